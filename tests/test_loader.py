"""The one loader, `lorakit.models.load`: tensors streamed from safetensors shards into a model built on
the meta device, 4-bit as they are read. References: transformers' `from_pretrained`, and the old path
(load in full precision, then `quantize_model` / `quantize_4bit`, then `load_adapter`)."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama, tiny_tokenizer
from lorakit.adapters.io import load_adapter
from lorakit.cli import main
from lorakit.models import load
from lorakit.quant import linear4bit
from lorakit.quant.linear4bit import Linear4bit, quantize_model
from lorakit.quant.nf4 import quantize_4bit


def biased_tied_llama(seed: int = 0, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    """Attention with biases, MLP without, tied embeddings: what the default tiny model lacks."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=hidden + 16, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attention_bias=True, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def save(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


MAKERS = {"llama": tiny_llama, "biased_tied_llama": biased_tied_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_full_precision_load_equals_from_pretrained(make, tmp_path, tokens):
    folder = save(make(), tmp_path / "m")
    ours, tokenizer = load(str(folder))
    theirs = AutoModelForCausalLM.from_pretrained(folder)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for key in ref:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key
    for (name, buffer), (_, want) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert not buffer.is_meta and torch.equal(buffer, want), name  # rotary inv_freq computed, not meta
    if theirs.config.tie_word_embeddings:
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    assert not ours.training and tokenizer.pad_token is not None
    assert ours.config._name_or_path == theirs.config._name_or_path
    torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, biased_tied_llama], ids=["llama", "biased_tied_llama"])
