"""Documentation that must not drift: every config key is in docs/CONFIG.md, README's commands are CI's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lorakit.config import LongLoraConfig, LoraSpec, QuantConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    keys = {f.name for c in (TrainConfig, LoraSpec, QuantConfig, LongLoraConfig) for f in dataclasses.fields(c)}
    assert keys - documented == set()
    assert documented - keys == set()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).strip().splitlines()
    assert len(block) == 2 and block[0].endswith("lorakit train") and "pytest" in block[1]
    assert readme.index("```bash") < readme.index("\n## ")  # before anything else
    assert block[1] in (ROOT / ".ci" / "run").read_text()
