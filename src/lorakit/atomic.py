"""Atomic writes: a reader sees the old file or the complete new one, never a partial one.

Temporary files and folders are made private by `tempfile`; before the rename they get the mode a
plain `open()` / `mkdir()` would give (0644 / 0755 under umask 022), so a serving user can read them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE, DIR_MODE = 0o666, 0o777  # what open() and mkdir() ask for; the umask takes away from them


def current_umask() -> int:
    """The process umask, read without changing it where /proc tells (os.umask would set it for a moment,
    for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Let `fill(tmp_dir)` write a whole folder, then move it to `path` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        os.chmod(tmp, DIR_MODE & ~current_umask())
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stale_temps(path: str | Path) -> list[Path]:
    """What atomic writes of `path` that were killed left beside it: temp files and folders
    (`.NAME.XXXXXXXX.tmp`, 8 random characters, as `tempfile` names them) and a replaced folder
    (`.NAME.old`). Never read as `path`; safe to delete when no write of `path` is running."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([a-z0-9_]{{8}}\.tmp|old)")
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name)) if path.parent.is_dir() else []
