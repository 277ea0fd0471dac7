"""`lorakit bench gpu`: the Triton kernels and GPU training against their baselines (CUDA only).

Parts (each a record; a table with ratios is printed):
  copy        the device's measured copy bandwidth (bf16 tensor copy): the unit for dequantization
  dequant     NF4 + double-quant -> bf16 of a [size, size] weight: GB/s moved (packed + absmax in,
              bf16 out) and its fraction of `copy` (target >= 0.7); also the plain PyTorch reference
              and bitsandbytes' `dequantize_4bit` when it imports
  decode      y = x W^T for x [rows, size], W [size, size]: lorakit's fused 4-bit matmul vs bf16
              `torch.matmul` (target: faster at batch 1) and bitsandbytes' `matmul_4bit`
  multi       LoRA delta for 16 rows through 8 adapters (BGMV decode, SGMV prefill) vs all rows
              through one adapter (target <= 1.1x)
  train       LoRA and QLoRA training steps on the default model (bf16): tokens/s and peak CUDA
              memory, lorakit vs PEFT (+ bitsandbytes), each side built, timed and freed alone;
              AdamW, r=16 on every linear, no gradient checkpointing on either side

Settings (`--set KEY=VALUE`): size (4096; --quick 1024), rank (16), adapters (8), rows (16),
prefill (128: tokens per row for SGMV), inner (20: calls per timed repetition of a kernel),
kernels (1: the copy/dequant/decode/multi parts; 0: skip), train (1: the training part; 0: skip), batch (8),
seq (512), model (default: the default model; or an HF folder, e.g. one `workload.write_shaped_model`
wrote). --quick: small sizes and the tiny random model, seconds. Kernel times are CUDA-event medians
over --reps repetitions.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import time
from pathlib import Path

from lorakit_bench.settings import parse_settings

MIB = 1 << 20
DEFAULTS = {"size": 4096, "rank": 16, "adapters": 8, "rows": 16, "prefill": 128, "inner": 20, "kernels": 1,
            "train": 1, "batch": 8, "seq": 512, "model": "default"}


def settings(args: argparse.Namespace) -> dict:
    quick = dict(size=1024, prefill=16, inner=5, batch=2, seq=64) if args.quick else None
    return parse_settings("gpu", getattr(args, "set", None), DEFAULTS, quick)


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from lorakit import kernels

    if not torch.cuda.is_available():
        raise ValueError("lorakit bench gpu needs a CUDA device (torch.cuda.is_available() is False here); "
                         "the kernels' correctness tests run without one: pytest tests/test_triton_kernels.py")
    if not kernels.triton_available():
        raise ValueError("lorakit bench gpu needs triton (pip install triton)")
    s = settings(args)
    reps, warmup = max(args.reps, 1), max(args.warmup, 1)
    env = environment()
    print(f"device: {env['device']}, driver {env['driver']}, torch {env['torch']}, triton {env['triton']}, "
          f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}")
    records = []
    if s["kernels"]:
        records += bench_kernels(s, reps, warmup)
    if s["train"]:
        records += bench_train(s, args.quick, reps, warmup, memory=not args.no_memory)
    for r in records:
        r.update(suite="gpu", settings=s, env=env)
    print(table(records))
    if args.json:
        from lorakit_bench.report import write_records

        write_records(args.json, records)
    return records


# ---- kernels ------------------------------------------------------------------------------------


def median_ms(fn, reps: int, warmup: int, inner: int, device: str = "cuda") -> float:
    """Median milliseconds of one call of `fn`, each repetition timing `inner` calls (by CUDA events on
    CUDA; by the wall clock elsewhere, which is only how the tests run this code through the interpreter)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device != "cuda":
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - start) * 1e3 / inner)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def bnb_or_none():
    try:
        return importlib.import_module("bitsandbytes")
    except Exception:  # noqa: BLE001 (not installed, or no CUDA build: the comparison is left out)
        return None


