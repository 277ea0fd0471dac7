"""`lorakit bench scale`: the random real-shape models it builds, and its records checked against their own
numbers (never against timings)."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit_bench import scale
from lorakit_bench.scale_models import SHAPES, llama_config, random_tensor, tensor_infos, write_random_model


def test_shapes_are_the_issue_s():
    """3B: hidden 3072, 28 layers, MLP 8192, GQA 24/8; 7B: hidden 4096, 32 layers, MLP 11008; vocab 49152."""
    count = lambda size: sum(torch.Size(s).numel() for _, _, s in tensor_infos(llama_config(size)))
    assert 2.9e9 < count("3b") < 3.1e9 and 6.8e9 < count("7b") < 6.95e9  # Llama 3.2 3B, Llama 2 7B; vocab 49152
    assert (SHAPES["3b"]["num_attention_heads"], SHAPES["3b"]["num_key_value_heads"]) == (24, 8)
    assert llama_config("7b").vocab_size == 49152


def test_random_model_is_written_tensor_by_tensor_and_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    config = llama_config("tiny", vocab=256)
    write_random_model(tmp_path, config, None, seed=3, max_shard_bytes=50_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.dtype == torch.bfloat16
    weight = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(weight, random_tensor("model.layers.1.mlp.up_proj.weight", tuple(weight.shape), 3))
    assert 0.015 < float(weight.detach().float().std()) < 0.025 and torch.equal(model.model.norm.weight, torch.ones(64,
                                                                                                        dtype=torch.bfloat16))
    assert not torch.equal(weight, random_tensor("model.layers.1.mlp.up_proj.weight", tuple(weight.shape), 4))


def test_settings_refuse_unknown_steps_and_sizes():
    with pytest.raises(ValueError, match="unknown steps"):
        scale.settings(["steps=ours-load-4bit,load-everything"], quick=True)
    with pytest.raises(ValueError, match="unknown sizes"):
        scale.settings(["sizes=70b"], quick=True)
    assert scale.settings(["peers=none"], quick=True)["peers"] == []


def test_quick_suite_records_agree_with_their_own_numbers(tmp_path, capsys):
    out = tmp_path / "scale.jsonl"
    assert main(["bench", "scale", "--quick", "--json", str(out), "--set",
                 "steps=ours-load-4bit,ours-qlora-step,ours-lora-step,ours-merge", "--set",
                 "peers=peer-qlora-step,peer-lora-step"]) == 0
    printed = capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["suite"] == "scale" and record["size"] == "tiny"
    steps = record["steps"]
    assert list(steps) == ["ours-load-4bit", "ours-qlora-step", "ours-lora-step", "ours-merge", "peer-qlora-step",
                           "peer-lora-step"]
    for step, r in steps.items():
        assert r["seconds"] > 0 and r["process_s"] >= r["seconds"], step
        # VmHWM is at least any RSS the parent saw, give or take what the child allocates after reading it
        # (encoding and printing its result, exiting): tens of KiB, seen when the peak is the step's very end
        assert r["peak_rss"] + (1 << 20) >= r["watched_rss"] > 0, step
    for step in ("ours-qlora-step", "peer-qlora-step", "ours-lora-step", "peer-lora-step"):
        assert steps[step]["load_s"] + steps[step]["step_s"] <= steps[step]["seconds"]
        assert 0 < steps[step]["loss"] < 20
    for step in ("ours-lora-step", "peer-lora-step"):  # the peak before the step (model loaded, weights read)
        assert 0 < steps[step]["loaded_peak_rss"] <= steps[step]["peak_rss"]
    for pair, (ours, peer) in (("qlora_step", ("ours-qlora-step", "peer-qlora-step")),
                               ("lora_step", ("ours-lora-step", "peer-lora-step"))):
        # the same random model, batch and fresh adapter (B = 0): both sides' first loss is the base model's
        assert steps[ours]["loss"] == pytest.approx(steps[peer]["loss"], rel=0.02), pair
        ratio = record["ratios"][pair]
        for key in ("seconds", "peak_rss", "process_s"):
            assert ratio[key] == pytest.approx(steps[ours][key] / steps[peer][key]), (pair, key)
    model = record["model"]
    assert model["shards"] == 1 and model["largest_shard_bytes"] <= model["bf16_bytes"]
    assert model["4bit_bytes"] == steps["ours-load-4bit"]["weight_bytes"] < model["bf16_bytes"]
    assert steps["ours-merge"]["written_bytes"] == model["tensor_bytes"] < model["bf16_bytes"]
    assert record["targets"] == {}  # the issue's targets are for 3B and 7B
    assert "ours-qlora-step" in printed and "lorakit / peer, qlora_step" in printed
    assert "lorakit / peer, lora_step" in printed


def test_targets_are_checked_against_their_limits():
    gib = 1 << 30
    steps = {"ours-qlora-step": {"peak_rss": 3.5 * gib, "seconds": 50.0}, "peer-qlora-step": {"seconds": 70.0},
             "ours-merge": {"peak_rss": 7 * gib}}
    found = scale.targets("3b", steps, {"largest_shard_bytes": 4.6 * gib})
    assert found["3b qlora peak_rss <= 4 GiB"]["met"]
    assert found["3b qlora load+step seconds < peer's"] == {"value": 50 / 70, "limit": 1.0, "met": True}
    assert not found["3b merge peak_rss <= largest shard + 2 GiB"]["met"]
    lora = {"ours-lora-step": {"peak_rss": 7.0 * gib, "loaded_peak_rss": 6.5 * gib}}
    bf16 = scale.targets("3b", lora, {"bf16_bytes": 5.5 * gib, "largest_shard_bytes": gib})
    name = "3b lora peak_rss <= 1.2 x bf16 size + activations"
    target = bf16[name]
    assert target["limit"] == pytest.approx(1.2 * 5.5 * gib + 0.5 * gib) and target["met"]  # 7.0 <= 6.6 + 0.5
    lora["ours-lora-step"]["loaded_peak_rss"] = 6.9 * gib  # loaded model over 1.2 x bf16 size: 7.0 > 6.6 + 0.1
    assert not scale.targets("3b", lora, {"bf16_bytes": 5.5 * gib, "largest_shard_bytes": gib})[name]["met"]
    seven = scale.targets("7b", {"ours-qlora-step": {"peak_rss": 6 * gib}}, {"4bit_bytes": 3.6 * gib,
                                                                              "largest_shard_bytes": gib})
    assert seven["7b qlora peak_rss <= 1.3 x 4-bit size + 1 GiB"]["limit"] == pytest.approx(1.3 * 3.6 * gib + gib)
    assert not seven["7b qlora peak_rss <= 1.3 x 4-bit size + 1 GiB"]["met"]


def test_run_rejects_a_suite_mixed_with_scenarios(capsys):
    assert main(["bench", "scale", "forward"]) == 2
    assert "runs alone" in capsys.readouterr().err


def test_unknown_setting_is_a_clear_error(capsys):
    assert main(["bench", "scale", "--quick", "--set", "sizes=13b"]) == 2
    assert "unknown sizes" in capsys.readouterr().err
