"""The frozen 4-bit linear layer: its forward/backward, its error, and its state dict against bitsandbytes'."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import tiny_llama
from lorakit.quant import Linear4bit, code_book, dequantize_4bit, dequantize_weight, quantize_model


@pytest.fixture(autouse=True)
def no_compile():
    """bnb wraps its reference dequantizer in torch.compile; eager is the same math and much faster here."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture
def bnb_reference(monkeypatch):
    """Route bnb's blockwise 8-bit quantizer to its pure-PyTorch reference backend (nearest code).

    On CPU bnb otherwise rounds the nested absmax through a 65536-bin lookup table (see test_quant_nf4.py).
    """
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    packet = torch.ops.bitsandbytes.quantize_blockwise
    op = packet.default
    monkeypatch.setattr(packet, "default", lambda *args: op.redispatch(keys, *args))


def linear(in_features: int = 128, out_features: int = 48, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, std=0.02)
    if bias:
        nn.init.normal_(layer.bias, std=0.1)
    return layer


def bnb_layer_from(sd: dict[str, torch.Tensor], in_features: int, out_features: int) -> bnb.nn.Linear4bit:
    """A bnb Linear4bit loaded from a state dict the way transformers does (`Params4bit.from_prequantized`)."""
    layer = bnb.nn.Linear4bit(in_features, out_features, bias="bias" in sd, compute_dtype=torch.float32)
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return layer.train()  # bnb's eval-mode CPU path repacks the weight for its own kernel


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_is_f_linear_with_the_dequantized_weight(compute_dtype):
    base = linear()
    layer = Linear4bit.from_linear(base, compute_dtype=compute_dtype)
    x = torch.randn(2, 5, 128)
    w = dequantize_4bit(layer.weight, layer.quant_state, compute_dtype)  # [48, 128]
    expected = F.linear(x.to(compute_dtype), w, base.bias.detach().to(compute_dtype)).float()
    assert torch.equal(layer(x), expected)
    assert layer(x).dtype == torch.float32
    assert (layer.in_features, layer.out_features) == (128, 48)


def test_gradient_reaches_the_input_not_the_weight():
    layer = Linear4bit.from_linear(linear())
    x = torch.randn(3, 7, 128, requires_grad=True)
    grad_out = torch.randn(3, 7, 48)
    layer(x).backward(grad_out)

    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, dequantize_weight(layer), layer.bias).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []


def test_backward_keeps_no_full_precision_weight():
    """QLoRA's memory saving: autograd holds the packed bytes, never a dequantized [out, in] weight."""
    layer = Linear4bit.from_linear(linear())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(4, 128, requires_grad=True))
    assert saved and all(t.shape != (48, 128) and t.dtype == torch.uint8 for t in saved)
    y.sum().backward()


def test_dequantized_weight_is_close_to_the_original():
    """NF4 error bound: at most half the widest code gap times the block absmax (no double quant)."""
    base = linear(256, 64)
    w = base.weight.detach()
    code = code_book("nf4").sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2  # (1 - 0.7230) / 2

    plain = Linear4bit.from_linear(base, double_quant=False)
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)  # [blocks, 1]
    err = (dequantize_weight(plain) - w).reshape(-1, 64).abs()
    assert (err <= half_gap * absmax * (1 + 1e-6)).all()

    double = Linear4bit.from_linear(base)  # nested absmax adds a little error on top
    relative = (dequantize_weight(double) - w).norm() / w.norm()
    assert 0.05 < relative < 0.12


