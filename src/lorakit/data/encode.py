"""Token ids and loss masks: prompt through the chat template, loss on the completion only."""

from __future__ import annotations

import torch

from lorakit.data.examples import Example

IGNORE = -100  # label of a position that takes no loss


def prompt_text(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return prompt


def encode(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are IGNORE on the prompt; the completion ends with EOS, kept in
    the loss so the model learns to stop. Prompt and completion are tokenized apart, as they are
    at generation time. Too-long rows lose the end of the completion."""
    prompt = tokenizer(prompt_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each [batch, longest]."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
