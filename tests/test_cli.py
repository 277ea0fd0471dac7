"""`lorakit train / eval / generate / merge` end to end on a tiny model folder (seconds)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.models import load


def train_args(tiny_model_dir, jsonl, out):
    return ["train", f"base={tiny_model_dir}", f"dataset={jsonl}", f"eval_dataset={jsonl}", f"output_dir={out}",
            "max_steps=60", "batch_size=8", "lr=0.02", "warmup_steps=2", "lora.r=8", "max_new_tokens=4"]


def test_train_eval_generate_merge(tiny_model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, jsonl, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["last_loss"] < 0.5 * results["first_loss"]
    assert results["exact_match_after"] > results["exact_match_before"]
    assert (out / "metrics.jsonl").read_text().count("\n") == 60
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "held-out exact match after training" in printed

    # the saved adapter reloads onto a fresh base and gives the trained model's predictions
    assert main(["eval", str(out / "adapter"), "--dataset", str(jsonl), "--max-new-tokens", "4"]) == 0
    assert f"exact match: {results['exact_match_after']:.1%}" in capsys.readouterr().out

    model, tokenizer = load(str(tiny_model_dir))
    lorakit.load_adapter(model, out / "adapter")
    ids = tokenizer("<|im_start|>user\nsay cat<|im_end|>\n", return_tensors="pt")["input_ids"]
    expected = model(ids).logits

    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    assert main(["generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "4", "say cat"]) == 0
    assert capsys.readouterr().out.strip().endswith("cat") == (results["exact_match_after"] == 1.0)


def test_print_config_and_errors(capsys, tmp_path):
    assert main(["train", "--print-config", "lora.r=4", "max_steps=3"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 3" in printed and "  r: 4" in printed
    assert main(["train", "lora.rr=4"]) == 2
    assert "unknown key 'rr' (did you mean 'r'?)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    assert main(["train", f"dataset={bad}"]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_validation_metrics_every_n_steps(tiny_model_dir, jsonl, tmp_path):
    out = tmp_path / "run"
    assert main(["train", f"base={tiny_model_dir}", f"dataset={jsonl}", "val_size=2", "eval_every=3", "max_steps=6",
                 f"output_dir={out}", "max_new_tokens=4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-6)
        assert 0.0 <= r["exact_match"] <= 1.0
    results = json.loads((out / "results.json").read_text())
    assert results["eval_examples"] == 2 and results["train_examples"] == 6
    assert results["best_val_loss"] == min(r["val_loss"] for r in evals)
