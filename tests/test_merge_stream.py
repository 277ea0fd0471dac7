"""Merge shard by shard (`lorakit merge`, `lorakit export`) against the in-memory merge
(`merge_and_unload` of the whole model) and plain torch; its memory stays about one tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import tiny_tokenizer
from lorakit.adapters.copies import module_copies
from lorakit.adapters.io import read_adapter
from lorakit.adapters.layer import lora_layers
from lorakit.cli import main
from lorakit.export import write_merged_streamed
from lorakit.models import load
from lorakit.stream import INDEX_FILE, checkpoint_files, iter_tensors


def llama(tied: bool, bias: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias, initializer_range=0.2,
    )).eval()  # fmt: skip


def gpt2(seed: int = 0) -> GPT2LMHeadModel:  # Conv1D layers (weight [in, out]), biases, tied head
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      initializer_range=0.2)).eval()


def save_sharded(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards, some tensors split across them
    tiny_tokenizer().save_pretrained(folder)
    return folder


def randomize(model, seed: int = 1) -> None:
    """Every adapter parameter (A, B, DoRA's magnitude, AdaLoRA's E, module copies) moved at random, so that
    each one shows."""
    g = torch.Generator().manual_seed(seed)
    params = [p for _, layer in lora_layers(model) for p in layer.adapters.parameters()]
    params += [p for _, copies in module_copies(model) for p in copies.copies.parameters()]
    with torch.no_grad():
        for p in params:
            p.copy_(p + torch.randn(p.shape, generator=g) * 0.1)


def in_memory(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model, _ = load(str(base))
    lorakit.load_adapter(model, read_adapter(adapter))
    return lorakit.merge_and_unload(model, safe=True).state_dict()


def streamed_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {key: t for f in checkpoint_files(folder) for key, t in iter_tensors(f)}


CASES = {  # name: (model, spec)
    "lora-llama-biases": (lambda: llama(tied=False, bias=True),
                          lorakit.LoraSpec(r=4, alpha=8, targets="all-linear", bias="all", rslora=True,
                                           rank_pattern={"v_proj": 2})),
    "dora-llama": (lambda: llama(tied=False, bias=False), lorakit.LoraSpec(r=4, targets="all-linear", kind="dora")),
    "adalora-llama": (lambda: llama(tied=False, bias=True),
                      lorakit.LoraSpec(r=12, targets=["q_proj", "down_proj"], kind="adalora")),
    "lora-llama-tied-embedding": (lambda: llama(tied=True, bias=False),
                                  lorakit.LoraSpec(r=4, targets=["embed_tokens", "q_proj", "lm_head"],
                                                   modules_to_save=["model.norm"])),
    "lora-gpt2-conv1d": (gpt2, lorakit.LoraSpec(r=4, targets=["c_attn", "c_proj", "c_fc"], bias="lora_only")),
    "pissa-saved-for-its-residual-base": (lambda: llama(tied=False, bias=False),
                                          lorakit.LoraSpec(r=4, targets=["q_proj", "up_proj"], init="pissa")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_equals_in_memory_merge(case, tmp_path):
    make, spec = CASES[case]
    base = save_sharded(make(), tmp_path / "base")
    assert len(checkpoint_files(base)) > 2
    model, _ = load(str(base))
    lorakit.inject(model, spec)
    randomize(model)
    if spec.bias != "none":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.add_(torch.randn(p.shape) * 0.1)  # trained biases, saved with the adapter
    lorakit.save_adapter(model, tmp_path / "adapter", convert_pissa=False)  # PiSSA: the SVD is redone per layer
    expected = in_memory(base, tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    got = streamed_tensors(tmp_path / "merged")
    stored = streamed_tensors(base)
    assert set(got) == set(stored)  # the checkpoint's keys, nothing more or less
    changed = 0
    for key, t in got.items():
        assert t.dtype == stored[key].dtype
        torch.testing.assert_close(t, expected[key], rtol=0, atol=0, msg=key)
        changed += not torch.equal(t, stored[key])
    assert changed >= 4
    index = json.loads((tmp_path / "merged" / INDEX_FILE).read_text())
    assert index["weight_map"] == json.loads((base / INDEX_FILE).read_text())["weight_map"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = make()
    reference.load_state_dict(expected, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, reference(ids).logits)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_streamed_merge_is_the_lora_formula(tmp_path):
    """W + alpha / r * B A for a plain linear, W^T-layout for a Conv1D, from the adapter file's tensors."""
    from safetensors.torch import load_file

    base = save_sharded(gpt2(), tmp_path / "base")
    model, _ = load(str(base))
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=6, targets=["c_attn"]))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    write_merged_streamed(base, read_adapter(tmp_path / "adapter"), tmp_path / "merged")
    got, stored = streamed_tensors(tmp_path / "merged"), streamed_tensors(base)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.1.attn.c_attn"
    a, b = saved[f"{prefix}.lora_A.weight"].double(), saved[f"{prefix}.lora_B.weight"].double()  # [r, in], [out, r]
    key = "transformer.h.1.attn.c_attn.weight"  # Conv1D: [in, out]
    expected = stored[key].double() + (3.0 * b @ a).T
    torch.testing.assert_close(got[key].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(got["transformer.h.1.mlp.c_fc.weight"], stored["transformer.h.1.mlp.c_fc.weight"])


def test_streamed_merge_casts_and_exports_gguf_like_the_in_memory_path(tmp_path):
    gguf = pytest.importorskip("gguf")
    from conftest import tiny_bpe_tokenizer
    from lorakit.export import write_merged_gguf_streamed, write_model_gguf

    base = tmp_path / "base"
    llama(tied=False, bias=False).save_pretrained(base, max_shard_size="20KB")
    tiny_bpe_tokenizer().save_pretrained(base)
    model, tokenizer = load(str(base))
    lorakit.inject(model, lorakit.LoraSpec(r=4, targets="all-linear"))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    adapter = read_adapter(tmp_path / "adapter")
    write_merged_streamed(base, adapter, tmp_path / "bf16", dtype="bf16")
    got = streamed_tensors(tmp_path / "bf16")
    expected = in_memory(base, tmp_path / "adapter")
    for key, t in got.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, expected[key].to(torch.bfloat16), rtol=0, atol=0)  # merged in fp32, cast once
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = lorakit.merge_and_unload(model)
    write_model_gguf(merged, tokenizer, tmp_path / "memory.gguf", "f16")
    write_merged_gguf_streamed(base, adapter, tmp_path / "streamed.gguf", "f16")
    ours, theirs = gguf.GGUFReader(tmp_path / "streamed.gguf"), gguf.GGUFReader(tmp_path / "memory.gguf")
    theirs = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs)  # in checkpoint order, not module order
    for a in ours.tensors:
        b = theirs[a.name]
        assert a.tensor_type == b.tensor_type and (a.data == b.data).all(), a.name
    assert ours.fields["tokenizer.ggml.tokens"].data == theirs_fields(tmp_path / "memory.gguf")


