"""`lorakit bench variants --quick`: every variant trains, its figures are consistent, the plot is a PNG."""

from __future__ import annotations

import argparse
import json

from lorakit_bench import variants


def test_variants_quick(tmp_path, capsys):
    out = tmp_path / "variants.jsonl"
    plot = tmp_path / "loss.png"
    args = argparse.Namespace(reps=1, warmup=0, threads=1, json=str(out), quick=True, no_memory=True,
                              set=[f"plot={plot}", "steps=3", "peft=1"])
    records = variants.run(args)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    by_name = {r["variant"]: r for r in records if "variant" in r}
    assert list(by_name) == list(variants.VARIANTS)
    model, _ = variants.tiny_model_and_tokenizer(0)
    total = sum(p.numel() for p in model.parameters())
    hidden, inter, layers = model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers
    kv = model.config.num_key_value_heads * hidden // model.config.num_attention_heads
    # every linear but the head: q, k, v, o, gate, up, down; r * (in + out) each (DoRA adds a magnitude per row)
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
              (inter, hidden)]
    lora = lambda r: layers * sum(r * (i + o) for i, o in shapes)
    assert by_name["full"]["trainable_params"] == total
    assert by_name["bitfit"]["trainable_params"] == (2 * layers + 1) * hidden  # two RMSNorms a layer + the final
    assert by_name["lora"]["trainable_params"] == by_name["loraplus"]["trainable_params"] == lora(8)
    assert by_name["rslora"]["trainable_params"] == lora(64)
    assert by_name["dora"]["trainable_params"] == lora(8) + layers * sum(o for _, o in shapes)
    assert by_name["adalora"]["trainable_params"] == lora(12) + layers * len(shapes) * 12  # + E
    # AdaLoRA's allocator reaches the target budget by the end of the run
    assert by_name["adalora"]["adalora_total_rank"] == by_name["adalora"]["adalora_target_rank"] == 8 * 7 * layers
    for r in by_name.values():
        assert len(r["losses"]) == 3 and r["step_s"] > 0 and r["peak_rss"] > 0 and 0 <= r["exact_match"] <= 1
        adapter_params = 0 if r["variant"] in ("full", "bitfit") else r["trainable_params"]
        assert r["total_params"] == total + adapter_params
    # the same seed and data: every adapter starts from the base's loss (B = 0 / E = 0 leaves the model unchanged)
    first = {n: r["losses"][0] for n, r in by_name.items() if n not in ("adalora",)}
    assert max(first.values()) - min(first.values()) < 1e-5
    dora = records[-1]["dora_step_s"]
    assert set(dora) == {"lorakit LoRA", "lorakit DoRA", "PEFT LoRA", "PEFT DoRA"} and min(dora.values()) > 0
    printed = capsys.readouterr().out
    assert f"| {by_name['dora']['step_s'] / by_name['lora']['step_s']:.2f} |" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
