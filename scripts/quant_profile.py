"""Where the time of NF4 quantization (double quantization on) goes on the CPU, step by step, beside bitsandbytes.

    PYTHONPATH=src .venv/bin/python scripts/quant_profile.py [--threads 2] [--reps 7] [--before FILE]

Cases: one 11008 x 4096 bf16 weight (a Llama-2-7B MLP weight) read from a safetensors file, and every linear
weight of one 3B layer (Llama 3.2 3B: q/o 3072 x 3072, k/v 1024 x 3072, gate/up 8192 x 3072, down 3072 x 8192).
Each repetition runs, in turn, in this one process: lorakit's `quantize_4bit`, bitsandbytes'
`quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")` on the CPU, the older quantizer
given by --before (a copy of an older `quant/nf4.py`, e.g. `git show afd4a92:src/lorakit/quant/nf4.py`), then
each step of lorakit's quantizer (and of the older one, if its steps are those of afd4a92) timed on its own.
Prints medians of wall time and of the process's CPU time (all its threads), and checks that the bytes
are bitsandbytes'. A measuring script beside the library: it imports bitsandbytes, which lorakit never does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LAYER_3B = {"q": (3072, 3072), "k": (1024, 3072), "v": (1024, 3072), "o": (3072, 3072),
            "gate": (8192, 3072), "up": (8192, 3072), "down": (3072, 8192)}  # fmt: skip


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Clock:
    """Sums of wall and process-CPU seconds by name, for the current repetition; medians over repetitions."""

    def __init__(self) -> None:
        self.runs: list[dict[str, tuple[float, float]]] = []

    def new_rep(self) -> None:
        self.runs.append({})

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        w, c = self.runs[-1].get(name, (0.0, 0.0))
        self.runs[-1][name] = (w + time.perf_counter() - wall, c + time.process_time() - cpu)

    def medians(self) -> dict[str, tuple[float, float]]:
        names = list(dict.fromkeys(n for run in self.runs for n in run))
        return {n: (statistics.median(r[n][0] for r in self.runs if n in r),
                    statistics.median(r[n][1] for r in self.runs if n in r)) for n in names}  # fmt: skip


def timed_chunks(nf4, w: torch.Tensor, clock: Clock, prefix: str, pack) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk loop both quantizers share, each step timed: to fp32, absmax and scale, then `pack(part, am,
    scaled)` (a version's own steps, timed inside it) -> the chunk's packed bytes. Returns (packed, absmax)."""
    flat, chunk, packed, absmax = w.reshape(-1), nf4.QUANTIZE_CHUNK, [], []
    for start in range(0, flat.numel(), chunk):
        with clock(f"{prefix}to fp32"):
            part = flat[start : start + chunk].float()
        with clock(f"{prefix}absmax + scale (+ clamp)"):
            am, scaled = nf4._scale_blocks(part, 64)
        packed.append(pack(part, am, scaled))
        absmax.append(am)
    with clock(f"{prefix}concatenate chunks"):
        return torch.cat(packed), torch.cat(absmax)


