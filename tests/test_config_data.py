"""Config loading (YAML + overrides, unknown keys) and JSONL datasets (errors name the line)."""

from __future__ import annotations

import pytest

from conftest import tiny_tokenizer
from lorakit.config import TrainConfig, load_train_config
from lorakit.data.encode import IGNORE, collate, encode, prompt_text
from lorakit.data.examples import Example, read_jsonl


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


def test_jsonl_reads_rows_and_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert read_jsonl(path) == [Example("a", "b"), Example("c", "d")]
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON at column"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'completion' is missing"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'completion' is not a string \(int\)"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object"):
        read_jsonl(path)


def test_encode_masks_prompt_and_keeps_eos_in_loss():
    tok = tiny_tokenizer()
    ids, labels = encode(tok, Example("hi", "yo"), max_length=64)
    prompt = tok(prompt_text(tok, "hi"), add_special_tokens=False)["input_ids"]
    assert prompt_text(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids == prompt + [ord("y"), ord("o"), tok.eos_token_id]
    # token by token: no loss on the prompt, loss on the answer and on the end-of-turn token
    assert labels == [IGNORE] * len(prompt) + [ord("y"), ord("o"), tok.eos_token_id]
    assert tok.pad_token_id == tok.eos_token_id  # pad == eos, yet eos stays supervised
    short_ids, short_labels = encode(tok, Example("hi", "yo"), max_length=len(prompt) + 1)
    assert short_ids == prompt + [ord("y")] and short_labels[-1] == ord("y")


def test_collate_pads_right_and_ignores_padding():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
