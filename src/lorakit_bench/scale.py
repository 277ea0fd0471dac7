"""`lorakit bench scale`: memory and time at real model sizes (3B, 7B), lorakit beside its peers.

Random-weight Llama models of real shapes are built once (`bench.scale_models`, cached under
`$LORAKIT_CACHE/bench` or `--set dir=`), bf16 safetensors in 5 GB shards with the default model's
tokenizer. Each step then runs alone in a fresh process (`measure.run_child`), which reports its
own time and its peak resident set (VmHWM: everything the process ever held, imports included). The
bf16 LoRA steps are in the default run: each costs about a bf16 load plus one step, far from doubling it.

  ours-load-4bit   `lorakit.models.load(folder, quant={})`: NF4 + double quant as the weights are read
  ours-qlora-step  the same load as `lorakit train quant={}` (k-bit preparation, gradient checkpointing),
                   LoRA r=8 on every linear, one AdamW step on batch 1 x `seq` tokens
  ours-lora-step   the same as `lorakit train` without `quant` (the checkpoint's bf16, `dtype: auto`) plus
                   gradient checkpointing: every weight read once, then LoRA r=8 on every linear, one AdamW step
  ours-load-bf16   `lorakit.models.load(folder)` (dtype auto: the checkpoint's bf16), then every weight read once
  ours-merge       `lorakit merge` of a random r=8 all-linear adapter, shard by shard (output removed after)
  peer-qlora-step  transformers + bitsandbytes `load_in_4bit` (NF4, double quant, fp32 compute) + PEFT
                   (`prepare_model_for_kbit_training`, LoRA r=8 all-linear), one AdamW step, same batch
  peer-lora-step   transformers `from_pretrained(dtype=bfloat16)` + PEFT (gradient checkpointing, LoRA r=8
                   all-linear): every weight read once, then one AdamW step, same batch
  peer-load-bf16   transformers `from_pretrained(dtype=bfloat16, low_cpu_mem_usage=True)`, then every weight read
                   once (transformers memory-maps the shards: untouched weights are not resident)

Settings (--set KEY=VALUE): sizes=3b (any of 1b, 3b, 7b; tiny under --quick);
steps=ours-load-4bit,ours-qlora-step,ours-lora-step,ours-load-bf16,ours-merge;
peers=peer-qlora-step,peer-lora-step,peer-load-bf16
(peers=none: none); seq=64; r=8; dir= (model cache; default $LORAKIT_CACHE/bench); max_rss_gib=20.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from lorakit_bench.settings import parse_settings

GIB = 1 << 30
OURS = ("ours-load-4bit", "ours-qlora-step", "ours-lora-step", "ours-load-bf16", "ours-merge")
PEERS = ("peer-qlora-step", "peer-lora-step", "peer-load-bf16")
DEFAULTS = {"sizes": ["3b"], "steps": list(OURS), "peers": list(PEERS), "seq": 64, "r": 8, "dir": "",
            "max_rss_gib": 20.0}
QUICK = {"sizes": ["tiny"], "seq": 16, "r": 4, "max_rss_gib": 8.0}
PAIRS = {"qlora_step": ("ours-qlora-step", "peer-qlora-step"), "lora_step": ("ours-lora-step", "peer-lora-step"),
         "load_bf16": ("ours-load-bf16", "peer-load-bf16")}


def settings(items: list[str], quick: bool) -> dict:
    found = parse_settings("scale", items, DEFAULTS, QUICK if quick else None)
    found["peers"] = [p for p in found["peers"] if p != "none"]
    for key, known in (("steps", OURS), ("peers", PEERS)):
        unknown = [s for s in found[key] if s not in known]
        if unknown:
            raise ValueError(f"bench scale: unknown {key} {unknown}; choose from {', '.join(known)}")
    from lorakit_bench.scale_models import SHAPES

    unknown = [s for s in found["sizes"] if s not in SHAPES]
    if unknown:
        raise ValueError(f"bench scale: unknown sizes {unknown}; choose from {', '.join(SHAPES)}")
    return found


def run(args: argparse.Namespace) -> list[dict]:
    """Build (or find) each size's model, run every step in its own process, print a table, return records."""
    from lorakit.models import cache_dir, resolve
    from lorakit_bench.measure import run_child
    from lorakit_bench.report import measured_environment, write_records
    from lorakit_bench.scale_models import build_model

    cfg = settings(args.set, args.quick)
    threads = args.threads or 2
    root = Path(cfg["dir"]) if cfg["dir"] else None
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="lorakit-scale-")) if args.quick else cache_dir() / "bench"
    records = []
    try:
        for size in cfg["sizes"]:
            folder = build_model(root, size, tokenizer_dir=resolve("default"), log=print)
            load_before = os.getloadavg()[0]
            steps = {}
            for step in [*cfg["steps"], *cfg["peers"]]:
                request = {"step": step, "model": str(folder / "model"), "adapter": str(folder / "adapter"),
                           "seq": cfg["seq"], "r": cfg["r"], "threads": threads}
                print(f"{size} {step} ...", flush=True)
                steps[step] = run_child("lorakit_bench.scale", request, threads, cfg["max_rss_gib"])
                print(json.dumps(steps[step]), flush=True)  # a long run keeps what it measured if stopped
            records.append(make_record(size, folder / "model", steps, cfg, measured_environment(threads, load_before)))
            print(table(records[-1]) + "\n", flush=True)
            if args.json:
                write_records(args.json, records)
    finally:
        if args.quick and not cfg["dir"]:
            shutil.rmtree(root, ignore_errors=True)
    return records


