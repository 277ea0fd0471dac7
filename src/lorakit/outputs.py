"""What a command may write over: outputs are replaced only when they are lorakit's own of the same kind.

`lorakit merge` / `lorakit export` replace their output atomically (`lorakit.atomic`), which deletes what
was there. So a folder output is replaced only when it is missing, empty, or marked by a previous output
of the same kind (`lorakit.json` inside it); a file output (GGUF) only when it is missing or a GGUF file
lorakit wrote (its `lorakit.kind` key). Anything else needs `--overwrite`. An output that is one of the
command's inputs, or a folder holding one, is always refused: the input would be deleted while read.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.atomic import atomic_write_text

MARK_FILE = "lorakit.json"  # in a folder lorakit wrote: {"written_by": "lorakit", "kind": ...}
GGUF_KIND_KEY = "lorakit.kind"  # in a GGUF file lorakit wrote: "gguf-model" or "gguf-adapter"


def mark_folder(folder: str | Path, kind: str) -> None:
    """Say in `folder` that lorakit wrote it as `kind` (so a later run may replace it)."""
    atomic_write_text(Path(folder) / MARK_FILE, json.dumps({"written_by": "lorakit", "kind": kind}) + "\n")


def folder_kind(folder: Path) -> str | None:
    """The kind `mark_folder` recorded in `folder`, or None (no mark, or not lorakit's)."""
    try:
        mark = json.loads((folder / MARK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return mark.get("kind") if isinstance(mark, dict) and mark.get("written_by") == "lorakit" else None


def gguf_kind(path: Path) -> str | None:
    """The `lorakit.kind` of a GGUF file lorakit wrote, or None (not GGUF, not ours, unreadable)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
        import gguf

        field = gguf.GGUFReader(path).fields.get(GGUF_KIND_KEY)
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # a damaged file is not one we wrote; the reader raises many kinds of errors
        return None


def check_output(out: str | Path, kind: str, inputs: list[str | Path | None], overwrite: bool = False) -> None:
    """Refuse, before any work, an output that would destroy what it should not (see the module doc).
    `kind`: "merged" (a folder) or "gguf-model" / "gguf-adapter" (a file)."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        if given is not None and Path(given).exists():
            source = Path(given).resolve()
            if source == target or target in source.parents:
                raise ValueError(f"output {out} is, or holds, the input {given}: writing it would delete the input; "
                                 "choose another output path")
    if not out.exists():
        return
    if kind.startswith("gguf"):
        if out.is_dir():
            raise ValueError(f"output {out} is a folder; a GGUF output is a file path (e.g. {out / 'model.gguf'})")
        if not overwrite and gguf_kind(out) != kind:
            raise ValueError(f"output file {out} exists and is not a {kind} GGUF file lorakit wrote; "
                             "pass --overwrite to replace it")
        return
    if not out.is_dir():
        raise ValueError(f"output {out} is a file; the output is a folder path")
    if not overwrite and any(out.iterdir()) and folder_kind(out) != kind:
        raise ValueError(f"output folder {out} is not empty and is not a {kind} folder lorakit wrote; "
                         f"pass --overwrite to replace it (everything in {out} will be deleted)")
