"""DDP and FSDP2 (2 CPU processes, gloo) equal one process on ragged rows split unevenly over the
ranks: the loss, the gradient of every adapter parameter, the reported grad_norm (of the whole
gradient, before clipping) and the parameters after each step.

The rows differ in length and in supervised tokens, so each rank's micro-batches hold a different
number of loss tokens; normalizing by a rank's own tokens (or averaging ranks' means) would give a
different gradient. SGD stands in for AdamW so that equal updates mean equal gradients (Adam's first
step is about lr * sign(g), which would amplify fp32 reduction-order noise)."""

from __future__ import annotations

import torch

from lorakit.config import TrainConfig
from lorakit.data.encode import IGNORE
from lorakit.train import distributed
from lorakit.train import fit as fit_module
from lorakit.train.distributed import World, micro_indices
from lorakit.train.fit import micro_batch, trainable
from test_accumulation import adapter_model, ragged_rows, supervised

STEPS, ROWS, BATCH, ACCUM = 2, 8, 2, 2  # per rank; one process reads ACCUM x 2 micro-batches a step


def config(mode: str, accum: int) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, batch_size=BATCH, grad_accum=accum, warmup_steps=1, lr=0.5,
                       schedule="constant", max_grad_norm=1e9, distributed=mode, seed=3)


def train(mode: str, accum: int) -> dict:
    """Fit the ragged rows; per step the gradients (whole tensors), the record, and the parameters after."""
    model = adapter_model()
    names = list(trainable(model))
    steps: list[dict] = []
    real = distributed.grad_norm

    def spy(params, max_norm):
        grads = [distributed.full(p.grad).detach().clone() for p in params]  # FSDP2: gathered (every rank)
        norm = real(params, max_norm)
        steps.append({"grads": dict(zip(names, grads, strict=True)), "grad_norm": norm})
        return norm

    distributed.grad_norm, fit_module.make_optimizer = spy, sgd
    try:
        result = fit_module.fit(model, ragged_rows(ROWS), config(mode, accum), pad_id=1, log=lambda *_: None)
    finally:
        distributed.grad_norm, fit_module.make_optimizer = real, MAKE_OPTIMIZER
    params = {n: distributed.full(p).detach().clone() for n, p in trainable(model).items()}
    return {"steps": steps, "history": result.history, "params": params}


MAKE_OPTIMIZER = fit_module.make_optimizer


def sgd(name, params, lr, weight_decay):
    return torch.optim.SGD(params, lr=lr)


def worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {mode: train(mode, ACCUM) for mode in ("ddp", "fsdp2")}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_hold_unequal_loss_tokens():
    """The split the test below relies on: each step, the two ranks' micro-batches differ in supervised tokens."""
    rows = ragged_rows(ROWS)
    cfg = config("none", ACCUM)
    for step in range(STEPS):
        per_rank = [sum(supervised_in(micro_batch(rows, cfg, 1, k)) for k in micro_indices(step, ACCUM, World(r, 2)))
                    for r in range(2)]
        assert per_rank[0] != per_rank[1], per_rank


def supervised_in(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def test_ddp_and_fsdp2_equal_one_process_on_ragged_rows_split_unevenly(tmp_path):
    torch.multiprocessing.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    got = torch.load(tmp_path / "out", weights_only=False)
    want = train("none", ACCUM * 2)
    rows = ragged_rows(ROWS)
    assert [r["tokens"] for r in want["history"]] == [supervised(rows)] * STEPS  # every row, every step
    for mode, run in got.items():
        for step, (a, b) in enumerate(zip(run["history"], want["history"], strict=True)):
            assert a["tokens"] == b["tokens"], (mode, step)
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"], (mode, step, a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (mode, step)
        for step, (a, b) in enumerate(zip(run["steps"], want["steps"], strict=True)):
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"], (mode, step)  # unrounded
            for name, grad in b["grads"].items():
                assert grad.shape == a["grads"][name].shape
                assert float((a["grads"][name] - grad).norm()) <= 1e-5 * float(grad.norm()) + 1e-9, (mode, step, name)
        for name, p in want["params"].items():
            torch.testing.assert_close(run["params"][name], p, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
    start = adapter_model()
    moved = [n for n, p in trainable(start).items() if not torch.equal(p, want["params"][n])]
    assert len(moved) == len(want["params"])  # every adapter parameter trained
