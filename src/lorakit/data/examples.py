"""Prompt/completion examples and reading them from JSONL files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Example:
    """One supervised example: the loss is taken on `completion` only."""

    prompt: str
    completion: str


def read_jsonl(path: str | Path) -> list[Example]:
    """Rows of {"prompt": str, "completion": str}; a bad row is an error naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read dataset {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                problem = "missing" if key not in row else f"not a string ({type(row[key]).__name__})"
                raise ValueError(f"{path}:{lineno}: field {key!r} is {problem}")
        examples.append(Example(row["prompt"], row["completion"]))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
