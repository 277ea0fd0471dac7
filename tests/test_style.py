"""The code base stays ruff-clean (the configured rules in pyproject.toml)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_never_imports_the_peers():
    peer_import = re.compile(r"^\s*(import|from)\s+(peft|bitsandbytes)\b")  # not `import peft_train`
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
                 if any(peer_import.match(line) for line in p.read_text().splitlines())]
    assert not offenders