def test_4bit_load_has_the_bytes_of_quantize_4bit_of_each_full_weight(make, tmp_path, tokens):
    folder = save(make(), tmp_path / "m")
    full = AutoModelForCausalLM.from_pretrained(folder)
    ours, _ = load(str(folder), quant={"type": "nf4", "blocksize": 32, "double_quant": True})
    quantized = [(n, m) for n, m in ours.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 7 * full.config.num_hidden_layers  # every linear of every block; not the head
    assert not isinstance(ours.get_output_embeddings(), Linear4bit)
    for name, layer in quantized:
        source = full.get_submodule(name)
        packed, state = quantize_4bit(source.weight.detach(), "nf4", 32, True)
        assert torch.equal(layer.weight, packed), name
        s = layer.quant_state
        assert torch.equal(s.absmax, state.absmax) and torch.equal(s.nested_absmax, state.nested_absmax)
        assert torch.equal(s.offset, state.offset) and torch.equal(s.code, state.code) and s.dtype == state.dtype
        assert (layer.bias is None) == (source.bias is None)
        if layer.bias is not None:
            assert torch.equal(layer.bias, source.bias) and not layer.bias.requires_grad
    # the old path: full precision, then quantize_model: the same state dict and logits
    old = quantize_model(full, "nf4", 32, True)
    mine, ref = ours.state_dict(), old.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    torch.testing.assert_close(ours(tokens).logits, old(tokens).logits, rtol=0, atol=0)


def test_multi_shard_checkpoint_loads_like_one_file(tmp_path, tokens):
    model = biased_tied_llama(layers=3)
    one = save(model, tmp_path / "one")
    sharded = save(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    for quant in (None, {}):
        a, _ = load(str(one), quant=quant)
        b, _ = load(str(sharded), quant=quant)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        torch.testing.assert_close(a(tokens).logits, b(tokens).logits, rtol=0, atol=0)


def float_matrix_bytes_alive() -> int:
    """Bytes of every float matrix (2-d or more, not on meta) a Python object holds right now: weights, not
    the 1-d norms, biases and 4-bit states. Tensors without real storage (the fake tensors a torch.compile
    earlier in the session leaves alive) hold no bytes."""
    gc.collect()
    storages = {}
    for t in gc.get_objects():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and t.ndim >= 2:
            try:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            except RuntimeError:  # "invalid python storage": a fake tensor's
                continue
    return sum(storages.values())


def test_the_full_precision_model_is_never_materialized(tmp_path, monkeypatch):
    """At every quantization step of a 4-bit load, the float matrices alive are the embedding (tied to the
    head) plus the one weight being quantized, never the model's linears; afterwards, the embedding alone."""
    model = biased_tied_llama(layers=6, hidden=64)
    folder = save(model, tmp_path / "m", max_shard_size="100KB")
    linears = [m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    linear_bytes = sum(m.weight.numel() * 4 for m in linears)
    largest = max(m.weight.numel() * 4 for m in linears)
    embedding = model.get_input_embeddings().weight.numel() * 4
    del model, linears
    baseline = float_matrix_bytes_alive()
    alive = []
    real = linear4bit.quantize_layer

    def watched(module, *args):
        alive.append(float_matrix_bytes_alive() - baseline)
        return real(module, *args)

    monkeypatch.setattr("lorakit.stream.quantize_layer", watched)
    loaded, _ = load(str(folder), quant={})
    assert len(alive) == 7 * 6 and sum(isinstance(m, Linear4bit) for m in loaded.modules()) == 7 * 6
    assert max(alive) <= embedding + largest < 0.25 * linear_bytes  # one linear weight in flight at a time
    assert float_matrix_bytes_alive() - baseline == embedding
    # the measure sees a full-precision weight kept alive: the old path holds every linear at once
    monkeypatch.setattr("lorakit.stream.quantize_layer", real)
    old = AutoModelForCausalLM.from_pretrained(folder)
    assert float_matrix_bytes_alive() - baseline >= 2 * embedding + linear_bytes
    del old


def test_missing_shard_is_an_error_naming_the_index_and_the_shard(tmp_path, capsys):
    folder = save(tiny_llama(), tmp_path / "m", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"model.safetensors.index.json names the shard {shard.name}, which is "
                                         f"missing from {folder}"):
        load(str(folder))
    assert main(["generate", "--base", str(folder), "hi"]) == 2  # the CLI: a clear error, no traceback
    assert f"lorakit: error: {folder}/model.safetensors.index.json names the shard" in capsys.readouterr().err


def test_a_tensor_of_the_wrong_shape_is_an_error_naming_file_tensor_and_shapes(tmp_path):
    folder = save(tiny_llama(), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 31)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for quant in (None, {}):
        with pytest.raises(ValueError, match=rf"^{folder}/model.safetensors: tensor model.layers.1.mlp.up_proj.weight "
                                             r"has shape \[48, 31\], but the model built from config.json expects "
                                             r"\[48, 32\]$"):
            load(str(folder), quant=quant)


def test_a_folder_without_safetensors_is_an_error_naming_it(tmp_path):
    folder = save(tiny_llama(), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=rf"^{folder} has neither model.safetensors.index.json nor "
                                         r"model.safetensors$"):
        load(str(folder))
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="it has pytorch_model.bin, but lorakit loads safetensors only"):
        load(str(folder))


def test_a_folder_without_a_tokenizer_is_an_error_naming_it(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'm'} has no tokenizer"):
        load(str(tmp_path / "m"))


def test_a_tensor_missing_from_the_checkpoint_is_an_error_naming_the_parameter(tmp_path):
    folder = save(tiny_llama(), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^{folder}: the checkpoint has no tensor for "
                                         r"model.layers.0.post_attention_layernorm.weight$"):
        load(str(folder))


def test_qlora_adapter_rebuilds_its_4bit_base_like_the_old_path(tmp_path, tokens):
    """`load(None, adapters=[folder])` = the adapter's recorded base, quantized as it records, adapter on:
    what `load_with_adapter` did (full precision, then quantize_model, then load_adapter)."""
    folder = save(biased_tied_llama(), tmp_path / "base")
    trained, _ = load(str(folder), quant={"type": "fp4", "blocksize": 64, "double_quant": False})
    lorakit.inject(trained, lorakit.LoraSpec(r=2, alpha=4, targets="all-linear"))
    randomize_adapters(trained)
    lorakit.save_adapter(trained, tmp_path / "adapter")
    ours, _ = load(None, adapters=[tmp_path / "adapter"])
    old = quantize_model(AutoModelForCausalLM.from_pretrained(folder), "fp4", 64, False)
    load_adapter(old, tmp_path / "adapter")
    mine, ref = ours.state_dict(), old.state_dict()
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    torch.testing.assert_close(ours(tokens).logits, old(tokens).logits, rtol=0, atol=0)
    torch.testing.assert_close(ours(tokens).logits, trained(tokens).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trained on a 4-bit base made with .*'fp4'.* but quant=.*'nf4'"):
        load(None, quant={}, adapters=[tmp_path / "adapter"])


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path, tokens):
    folder = save(tiny_llama().to(torch.bfloat16), tmp_path / "bf16")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    auto, _ = load(str(folder))
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    sa, sb = auto.state_dict(), theirs.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    as_fp32, _ = load(str(folder), dtype="float32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert all(torch.equal(v, sb[k].float()) for k, v in as_fp32.state_dict().items())
    q, _ = load(str(folder), quant={})  # 4-bit from the bf16 weights; the rest stays bf16
    layer = q.model.layers[0].mlp.up_proj
    packed, state = quantize_4bit(theirs.model.layers[0].mlp.up_proj.weight, "nf4", 64, True)
    assert torch.equal(layer.weight, packed) and layer.quant_state.dtype == torch.bfloat16
    assert q.lm_head.weight.dtype == q.model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'int8'"):
        load(str(folder), dtype="int8")


def test_device_cuda_without_cuda_names_the_devices_there(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"device 'cuda' is not available: no CUDA device here \(available: cpu\)"):
        load(str(tiny_model_dir), device="cuda")


def float_weights_shaped_like(shapes: set[tuple[int, ...]], before: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """Shapes of the float tensors alive (not on meta) whose shape is one of `shapes`, but for those in
    `before` (what other tests of the session still hold, e.g. module-scoped tiny models; held by the
    caller, so no id of theirs is reused meanwhile)."""
    gc.collect()
    old = {id(t) for t in before}
    return [tuple(t.shape) for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and not t.is_meta and tuple(t.shape) in shapes and id(t) not in old]


def alive_tensors() -> list[torch.Tensor]:
    gc.collect()
    return [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]


def test_eval_generate_and_serve_on_a_4bit_base_keep_no_full_precision_weight(tmp_path):
    """Inference over a 4-bit base (LoRA and DoRA adapters on it) dequantizes each weight for its matmul
    only: afterwards no float tensor shaped like a quantized weight is alive anywhere."""
    import threading

    from lorakit.data.demo import make_demo
    from lorakit.generate import generate, score_rows
    from lorakit.quant.linear4bit import dequantize_weight
    from lorakit.serve import Engine

    folder = save(tiny_llama(), tmp_path / "m")
    before = alive_tensors()  # what the session held before this test
    for kind in ("lora", "dora"):
        model, _ = load(str(folder), quant={"blocksize": 32})
        lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, kind=kind, targets="all-linear"))
        randomize_adapters(model)
        lorakit.save_adapter(model, tmp_path / kind)
    del model
    model, tokenizer = load(str(folder), adapters={"lora": tmp_path / "lora", "dora": tmp_path / "dora"})
    bases = [getattr(m, "base_module", m) for m in model.modules()]  # a wrapper keeps its base outside the tree
    shapes = {tuple(m.quant_state.shape) for m in bases if isinstance(m, Linear4bit)}
    assert len(shapes) == 4 and len([m for m in bases if isinstance(m, Linear4bit)]) == 14
    del bases
    assert float_weights_shaped_like(shapes, before) == []
    lorakit.set_active(model, ["dora"])
    score_rows(model, tokenizer, make_demo(0, n_train=1, n_eval=2)[1], 4)  # eval
    generate(model, tokenizer, ["say cat"], 4)
    assert float_weights_shaped_like(shapes, before) == []
    engine = Engine(model, tokenizer, base_id="tiny", adapters={"lora": tmp_path / "lora", "dora": tmp_path / "dora"})
    try:
        for name in ("lora", "dora"):
            done = threading.Event()
            job = engine.prepare({"model": name, "prompt": "say cat", "max_tokens": 4, "temperature": 0}, chat=False)
            engine.submit(job, lambda item, done=done: done.set() if item is None else None)
            assert done.wait(30)
        assert float_weights_shaped_like(shapes, before) == []
    finally:
        engine.close()
    kept = dequantize_weight(model.model.layers[0].mlp.down_proj.base_module)  # the measure sees a kept copy
    assert float_weights_shaped_like(shapes, before) == [(32, 48)]
    del kept


CHILD = """
import sys
from lorakit.models import load_weights
from pathlib import Path

def status_mib(key):  # VmHWM: this process image's peak (ru_maxrss keeps the forking parent's across exec)
    line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024

quant = {"type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "float32"}
load_weights(Path(sys.argv[2]), quant)  # imports and first-use allocations, before the measure
before = status_mib("VmRSS")
model = load_weights(Path(sys.argv[1]), quant)
print(before, status_mib("VmHWM"), status_mib("VmRSS"))
"""


@pytest.mark.slow  # writes and reads a 300 MB checkpoint
def test_a_4bit_load_peaks_far_below_the_full_precision_size(tmp_path):
    """Resident memory, in a child process: loading a 300 MB fp32 checkpoint (3 shards) with quant peaks
    at well under its size: no shard is held whole (read, mapped or converted), only the 4-bit model."""
    import os
    import subprocess
    import sys

    from accelerate import init_empty_weights

    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    folder = tmp_path / "m"
    folder.mkdir()
    config.save_pretrained(folder)
    names = [(n, p.shape) for n, p in skeleton.named_parameters()]
    total = sum(s.numel() * 4 for _, s in names)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, files = {}, {}, 0, []
    for i, (name, shape) in enumerate(names):  # ~100 MB shards written one at a time
        shard[name] = torch.randn(shape, generator=g) * 0.02
        size += shard[name].numel() * 4
        if size > 100 * 2**20 or i == len(names) - 1:
            files.append(f"model-{len(files):05d}.safetensors")
            save_file(shard, folder / files[-1], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, files[-1]))
            shard, size = {}, 0
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert total > 290 * 2**20 and len(files) == 3
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big frees go back to the system at once
    tiny = save(tiny_llama(), tmp_path / "tiny")
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tiny)], capture_output=True, text=True,
                         env=env, check=True).stdout
    before, peak, after = map(float, out.split())
    four_bit = (total - 2 * 1024 * 1024 * 4) / 8 * 1.04 / 2**20 + 2 * 4  # linears at ~4.1 bits + embed and head
    assert after - before < 2 * four_bit  # what stays: the 4-bit model
    assert peak - before < 0.3 * total / 2**20  # full precision would be 300 MB more; one shard alone 100 MB


