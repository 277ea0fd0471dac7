"""Long real text for LongLoRA: source files packed into token sequences of a target length, and passkey prompts.

Every machine with Python has megabytes of real, long-range-structured text offline: the standard
library's source. Files are split into training and held-out sets by a hash of their relative
path (stable across machines and Python patch versions), then concatenated in path order, each
file headed by its path and closed by the end-of-text token, and cut into sequences of exactly
`length` tokens. Unlike `packing.pack`, attention is not cut at file boundaries: LongLoRA trains
on continuous long sequences.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path

HELD_OUT_EVERY = 10  # one file in ten (by path hash) is held out for evaluation


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: str | Path | None = None, split: str = "train", held_out_every: int = HELD_OUT_EVERY,
                 suffix: str = ".py") -> list[Path]:
    """The `split` ("train", "held-out" or "all") of the `suffix` files under `root` (default: the
    standard library, without site-packages), sorted by path."""
    if split not in ("train", "held-out", "all"):
        raise ValueError(f"split must be train, held-out or all, got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise ValueError(f"long-text source folder {root} does not exist")
    files = []
    for path in sorted(root.rglob(f"*{suffix}")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel or not path.is_file():
            continue
        if split != "all" and (is_held_out(rel, held_out_every) != (split == "held-out")):
            continue
        files.append(path)
    if not files:
        raise ValueError(f"no {suffix} files of split {split!r} under {root}")
    return files


def is_held_out(relative_path: str, every: int = HELD_OUT_EVERY) -> bool:
    return int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % every == 0


def token_stream(tokenizer, files: list[Path], max_tokens: int, root: str | Path | None = None) -> list[int]:
    """Token ids of the files in order ("# file: PATH" header, text, end-of-text), stopping once
    `max_tokens` are there. Files that are not UTF-8 are skipped."""
    root = Path(root) if root is not None else stdlib_root()
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        ids += tokenizer(f"# file: {name}\n{text}", add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def long_sequences(tokenizer, length: int, count: int, split: str = "train", root: str | Path | None = None,
                   seed: int | None = None) -> list[list[int]]:
    """`count` sequences of exactly `length` tokens from the `split` files (see module docstring).

    `seed` shuffles the file order first (training); None keeps path order (evaluation)."""
    if length < 2 or count < 1:
        raise ValueError(f"length must be >= 2 and count >= 1, got length={length}, count={count}")
    files = source_files(root, split)
    if seed is not None:
        random.Random(seed).shuffle(files)
    ids = token_stream(tokenizer, files, length * count, root)
    if len(ids) < length * count:
        raise ValueError(f"the {split} files hold only {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def as_rows(sequences: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """Training rows (ids, labels): every token is supervised (the first predicts nothing anyway)."""
    return [(list(s), list(s)) for s in sequences]


INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): `length` tokens in all, the needle at `depth` (0 = start, 1 = end) of
    the filler. The answer is " KEY"; the model retrieves it if greedy decoding produces exactly it."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    intro, filler, needle = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=key))
    question, answer = enc(QUESTION), enc(f" {key}")
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < len(filler):
        raise ValueError(f"length {length} is too short for a passkey prompt (needs > {length - room + len(filler)})")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = int(round(depth * room / len(filler))) * len(filler)  # at a sentence boundary
    cut = min(cut, room)
    return intro + hay[:cut] + needle + hay[cut:] + question, answer