def make_record(size: str, model: Path, steps: dict, cfg: dict, env: dict) -> dict:
    """One size's steps, the model's sizes, ours / peer ratios, and the issue's targets checked."""
    shards = sorted(model.glob("*.safetensors"))
    sizes = {"bf16_bytes": sum(f.stat().st_size for f in shards), "largest_shard_bytes":
             max(f.stat().st_size for f in shards), "shards": len(shards),
             "tensor_bytes": sum(f.stat().st_size - 8 - header_length(f) for f in shards)}  # fmt: skip
    four = steps.get("ours-load-4bit", steps.get("ours-qlora-step", {})).get("weight_bytes")
    if four:
        sizes["4bit_bytes"] = four
    return {"suite": "scale", "size": size, "steps": steps, "model": sizes, "ratios": ratios(steps),
            "targets": targets(size, steps, sizes), "config": cfg, "env": env}


def header_length(file: Path) -> int:
    with open(file, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def ratios(steps: dict) -> dict[str, dict[str, float]]:
    """ours / peer of seconds, whole-process seconds and peak RSS, for each pair that both ran."""
    found = {}
    for name, (ours, peer) in PAIRS.items():
        a, b = steps.get(ours, {}), steps.get(peer, {})
        r = {k: a[k] / b[k] for k in ("seconds", "process_s", "peak_rss") if k in a and k in b and b[k]}
        if r:
            found[name] = r
    return found


def targets(size: str, steps: dict, sizes: dict) -> dict[str, dict]:
    """The issue's targets where this run measured them: {name: {value, limit, met}} (bytes or ratios)."""
    found = {}

    def check(name: str, value: float | None, limit: float | None) -> None:
        if value is not None and limit is not None:
            found[name] = {"value": value, "limit": limit, "met": value <= limit}

    qlora = steps.get("ours-qlora-step", {})
    peer = steps.get("peer-qlora-step", {})
    if size == "3b":
        check("3b qlora peak_rss <= 4 GiB", qlora.get("peak_rss"), 4 * GIB)
        if "seconds" in qlora and "seconds" in peer:
            check("3b qlora load+step seconds < peer's", qlora["seconds"] / peer["seconds"], 1.0)
    if size == "7b" and "4bit_bytes" in sizes:
        check("7b qlora peak_rss <= 1.3 x 4-bit size + 1 GiB", qlora.get("peak_rss"), 1.3 * sizes["4bit_bytes"] + GIB)
    lora = steps.get("ours-lora-step", {})
    if size == "3b" and "peak_rss" in lora and "loaded_peak_rss" in lora:
        activations = lora["peak_rss"] - lora["loaded_peak_rss"]  # what the step adds over the loaded model
        check("3b lora peak_rss <= 1.2 x bf16 size + activations", lora["peak_rss"],
              1.2 * sizes["bf16_bytes"] + activations)
    merge = steps.get("ours-merge", {})
    if size in ("3b", "7b"):
        check(f"{size} merge peak_rss <= largest shard + 2 GiB", merge.get("peak_rss"),
              sizes["largest_shard_bytes"] + 2 * GIB)
    return found


COLUMNS = ("step", "seconds", "load s", "step s", "process s", "peak RSS GiB", "notes")


def table(record: dict) -> str:
    """Markdown: one row per step, then the model's sizes, ratios and targets."""
    m = record["model"]
    lines = [f"### scale {record['size']}: bf16 {m['bf16_bytes'] / GIB:.2f} GiB in {m['shards']} shard(s), "
             f"largest {m['largest_shard_bytes'] / GIB:.2f} GiB"
             + (f", 4-bit model {m['4bit_bytes'] / GIB:.2f} GiB" if "4bit_bytes" in m else ""), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for step, r in record["steps"].items():
        cell = lambda key, spec, scale=1, r=r: format(r[key] / scale, spec) if key in r else "-"
        notes = r.get("skipped") or (f"loss {r['loss']:.3f}" if "loss" in r else "")
        if "loaded_peak_rss" in r:
            added = (r["peak_rss"] - r["loaded_peak_rss"]) / GIB
            notes += f"; loaded {r['loaded_peak_rss'] / GIB:.2f} GiB, the step adds {added:.2f}"
        lines.append("| " + " | ".join([step, cell("seconds", ".1f"), cell("load_s", ".1f"), cell("step_s", ".1f"),
                                        cell("process_s", ".1f"), cell("peak_rss", ".2f", GIB), notes]) + " |")
    for name, r in record["ratios"].items():
        lines.append(f"\nlorakit / peer, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    for name, t in record["targets"].items():
        value = f"{t['value'] / GIB:.2f} GiB" if t["limit"] > 100 else f"{t['value']:.2f}"
        limit = f"{t['limit'] / GIB:.2f} GiB" if t["limit"] > 100 else f"{t['limit']:.2f}"
        lines.append(f"\ntarget {name}: {value} (limit {limit}): {'met' if t['met'] else 'NOT met'}")
    lines.append(f"\nload average (1 min) {record['env']['loadavg_1m_before']:.2f} before, "
                 f"{record['env']['loadavg_1m_after']:.2f} after; {record['env']['date']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the child process


def measure_step(request: dict) -> dict:
    """In this (fresh) process: run one step, return its seconds and this process's peak RSS."""
    import torch

    from lorakit_bench.measure import peak_rss_bytes

    torch.set_num_threads(request["threads"])
    torch.manual_seed(0)
    start = time.perf_counter()
    result = STEPS[request["step"]](request)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = peak_rss_bytes()
    return result


def ours_load_4bit(request: dict) -> dict:
    from lorakit.models import load
    from lorakit_bench.workload import weight_mib

    model, _ = load(request["model"], quant={})
    return {"weight_bytes": int(weight_mib(model)["base_weight_mib"] * (1 << 20))}


def ours_load_bf16(request: dict) -> dict:
    from lorakit.models import load
    from lorakit_bench.workload import weight_mib

    model, _ = load(request["model"])
    return {"weight_bytes": int(weight_mib(model)["base_weight_mib"] * (1 << 20)), "dtype": str(model.dtype),
            **touch(model)}


def touch(model) -> dict:
    """Read every weight once: transformers memory-maps safetensors, so its weights become resident (and count
    in RSS) only when first used; this makes both sides' peak RSS that of a model whose weights were all read."""
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    return {"touch_s": time.perf_counter() - start}


def ours_lora_step(request: dict, quant: bool) -> dict:
    """As `lorakit train base=FOLDER lora.r=R` builds its model (`quant={}`: 4-bit; else the checkpoint's bf16
    with gradient checkpointing, which `quant` turns on by default), then one step."""
    import lorakit
    from lorakit.config import load_train_config
    from lorakit.train.loop import loss_sum
    from lorakit.train.run import load_base
    from lorakit_bench.ours import train_step_task
    from lorakit_bench.workload import Workload, make_batch, supervised_tokens, weight_mib

    r = request["r"]
    start = time.perf_counter()
    cfg = load_train_config(None, [f"base={request['model']}", "quant={}" if quant else "gradient_checkpointing=true",
                                   f"lora.r={r}", f"lora.alpha={2 * r}", "lora.targets=all-linear", "lora.dropout=0"])
    model, _ = load_base(cfg)
    weight_bytes = int(weight_mib(model)["base_weight_mib"] * (1 << 20))  # the base as stored, before LoRA
    lorakit.inject(model, cfg.lora)
    model.train()
    loaded = {} if quant else loaded_peak(model)
    load_s = time.perf_counter() - start
    batch = make_batch(Workload(batch=1, seq=request["seq"]), model.config.vocab_size)
    n = supervised_tokens(batch)
    task = train_step_task(model, batch, 1e-4, lambda: loss_sum(model, batch) / n)
    return {"load_s": load_s, "weight_bytes": weight_bytes, **loaded, **timed(task.run)}


def peer_lora_step(request: dict, quant: bool) -> dict:
    """PEFT's recipe (`bench.peers.peft_train`), then one step: `quant`: transformers + bitsandbytes' QLoRA
    (fp32 compute); else a bf16 `from_pretrained` (transformers 5 always loads as `low_cpu_mem_usage=True` did)
    with gradient checkpointing."""
    from lorakit_bench.peers import peft_train
    from lorakit_bench.workload import Workload

    r = request["r"]
    w = Workload(model_dir=request["model"], batch=1, seq=request["seq"], r=r, alpha=2.0 * r, checkpointing=True,
                 dtype="float32" if quant else "bfloat16")
    start = time.perf_counter()
    task = peft_train(w, quantized=quant)
    loaded = {} if quant else loaded_peak(task.keep[0])
    return {"load_s": time.perf_counter() - start, **loaded, **timed(task.run)}


def loaded_peak(model) -> dict:
    """The peak RSS with the model loaded and every weight read once (both sides may memory-map the shards,
    whose pages count only once read), before the step: the step's own addition (activations, gradients,
    optimizer state) is `peak_rss - loaded_peak_rss`."""
    from lorakit_bench.measure import peak_rss_bytes

    if model is not None:
        touch(model)
    return {"loaded_peak_rss": peak_rss_bytes()}


def timed(run) -> dict:
    start = time.perf_counter()
    extras = run() or {}
    return {"step_s": time.perf_counter() - start, **extras}


def peer_load_bf16(request: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.bfloat16, low_cpu_mem_usage=True)
    return {"dtype": str(model.dtype), **touch(model)}


def ours_merge(request: dict) -> dict:
    from lorakit.adapters.io import read_adapter
    from lorakit.export import write_merged_streamed

    out = Path(request["adapter"]).parent / "merged"
    try:
        write_merged_streamed(request["model"], read_adapter(request["adapter"]), out)
        written = sum(f.stat().st_size - 8 - header_length(f) for f in out.glob("*.safetensors"))  # tensor data
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"written_bytes": written}


STEPS = {"ours-load-4bit": ours_load_4bit, "ours-qlora-step": partial(ours_lora_step, quant=True),
         "ours-lora-step": partial(ours_lora_step, quant=False), "ours-load-bf16": ours_load_bf16,
         "ours-merge": ours_merge, "peer-qlora-step": partial(peer_lora_step, quant=True),
         "peer-lora-step": partial(peer_lora_step, quant=False), "peer-load-bf16": peer_load_bf16}


def main(request: str) -> int:
    print(json.dumps(measure_step(json.loads(request))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
