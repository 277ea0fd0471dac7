"""`lorakit bench ddp`: one training step on 1 process vs N processes (DDP, gloo on the CPU).

Both sides train the same LoRA on the same global batch with `lorakit.train.fit.train_step` (what
`lorakit train` runs): 1 process reads the N micro-batches one after another (grad_accum = N), N
processes (torchrun, DDP) read one each. Each side runs in fresh processes, every process with the
same threads (--threads, default 1): a process stands for one device, so N processes use N times
the cores (the speed-up is data parallelism's, not a reshuffle of the same cores).

Measured: median step time and tokens/s, and the bytes DDP all-reduces per step, counted by a DDP
communication hook on the buckets it actually reduces (and the seconds those all-reduces take),
cross-checked against the bytes of the trainable (adapter) parameters. From these bytes: what a ring
all-reduce moves per GPU per step on N GPUs, 2 (N - 1) / N x bytes, against the full fine-tune's.

Settings (`--set KEY=VALUE`): batch (global rows per step, default 8), seq (128), r (16), nproc (2).
--quick: a tiny random model, batch 4, seq 16, r 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit_bench.settings import parse_settings

KNOWN = {"batch": 8, "seq": 128, "r": 16, "nproc": 2}
QUICK = {"batch": 4, "seq": 16, "r": 4}
MIB = 1 << 20
LINKS = {"10 Gb/s": 1.25e9, "100 Gb/s": 12.5e9}  # bytes per second on the wire
GPUS = (2, 8, 64)


def settings(args: argparse.Namespace) -> dict:
    out = parse_settings("ddp", getattr(args, "set", None), KNOWN)
    if args.quick:  # --quick wins over --set here
        out.update(QUICK)
    if out["nproc"] < 2 or out["batch"] % out["nproc"]:
        raise ValueError(f"--set nproc={out['nproc']}: need at least 2 processes dividing batch={out['batch']}")
    return out


def run(args: argparse.Namespace) -> list[dict]:
    """Time both sides (each in fresh processes), print the table, return one record per side."""
    from lorakit_bench.report import environment, write_records
    from lorakit_bench.workload import Workload, resolve_model

    s = settings(args)
    threads = args.threads or 1  # per process
    w = resolve_model(Workload(model="tiny" if args.quick else "default", seed=0))
    env = {**environment(threads), "loadavg_before": list(os.getloadavg())}
    records = []
    for nproc in (1, s["nproc"]):
        request = {**s, "model_dir": w.model_dir, "procs": nproc, "threads": threads,
                   "reps": max(1, args.reps), "warmup": args.warmup}
        record = run_side(request)
        print(f"{nproc} process(es): {record['step_s']:.3f} s/step, {record['allreduce_bytes'] / MIB:.2f} MiB "
              f"all-reduced per step (load {os.getloadavg()[0]:.1f})", flush=True)
        records.append(record)
    env["loadavg_after"] = list(os.getloadavg())
    config = {**s, "model": w.model, "threads_per_process": threads, "reps": args.reps, "warmup": args.warmup}
    out = [{"suite": "ddp", **r, "config": config, "env": env} for r in records]
    print(table(out))
    print(f"\nload average before {env['loadavg_before']}, after {env['loadavg_after']} (shared machine)")
    if args.json:
        write_records(args.json, out)
    return out


def run_side(request: dict) -> dict:
    """One side in fresh processes: `python -m lorakit_bench.ddp` alone, or under torchrun."""
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-ddp-") as tmp:
        request = {**request, "out": str(Path(tmp) / "result.json")}
        launcher = [] if request["procs"] == 1 else [
            "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(request["procs"])]
        cmd = [sys.executable, *launcher, "-m", "lorakit_bench.ddp", json.dumps(request)]
        env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench ddp, {request['procs']} process(es) failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(request["out"]).read_text())


def measure(request: dict) -> dict | None:
    """Train `reps` timed steps (after `warmup`) on this rank; rank 0's figures (None on the others)."""
    import torch

    from lorakit.adapters.inject import inject
    from lorakit.config import TrainConfig
    from lorakit.quant.optim import make_optimizer
    from lorakit.train import distributed
    from lorakit.train.fit import train_step, trainable
    from lorakit_bench.ours import lora_spec
    from lorakit_bench.workload import Workload, load_base, make_batch

    torch.set_num_threads(request["threads"])
    nproc = request["procs"]  # this side's processes; request["nproc"]: the N the global batch is split into
    world = distributed.init("ddp" if nproc > 1 else "none")
    w = Workload(model_dir=request["model_dir"], batch=request["batch"], seq=request["seq"], r=request["r"],
                 alpha=2.0 * request["r"], seed=0)
    model = load_base(w)
    torch.manual_seed(0)
    inject(model, lora_spec(w))
    batch = make_batch(w, model.config.vocab_size)  # the global batch: [batch, seq]
    rows = [(ids.tolist(), labels.tolist()) for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)]
    cfg = TrainConfig(batch_size=w.batch // request["nproc"], grad_accum=request["nproc"] // nproc, lr=1e-4,
                      warmup_steps=1, max_steps=10**6, distributed="ddp" if nproc > 1 else "none")
    net = distributed.wrap(model, world)
    params = list(trainable(model).values())
    optimizer = make_optimizer(cfg.optim, params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    comm = {"bytes": 0, "seconds": 0.0, "calls": 0}
    if nproc > 1:
        net.register_comm_hook(comm, counting_allreduce)
    steps, reduced = [], []
    for step in range(request["warmup"] + request["reps"]):
        comm.update(bytes=0, seconds=0.0, calls=0)
        t = time.perf_counter()
        train_step(net, rows, cfg, pad_id=0, step=step, params=params, optimizer=optimizer, schedule=schedule,
                   world=world)
        if step >= request["warmup"]:
            steps.append(time.perf_counter() - t)
            reduced.append(dict(comm))
    distributed.finish(world)
    if not world.main:
        return None
    trained = sum(p.numel() * p.element_size() for p in params)
    seen, base = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            base += p.numel() * p.element_size()
    return {
        "side": f"{nproc} process" + ("es (DDP)" if nproc > 1 else ""),
        "processes": nproc, "threads_per_process": request["threads"], "grad_accum": cfg.grad_accum,
        "micro_batch": cfg.batch_size, "step_s": statistics.median(steps), "steps_s": steps,
        "tokens_per_s": w.batch * w.seq / statistics.median(steps),
        "allreduce_bytes": statistics.median(r["bytes"] for r in reduced) if reduced else 0,
        "allreduce_calls": statistics.median(r["calls"] for r in reduced) if reduced else 0,
        "allreduce_s": statistics.median(r["seconds"] for r in reduced) if reduced else 0.0,
        "adapter_grad_bytes": trained, "all_param_bytes": base,
        "hook_matches_adapter": nproc == 1 or all(r["bytes"] == trained for r in reduced),
    }


def counting_allreduce(state: dict, bucket):
    """DDP's default all-reduce of one gradient bucket, counting its bytes and timing it."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    state["bytes"] += buffer.numel() * buffer.element_size()
    state["calls"] += 1
    start = time.perf_counter()

    def done(fut):
        state["seconds"] += time.perf_counter() - start
        return fut.value()

    return allreduce_hook(None, bucket).then(done)


def ring_bytes(nbytes: float, gpus: int) -> float:
    """Bytes each of `gpus` sends (and receives) in a ring all-reduce of `nbytes`."""
    return 2 * (gpus - 1) / gpus * nbytes


def table(records: list[dict]) -> str:
    one, many = records[0], records[-1]
    lines = ["| side | threads/process | median s/step | tokens/s | x 1 process | all-reduced MiB/step "
             "(hook) | adapter grads MiB | all-reduce s/step |", "|" + "---|" * 8]
    for r in records:
        lines.append(f"| {r['side']} | {r['threads_per_process']} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_s'] / one['step_s']:.2f} | {r['allreduce_bytes'] / MIB:.3f} | "
                     f"{r['adapter_grad_bytes'] / MIB:.3f} | {r['allreduce_s']:.4f} |")
    adapter = many["adapter_grad_bytes"]
    full = many["all_param_bytes"] - adapter  # a full fine-tune's gradients: every base parameter
    lines += ["", f"N GPUs, ring all-reduce per GPU per step: adapters ({adapter / MIB:.3f} MiB) vs a full "
              f"fine-tune ({full / MIB:.2f} MiB, {full / adapter:.0f}x more)", "",
              "| GPUs | adapter MiB sent/GPU | " + " | ".join(f"s at {k}" for k in LINKS) + " | full FT MiB sent/GPU | "
              + " | ".join(f"full FT s at {k}" for k in LINKS) + " |", "|" + "---|" * (3 + 2 * len(LINKS))]
    for n in GPUS:
        a, f = ring_bytes(adapter, n), ring_bytes(full, n)
        lines.append(f"| {n} | {a / MIB:.2f} | " + " | ".join(f"{a / bw:.4f}" for bw in LINKS.values())
                     + f" | {f / MIB:.1f} | " + " | ".join(f"{f / bw:.3f}" for bw in LINKS.values()) + " |")
    return "\n".join(lines)


def main(request: str) -> int:
    req = json.loads(request)
    result = measure(req)
    if result is not None:
        Path(req["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
