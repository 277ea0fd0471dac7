"""A save is atomic: a process killed (SIGKILL) in the middle of writing through `lorakit.atomic` leaves the
old file (or folder) intact and complete, and nothing else but temp files that `stale_temps` names.

The child is stopped at a fixed point: `os.fsync` is replaced (in the child only) by a hook that
announces itself and sleeps, so the new bytes are in the temp file but not yet renamed over the target."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.atomic import atomic_dir, atomic_write_bytes, stale_temps

CHILD = r"""
import os, sys, time
from pathlib import Path
from lorakit import atomic

ready, target, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real_fsync = os.fsync

def stop_here(fd):  # the new bytes are written; announce, then wait to be killed
    real_fsync(fd)
    ready.write_text("ready")
    time.sleep(600)

os.fsync = stop_here
new = bytes(range(256)) * (32 * 4096)  # 32 MiB
if kind == "file":
    atomic.atomic_write_bytes(target, new)
else:
    def fill(tmp):
        (tmp / "weights.bin").write_bytes(new)
        (tmp / "config.json").write_text('{"new": true}')
    atomic.atomic_dir(target, fill)
"""


def kill_mid_write(tmp_path: Path, target: Path, kind: str) -> None:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), str(target), kind], env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready.exists():
        assert child.poll() is None, child.stderr.read()
        assert time.time() < deadline, "the child never reached the write"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
    ready.unlink()


def test_killed_file_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "out" / "adapter_model.safetensors"
    old = os.urandom(3 * 1024 * 1024)
    atomic_write_bytes(target, old)
    assert stale_temps(target) == []

    kill_mid_write(tmp_path, target, "file")
    assert target.read_bytes() == old  # intact and complete
    left = stale_temps(target)
    assert len(left) == 1 and left[0].is_file() and left[0].stat().st_size == 32 * 1024 * 1024
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, left[0].name])  # nothing else

    atomic_write_bytes(target, b"next")  # a later write is unaffected by the leftover
    assert target.read_bytes() == b"next" and stale_temps(target) == left


def test_killed_folder_write_leaves_the_old_folder_whole(tmp_path):
    target = tmp_path / "checkpoint-3"
    atomic_dir(target, lambda tmp: (tmp / "config.json").write_text('{"old": true}'))

    kill_mid_write(tmp_path, target, "dir")
    assert [p.name for p in target.iterdir()] == ["config.json"]
    assert (target / "config.json").read_text() == '{"old": true}'
    left = stale_temps(target)
    assert len(left) == 1 and left[0].is_dir() and (left[0] / "weights.bin").stat().st_size == 32 * 1024 * 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, left[0].name])


@pytest.mark.parametrize("name", ["checkpoint-3", "adapter_model.safetensors"])
def test_stale_temps_names_only_leftovers_of_that_path(tmp_path, name):
    target = tmp_path / name
    mine = [tmp_path / f".{name}.ab_12xyz.tmp", tmp_path / f".{name}.old"]
    others = [tmp_path / name, tmp_path / f".{name}.tmp", tmp_path / f".{name}x.ab_12xyz.tmp",
              tmp_path / f".other.{name}.ab_12xyz.tmp", tmp_path / f".{name}.ab_12xyz.tmp.bak"]
    for p in mine + others:
        p.write_text("x")
    assert stale_temps(target) == sorted(mine)
    assert stale_temps(tmp_path / "missing" / name) == []
