"""Gradient accumulation is exactly one big batch, on rows of unequal length with unequal numbers of
supervised tokens per micro-batch, where normalizing each micro-batch by its own tokens (the classic
bug) gives a different gradient. The reference is plain torch: each row alone through the model's own
forward, token losses summed over the whole step and divided by the step's supervised tokens."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.config import TrainConfig
from lorakit.data.encode import IGNORE
from lorakit.data.packing import pack
from lorakit.train import distributed
from lorakit.train.fit import fit, micro_batch

PROMPTS = (3, 5, 2, 8, 4, 6, 7, 2)  # tokens per row: prompt + answer, all lengths distinct
ANSWERS = (1, 9, 4, 2, 12, 6, 10, 1)


def ragged_rows(n: int = 6, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows of 4 to 17 tokens of which 1 to 12 are supervised (the answer); no two of equal length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, a in zip(PROMPTS[:n], ANSWERS[:n], strict=True):
        prompt = torch.randint(3, 128, (p,), generator=g).tolist()
        answer = torch.randint(3, 128, (a,), generator=g).tolist()
        rows.append((prompt + answer, [IGNORE] * p + answer))
    return rows


def row_loss_sum(model: torch.nn.Module, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Summed next-token cross entropy of one row, alone (no padding), from the model's full logits."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # [t-1, vocab]
    return F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=IGNORE, reduction="sum")


def supervised(rows: list) -> int:
    return sum(sum(label != IGNORE for label in labels[1:]) for _, labels in rows)


def reference_step(model: torch.nn.Module, micro: list[list]) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one step over micro-batches `micro` (lists of rows): sum of every token
    loss of the step / the step's supervised tokens."""
    n_tokens = supervised([row for batch in micro for row in batch])
    total = sum(row_loss_sum(model, ids, labels) for batch in micro for ids, labels in batch) / n_tokens
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(total, list(params.values()))
    return float(total), dict(zip(params, grads, strict=True))


def per_micro_batch_mean(model: torch.nn.Module, micro: list[list]) -> dict[str, torch.Tensor]:
    """The bug's gradient: the mean over micro-batches of each micro-batch's per-token mean."""
    total = sum(sum(row_loss_sum(model, ids, labels) for ids, labels in batch) / supervised(batch)
                for batch in micro) / len(micro)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(total, list(params.values())), strict=True))


def capture_gradients(monkeypatch) -> list[dict]:
    """Record, at each optimizer step of `fit`, the gradients (before clipping) and the reported norm."""
    seen = []
    real = distributed.grad_norm

    def spy(params, max_norm):
        grads = [distributed.full(p.grad).detach().clone() for p in params]
        norm = real(params, max_norm)
        seen.append({"grads": grads, "grad_norm": norm})
        return norm

    monkeypatch.setattr(distributed, "grad_norm", spy)
    return seen


def adapter_model() -> torch.nn.Module:
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    randomize_adapters(model)  # B != 0, so A gets gradient too
    return model


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((got - want).norm()) <= rel * float(want.norm()) + 1e-9


def test_accumulated_gradient_is_the_big_batch_gradient_on_ragged_rows(monkeypatch):
    rows = ragged_rows(6)
    model = adapter_model()
    reference = copy.deepcopy(model)
    seen = capture_gradients(monkeypatch)
    cfg = TrainConfig(max_steps=1, batch_size=2, grad_accum=3, warmup_steps=1, lr=1e-2, max_grad_norm=1e9)
    result = fit(model, rows, cfg, pad_id=1, log=lambda *_: None)

    # the step read micro-batches 0, 1, 2 of the run: all 6 rows, in the seeded order
    order = [micro_batch(rows, cfg, 1, k)["lengths"].tolist() for k in range(3)]
    by_length = {len(ids): (ids, labels) for ids, labels in rows}
    assert len(by_length) == 6  # lengths identify rows
    micro = [[by_length[n] for n in lengths] for lengths in order]
    tokens = [supervised(batch) for batch in micro]
    assert len(set(tokens)) == 3  # unequal supervised tokens per micro-batch

    loss, want = reference_step(reference, micro)
    bug = per_micro_batch_mean(reference, micro)
    got = dict(zip(want, seen[0]["grads"], strict=True))
    assert result.history[0]["tokens"] == sum(tokens)
    assert abs(result.history[0]["loss"] - loss) <= 1e-5 * loss
    for name in want:
        assert close(got[name], want[name]), name
    # the data can tell the two apart: the per-micro-batch mean is far off
    assert sum(float((bug[n] - want[n]).norm()) for n in want) > 1e-2 * sum(float(want[n].norm()) for n in want)
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in want.values()))
    assert abs(seen[0]["grad_norm"] - float(total)) <= 1e-5 * float(total)


def test_one_big_batch_and_accumulation_read_the_same_rows_and_agree(monkeypatch):
    """batch_size 6 x 1 and 2 x 3 (and 1 x 6) give the same gradient on the same ragged rows."""
    rows = ragged_rows(6, seed=1)
    seen = capture_gradients(monkeypatch)
    for batch_size, accum in ((6, 1), (2, 3), (1, 6)):
        cfg = TrainConfig(max_steps=1, batch_size=batch_size, grad_accum=accum, warmup_steps=1, max_grad_norm=1e9)
        fit(adapter_model(), rows, cfg, pad_id=1, log=lambda *_: None)
    grads = [record["grads"] for record in seen]
    for other in grads[1:]:
        for a, b in zip(other, grads[0], strict=True):
            assert close(a, b)


def test_accumulated_packed_rows_give_the_gradient_of_their_examples_alone(monkeypatch):
    """Packing: rows of several ragged examples each (block-diagonal attention, positions restarting),
    accumulated one row per micro-batch, give the gradient of every example run alone, normalized by the
    step's supervised tokens."""
    examples = ragged_rows(8)
    packed = pack(examples, max_length=24)
    assert 1 < len(packed) < len(examples) and len({len(ids) for ids, _, _ in packed}) > 1
    micro, start = [], 0
    for _, _, segments in packed:  # the examples of each packed row, in order
        micro.append(examples[start : start + max(segments)])
        start += max(segments)
    assert start == len(examples)
    model = adapter_model()
    reference = copy.deepcopy(model)
    seen = capture_gradients(monkeypatch)
    cfg = TrainConfig(max_steps=1, batch_size=1, grad_accum=len(packed), warmup_steps=1, packing=True,
                      max_grad_norm=1e9)
    result = fit(model, packed, cfg, pad_id=1, log=lambda *_: None)
    loss, want = reference_step(reference, micro)
    bug = per_micro_batch_mean(reference, micro)
    assert result.history[0]["tokens"] == supervised(examples)
    assert abs(result.history[0]["loss"] - loss) <= 1e-5 * loss
    for name, got in zip(want, seen[0]["grads"], strict=True):
        assert close(got, want[name]), name
    assert sum(float((bug[n] - want[n]).norm()) for n in want) > 1e-2 * sum(float(want[n].norm()) for n in want)
