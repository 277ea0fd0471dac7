"""`python -m lorakit_bench.memory REQUEST`: build one side of one scenario alone, run it, print its peak RSS.

REQUEST is a JSON object {"scenario", "side", "workload", "runs"}; the answer is one JSON line
{"setup_peak_rss", "peak_rss"} in bytes on stdout.
"""

from __future__ import annotations

import json
import sys


def main(request: str) -> int:
    import torch

    from lorakit_bench.measure import measure_memory_here
    from lorakit_bench.scenarios import sides_of
    from lorakit_bench.workload import Workload

    spec = json.loads(request)
    w = Workload(**spec["workload"])
    torch.set_num_threads(w.threads)
    task = sides_of(spec["scenario"], w)[spec["side"]](w)
    print(json.dumps(measure_memory_here(task, spec["runs"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
