"""`lorakit bench longlora`: one LoRA training step with S2-Attn vs full attention, by sequence length.

A step is forward + backward (no optimizer update) of batch 1, LoRA on the attention projections,
gradient checkpointing on, full attention through SDPA (never eager: no [t, t] score matrix per
head). Each (length, side) point runs alone in its own subprocess (`python -m lorakit_bench.longlora
REQUEST`), which times `--warmup` + `--reps` steps and reports its peak RSS over the steps (VmHWM reset
after setup), so one point's allocations never hide in another's. A parent watches each child's RSS
and stops it at `max_rss_gib`: that point is reported as skipped, with the reason. Children run with
a fixed glibc mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536` unless set), so that peak RSS counts
tensors rather than heap fragmentation.

The attention part is timed apart: attention alone (forward + backward on random q, k, v of the
model's shape) x the number of layers, so "attn share" = that / the step. Gradient checkpointing runs
attention's forward once more, which this leaves out: the share is a lower bound.

Settings (--set KEY=VALUE): lengths=2048,4096,8192,16384; group_size_ratio=0.25; r=8;
targets=q_proj,k_proj,v_proj,o_proj; layers=N (keep the first N decoder layers; default: all);
attention_only=1 (time one layer's attention function alone, forward + backward, instead of a step);
group=N (a fixed S2 group of N tokens instead of the ratio: attention cost linear in the length);
max_rss_gib=6; model=default (or an HF folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lorakit_bench.settings import parse_settings

SIDES = ("full", "s2")
DEFAULTS = {"lengths": [2048, 4096, 8192, 16384], "group_size_ratio": 0.25, "r": 8,
            "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers": None, "attention_only": 0, "group": 0,
            "max_rss_gib": 6.0, "model": "default"}
QUICK = {"lengths": [32, 64], "r": 4, "model": "tiny"}
GIB = 1 << 30


def settings(items: list[str], quick: bool) -> dict:
    """DEFAULTS, then QUICK's under --quick, then each --set KEY=VALUE (lists comma-separated)."""
    found = parse_settings("longlora", items, DEFAULTS, QUICK if quick else None, parsers={"layers": int})
    for length in found["lengths"]:
        group = found["group"] or length * found["group_size_ratio"]
        if group != int(group) or int(group) % 2 or length % int(group):
            raise ValueError(f"bench longlora: length {length} x group_size_ratio {found['group_size_ratio']} "
                             "must give an even group that divides the length")
    return found


def run(args: argparse.Namespace) -> list[dict]:
    """Every length, both sides, each in its own subprocess; prints the table, returns the records."""
    from lorakit_bench.report import measured_environment, write_records
    from lorakit_bench.workload import Workload, resolve_model

    cfg = settings(args.set, args.quick)
    threads = args.threads or 2
    w = resolve_model(Workload(model=cfg["model"], threads=threads))
    records = []
    for length in cfg["lengths"]:
        load_before = os.getloadavg()[0]
        point = {"length": length}
        for side in SIDES:
            request = {"model_dir": w.model_dir, "side": side, "length": length, "reps": args.reps,
                       "warmup": args.warmup, "threads": threads, **{k: cfg[k] for k in
                       ("group_size_ratio", "r", "targets", "layers", "attention_only")}}  # fmt: skip
            if cfg["group"]:  # a fixed group size: the ratio follows the length
                request["group_size_ratio"] = min(1.0, cfg["group"] / length)
            point[side] = run_point(request, cfg["max_rss_gib"], memory=not args.no_memory)
        env = measured_environment(threads, load_before)
        record = {"suite": "longlora", **point, "ratios": ratios(point), "config": {**cfg, "reps": args.reps,
                  "warmup": args.warmup}, "env": env}  # fmt: skip
        records.append(record)
        if args.json:
            write_records(args.json, records)
    print(table(records))
    return records


def run_point(request: dict, max_rss_gib: float, memory: bool = True) -> dict:
    """One point in a fresh process, stopped (and reported as skipped) once its RSS passes the limit."""
    from lorakit_bench.measure import run_child

    result = run_child("lorakit_bench.longlora", request, request["threads"], max_rss_gib)
    if not memory:
        result.pop("peak_rss", None)
        result.pop("setup_peak_rss", None)
    return result


def ratios(point: dict) -> dict[str, float]:
    """full / s2 of the step time, the attention time and the peak RSS (where both sides ran)."""
    full, s2 = point["full"], point["s2"]
    return {k: full[k] / s2[k] for k in ("seconds", "attn_seconds", "peak_rss") if k in full and k in s2 and s2[k]}


def table(records: list[dict]) -> str:
    """Markdown: per length, each side's step time, attention share and peak RSS; full/S2; growth per doubling."""
    head = ("tokens", "full s", "S2 s", "full/S2", "attn share full", "attn share S2", "full attn s", "S2 attn s",
            "full MiB", "S2 MiB", "growth full", "growth S2")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(records):
        lines.append("| " + " | ".join(row(r, records[i - 1] if i else None)) + " |")
    skipped = [f"{r['length']} {side}: {r[side]['skipped']}" for r in records for side in SIDES if "skipped" in r[side]]
    return "\n".join(lines + [f"skipped: {s}" for s in skipped])