def test_a_4bit_folder_split_across_shards_loads_like_one_file(tmp_path, tokens):
    """A bitsandbytes-layout folder whose layers' entries (packed bytes, absmax, quant state) lie in
    different shards is rebuilt the same as from one file, without quantizing again."""
    from lorakit.quant.checkpoint import save_4bit

    model = quantize_model(biased_tied_llama(), "fp4", 64, False)
    one = tmp_path / "one"
    save_4bit(model, one)
    tiny_tokenizer().save_pretrained(one)
    split = tmp_path / "split"
    split.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (one / name).is_file():
            (split / name).write_bytes((one / name).read_bytes())
    tensors = load_file(one / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[0::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in shards.items():  # every other key: each layer's entries straddle the two shards
        save_file({k: tensors[k] for k in names}, split / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (split / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, _ = load(str(one))
    b, _ = load(str(split))
    assert isinstance(b.model.layers[1].self_attn.q_proj, Linear4bit)
    sa, sb, ref = a.state_dict(), b.state_dict(), model.state_dict()
    assert sa.keys() == sb.keys() == ref.keys() and all(torch.equal(sb[k], ref[k]) and torch.equal(sa[k], ref[k])
                                                        for k in ref)
    torch.testing.assert_close(b(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def keep_fp32_model(arch: str):
    """Tiny random models whose class keeps some tensors in fp32: GPT-OSS its norms (in fp16), DeepSeek-V3
    and GLM-4-MoE their routers and e_score_correction_bias (in fp16 and bf16)."""
    from transformers import AutoConfig

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    extra = {
        "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"]),
        "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                            first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
        "glm4_moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8),
    }[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common, **extra))
    with torch.no_grad():  # e_score_correction_bias starts at zero: values that bf16 would round
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand(buffer.shape) * 1e-2 + 1.0)
    return model.eval()


@pytest.mark.parametrize(("arch", "dtype", "kept"), [
    ("gpt_oss", torch.float16, "layernorm.weight"), ("gpt_oss", torch.bfloat16, None),
    ("deepseek_v3", torch.bfloat16, "e_score_correction_bias"), ("glm4_moe", torch.float16, "mlp.gate.weight"),
])
def test_tensors_kept_in_fp32_as_transformers_keeps_them(arch, dtype, kept, tmp_path):
    """transformers keeps `_keep_in_fp32_modules` (in fp16) and `_keep_in_fp32_modules_strict` (fp16 and bf16)
    in fp32: the loader gives every tensor transformers' dtype and value, from an fp32 folder cast on load and
    from a folder stored in `dtype` (dtype auto)."""
    fp32 = keep_fp32_model(arch)
    for folder, asked in ((save(fp32, tmp_path / "fp32"), dtype), (save(fp32.to(dtype), tmp_path / "low"), "auto")):
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()
        ours = load(str(folder), dtype=asked)[0].state_dict()
        assert ours.keys() == theirs.keys()
        for key, want in theirs.items():
            assert ours[key].dtype == want.dtype and torch.equal(ours[key], want), (key, ours[key].dtype, want.dtype)
        fp32_keys = [k for k, t in theirs.items() if t.dtype == torch.float32]
        if kept is None:  # GPT-OSS in bf16: its norms follow the dtype
            assert not fp32_keys
        else:
            assert fp32_keys and any(kept in k for k in fp32_keys), fp32_keys
            assert len(fp32_keys) < len(theirs)
        fp32 = keep_fp32_model(arch)  # save() above cast it
