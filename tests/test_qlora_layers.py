"""QLoRA on biased linears (Qwen2, GPT-2, ...) and on GPT-2's Conv1D, against a plain-torch reference.

The reference model computes each adapted layer as  F.linear(x, W, b) + s * (x A^T) B^T  with W the
weight dequantized by `quant.nf4.dequantize_4bit` (the plain path, not the layer's kernel), b the bias,
and copies of the adapter's factors: no lorakit layer, kernel or autograd function is in it.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_tokenizer
from lorakit.adapters.layer import lora_layers
from lorakit.kernels.lora_linear import lora_linear, lora_linear_reference
from lorakit.quant.linear4bit import Linear4bit, quantize_model
from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit
from tiny_archs import tiny_model

BIASED = ["qwen2", "gpt2", "starcoder2", "bloom"]  # biased q/k/v only; Conv1D; biased everywhere; fused QKV


class ReferenceLora(nn.Module):
    """y = x W^T + b + s (x A^T) B^T, W dequantized by the plain reference path; factors copied."""

    def __init__(self, layer) -> None:
        super().__init__()
        base = layer.base_module
        self.weight = dequantize_4bit(base.weight, base.quant_state, torch.float32)  # [out, in]
        self.bias = base.bias
        self.adapters = [(nn.Parameter(a.lora_A.detach().clone()), nn.Parameter(a.lora_B.detach().clone()), a.scale)
                         for n, a in layer.adapters.items() if n in layer.active]
        for i, (a, b, _) in enumerate(self.adapters):
            self.register_parameter(f"A{i}", a)
            self.register_parameter(f"B{i}", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for a, b, scale in self.adapters:
            y = y + scale * F.linear(F.linear(x, a), b)
        return y


def reference_of(model: nn.Module) -> nn.Module:
    """A copy of `model` with every wrapped 4-bit layer replaced by its `ReferenceLora`."""
    ref = copy.deepcopy(model)
    for path, layer in list(lora_layers(ref)):
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, ReferenceLora(layer))
    assert not any(isinstance(m, Linear4bit) for m in ref.modules())  # all-linear wrapped every 4-bit layer
    return ref


def qlora(arch: str, seed: int = 0) -> nn.Module:
    model = quantize_model(tiny_model(arch, seed), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    return model


def ids(rows: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", BIASED)
def test_biased_4bit_model_has_biases_and_is_4bit(arch):
    model = qlora(arch)
    bases = [layer.base_module for _, layer in lora_layers(model)]
    assert all(isinstance(b, Linear4bit) for b in bases)
    assert any(b.bias is not None for b in bases)  # the case under test


@pytest.mark.parametrize("arch", BIASED)
def test_qlora_training_step_equals_the_reference(arch):
    """Loss and every adapter gradient of one step, in training mode (the in-place LoRA node)."""
    model = qlora(arch)
    ref = reference_of(model)
    batch = ids()
    model.train()
    ref.train()
    torch.manual_seed(0)  # the same dropout masks (GPT-2 drops out in training mode)
    loss = model(batch, labels=batch).loss
    loss.backward()  # raised "Output 0 of _Linear4bitFn is a view and is being modified inplace" before
    torch.manual_seed(0)
    ref_loss = ref(batch, labels=batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    refs = dict(ref.named_modules())
    for path, layer in lora_layers(model):
        a, b, _ = refs[path].adapters[0]
        adapter = layer.adapters["default"]
        assert b.grad.abs().max() > 0, path
        torch.testing.assert_close(adapter.lora_A.grad, a.grad, rtol=1e-4, atol=1e-6, msg=path)
        torch.testing.assert_close(adapter.lora_B.grad, b.grad, rtol=1e-4, atol=1e-6, msg=path)


@pytest.mark.parametrize("arch", BIASED)
def test_qlora_eval_generate_and_merge_equal_the_reference(arch):
    model = qlora(arch)
    ref = reference_of(model)
    batch = ids()
    with torch.no_grad():
        expected = ref(batch).logits
        torch.testing.assert_close(model(batch).logits, expected, rtol=1e-5, atol=1e-5)
        greedy = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        assert model.generate(batch, **greedy).tolist() == ref.generate(batch, **greedy).tolist()
        merged = lorakit.merge_and_unload(model)
        kinds = {type(m) for m in merged.modules()}
        assert Linear4bit not in kinds and (Conv1D in kinds) == (arch == "gpt2")  # the layout it came from
        torch.testing.assert_close(merged(batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", BIASED)
def test_qlora_mixed_adapter_batch_equals_rows_alone(arch):
    model = quantize_model(tiny_model(arch), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets="all-linear"), name="a")
    lorakit.inject(model, lorakit.LoraSpec(r=3, alpha=3, targets="all-linear", kind="dora"), name="b")
    randomize_adapters(model)
    rows, batch = ["a", None, "b", "a"], ids(4)
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(batch).logits
    with torch.no_grad():
        for i, name in enumerate(rows):
            lorakit.set_active(model, [] if name is None else [name])
            alone = model(batch[i : i + 1]).logits[0]
            torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
            if name == "a":  # and a row alone is the reference's
                torch.testing.assert_close(alone, reference_of(model)(batch[i : i + 1]).logits[0], rtol=1e-5,
                                           atol=1e-5)


@pytest.mark.parametrize("kernels", ["1", "0", "triton"])
@pytest.mark.parametrize("tokens", [1, 40])  # Triton: the fused 4-bit matmul (decoding), or dequantize + matmul
def test_4bit_output_is_never_a_view(kernels, tokens, monkeypatch):
    """A biased F.linear on a [batch, seq, in] input returns a view; out of a custom autograd Function, such
    a view cannot be added into in place (what the LoRA node does). The values stay F.linear's."""
    monkeypatch.setenv("LORAKIT_KERNELS", kernels)
    linear = nn.Linear(64, 8)
    base = Linear4bit.from_linear(linear)
    x = torch.randn(2, tokens, 64, requires_grad=True)
    y = base(x)
    assert y.grad_fn is not None and not y._is_view()
    w = dequantize_4bit(base.weight, base.quant_state, torch.float32)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=1e-5, atol=1e-5)


