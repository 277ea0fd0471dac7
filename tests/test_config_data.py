"""Config loading (YAML + overrides, unknown keys) and batch collation."""

from __future__ import annotations

import pytest

from lorakit.config import TrainConfig, load_train_config
from lorakit.data.encode import IGNORE, collate


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nlora:\n  r: 4\n  targets: [q_proj, v_proj]\n")
    cfg = load_train_config(path, ["lora.alpha=12", "max_steps=7", "eval_dataset=null"])
    assert cfg.lr == 0.001 and cfg.max_steps == 7 and cfg.eval_dataset is None
    assert cfg.lora.r == 4 and cfg.lora.alpha == 12 and cfg.lora.targets == ["q_proj", "v_proj"]
    # a partial section keeps the other defaults of that section
    assert cfg.lora.dropout == TrainConfig().lora.dropout


def test_unknown_key_names_key_and_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  alpah: 4\n")
    with pytest.raises(ValueError, match=r"c\.yaml, section 'lora': unknown key 'alpah' \(did you mean 'alpha'\?\)"):
        load_train_config(path)
    with pytest.raises(ValueError, match=r"overrides: unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        load_train_config(None, ["max_step=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_train_config(None, ["max_steps"])


def test_bad_values_and_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"overrides, section 'lora': r must be a positive integer, got 'x'"):
        load_train_config(None, ["lora.r=x"])
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML"):
        load_train_config(path)


def test_collate_pads_right_and_ignores_padding():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
