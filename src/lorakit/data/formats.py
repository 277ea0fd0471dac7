"""Dataset row formats, all turned into one shape: a list of chat messages (or plain text).

    text               {"text": ...}                                  loss on every token
    prompt/completion  {"prompt": ..., "completion": ...}             one user turn, one answer
    alpaca             {"instruction", "input"?, "output", "system"?}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}
    messages           {"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}

The format is detected from a row's keys, or named (`format:` in the config); every error names
the row's source (file and line).
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("text", "prompt_completion", "alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}
ROLES = ("system", "user", "assistant")


@dataclass
class Row:
    """One training row: chat `messages`, or raw `text`; `source` is "file:line" for errors."""

    messages: list[dict[str, str]] | None
    text: str | None
    source: str


def detect_format(row: dict, source: str) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise ValueError(f"{source}: cannot tell the format from the fields {sorted(row)}; expected one of "
                     "text, prompt/completion, instruction/output (alpaca), conversations (sharegpt), messages")


def to_row(row: dict, source: str, fmt: str | None = None) -> Row:
    """Normalize one parsed row; `fmt` None = detect."""
    if not isinstance(row, dict):
        raise ValueError(f"{source}: expected an object of fields, got {type(row).__name__}")
    fmt = fmt or detect_format(row, source)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose from {FORMATS}")
    if fmt == "text":
        return Row(None, field(row, "text", source), source)
    if fmt == "prompt_completion":
        messages = [{"role": "user", "content": field(row, "prompt", source)},
                    {"role": "assistant", "content": field(row, "completion", source)}]
    elif fmt == "alpaca":
        user = field(row, "instruction", source)
        extra = field(row, "input", source, optional=True)
        messages = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                    {"role": "assistant", "content": field(row, "output", source)}]
        system = field(row, "system", source, optional=True)
        if system:
            messages.insert(0, {"role": "system", "content": system})
    elif fmt == "sharegpt":
        messages = [sharegpt_turn(t, source, i) for i, t in enumerate(turns(row, "conversations", source))]
    else:
        messages = [openai_turn(t, source, i) for i, t in enumerate(turns(row, "messages", source))]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{source}: the conversation has no assistant turn, so nothing to learn from")
    return Row(messages, None, source)


def field(row: dict, key: str, source: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        problem = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise ValueError(f"{source}: field {key!r} is {problem}")
    return value


def turns(row: dict, key: str, source: str) -> list:
    value = row.get(key)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{source}: field {key!r} must be a non-empty list of turns")
    return value


def sharegpt_turn(turn, source: str, i: int) -> dict[str, str]:
    if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
        raise ValueError(f"{source}: conversations[{i}] needs 'from' in {sorted(SHAREGPT_ROLES)} and a string 'value'")
    return {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}


def openai_turn(turn, source: str, i: int) -> dict[str, str]:
    if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
        raise ValueError(f"{source}: messages[{i}] needs 'role' in {ROLES} and a string 'content'")
    return {"role": turn["role"], "content": turn["content"]}
