"""Config loading (YAML + overrides, unknown keys) and batch collation."""

from __future__ import annotations

import re

import pytest

from lorakit.config import QuantConfig, TrainConfig, load_jobs_config, load_train_config
from lorakit.data.encode import IGNORE, collate
from lorakit.data.files import read_file


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nlora:\n  r: 4\n  targets: [q_proj, v_proj]\n")
    cfg = load_train_config(path, ["lora.alpha=12", "max_steps=7", "eval_dataset=null"])
    assert cfg.lr == 0.001 and cfg.max_steps == 7 and cfg.eval_dataset is None
    assert cfg.lora.r == 4 and cfg.lora.alpha == 12 and cfg.lora.targets == ["q_proj", "v_proj"]
    # a partial section keeps the other defaults of that section
    assert cfg.lora.dropout == TrainConfig().lora.dropout


def test_default_lr_by_adapter_kind():
    """lr unset: 2e-3, and 5x that for AdaLoRA (its three small factors learn slower); a given lr always wins."""
    assert load_train_config(None, []).lr == 2e-3
    assert load_train_config(None, ["lora.kind=dora"]).lr == 2e-3
    assert load_train_config(None, ["lora.kind=adalora", "lora.r=12"]).lr == 1e-2
    assert load_train_config(None, ["lora.kind=adalora", "lora.r=12", "lr=3e-4"]).lr == 3e-4
    assert load_train_config(None, ["lr=null"]).lr == 2e-3


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
    with pytest.raises(ValueError, match=r"overrides, section 'lora': r: expected an integer, got 'x'"):
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


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads `3e-4` and `1e-4` as strings; a float field takes them as the number."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nweight_decay: 1e-2\nlora:\n  alpha: 3e1\n  alpha_pattern: {q_proj: 2e1}\n")
    cfg = load_train_config(path, ["loraplus_ratio=1.6e1"])
    assert (cfg.lr, cfg.weight_decay, cfg.loraplus_ratio) == (1e-4, 1e-2, 16.0)
    assert cfg.lora.alpha == 30.0 and cfg.lora.alpha_pattern == {"q_proj": 20.0}
    assert type(cfg.lr) is float
    assert load_train_config(None, ["lr=3e-4"]).lr == 3e-4  # the LongLoRA command in docs/CONFIG.md
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("lr: 1e-4\njobs:\n  - {seed: 1}\n  - {lr: 5e-3}\n")
    assert [j.lr for j in load_jobs_config(jobs)] == [1e-4, 5e-3]
    sections = load_train_config(None, ["quant={}", "longlora={target_context: 128}", "lora.kind=adalora"])
    assert sections.quant == QuantConfig() and sections.longlora.target_context == 128  # sections pass the check


@pytest.mark.parametrize(("override", "message"), [
    ("lr=abc", "lr: expected a number or null, got 'abc'"),  # null: the default lr of the adapter kind
    ("max_steps=1.5", "max_steps: expected an integer or null, got 1.5"),
    ("lora=5", "lora: expected a section"),
    ("eval=yes please", "eval: expected true or false, got 'yes please'"),
    ("lora.layers=[0, one]", "layers[1]: expected an integer, got 'one'"),
    ("dataset={path: a.jsonl}", "dataset: expected a string or a list"),
    ("max_steps=0", "max_steps must be a positive integer, got 0"),
    ("keep_checkpoints=0", "keep_checkpoints must be a positive integer, got 0"),
    ("warmup_steps=-1", "warmup_steps must be a non-negative integer, got -1"),
    ("lr=.nan", "lr must be a positive number, got nan"),
    ("max_grad_norm=0", "max_grad_norm must be a positive number"),
])
def test_wrong_types_and_ranges_name_the_key(override, message):
    with pytest.raises(ValueError, match="^overrides.*" + re.escape(message)):
        load_train_config(None, [override])


def test_csv_fields_are_counted_per_row(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text('prompt,completion\n"Say the numbers, please","one, two"\n\n"two\nlines",x\n')
    rows = read_file(good)
    assert [r.messages[1]["content"] for r in rows] == ["one, two", "x"]
    assert rows[0].messages[0]["content"] == "Say the numbers, please" and rows[1].source == f"{good}:4"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,completion\nsay cat,cat\nSay the numbers,one, two, three\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: 4 fields, but the header has 2"):
        read_file(bad)  # before: the completion was silently cut to "one"
