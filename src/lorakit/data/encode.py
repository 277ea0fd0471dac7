"""Token ids and loss masks for rows: chat template, assistant-only loss, truncation, padding.

The assistant spans are found by rendering the conversation incrementally (each prefix, then
each assistant turn) and tokenizing piece by piece, exactly as generation sees it: the prompt
up to the generation marker is one piece, the answer the next. This needs no `{% generation %}`
markers in the template (SmolLM2's has none). An assistant turn's end-of-turn token stays in
the loss even when pad == eos; whitespace after it does not.
"""

from __future__ import annotations

import torch

from lorakit.data.formats import Row

IGNORE = -100  # label of a position that takes no loss

# a named template for tokenizers without one (`chat_template: chatml`)
CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def prompt_text(tokenizer, prompt: str | list[dict]) -> str:
    """The text the model sees before its answer: a user string or a message list, through the
    chat template when the tokenizer has one (else the bare string)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return render(tokenizer, messages, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    raise ValueError("the tokenizer has no chat template; set chat_template (e.g. 'chatml') in the config")


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_row(tokenizer, row: Row, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole row, untruncated; labels are IGNORE where no loss is taken."""
    if row.messages is None:  # plain text: every token, then EOS
        ids = tokens(tokenizer, row.text) + [tokenizer.eos_token_id]
        return ids, list(ids)
    if not getattr(tokenizer, "chat_template", None):
        if [m["role"] for m in row.messages] != ["user", "assistant"]:
            raise ValueError(f"{row.source}: the tokenizer has no chat template for a conversation; "
                             "set chat_template (e.g. 'chatml') in the config")
        pieces = [(row.messages[0]["content"], False), (row.messages[1]["content"], True)]
        return assemble(tokenizer, pieces, train_on_prompt, eos_after_answers=True)
    pieces, done = [], ""
    for i, message in enumerate(row.messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, row.messages[:i], add_generation_prompt=True)
        after = render(tokenizer, row.messages[: i + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ValueError(f"{row.source}: the chat template does not render turn by turn (each prefix a "
                             "prefix of the whole), so assistant spans cannot be found; use chat_template: chatml")
        turn = after[len(before):]
        answer = turn.rstrip()
        pieces += [(before[len(done):], False), (answer, True), (turn[len(answer):], False)]
        done = after
    pieces.append((render(tokenizer, row.messages, add_generation_prompt=False)[len(done):], False))
    return assemble(tokenizer, pieces, train_on_prompt, eos_after_answers=False)


def assemble(tokenizer, pieces: list[tuple[str, bool]], train_on_prompt: bool,
             eos_after_answers: bool) -> tuple[list[int], list[int]]:
    """Tokenize (text, is answer) pieces one by one; an answer that does not end the turn with
    EOS gets one, so the model learns to stop."""
    ids, labels = [], []
    eos = tokenizer.eos_token_id
    for text, is_answer in pieces:
        piece = tokens(tokenizer, text)
        if is_answer and (eos_after_answers or not piece or piece[-1] != eos):
            piece.append(eos)
        ids += piece
        labels += piece if is_answer or train_on_prompt else [IGNORE] * len(piece)
    return ids, labels


def encode_all(tokenizer, rows: list[Row], max_length: int, train_on_prompt: bool = False,
               truncation: str = "truncate", warn=print) -> list[tuple[list[int], list[int]]]:
    """Encode rows; rows over `max_length` lose their end ("truncate") or are left out ("drop"),
    with a count and the first such row named."""
    out, too_long, empty = [], [], []
    for row in rows:
        ids, labels = encode_row(tokenizer, row, train_on_prompt)
        if len(ids) > max_length:
            too_long.append(row.source)
            if truncation == "drop":
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            empty.append(row.source)  # truncation left no answer token to learn from
            continue
        out.append((ids, labels))
    if too_long:
        action = "dropped" if truncation == "drop" else "truncated"
        warn(f"{len(too_long)} rows longer than max_length={max_length} {action} (first: {too_long[0]})")
    if empty:
        warn(f"{len(empty)} rows left out: no answer token within max_length={max_length} (first: {empty[0]})")
    if not out:
        raise ValueError("no row has any token to learn from after truncation; raise max_length")
    return out


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each [batch, longest]; lengths [batch]."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "lengths": torch.tensor([len(ids) for ids, _ in rows])}
