"""Exports: a merged model as GGUF read back by transformers' GGUF loader, an adapter as llama.cpp's
LoRA-adapter GGUF read back by gguf.GGUFReader, and merged HF folders in a chosen dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lorakit
from conftest import BPE_TEXT, tiny_llama, tiny_tokenizer
from lorakit.adapters.io import read_adapter
from lorakit.cli import main
from lorakit.export import permute_rows, write_model_gguf
from lorakit.models import load

gguf = pytest.importorskip("gguf")

def merged_model(adapter_dir):
    model, tokenizer = load(read_adapter(adapter_dir).base)
    lorakit.load_adapter(model, read_adapter(adapter_dir))
    return lorakit.merge_and_unload(model), tokenizer


def test_permutation_matches_llama_cpp_formula():
    """llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)."""
    w = torch.arange(8 * 3).reshape(8, 3)
    got = permute_rows(w, 2)
    # head 0 rows 0..3 are [first half 0,1 | second half 2,3] -> interleaved 0,2,1,3
    assert got[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-5), ("f16", 2e-2), ("bf16", 1e-1)])
def test_merged_gguf_loads_back_in_transformers_with_close_logits(adapter_dir, tmp_path, tokens, dtype, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, tokenizer = merged_model(adapter_dir)
    out = tmp_path / "gguf" / f"merged-{dtype}.gguf"
    assert main(["export", "gguf", "--merged", str(adapter_dir), str(out), "--dtype", dtype]) == 0
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = merged(tokens).logits, back(tokens).logits
    assert want.abs().max() > 0.1  # a real signal to compare
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    tok_back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert tok_back(BPE_TEXT)["input_ids"] == tokenizer(BPE_TEXT)["input_ids"]
    assert tok_back.eos_token == "<|im_end|>"


def test_merged_gguf_has_llama_cpp_names_and_metadata(adapter_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--merged", str(adapter_dir), str(out)]) == 0
    reader = gguf.GGUFReader(out)
    names = {t.name: t for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
            "blk.1.attn_k.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"} <= set(names)
    assert names["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    field = reader.fields["llama.attention.head_count_kv"]
    assert int(field.parts[field.data[0]][0]) == 2
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt2"  # llama.cpp's name for byte-level BPE
    field = reader.fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt-2"  # GPT-2's split (llama.cpp refuses "gpt2")


def test_q8_0_gguf_is_close(adapter_dir, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    merged, _ = merged_model(adapter_dir)
    out = tmp_path / "q8.gguf"
    assert main(["export", "gguf", "--merged", str(adapter_dir), str(out), "--dtype", "q8_0"]) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 32
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48: llama.cpp's fallback
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, merged(tokens).logits, atol=0.1, rtol=0.1)


def test_adapter_gguf_refuses_q8_0(adapter_dir, tmp_path, capsys):
    assert main(["export", "gguf", "--adapter", str(adapter_dir), str(tmp_path / "a.gguf"), "--dtype", "q8_0"]) == 2
    assert "f32, f16 or bf16" in capsys.readouterr().err


def test_char_level_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="byte-level BPE"):
        write_model_gguf(tiny_llama(), tiny_tokenizer(), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_adapter_gguf_layout(adapter_dir, tmp_path):
    """llama.cpp's adapter layout: general.type=adapter, adapter.type=lora, adapter.lora.alpha, and
    `<base tensor>.lora_a` [r, in] / `.lora_b` [out, r] (GGUF lists shapes reversed)."""
    out = tmp_path / "adapter.gguf"
    assert main(["export", "gguf", "--adapter", str(adapter_dir), str(out)]) == 0
    plain = tmp_path / "plain"
    plain.write_text("")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600: a server reads it
    reader = gguf.GGUFReader(out)

    def value(key):
        field = reader.fields[key]
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part[0]

    assert value("general.type") == "adapter"
    assert value("general.architecture") == "llama"
    assert value("adapter.type") == "lora"
    assert value("adapter.lora.alpha") == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * 2  # 7 linears per block, 2 blocks, a and b each
    a, b = tensors["blk.0.attn_k.weight.lora_a"], tensors["blk.0.attn_k.weight.lora_b"]
    assert list(a.shape) == [32, 4] and list(b.shape) == [4, 16]  # ne: [in, r], [r, out]
    src = read_adapter(adapter_dir).lora["model.layers.0.self_attn.k_proj"]
    np.testing.assert_allclose(a.data, src["lora_A"].numpy())
    np.testing.assert_allclose(b.data, permute_rows(src["lora_B"], 2).numpy())  # k rows as llama.cpp's
    v = tensors["blk.1.attn_v.weight.lora_b"]
    np.testing.assert_allclose(v.data, read_adapter(adapter_dir).lora["model.layers.1.self_attn.v_proj"]["lora_B"])


def test_adapter_gguf_delta_equals_merged_delta(adapter_dir, tmp_path):
    """alpha / r * B A from the GGUF, un-permuted, is the delta the merge adds to q_proj."""
    out = tmp_path / "adapter.gguf"
    assert main(["export", "gguf", "--adapter", str(adapter_dir), str(out)]) == 0
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in gguf.GGUFReader(out).tensors}
    merged, _ = merged_model(adapter_dir)
    base = tiny_llama().model.layers[0].self_attn.q_proj.weight
    delta = merged.model.layers[0].self_attn.q_proj.weight - base
    got = tensors["blk.0.attn_q.weight.lora_b"] @ tensors["blk.0.attn_q.weight.lora_a"] * (8 / 4)
    torch.testing.assert_close(got, permute_rows(delta.detach(), 4), atol=1e-5, rtol=1e-5)


def test_export_merged_folder_in_bf16(adapter_dir, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    merged, _ = merged_model(adapter_dir)
    out = tmp_path / "merged"
    assert main(["export", "merged", str(adapter_dir), str(out), "--dtype", "bf16"]) == 0
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(back.float()(tokens).logits, merged(tokens).logits, atol=0.1, rtol=0.1)
    assert main(["export", "merged", str(adapter_dir), str(out)]) == 0  # default fp32: equal logits
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(tokens).logits,
                                   merged(tokens).logits, atol=1e-5, rtol=1e-5)


def test_pre_tokenizer_names_follow_llama_cpp():
    """Names from llama.cpp's llama-vocab.cpp (`gpt2` is not one: llama.cpp refuses it), each for the
    split it implements; a tokenizer that splits otherwise is refused, never given a near name."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    from lorakit.export import LLAMA3_SPLIT, pre_from_config

    def name(pre, ignore_merges=False, normalizer=None):
        backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre
        backend.normalizer = normalizer
        return pre_from_config(json.loads(backend.to_str()))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = pre_tokenizers.Digits(individual_digits=True)
    llama3 = [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    assert name(byte_level) == "gpt-2"
    assert name(pre_tokenizers.Sequence([digits, byte_level])) == "smollm"
    assert name(pre_tokenizers.Sequence(llama3), ignore_merges=True) == "llama-bpe"
    refused = [
        (pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), byte_level]), False, None),
        (pre_tokenizers.ByteLevel(add_prefix_space=True), False, None),  # llama.cpp adds no space
        (byte_level, False, normalizers.NFC()),  # llama.cpp does not normalize BPE text
        (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False), byte_level]), False, None),
        (pre_tokenizers.Sequence(llama3), False, None),  # llama.cpp's llama-bpe ignores merges
    ]
    for pre, ignore_merges, normalizer in refused:
        with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
            name(pre, ignore_merges, normalizer)

