"""Greedy generation for prompts, batched, and the exact-match score built on it."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.data.encode import prompt_text
from lorakit.data.formats import Row
from lorakit.devices import model_device


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int = 64, batch_size: int = 32
) -> list[str]:
    """Greedy completions of user strings or message lists (chat template applied), decoded
    without special tokens."""
    was_training = model.training
    device = model_device(model)  # prompts are tokenized on the host, then moved to the model
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                temperature=None, top_p=None, top_k=None,
            )
            new = ids[:, batch["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def score_rows(model: nn.Module, tokenizer, rows: list[Row], max_new_tokens: int) -> float:
    """Exact match of the model's answer to each row's last (assistant) message, given the rest."""
    usable = [r for r in rows if r.messages and r.messages[-1]["role"] == "assistant"]
    if not usable:
        raise ValueError("no evaluation row ends with an assistant message to compare against")
    predictions = generate(model, tokenizer, [r.messages[:-1] for r in usable], max_new_tokens)
    return exact_match(predictions, [r.messages[-1]["content"] for r in usable])


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)
