"""S2-Attn against full attention and an independent loop-by-loop reference; position interpolation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from lorakit.longlora import enable_s2_attention, group_positions, grouped_attention, interpolate_positions


def reference_s2(q, k, v, group: int, allowed=None):
    """Plain torch, one head and one query at a time: the first half of the heads attend within
    groups [0, g), [g, 2g), ...; the other half within groups shifted by g/2 (the last one wrapping
    around to the start); always only to keys at or before the query's own position."""
    b, h, t, d = q.shape
    out = torch.zeros_like(q)
    for head in range(h):
        shift = group // 2 if head >= h // 2 else 0
        group_of = [((i - shift) % t) // group for i in range(t)]
        for i in range(t):
            keys = [j for j in range(t) if group_of[j] == group_of[i] and j <= i]
            for bi in range(b):
                ok = [j for j in keys if allowed is None or allowed[bi, 0, i, j]] or [i]
                scores = (q[bi, head, i] @ k[bi, head, ok].T) / d**0.5
                out[bi, head, i] = torch.softmax(scores, -1) @ v[bi, head, ok]
    return out


def test_one_group_over_the_sequence_is_full_causal_attention():
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    grouped = grouped_attention(q, k, v, group_positions(16, 16, False, "cpu"), None, 8**-0.5)
    torch.testing.assert_close(grouped, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [4, 8])
def test_s2_attention_equals_the_reference(group):
    model = enable_s2_attention(tiny_llama(), group_size_ratio=group / 16).train()
    attention = model.model.layers[0].self_attn
    q = torch.randn(2, 4, 16, 8)
    k, v = torch.randn(2, 2, 2, 16, 8).unbind(0)  # 2 kv heads for 4 query heads
    from lorakit.longlora import s2_attention

    out, _ = s2_attention(attention, q, k, v, None, scaling=8**-0.5)
    expected = reference_s2(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), group)
    torch.testing.assert_close(out.transpose(1, 2), expected, rtol=1e-5, atol=1e-5)
    # with a padding mask (second row: last 5 tokens are padding)
    allowed = torch.ones(2, 1, 16, 16, dtype=torch.bool).tril()
    allowed[1, :, :, 11:] = False
    out, _ = s2_attention(attention, q, k, v, allowed, scaling=8**-0.5)
    expected = reference_s2(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), group, allowed)
    torch.testing.assert_close(out.transpose(1, 2)[:, :, :11], expected[:, :, :11], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_model_trains_with_s2_and_infers_with_full_attention():
    tokens = torch.randint(0, 128, (2, 16))
    full = tiny_llama()
    expected_eval = full(tokens).logits
    model = enable_s2_attention(tiny_llama(), group_size_ratio=0.25)
    torch.testing.assert_close(model.eval()(tokens).logits, expected_eval, rtol=1e-5, atol=1e-5)
    model.train()
    sparse = model(tokens).logits
    assert not torch.allclose(sparse, full.train()(tokens).logits, atol=1e-4)  # training really is sparse
    # the first group (tokens 0..3) sees the same keys in both patterns for unshifted heads only; causality
    # holds: the first token's logits equal full attention's (it only ever sees itself)
    torch.testing.assert_close(sparse[:, 0], expected_eval[:, 0], rtol=1e-5, atol=1e-5)
    sparse.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_position_interpolation_sets_linear_rope():
    model = tiny_llama()
    factor = interpolate_positions(model, 256)
    assert factor == 4.0 and model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.max_position_embeddings == 256
    ids = torch.arange(8)[None]
    cos, _ = model.model.rotary_emb(torch.zeros(1, 8, 32), ids)
    plain = tiny_llama()
    cos4, _ = plain.model.rotary_emb(torch.zeros(1, 8, 32), ids.float() / 4)  # positions divided by the factor
    torch.testing.assert_close(cos, cos4, rtol=1e-5, atol=1e-5)


def test_longlora_training_saves_embeddings_norms_and_context(tiny_model_dir, jsonl, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from lorakit.config import load_train_config
    from lorakit.models import load
    from lorakit.train.run import run

    cfg = load_train_config(None, [f"base={tiny_model_dir}", f"dataset={jsonl}", f"output_dir={tmp_path}",
                                   "max_steps=3", "eval=false", "longlora.group_size_ratio=0.5",
                                   "longlora.target_context=128", "max_length=32"])
    trained, _ = run(cfg, log=lambda *_: None)
    assert trained.config._attn_implementation == "s2attn"
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        context = f.metadata()["lorakit.context"]
    assert "base_model.model.model.embed_tokens.weight" in keys
    assert "base_model.model.model.layers.1.post_attention_layernorm.weight" in keys
    assert '"factor": 2.0' in context and '"rope_type": "linear"' in context
    ids = torch.tensor([[2, 117, 115, 101, 114, 10, 115, 97, 121, 1]])
    expected = trained.eval()(ids).logits  # inference: full attention
    reloaded, _ = load(None, adapters=[tmp_path / "adapter"])  # the base the adapter records, its RoPE setup
    assert reloaded.config.rope_parameters["factor"] == 2.0
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # PEFT reads the embeddings and norms as modules_to_save (its base needs the same RoPE setup)
    base, _ = load(str(tiny_model_dir))
    interpolate_positions(base, 128)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_long_sequences_split_files_and_cut_exact_lengths(tmp_path):
    from conftest import tiny_tokenizer
    from lorakit.data.longtext import as_rows, is_held_out, long_sequences, source_files

    for i in range(40):
        (tmp_path / f"pkg{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"pkg{i % 3}" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * (i + 1))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "dep.py").write_text("print('not stdlib')\n")
    train, held = source_files(tmp_path, "train"), source_files(tmp_path, "held-out")
    names = lambda files: {p.relative_to(tmp_path).as_posix() for p in files}
    assert names(train) | names(held) == {f"pkg{i % 3}/m{i}.py" for i in range(40)}  # site-packages left out
    assert not names(train) & names(held) and held
    assert all(is_held_out(n) for n in names(held))
    tok = tiny_tokenizer()
    seqs = long_sequences(tok, 50, 3, split="held-out", root=tmp_path)
    assert [len(s) for s in seqs] == [50, 50, 50]
    # reference: the held-out files in path order, each headed by its path and ended by end-of-text
    expected = []
    for path in sorted(held):
        text = f"# file: {path.relative_to(tmp_path).as_posix()}\n{path.read_text()}"
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sum(seqs, []) == expected[:150]
    assert as_rows(seqs)[0] == (seqs[0], seqs[0])
    with pytest.raises(ValueError, match="hold only"):
        long_sequences(tok, 10**6, 2, split="held-out", root=tmp_path)


def test_passkey_prompt_has_the_length_and_the_needle_at_its_depth():
    from conftest import tiny_tokenizer
    from lorakit.data.longtext import passkey_prompt

    tok = tiny_tokenizer()
    where = {}
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = passkey_prompt(tok, 2000, depth, 40721)
        assert len(prompt) + len(answer) == 2000 and tok.decode(answer) == " 40721"
        text = tok.decode(prompt)
        assert text.endswith("What is the pass key? The pass key is") and text.count("40721") == 2
        where[depth] = text.index("The pass key is 40721") / len(text)
    assert where[0.0] < 0.1 and 0.4 < where[0.5] < 0.6 and where[1.0] > 0.9
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok, 100, 0.5, 40721)


def test_token_nll_and_bucket_perplexity_match_plain_cross_entropy():
    from lorakit.longlora import bucket_perplexity, token_nll

    model = tiny_llama()
    ids = torch.randint(0, 128, (40,)).tolist()
    nll = token_nll(model, ids, chunk=7)
    logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").detach()
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    ppl = bucket_perplexity(nll, [0, 10, 20, 40])
    # token at position p (1..39) is predicted by nll[p - 1]
    assert ppl["0-10"] == pytest.approx(float(expected[0:9].mean().exp()), rel=1e-5)
    assert ppl["10-20"] == pytest.approx(float(expected[9:19].mean().exp()), rel=1e-5)
    assert ppl["20-40"] == pytest.approx(float(expected[19:].mean().exp()), rel=1e-5)


def test_passkey_retrieved_agrees_with_greedy_generation():
    from lorakit.longlora import passkey_retrieved

    model = tiny_llama()
    prompt = torch.randint(3, 128, (20,)).tolist()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    greedy = out[0, 20:].tolist()
    assert passkey_retrieved(model, prompt, greedy) == (True, greedy)
    wrong = greedy[:2] + [(greedy[2] + 1) % 128] + greedy[3:]
    ok, predicted = passkey_retrieved(model, prompt, wrong)
    assert not ok and predicted[:3] == greedy[:3]


def test_bench_longlora_quick(tmp_path):
    from lorakit.cli import main

    out = tmp_path / "bench.jsonl"
    common = ["bench", "longlora", "--quick", "--reps", "1", "--warmup", "0", "--threads", "1"]
    assert main([*common, "--set", "lengths=32", "--set", "group_size_ratio=0.25", "--json", str(out)]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    full, s2 = record["full"], record["s2"]
    assert record["length"] == 32 and full["attn_implementation"] == "sdpa" and s2["attn_implementation"] == "s2attn"
    assert s2["group"] == 8 and full["group"] == 32
    assert full["loss"] != pytest.approx(s2["loss"], abs=1e-6)  # the S2 step really attends sparsely
    assert record["ratios"]["seconds"] == full["seconds"] / s2["seconds"]
    assert record["ratios"]["peak_rss"] == full["peak_rss"] / s2["peak_rss"] and full["peak_rss"] > 0
    assert record["env"]["threads"] == 1 and "loadavg_1m_before" in record["env"]
    # a point that passes the memory limit is stopped and reported, not run to the end
    out2 = tmp_path / "skipped.jsonl"
    assert main([*common, "--set", "lengths=32", "--set", "max_rss_gib=0.01", "--json", str(out2)]) == 0
    [record] = [json.loads(line) for line in out2.read_text().splitlines()]
    assert "max_rss_gib=0.01" in record["full"]["skipped"] and "seconds" not in record["s2"]
    assert main([*common, "--set", "lengths=30"]) == 2  # 30 x 0.25 is no even group
    out3 = tmp_path / "attention.jsonl"
    assert main([*common, "--set", "lengths=32", "--set", "attention_only=1", "--json", str(out3)]) == 0
    [record] = [json.loads(line) for line in out3.read_text().splitlines()]
    for side in ("full", "s2"):
        assert record[side]["attention_only"] and record[side]["seconds"] == record[side]["attn_seconds"] > 0


def test_bench_longlora_settings():
    from lorakit_bench.longlora import DEFAULTS, settings

    assert settings([], quick=False)["lengths"] == DEFAULTS["lengths"] == [2048, 4096, 8192, 16384]
    found = settings(["lengths=64,128", "group=16", "targets=q_proj", "max_rss_gib=2.5"], quick=True)
    assert found["lengths"] == [64, 128] and found["group"] == 16 and found["targets"] == ["q_proj"]
    assert found["max_rss_gib"] == 2.5 and found["model"] == "tiny"
    with pytest.raises(ValueError, match="KEY one of"):
        settings(["lenghts=64"], quick=True)
    with pytest.raises(ValueError, match="divides the length"):
        settings(["lengths=100", "group=16"], quick=True)


def test_train_on_standard_library_long_text(tiny_model_dir, tmp_path, monkeypatch):
    """`dataset: stdlib` trains on rows of exactly max_length tokens of the training files (as many as the
    steps take) and validates on held-out files; no exact match (there are no answers)."""
    from lorakit.config import load_train_config
    from lorakit.data.longtext import long_sequences
    from lorakit.models import load
    from lorakit.train import run as run_module

    seen = {}
    real_fit = run_module.fit

    def spy(model, rows, cfg, *args, evaluate=None, **kw):
        seen["rows"], seen["val"] = rows, evaluate(model)
        return real_fit(model, rows, cfg, *args, evaluate=evaluate, **kw)

    monkeypatch.setattr(run_module, "fit", spy)
    settings = [f"base={tiny_model_dir}", "dataset=stdlib", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                "batch_size=2", "max_length=40", "eval_every=1", "longlora.group_size_ratio=0.5"]
    _, results = run_module.run(load_train_config(None, settings), log=lambda *_: None)
    _, tokenizer = load(str(tiny_model_dir))
    expected = long_sequences(tokenizer, 40, 4, split="train", seed=0)
    assert [ids for ids, _ in seen["rows"]] == expected and [labels for _, labels in seen["rows"]] == expected
    assert "exact_match" not in seen["val"] and seen["val"]["val_loss"] > 0
    assert "exact_match_after" not in results and results["steps"] == 2
    with pytest.raises(ValueError, match="set max_steps"):
        run_module.run(load_train_config(None, [*settings, "max_steps=null", "epochs=1"]), log=lambda *_: None)


def test_parallel_jobs_train_on_standard_library_long_text(tiny_model_dir, tmp_path, monkeypatch):
    """`train-multi` builds each job's rows as `lorakit train` does: `dataset: stdlib` gives each job its
    own seeded long-text rows and held-out validation rows."""
    from lorakit.config import load_train_config
    from lorakit.data.longtext import as_rows, long_sequences
    from lorakit.models import load
    from lorakit.train import multi as multi_train

    seen = []
    real = multi_train.fit_multi
    monkeypatch.setattr(multi_train, "fit_multi", lambda model, jobs, *a: seen.extend(jobs) or real(model, jobs, *a))
    cfgs = [load_train_config(None, [f"base={tiny_model_dir}", "dataset=stdlib", f"output_dir={tmp_path / str(i)}",
                                     "max_steps=2", "batch_size=1", "max_length=32", "eval_every=2", f"seed={i}"])
            for i in range(2)]
    multi_train.run_multi(cfgs, log=lambda *_: None)
    _, tokenizer = load(str(tiny_model_dir))
    held = as_rows(long_sequences(tokenizer, 32, 1, split="held-out"))
    for i, job in enumerate(seen):
        assert job.rows == as_rows(long_sequences(tokenizer, 32, 2, split="train", seed=i))
        assert job.val_rows == held
    assert seen[0].rows != seen[1].rows
    assert (tmp_path / "1" / "adapter" / "adapter_model.safetensors").is_file()