def bench_kernels(s: dict, reps: int, warmup: int, device: str = "cuda") -> list[dict]:
    """The copy, dequant, decode and multi parts (`device` other than cuda: only for the tests)."""
    import torch
    import torch.nn.functional as F

    from lorakit.kernels.triton_lora import lora_bgmv, lora_sgmv, stack_adapters
    from lorakit.kernels.triton_matmul4bit import matmul_4bit
    from lorakit.kernels.triton_nf4 import dequantize_4bit_triton
    from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit

    n, inner, dev = s["size"], s["inner"], device
    time_it = lambda fn: median_ms(fn, reps, warmup, inner, dev)
    records = []

    src = torch.empty(n * n, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    copy_ms = time_it(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 2 / copy_ms / 1e6
    records.append({"part": "copy", "name": f"bf16 copy {n}x{n}", "ms": copy_ms, "gb_per_s": copy_gbs})

    w = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    moved = packed.numel() + state.absmax.numel() + 4 * state.nested_absmax.numel() + 2 * n * n  # bytes
    sides = {"lorakit triton": lambda: dequantize_4bit_triton(packed, state, torch.bfloat16),
             "lorakit plain torch": lambda: dequantize_4bit(packed, state, torch.bfloat16)}
    bnb = bnb_or_none()
    if bnb is not None:
        b_packed, b_state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        sides["bitsandbytes"] = lambda: bnb.functional.dequantize_4bit(b_packed, b_state)
    for name, fn in sides.items():
        ms = time_it(fn)
        gbs = moved / ms / 1e6
        records.append({"part": "dequant", "name": name, "ms": ms, "gb_per_s": gbs, "of_copy": gbs / copy_gbs})

    w_bf16 = dequantize_4bit_triton(packed, state, torch.bfloat16)
    for rows in (1, s["rows"]):
        x = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
        base_ms = time_it(lambda x=x: torch.matmul(x, w_bf16.T))
        sides = {"bf16 torch.matmul": None, "lorakit fused 4-bit": lambda x=x: matmul_4bit(x, packed, state),
                 "lorakit dequant + matmul": lambda x=x: F.linear(x, dequantize_4bit_triton(packed, state, x.dtype))}
        if bnb is not None:
            sides["bitsandbytes matmul_4bit"] = lambda x=x: bnb.matmul_4bit(x, b_packed.t(), quant_state=b_state)
        for name, fn in sides.items():
            ms = base_ms if fn is None else time_it(fn)
            records.append({"part": "decode", "name": f"{name}, {rows} row(s)", "ms": ms, "over_bf16": ms / base_ms})

    g = torch.Generator(device=dev).manual_seed(0)
    ranks = [s["rank"]] * s["adapters"]
    lora_A = [torch.randn(r, n, device=dev, dtype=torch.bfloat16, generator=g) * 0.01 for r in ranks]
    lora_B = [torch.randn(n, r, device=dev, dtype=torch.bfloat16, generator=g) * 0.01 for r in ranks]
    a_stack, b_stack, rk = stack_adapters(lora_A, lora_B)
    scales = torch.ones(s["adapters"], device=dev)
    rows, per_row = s["rows"], s["prefill"]
    mixed = torch.arange(rows, device=dev, dtype=torch.int32) % s["adapters"]
    single = torch.zeros(rows, device=dev, dtype=torch.int32)
    x1 = torch.randn(rows, n, device=dev, dtype=torch.bfloat16)
    y1 = torch.zeros(rows, n, device=dev, dtype=torch.bfloat16)
    xp = torch.randn(rows * per_row, n, device=dev, dtype=torch.bfloat16)
    yp = torch.zeros(rows * per_row, n, device=dev, dtype=torch.bfloat16)
    seg_start = torch.arange(rows + 1, device=dev, dtype=torch.int32) * per_row
    for kind in ("BGMV decode", "SGMV prefill"):
        times = {}
        for label, adapter in (("1 adapter", single), (f"{s['adapters']} adapters", mixed)):
            if kind.startswith("BGMV"):
                fn = lambda a=adapter: lora_bgmv(y1, x1, a_stack, b_stack, rk, scales, a)
            else:
                fn = lambda a=adapter: lora_sgmv(yp, xp, a_stack, b_stack, rk, scales, seg_start, a, max_len=per_row)
            times[label] = time_it(fn)
        one = times["1 adapter"]
        for label, ms in times.items():
            records.append({"part": "multi", "name": f"{kind}, {rows} rows, {label}", "ms": ms,
                            "over_single": ms / one})
    return records


# ---- training -----------------------------------------------------------------------------------


def bench_train(s: dict, quick: bool, reps: int, warmup: int, memory: bool) -> list[dict]:
    import dataclasses

    import torch

    from lorakit_bench.workload import QUICK, Workload, resolve_model

    w = Workload(model=s["model"], dtype="bfloat16", batch=s["batch"], seq=s["seq"])
    if quick:
        w = dataclasses.replace(w, **{**QUICK, "batch": s["batch"], "seq": s["seq"]})
    w = resolve_model(w)
    records = []
    for quantized in (False, True):
        kind = "QLoRA" if quantized else "LoRA"
        sides = {"lorakit": lambda q=quantized: lorakit_task(w, q)}
        if importlib.util.find_spec("peft") is not None and (not quantized or bnb_or_none() is not None):
            sides["PEFT" + (" + bitsandbytes" if quantized else "")] = lambda q=quantized: peft_task(w, q)
        found = {}
        for name, build in sides.items():
            step = build()
            for _ in range(warmup):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                step()  # ends in loss.item(): synchronized
                times.append(time.perf_counter() - start)
            sec = statistics.median(times)
            found[name] = {"part": "train", "name": f"{kind}: {name}", "seconds": sec, "tokens_per_s": w.tokens / sec,
                           **({"peak_mib": torch.cuda.max_memory_allocated() / MIB} if memory else {})}
            del step
            torch.cuda.empty_cache()
        ours = found["lorakit"]
        for rec in found.values():
            rec["speed_vs_lorakit"] = rec["tokens_per_s"] / ours["tokens_per_s"]
        records += found.values()
    return records


def lorakit_task(w, quantized: bool, device: str = "cuda"):
    """One lorakit LoRA/QLoRA (NF4 + double quant) training step on `device`, as `lorakit train` sets it up."""

    import lorakit
    from lorakit.config import QuantConfig, TrainConfig
    from lorakit.models import load_weights
    from lorakit.quant.linear4bit import quant_record
    from lorakit.train.loop import loss_sum
    from lorakit.train.run import prepare_base
    from lorakit_bench.ours import lora_spec
    from lorakit_bench.workload import make_batch, supervised_tokens

    quant = QuantConfig(type="nf4", double_quant=True, blocksize=64, compute_dtype=w.dtype) if quantized else None
    model = load_weights(Path(w.model_dir), quant_record(quant), w.torch_dtype, device)  # 4-bit as it is read,
    model.requires_grad_(False)  # on the device, as `lorakit train`
    prepare_base(model, TrainConfig(quant=quant, gradient_checkpointing=w.checkpointing))  # off, as PEFT's side
    lorakit.inject(model, lora_spec(w))
    model.train()
    batch = {k: v.to(device) for k, v in make_batch(w, model.config.vocab_size).items()}
    n = supervised_tokens(batch)
    return step_fn(model, lambda: loss_sum(model, batch) / n, w.lr)


def peft_task(w, quantized: bool, device: str = "cuda"):
    """PEFT's LoRA step (on transformers' bitsandbytes NF4 + double-quant base when `quantized`) on `device`."""
    from lorakit_bench.peers import need, peft_config
    from lorakit_bench.workload import load_base, make_batch

    peft = need("peft")
    if quantized:
        need("bitsandbytes")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=w.torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=w.torch_dtype, quantization_config=config,
                                                     device_map={"": device})
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_base(w).to(device)
    model = peft.get_peft_model(model, peft_config(w))
    model.train()
    batch = {k: v.to(device) for k, v in make_batch(w, model.config.vocab_size).items()}
    return step_fn(model, lambda: model(**batch, use_cache=False).loss, w.lr)


def step_fn(model, loss_fn, lr: float):
    """One AdamW step on the trainable parameters; ends with `loss.item()` (a device sync)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


# ---- report -------------------------------------------------------------------------------------


def environment() -> dict:
    import torch

    from lorakit_bench.peers import version

    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"device": torch.cuda.get_device_name(), "driver": driver, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": version("triton"), "bitsandbytes": version("bitsandbytes"),
            "peft": version("peft"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(records: list[dict]) -> str:
    cols = ("ms", "gb_per_s", "of_copy", "over_bf16", "over_single", "tokens_per_s", "peak_mib", "speed_vs_lorakit")
    lines = [f"{'part':8} {'name':44} " + " ".join(f"{c:>16}" for c in cols)]
    for r in records:
        cells = " ".join(f"{r[c]:>16.4g}" if c in r else f"{'':>16}" for c in cols)
        lines.append(f"{r['part']:8} {r['name'][:44]:44} {cells}")
    return "\n".join(lines)
