"""Packing: several encoded examples per row, each attending only to itself.

A packed row carries segment ids; its position ids restart at 0 for every example, and its
attention mask is block-diagonal causal (a 4-D additive mask, which transformers uses as given),
so no token sees another example. The first token of each example takes no loss: in an unpacked
row nothing predicts it either, so packed and unpacked losses are the same sums.
"""

from __future__ import annotations

import torch

from lorakit.data.encode import IGNORE

Encoded = tuple[list[int], list[int]]


def pack(rows: list[Encoded], max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy in order: (ids, labels, segment ids 1..k) rows of at most `max_length` tokens."""
    packed, ids, labels, segments = [], [], [], []
    for row_ids, row_labels in rows:
        if ids and len(ids) + len(row_ids) > max_length:
            packed.append((ids, labels, segments))
            ids, labels, segments = [], [], []
        segment = (segments[-1] + 1) if segments else 1
        ids = ids + row_ids
        labels = labels + [IGNORE] + row_labels[1:]
        segments = segments + [segment] * len(row_ids)
    if ids:
        packed.append((ids, labels, segments))
    return packed


def collate_packed(rows: list[tuple[list[int], list[int], list[int]]], pad_id: int,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids [b, t] and a block-diagonal causal additive mask [b, 1, t, t]."""
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)  # 0 = padding
    for i, (ids, lab, seg) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        segments[i, : len(seg)] = torch.tensor(seg)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(width).expand_as(segments)
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values  # index where each token's segment starts
    position_ids = index - first
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]  # [b, t, t]
    allowed = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask[:, None],
            "lengths": torch.tensor([len(ids) for ids, _, _ in rows])}
