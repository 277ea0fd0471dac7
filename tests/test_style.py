"""The code base stays ruff-clean (the configured rules in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_never_imports_the_peers():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
                 if any(f"import {peer}" in line or f"from {peer}" in line
                        for line in p.read_text().splitlines() for peer in ("peft", "bitsandbytes"))]
    assert not offenders