def row(r: dict, previous: dict | None) -> list[str]:
    def cell(side: str, key: str, spec: str, scale: float = 1) -> str:
        return format(r[side][key] / scale, spec) if key in r[side] else "-"

    def share(side: str) -> str:
        return format(r[side]["attn_seconds"] / r[side]["seconds"], ".0%") if "seconds" in r[side] else "-"

    def growth(side: str) -> str:
        if previous is None or "seconds" not in r[side] or "seconds" not in previous[side]:
            return "-"
        return format(r[side]["seconds"] / previous[side]["seconds"], ".2f") + "x"

    ratio = format(r["ratios"]["seconds"], ".2f") if "seconds" in r["ratios"] else "-"
    return [str(r["length"]), cell("full", "seconds", ".2f"), cell("s2", "seconds", ".2f"), ratio, share("full"),
            share("s2"), cell("full", "attn_seconds", ".2f"), cell("s2", "attn_seconds", ".2f"),
            cell("full", "peak_rss", ".0f", 1 << 20), cell("s2", "peak_rss", ".0f", 1 << 20), growth("full"),
            growth("s2")]


def measure_point(request: dict) -> dict:
    """In this (fresh) process: build the side, time its steps and its attention, report peak RSS."""
    import torch

    from lorakit.adapters.inject import inject
    from lorakit.config import LoraSpec
    from lorakit.data.encode import collate
    from lorakit.longlora import enable_s2_attention
    from lorakit.train.loop import loss_sum
    from lorakit.train.run import enable_checkpointing
    from lorakit_bench.measure import peak_rss_bytes, reset_peak_rss
    from lorakit_bench.workload import Workload, load_base

    torch.set_num_threads(request["threads"])
    torch.manual_seed(0)
    model = load_base(Workload(model_dir=request["model_dir"]))
    if request["layers"]:
        model.model.layers = model.model.layers[: request["layers"]]
        model.config.num_hidden_layers = len(model.model.layers)
    inject(model, LoraSpec(r=request["r"], alpha=2 * request["r"], targets=request["targets"]))
    if request["side"] == "s2":
        enable_s2_attention(model, request["group_size_ratio"])
    else:
        model.set_attn_implementation("sdpa")
    enable_checkpointing(model)
    model.train()
    length = request["length"]
    group = int(length * request["group_size_ratio"]) if request["side"] == "s2" else length
    if request["attention_only"]:  # one layer's attention alone, forward + backward
        setup = peak_rss_bytes()
        reset_peak_rss()
        attn = attention_seconds(model, length, request["reps"])
        return {"seconds": attn, "attn_seconds": attn, "attn_implementation": model.config._attn_implementation,
                "group": group, "attention_only": True, "peak_rss": peak_rss_bytes(), "setup_peak_rss": setup}
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = collate([(ids, ids)], model.config.pad_token_id or 0)

    def step() -> float:
        loss = loss_sum(model, batch) / (length - 1)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    setup = peak_rss_bytes()
    if not reset_peak_rss():
        setup = None
    seconds, loss = [], None
    for i in range(request["warmup"] + request["reps"]):
        t = time.perf_counter()
        loss = step()
        if i >= request["warmup"]:
            seconds.append(time.perf_counter() - t)
    peak = peak_rss_bytes()
    attn = attention_seconds(model, length, request["reps"]) * len(model.model.layers)
    return {"seconds": sorted(seconds)[len(seconds) // 2], "seconds_min": min(seconds), "loss": loss,
            "attn_seconds": attn, "attn_implementation": model.config._attn_implementation,
            "group": group, "peak_rss": peak, "setup_peak_rss": setup}


def attention_seconds(model, length: int, reps: int) -> float:
    """Median time of one layer's attention function alone, forward + backward, on random q, k, v."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = model.model.layers[0].self_attn
    config = model.config
    name = config._attn_implementation
    fn = ALL_ATTENTION_FUNCTIONS[name]
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, config.num_attention_heads, length, d, generator=g).requires_grad_()
    k, v = (torch.randn(1, config.num_key_value_heads, length, d, generator=g).requires_grad_() for _ in range(2))
    small = min(length, 64)  # one untimed call first: lazy initialisation stays out of the timing
    fn(attention, q[:, :, :small], k[:, :, :small], v[:, :, :small], None, scaling=d**-0.5)[0].sum().backward()
    q.grad = k.grad = v.grad = None
    times = []
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        out, _ = fn(attention, q, k, v, None, scaling=d**-0.5)
        out.sum().backward()
        times.append(time.perf_counter() - t)
        q.grad = k.grad = v.grad = None
    return sorted(times)[len(times) // 2]


def main(request: str) -> int:
    print(json.dumps(measure_point(json.loads(request))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