def test_lora_node_adds_out_of_place_into_a_view_autograd_cannot_rebase():
    """Any base layer may be a custom Function returning a view: the node then does not write into it."""

    class ViewingLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            return F.linear(x, w, b)  # a view of the addmm result, made where autograd records nothing

        @staticmethod
        def backward(ctx, grad):
            return grad @ w, None, None

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    x = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    a = torch.randn(4, 16, generator=g, requires_grad=True)
    lb = torch.randn(8, 4, generator=g, requires_grad=True)
    base_out = ViewingLinear.apply(x, w, b)
    assert base_out._is_view()
    y = lora_linear(x, base_out, a, lb, 0.5, inplace=True)
    expected = lora_linear_reference(x, F.linear(x, w, b), a, lb, 0.5)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert a.grad is not None and lb.grad is not None


# ----------------------------------------------------------------------------- GPT-2's Conv1D


def gpt2_64(seed: int = 0) -> nn.Module:
    """Rows of 64+ weights: bitsandbytes' CPU 4-bit kernel mis-dequantizes blocks that span rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      initializer_range=0.2)).eval()


def test_conv1d_is_quantized_as_its_transposed_weight():
    model = tiny_gpt2()
    convs = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left in full precision
        quantize_model(model, blocksize=32)
    assert convs
    for name, weight in convs.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Linear4bit) and layer.conv1d, name
        packed, state = quantize_4bit(weight.T.contiguous(), "nf4", 32, True)  # W^T: [out, in]
        assert torch.equal(layer.weight, packed), name
        assert torch.equal(layer.quant_state.absmax, state.absmax) and list(layer.quant_state.shape) == list(
            weight.T.shape), name


def test_conv1d_4bit_bytes_equal_transformers_bitsandbytes(tmp_path):
    """transformers + bitsandbytes convert GPT-2's Conv1D to a Linear4bit of the transposed weight: our
    4-bit model's state dict holds the same bytes under the same keys. (Without double quantization: on
    CPU, bnb rounds a few nested absmax codes through a lookup table, see test_quant_nf4.)"""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    gpt2_64().save_pretrained(tmp_path / "fp32")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=bnb, device_map="cpu")
    theirs = theirs.state_dict()
    ours = quantize_model(gpt2_64(), blocksize=64, double_quant=False).state_dict()
    assert ours.keys() == theirs.keys()
    assert sum(k.endswith("c_proj.weight.absmax") for k in ours) == 4  # attention's and the MLP's, 2 layers
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key


def test_gpt2_qlora_step_save_and_reload_4bit_folder(tmp_path):
    """A QLoRA step on GPT-2, then its 4-bit base written, read by transformers + bitsandbytes and by
    lorakit, each giving the 4-bit model's logits."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import load
    from lorakit.quant.checkpoint import save_4bit

    base = quantize_model(gpt2_64(), blocksize=64)
    batch = ids()
    expected = base(batch).logits
    save_4bit(base, tmp_path / "q")
    tiny_tokenizer().save_pretrained(tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(theirs.transformer.h[0].attn.c_attn).__module__.startswith("bitsandbytes")
    torch.testing.assert_close(theirs(batch).logits, expected, rtol=1e-5, atol=1e-5)
    mine, _ = load(str(tmp_path / "q"))
    c_attn = mine.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Linear4bit) and c_attn.conv1d
    torch.testing.assert_close(mine(batch).logits, expected, rtol=0, atol=0)
    lorakit.inject(mine, lorakit.LoraSpec(r=4, targets=None))  # PEFT's default for gpt2: c_attn
    mine.train()
    loss = mine(batch, labels=batch).loss
    loss.backward()
    torch.optim.SGD([p for p in mine.parameters() if p.requires_grad], lr=0.5).step()
    assert mine(batch, labels=batch).loss < loss
    lorakit.save_adapter(mine, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    # the adapter trained over the 4-bit Conv1D goes onto the full-precision GPT-2, in lorakit and in PEFT
    full = gpt2_64()
    lorakit.load_adapter(full, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(gpt2_64(), tmp_path / "adapter")
    with torch.no_grad():
        assert (full(batch).logits - gpt2_64()(batch).logits).abs().max() > 1e-3  # the trained adapter shows
        torch.testing.assert_close(full(batch).logits, theirs(batch).logits, rtol=1e-5, atol=1e-5)


def test_plain_linear_subclasses_are_quantized_and_others_reported():
    """Falcon's FalconLinear computes F.linear's formula: quantized (transformers 5 + bitsandbytes leave it, and
    so all of Falcon, in full precision). Another subclass of nn.Linear keeps its semantics and full
    precision, never silently."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from lorakit.quant.linear4bit import PLAIN_LINEARS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=g)
    for cls in PLAIN_LINEARS:  # the claim that lets them be replaced
        layer = cls(16, 8)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = quantize_model(tiny_model("falcon"), blocksize=32)
    assert not any(isinstance(m, FalconLinear) for m in model.modules())
    attention = nn.Sequential(nn.Linear(32, 16))
    attention.add_module("mha", nn.MultiheadAttention(16, 2))
    with pytest.warns(UserWarning, match=r"1 linear layers stay in full precision.*mha\.out_proj "
                                         r"\(NonDynamicallyQuantizableLinear\)"):
        quantize_model(attention, blocksize=32)
    assert isinstance(attention[0], Linear4bit) and type(attention.mha.out_proj) is not Linear4bit


def test_4bit_falcon_folder_reloads_in_lorakit(tmp_path):
    from lorakit.models import load
    from lorakit.quant.checkpoint import save_4bit

    model = quantize_model(tiny_model("falcon"), blocksize=32)
    batch = ids()
    save_4bit(model, tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    mine, _ = load(str(tmp_path))
    assert isinstance(mine.transformer.h[0].self_attention.query_key_value, Linear4bit)
    torch.testing.assert_close(mine(batch).logits, model(batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_merged_folder_of_an_adapter_on_some_4bit_layers_is_plain(arch, tmp_path):
    """A QLoRA adapter on the default targets only: the untouched 4-bit layers are dequantized too, so the
    merged folder loads in transformers as a plain model with the adapted model's logits."""
    from transformers import AutoModelForCausalLM

    from lorakit.export import write_merged_folder

    model = quantize_model(tiny_model(arch), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets=None))
    randomize_adapters(model)
    batch = ids()
    with torch.no_grad():
        expected = model(batch).logits
    write_merged_folder(lorakit.merge_and_unload(model), tiny_tokenizer(), tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())
    torch.testing.assert_close(plain(batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_cli_qlora_train_generate_and_merge_on_a_biased_model(tmp_path, jsonl):
    """`lorakit train` with quant on Qwen2 (biased q/k/v; gradient checkpointing on by default), then the
    adapter reloaded over the rebuilt 4-bit base, and `lorakit merge` giving the trained model's logits."""
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.config import load_train_config
    from lorakit.models import load
    from lorakit.train.run import run

    base = tiny_model("qwen2")
    base.generation_config.pad_token_id = base.generation_config.eos_token_id = 1
    base.save_pretrained(tmp_path / "qwen2")
    tiny_tokenizer().save_pretrained(tmp_path / "qwen2")
    cfg = load_train_config(None, [f"base={tmp_path / 'qwen2'}", f"dataset={jsonl}", f"output_dir={tmp_path / 'run'}",
                                   "max_steps=12", "lr=0.02", "lora.r=4", "quant.blocksize=32", "eval=false"])
    trained, results = run(cfg, log=lambda *_: None)
    assert results["last_loss"] < results["first_loss"]
    assert trained.model.layers[0].self_attn.q_proj.kind == "linear4bit"
    batch = ids(1)
    with torch.no_grad():
        expected = trained(batch).logits
        reloaded, _ = load(None, adapters=[tmp_path / "run" / "adapter"])  # over the 4-bit base it records
        assert reloaded.model.layers[0].self_attn.q_proj.kind == "linear4bit"
        torch.testing.assert_close(reloaded(batch).logits, expected, rtol=0, atol=1e-6)
    assert main(["generate", "--adapter", str(tmp_path / "run" / "adapter"), "say cat"]) == 0
    assert main(["merge", str(tmp_path / "run" / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(batch).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", BIASED)
def test_qdora_training_step_fast_path_equals_plain_path(arch, monkeypatch):
    """DoRA over biased 4-bit layers: the fast path (one in-place LoRA node on W x, then m/n and the bias)
    gives the plain path's loss and gradients (LORAKIT_KERNELS=0: base output + each contribution)."""
    model = quantize_model(tiny_model(arch), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear", kind="dora"))
    randomize_adapters(model)
    model.train()
    batch = ids()

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(0)
        loss = model(batch, labels=batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast = loss_and_grads()
    monkeypatch.setenv("LORAKIT_KERNELS", "0")
    plain = loss_and_grads()
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-5)
    assert fast[1].keys() == plain[1].keys() and any(".magnitude" in n for n in fast[1])
    for name, grad in fast[1].items():
        torch.testing.assert_close(grad, plain[1][name], rtol=1e-4, atol=1e-5, msg=name)