def steps_now(nf4, weights: list[torch.Tensor], clock: Clock, prefix: str) -> None:
    """lorakit's quantize_4bit (NF4, blocksize 64, double quantization), one step at a time."""
    lookup = nf4._code_lookup("nf4", torch.device("cpu"))

    def pack(part: torch.Tensor, am: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        with clock(f"{prefix}NaN/Inf check"):
            math.isfinite(am.max())
        with clock(f"{prefix}nearest code (lookup table)"):
            q = nf4._nearest_code(scaled, lookup)
        with clock(f"{prefix}pack two codes a byte"):
            return torch.add(q[1::2], q[0::2], alpha=16)

    for w in weights:
        _packed, am = timed_chunks(nf4, w, clock, prefix, pack)
        state = nf4.QuantState(am, w.shape, w.dtype, 64, "nf4", nf4.code_book("nf4"))
        with clock(f"{prefix}double quantization"):
            nf4._double_quantize(state)


def steps_afd4a92(nf4, weights: list[torch.Tensor], clock: Clock, prefix: str) -> None:
    """The quantizer of commit afd4a92 (chunks of 2^20, bucketize), one step at a time."""
    code = nf4.code_book("nf4")

    def pack(part: torch.Tensor, am: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        with clock(f"{prefix}pad to even"):
            scaled = F.pad(scaled, (0, part.numel() % 2))
        with clock(f"{prefix}nearest code (bucketize + order)"):
            q = nf4._nearest_code(scaled, code)
        with clock(f"{prefix}to uint8"):
            q = q.to(torch.uint8)
        with clock(f"{prefix}pack two codes a byte"):
            return q[0::2] << 4 | q[1::2]

    for w in weights:
        _packed, am = timed_chunks(nf4, w, clock, prefix, pack)
        with clock(f"{prefix}NaN/Inf check"):
            bool(torch.isfinite(am).all())
        state = nf4.QuantState(am, w.shape, w.dtype, 64, "nf4", code)
        with clock(f"{prefix}double quantization"):
            nf4._double_quantize(state)


def same_bytes(ours, bnb_out) -> bool:
    (packed, state), (ref_packed, ref) = ours, bnb_out
    raw = lambda t: t.reshape(-1).view(torch.uint8)
    return all(torch.equal(raw(a), raw(b)) for a, b in [(packed, ref_packed), (state.absmax, ref.absmax),
               (state.nested_absmax, ref.state2.absmax), (state.offset.reshape(1), ref.offset.reshape(1))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--before", help="an older quant/nf4.py to time beside (e.g. from git show)")
    parser.add_argument("--cases", default="weight,layer", help="weight (11008 x 4096), layer (a 3B layer)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.disable = True  # bnb wraps some CPU paths in torch.compile; eager here

    import bitsandbytes.functional as bnbf
    from safetensors.torch import save_file

    from lorakit.quant import nf4
    from lorakit.stream import read_header, read_tensor

    before = load_module(args.before, "nf4_before") if args.before else None
    g = torch.Generator().manual_seed(0)
    cases = {"weight": {"w": (11008, 4096)}, "layer": LAYER_3B}
    tmp = tempfile.TemporaryDirectory()  # the safetensors files read back; removed at exit
    for case in args.cases.split(","):
        weights = [(torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for shape in cases[case].values()]
        file = Path(tmp.name) / f"{case}.safetensors"
        save_file({f"w{i}": w for i, w in enumerate(weights)}, file)
        header = read_header(file)
        ok = all(same_bytes(nf4.quantize_4bit(w),
                            bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
                 for w in weights)  # fmt: skip
        clock = Clock()
        load = [os.getloadavg()[0]]
        for _ in range(args.reps):
            clock.new_rep()
            with open(file, "rb") as f, clock("read (positioned read, safetensors)"):
                for entry in header.values():
                    read_tensor(f, entry)
            with clock("= lorakit quantize_4bit"):
                for w in weights:
                    nf4.quantize_4bit(w)
            with clock("= bitsandbytes quantize_4bit"):
                for w in weights:
                    bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            if before is not None:
                with clock("= before quantize_4bit"):
                    for w in weights:
                        before.quantize_4bit(w)
            steps_now(nf4, weights, clock, "  lorakit: ")
            if before is not None and hasattr(before, "_nearest_code") and not hasattr(before, "_code_lookup"):
                steps_afd4a92(before, weights, clock, "  before: ")
        load.append(os.getloadavg()[0])
        n = sum(w.numel() for w in weights)
        print(f"\n{case}: {len(weights)} bf16 weight(s), {n / 1e6:.1f} M values; {args.reps} repetitions, "
              f"{torch.get_num_threads()} torch threads, load average {load[0]:.1f} -> {load[1]:.1f}; "
              f"bytes equal bitsandbytes': {ok}")
        medians = clock.medians()
        bnb = medians["= bitsandbytes quantize_4bit"]
        print(f"{'step':46s} {'wall ms':>9s} {'CPU ms':>9s} {'wall / bnb':>10s}")
        for name, (wall, cpu) in medians.items():
            print(f"{name:46s} {wall * 1e3:9.1f} {cpu * 1e3:9.1f} {wall / bnb[0]:10.3f}")


if __name__ == "__main__":
    main()