def theirs_fields(path):
    import gguf

    return gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data


def test_streamed_merge_of_a_qlora_adapter_into_the_original_weights(tmp_path):
    """--qlora-base original: the checkpoint's weights + the delta, no 4-bit rounding in any weight."""
    from lorakit.quant.linear4bit import quantize_model

    base = save_sharded(llama(tied=False, bias=False), tmp_path / "base")
    model, _ = load(str(base))
    quantize_model(model, blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"]))
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert read_adapter(tmp_path / "adapter").quant is not None
    args = ["merge", str(tmp_path / "adapter")]
    assert main([*args, str(tmp_path / "original"), "--qlora-base", "original"]) == 0
    assert main([*args, str(tmp_path / "dequantized")]) == 0
    stored, original = streamed_tensors(base), streamed_tensors(tmp_path / "original")
    dequantized = streamed_tensors(tmp_path / "dequantized")
    plain = lorakit.LoraSpec(r=2, targets=["q_proj"])
    full, _ = load(str(base))
    lorakit.inject(full, plain)
    for (_, ours), (_, theirs) in zip(lora_layers(full), lora_layers(model), strict=True):
        ours.adapters["default"].load_state_dict(theirs.adapters["default"].state_dict())
    expected = lorakit.merge_and_unload(full).state_dict()
    for key in stored:
        torch.testing.assert_close(original[key], expected[key], rtol=0, atol=0, msg=key)
    key = "model.layers.0.mlp.up_proj.weight"  # not adapted: the original vs its 4-bit rounding
    assert torch.equal(original[key], stored[key]) and not torch.equal(dequantized[key], stored[key])


def test_merge_of_a_folder_without_weights_names_it(tmp_path, capsys):
    base = save_sharded(llama(tied=False, bias=False), tmp_path / "base")
    model, _ = load(str(base))
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    shard = checkpoint_files(base)[1]
    shard.unlink()
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "m"), "--base", str(base)]) == 2
    assert shard.name in capsys.readouterr().err
    for f in base.glob("*.safetensors*"):
        f.unlink()
    assert main(["export", "merged", str(tmp_path / "adapter"), str(tmp_path / "m"), "--base", str(base)]) == 2
    assert "model.safetensors" in capsys.readouterr().err and not (tmp_path / "m").exists()


CHILD = textwrap.dedent("""
    import json, sys
    from lorakit.adapters.io import read_adapter
    from lorakit_bench.measure import peak_rss_bytes, reset_peak_rss
    from lorakit.export import skeleton, write_merged_streamed
    from transformers import AutoConfig
    base, adapter, out = sys.argv[1:]
    found = read_adapter(adapter)
    skeleton(AutoConfig.from_pretrained(base))  # the code (transformers' modeling modules) loaded before the baseline
    start = peak_rss_bytes()
    reset_peak_rss()
    write_merged_streamed(base, found, out)
    print(json.dumps({"start": start, "peak": peak_rss_bytes()}))
""")


def test_streamed_merge_peak_memory_stays_under_two_shards(tmp_path):
    """A ~240 MB bf16 model in 4+ shards merged in a child process: its peak RSS grows by less than two
    shards (a whole-model merge would hold all four, in fp32 twice that)."""
    from lorakit_bench.measure import reset_peak_rss
    from lorakit_bench.scale_models import llama_config, write_random_adapter, write_random_model

    if not reset_peak_rss():
        pytest.skip("the kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    config = llama_config("tiny", vocab=8192)
    config.update({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
                   "num_attention_heads": 8, "num_key_value_heads": 8})
    shard_bytes = 60_000_000
    write_random_model(tmp_path / "model", config, None, max_shard_bytes=shard_bytes)
    write_random_adapter(tmp_path / "adapter", config, str(tmp_path / "model"))
    files = checkpoint_files(tmp_path / "model")
    sizes = [f.stat().st_size for f in files]
    assert len(files) >= 4 and sum(sizes) > 200_000_000
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(Path(lorakit.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "model"), str(tmp_path / "adapter"),
                           str(tmp_path / "merged")], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["peak"] - rss["start"] < 2 * max(sizes), rss
    assert [f.name for f in checkpoint_files(tmp_path / "merged")] == [f.name for f in files]
