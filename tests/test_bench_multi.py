"""`lorakit bench multi --quick`: every record present, well formed, and its ratios = ours / peer."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit_bench.multi import settings


def test_quick_suite_records_and_ratios(tmp_path, capsys):
    out = tmp_path / "multi.jsonl"
    assert main(["bench", "multi", "--quick", "--reps", "1", "--warmup", "0", "--threads", "1", "--no-memory",
                 "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["scenario"] for r in records] == ["mixed-prefill", "mixed-generate", "mixed-decode", "train-parallel",
                                                "adapter-switch"]
    for r in records:
        assert r["suite"] == "multi" and r["config"]["model"] == "tiny" and r["env"]["threads"] == 1
        assert "loadavg_1m_before" in r["env"]
        ours, peer = r["ours"], r["peer"]
        assert ours["seconds"] > 0 and peer["seconds"] > 0
        for key in ("seconds", "tokens_per_s", "mixed_over_single", "single_seconds"):
            if key in ours:
                assert r["ratios"][key] == pytest.approx(ours[key] / peer[key])
    prefill, generate, decode, train, switch = records
    for r in (prefill, generate, decode):
        assert r["peer"]["name"] == "peft adapter_names"
        for side in (r["ours"], r["peer"]):
            assert side["mixed_over_single"] == pytest.approx(side["seconds"] / side["single_seconds"])
            assert side["tokens_per_s"] == pytest.approx(r["tokens"] / side["seconds"])
    assert prefill["tokens"] == 6 * 8 and generate["tokens"] == decode["tokens"] == 6 * 3  # rows x prompt, x new
    assert train["tokens"] == 2 * 1 * 2 * 16 and "tokens_per_s" in train["ratios"]
    assert switch["attach_seconds"] == pytest.approx(switch["ours"]["seconds"] - switch["peer"]["seconds"])
    assert switch["store"]["device_misses"] >= 1 and switch["store"]["device_hits"] >= 1  # both cases happened
    assert "| mixed-generate | lorakit route |" in capsys.readouterr().out


def test_settings_refuse_unknown_keys_and_bad_values():
    assert settings(["adapters=4", "model=tiny"], quick=False)["adapters"] == 4
    assert settings(["parts=train,mixed"], quick=True)["parts"] == ["train", "mixed"]
    with pytest.raises(ValueError, match="device is cpu or cuda"):
        settings(["device=tpu"], quick=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device here"):
            settings(["device=cuda"], quick=True)
    with pytest.raises(ValueError, match="dtype is float32, bfloat16 or float16"):
        settings(["dtype=int8"], quick=True)
    with pytest.raises(ValueError, match="parts are some of mixed, train, switch"):
        settings(["parts=mixed,serve"], quick=True)
    with pytest.raises(ValueError, match="KEY one of parts, model, adapters"):
        settings(["adaptors=4"], quick=False)
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        settings(["rows=0"], quick=True)


def test_decode_loop_makes_the_tokens_generate_makes():
    """The decode record times real decoding: from the prefilled cache, the same greedy tokens as `generate`."""
    import torch

    import lorakit
    from conftest import tiny_llama
    from lorakit_bench.multi import decode, prefilled

    model = tiny_llama()
    for i, r in enumerate((2, 4)):
        lorakit.inject(model, lorakit.LoraSpec(r=r, alpha=2 * r), name=f"a{i}")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lorakit.route(model, ["a0", None, "a1"]):
        tokens = decode(model, prefilled(model, ids), 4)
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)[:, 5:]
    assert tokens.shape == (3, 5) and torch.equal(tokens, expected)
    assert len({tuple(row) for row in tokens.tolist()}) > 1  # the rows really differ
