"""S2-Attn against full attention and an independent loop-by-loop reference; position interpolation."""

from __future__ import annotations

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

    from lorakit.cli import load_with_adapter
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
    reloaded, _ = load_with_adapter(None, str(tmp_path / "adapter"))
    assert reloaded.config.rope_parameters["factor"] == 2.0
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # PEFT reads the embeddings and norms as modules_to_save (its base needs the same RoPE setup)
    base, _ = load(str(tiny_model_dir))
    interpolate_positions(base, 128)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
