"""Packing: position ids restart, attention stays within each example, losses equal unpacked ones."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.data.encode import IGNORE, collate
from lorakit.data.packing import collate_packed, pack
from lorakit.train.loop import loss_sum
from test_train import toy_rows


def test_pack_layout():
    rows = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [8, 9]), ([3, 4, 5, 6], [IGNORE, IGNORE, 5, 6])]
    packed = pack(rows, max_length=6)
    assert packed == [([5, 6, 7, 8, 9], [IGNORE, 6, 7, IGNORE, 9], [1, 1, 1, 2, 2]),
                      ([3, 4, 5, 6], [IGNORE, IGNORE, 5, 6], [1, 1, 1, 1])]
    batch = collate_packed(packed, pad_id=1)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    allowed = (batch["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_unpacked_losses_agree(attention):
    model = tiny_llama()
    model.config._attn_implementation = attention
    lorakit.inject(model, lorakit.LoraSpec(r=2))
    g = torch.Generator().manual_seed(0)
    rows = [(ids[: 4 + i], labels[: 4 + i]) for i, (ids, labels) in enumerate(toy_rows(6))]  # ragged lengths
    for _, labels in rows:
        labels[0] = int(torch.randint(3, 128, (1,), generator=g))  # a label on the first token must not count
    unpacked = sum(float(loss_sum(model, collate([r], pad_id=1))) for r in rows)
    packed = pack(rows, max_length=24)
    assert len(packed) < len(rows)
    together = float(loss_sum(model, collate_packed(packed, pad_id=1)))
    assert together == pytest.approx(unpacked, rel=1e-5)


def test_fit_trains_on_packed_rows():
    from lorakit.config import TrainConfig
    from lorakit.train.fit import fit

    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4))
    packed = pack(toy_rows(16), max_length=36)  # three 12-token examples per row
    result = fit(model, packed, TrainConfig(packing=True, max_steps=20, batch_size=2, lr=1e-2), pad_id=1,
                 log=lambda *_: None)
    assert result.last_loss < result.first_loss
