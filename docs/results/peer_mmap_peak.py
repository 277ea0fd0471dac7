"""RSS of the PEFT side's load (`from_pretrained` of the default model) before and after touching every weight:
the weights stay memory-mapped, paged in at first use (docs/BENCHMARKS.md, the no-regression re-run).

Run: `.venv/bin/python docs/results/peer_mmap_peak.py`.
"""

import torch

from lorakit_bench.workload import Workload, load_base, resolve_model


def memory_mib() -> dict[str, int]:
    """This process's VmHWM, VmRSS and its anonymous / file-backed parts, MiB."""
    with open("/proc/self/status") as f:
        fields = [line.split() for line in f if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile"))]
    return {name.rstrip(":"): int(kb) // 1024 for name, kb, _unit in fields}


if __name__ == "__main__":
    w = resolve_model(Workload())
    print("imports", memory_mib())
    model = load_base(w)
    print("from_pretrained", memory_mib())
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())
    print("after touching every weight", memory_mib())
