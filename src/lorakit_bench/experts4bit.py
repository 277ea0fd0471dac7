"""`python -m lorakit_bench.experts4bit [RUNS]`: 4-bit vs full-precision mixture-of-experts weights, timed.

One Mixtral-like experts module (8 experts, hidden 512, ff 1024, 512 tokens routed top-2 by fixed random
weights), on the CPU: the forward without adapter, and the forward and forward + backward of an r=8 expert
adapter, over full-precision experts (transformers' grouped matmuls; with the adapter, `W + delta` of every
expert, as PEFT does) and over `Experts4bit` (one routed-to expert dequantized at a time). The two sides
alternate run by run, so changes in the load of a shared machine hit both; each figure is the fastest of
RUNS (default 15) after a warm-up, and the ratio is 4-bit / full precision.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    import lorakit
    from lorakit.quant.linear4bit import quantize_model

    runs = int(argv[0]) if argv else 15
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                           num_attention_heads=8, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    full = AutoModelForCausalLM.from_config(config).eval()
    four_bit = quantize_model(copy.deepcopy(full))
    for model in (full, four_bit):
        lorakit.inject(model, lorakit.LoraSpec(r=8, alpha=16, targets=["experts"]))
    x = torch.randn(512, 512)
    weights, index = torch.softmax(torch.randn(512, 8), -1).topk(2, -1)

    def step(model, backward: bool) -> None:
        experts = model.model.layers[0].mlp.experts
        if backward:
            experts(x, index, weights).square().mean().backward()
        else:
            with torch.no_grad():
                experts(x, index, weights)

    def fastest(backward: bool) -> tuple[float, float]:
        step(full, backward), step(four_bit, backward)
        times = ([], [])
        for _ in range(runs):
            for model, got in zip((full, four_bit), times, strict=True):
                start = time.perf_counter()
                step(model, backward)
                got.append(time.perf_counter() - start)
        return min(times[0]), min(times[1])

    rows = [("adapter, forward", False), ("adapter, forward + backward", True)]
    results = [(label, *fastest(backward)) for label, backward in rows]
    for model in (full, four_bit):
        lorakit.set_active(model, [])
    results.append(("no adapter, forward", *fastest(False)))
    for label, a, b in results:
        print(f"{label}: full precision {a * 1e3:.1f} ms, 4-bit {b * 1e3:.1f} ms, ratio {b / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