def test_parameter_count_matches_the_unquantized_layer():
    layer = Linear4bit.from_linear(linear(128, 48))
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (128 * 48 // 2, 1)
    assert layer.weight.lorakit_numel_factor == 2
    counted = sum(p.numel() * getattr(p, "lorakit_numel_factor", 1) for p in layer.parameters())
    assert counted == 128 * 48 + 48

    bf16 = Linear4bit.from_linear(linear(128, 48), quant_storage=torch.bfloat16)
    assert bf16.weight.lorakit_numel_factor == 4 and bf16.weight.numel() * 4 == 128 * 48


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_state_dict_is_bnb_layout(bnb_reference, quant_type, double_quant):
    base = linear()
    ours = Linear4bit.from_linear(base, quant_type=quant_type, double_quant=double_quant).state_dict()
    ref_layer = bnb.nn.Linear4bit(128, 48, quant_type=quant_type, compress_statistics=double_quant)
    ref_layer.load_state_dict(base.state_dict())
    ref = ref_layer.to("cpu").state_dict()  # bnb quantizes on .to(device)
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", True), ("nf4", False)])
def test_bnb_loads_our_state_dict(quant_type, double_quant):
    ours = Linear4bit.from_linear(linear(), quant_type=quant_type, double_quant=double_quant)
    ref = bnb_layer_from(ours.state_dict(), 128, 48)
    assert torch.equal(bnb.functional.dequantize_4bit(ref.weight, ref.weight.quant_state), dequantize_weight(ours))
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_we_load_bnb_state_dict(quant_type, double_quant):
    base = linear(seed=1)
    ref = bnb.nn.Linear4bit(128, 48, quant_type=quant_type, compress_statistics=double_quant)
    ref.load_state_dict(base.state_dict())
    ref = ref.to("cpu").train()
    ours = Linear4bit.from_linear(linear(seed=2))  # other weights and settings, overwritten by the load
    ours.load_state_dict(ref.state_dict())
    assert ours.quant_state.quant_type == quant_type and ours.quant_state.nested == double_quant
    assert torch.equal(dequantize_weight(ours), bnb.functional.dequantize_4bit(ref.weight, ref.weight.quant_state))
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_a_float_checkpoint_is_quantized_on_load():
    base = linear()
    ours = Linear4bit.from_linear(linear(seed=5), quant_type="fp4", blocksize=32)
    ours.load_state_dict(base.state_dict())
    expected = Linear4bit.from_linear(base, quant_type="fp4", blocksize=32)
    assert torch.equal(ours.weight, expected.weight)
    assert torch.equal(dequantize_weight(ours), dequantize_weight(expected))


def test_a_malformed_state_dict_is_refused_naming_the_key():
    sd = Linear4bit.from_linear(linear()).state_dict()
    layer = Linear4bit.from_linear(linear())
    with pytest.raises(RuntimeError, match=r"weight\.absmax"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"})
    with pytest.raises(RuntimeError, match=r"Missing key.*bias"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "bias"})
    other = Linear4bit.from_linear(linear(64, 48)).state_dict()
    with pytest.raises(RuntimeError, match=r"weight: shape \(48, 64\)"):
        layer.load_state_dict(other)


def test_to_casts_the_bias_but_never_the_packed_bytes():
    layer = Linear4bit.from_linear(linear(), quant_storage=torch.bfloat16)
    packed, w = layer.weight.detach().clone(), dequantize_weight(layer)
    layer.to(torch.float16)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, packed)
    assert layer.bias.dtype == torch.float16 and layer.quant_state.absmax.dtype == torch.uint8
    assert torch.equal(dequantize_weight(layer), w)
    assert layer(torch.randn(2, 128, dtype=torch.float16)).dtype == torch.float16


def test_quantize_model_replaces_linears_but_not_the_head(tmp_path):
    model = tiny_llama()
    tokens = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(tokens).logits
    quantize_model(model, skip=("lm_head", "layers.1.mlp"))

    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear | Linear4bit)}
    assert kinds["lm_head"] is nn.Linear
    assert kinds["model.layers.1.mlp.down_proj"] is nn.Linear
    assert kinds["model.layers.0.self_attn.q_proj"] is Linear4bit
    assert sum(k is Linear4bit for k in kinds.values()) == 2 * 4 + 3  # attention in both layers, one MLP

    reference = tiny_llama()  # the same model with each quantized weight replaced by its dequantized value
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Linear4bit):
                reference.get_submodule(name).weight.copy_(dequantize_weight(module))
        after, expected = model(tokens).logits, reference(tokens).logits
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, rtol=1e-2, atol=1e-2)

    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    save_file(sd, tmp_path / "model.safetensors")
    fresh = quantize_model(tiny_llama(seed=3), skip=("lm_head", "layers.1.mlp"))
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, after)
