"""The fast paths equal the plain ones (fp32, 1e-5 relative): chunked head + loss, the LoRA autograd node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit.adapters.layer import lora_layers
from lorakit.data.encode import IGNORE
from lorakit.kernels import dequant
from lorakit.kernels.dequant import dequantize_4bit_bytes, whole_blocks
from lorakit.kernels.linear_ce import linear_cross_entropy
from lorakit.kernels.lora_linear import lora_linear, lora_linear_reference
from lorakit.quant.linear4bit import dequantize, quantize_model
from lorakit.quant.nf4 import absmax_of, dequantize_4bit, quantize_4bit
from lorakit.train.loop import loss_sum


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, msg: str = "") -> None:
    """Equal within `rel` of the reference's largest magnitude (entries near 0 carry no relative meaning)."""
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"{msg}: max error {err:.3g}, largest value {want.abs().max():.3g}"


def loss_and_grads(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_linear_cross_entropy_equals_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, generator=g) for shape in [(10, 16), (50, 16), (50,)])
    labels = torch.randint(0, 50, (10,), generator=g)
    fast = loss_and_grads(lambda h, w, b: linear_cross_entropy(h, w, labels, b, chunk_tokens=chunk),
                          hidden, weight, bias)
    plain = loss_and_grads(lambda h, w, b: F.cross_entropy(F.linear(h, w, b), labels, reduction="sum"),
                           hidden, weight, bias)
    assert_rel(fast[0], plain[0])
    for a, b in zip(fast[1], plain[1], strict=True):
        assert_rel(a, b)


def test_linear_cross_entropy_without_gradients_is_the_same_loss():
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (9,), generator=g)
    with torch.no_grad():
        assert_rel(linear_cross_entropy(hidden, weight, labels, chunk_tokens=4),
                   F.cross_entropy(hidden @ weight.T, labels, reduction="sum"))


def test_linear_cross_entropy_scales_by_the_upstream_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(12, 8)
    labels = torch.tensor([0, 3, 11, 5])
    (linear_cross_entropy(hidden, weight, labels) * 0.25).backward()
    expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, labels, reduction="sum") * 0.25, hidden)[0]
    assert_rel(hidden.grad, expected)


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
@pytest.mark.parametrize("inplace", [False, True])
def test_lora_linear_equals_the_formula(shape, inplace):
    g = torch.Generator().manual_seed(1)
    x, base_out = torch.randn(*shape, generator=g), torch.randn(*shape[:-1], 9, generator=g)
    a, b = torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)
    weights = torch.linspace(-1, 1, 9)
    # `base * 1.0`: a non-leaf base output, as a layer's is (a leaf cannot be changed in place)
    fast = loss_and_grads(lambda x, base, a, b: (lora_linear(x, base * 1.0, a, b, 0.75, inplace) * weights).sum(),
                          x, base_out, a, b)
    plain = loss_and_grads(lambda *t: (lora_linear_reference(*t, 0.75) * weights).sum(), x, base_out, a, b)
    assert_rel(fast[0], plain[0])
    for got, want in zip(fast[1], plain[1], strict=True):
        assert_rel(got, want)


def supervised_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE  # the first half of each row is prompt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def plain_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def test_training_loss_and_lora_gradients_equal_the_plain_path(monkeypatch):
    monkeypatch.setattr("lorakit.kernels.linear_ce.CHUNK_ELEMENTS", 128 * 5)  # 5 tokens per chunk
    calls = []
    monkeypatch.setattr("lorakit.train.loop.linear_cross_entropy",
                        lambda *a, **k: calls.append(a[0].shape) or linear_cross_entropy(*a, **k))
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8))
    randomize_adapters(model)
    batch = supervised_batch()
    fast = loss_sum(model, batch)
    assert calls == [(3 * 6, 32)]  # the chunked head ran, on the supervised positions only
    fast.backward()
    fast_grads = lora_grads(model)
    model.zero_grad()
    plain = plain_loss_sum(model, batch)
    plain.backward()
    assert_rel(fast, plain)
    for name, grad in lora_grads(model).items():
        assert_rel(fast_grads[name], grad, msg=name)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])  # Linear (with and without bias) and Conv1D bases
def test_lora_linear_in_every_layer_gives_the_same_gradients(make, monkeypatch):
    calls = []
    monkeypatch.setattr("lorakit.adapters.layer.lora_linear", lambda *a, **k: calls.append(k) or lora_linear(*a, **k))
    model = lorakit.inject(make(), lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    batch = supervised_batch(1)
    monkeypatch.setenv("LORAKIT_KERNELS", "0")  # the plain path: LoraAdapter.forward, then base_out + delta
    loss_sum(model, batch).backward()
    plain_grads = lora_grads(model)
    model.zero_grad()
    assert calls == []
    monkeypatch.setenv("LORAKIT_KERNELS", "1")
    loss_sum(model, batch).backward()
    assert len(calls) == len(list(lora_layers(model))) and all(k["inplace"] for k in calls)
    for name, grad in lora_grads(model).items():
        assert_rel(grad, plain_grads[name], msg=name)


def test_two_active_adapters_and_autocast_take_safe_paths(monkeypatch):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets="all-linear"), name="other")
    lorakit.set_active(model, ["default", "other"])
    randomize_adapters(model)
    batch = supervised_batch(1)
    monkeypatch.setenv("LORAKIT_KERNELS", "0")
    plain = loss_sum(model, batch)
    monkeypatch.setenv("LORAKIT_KERNELS", "1")
    assert_rel(loss_sum(model, batch), plain)  # two adapters: no in-place add, each still fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_bf16 = loss_sum(model, batch)
        monkeypatch.setenv("LORAKIT_KERNELS", "0")
        plain_bf16 = loss_sum(model, batch)
    assert torch.equal(fast_bf16, plain_bf16)  # under autocast the plain path is taken either way


def test_a_trainable_head_copy_takes_the_module_path_and_gets_its_gradient():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2, modules_to_save=["lm_head"]))
    batch = supervised_batch(2)
    loss = loss_sum(model, batch)
    torch.testing.assert_close(loss, plain_loss_sum(model, batch), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.lm_head.lora_copies.copies["default"].weight.grad is not None


@pytest.mark.parametrize("quant_type,blocksize,nested,shape", [
    ("nf4", 64, True, (48, 64)), ("fp4", 32, False, (16, 96)), ("nf4", 64, True, (7, 9)),  # last: ragged block
])
def test_byte_table_dequantization_is_bit_exact(quant_type, blocksize, nested, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    packed, state = quantize_4bit(w, quant_type, blocksize, nested)
    for dtype in (torch.float32, torch.bfloat16):
        want = dequantize_4bit(packed, state, dtype)
        assert torch.equal(dequantize(packed, state, dtype), want)  # the library's choice (ragged: the reference)
        if whole_blocks(state.numel, blocksize):
            assert torch.equal(dequantize_4bit_bytes(*plain(packed, state), dtype), want)
        else:
            with pytest.raises(ValueError, match="not whole blocks"):
                dequantize_4bit_bytes(*plain(packed, state), dtype)


def plain(packed: torch.Tensor, state) -> tuple:
    """The plain tensors the byte-table kernels take: packed bytes, code table, fp32 absmax, blocksize, shape."""
    return packed, state.code, absmax_of(state), state.blocksize, state.shape


def test_byte_table_checks_the_byte_count():
    packed, state = quantize_4bit(torch.randn(8, 64), "nf4", 64, True)
    with pytest.raises(ValueError, match="holds 255 bytes; shape \\(8, 64\\) needs 256"):
        dequantize_4bit_bytes(*plain(packed[:-1], state), torch.float32)


def test_compiled_dequantization_falls_back_to_the_byte_table(monkeypatch):
    def fail():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(dequant, "compiled_codes", fail)
    monkeypatch.setitem(dequant.COMPILE, "ok", True)
    packed, state = quantize_4bit(torch.randn(8, 64, generator=torch.Generator().manual_seed(5)), "nf4", 64, True)
    with pytest.warns(UserWarning, match="byte table"):
        out = dequant.dequantize_4bit_compiled(*plain(packed, state), state.dtype)
    assert torch.equal(out, dequantize_4bit(packed, state)) and dequant.COMPILE["ok"] is False


@pytest.mark.slow
def test_compiled_dequantization_is_bit_exact():
    packed, state = quantize_4bit(torch.randn(48, 64, generator=torch.Generator().manual_seed(6)), "nf4", 64, True)
    assert torch.equal(dequant.dequantize_4bit_compiled(*plain(packed, state), state.dtype),
                       dequantize_4bit(packed, state))
    assert dequant.COMPILE["ok"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, lambda: quantize_model(tiny_llama(), "nf4", 32, True)],
                         ids=["linear", "conv1d-bias", "4bit"])
def test_dora_alone_fast_path_gives_the_plain_loss_and_gradients(make, monkeypatch):
    """One active DoRA adapter per layer takes `apply_alone` (in-place LoRA node, one scaling); loss, every
    gradient (magnitude included) and eval logits equal the plain `contribution` path."""
    from lorakit.adapters.dora import DoraAdapter

    calls = []
    real = DoraAdapter.apply_alone
    monkeypatch.setattr(DoraAdapter, "apply_alone", lambda self, *a: calls.append(1) or real(self, *a))
    model = lorakit.inject(make(), lorakit.LoraSpec(r=4, alpha=8, targets="all-linear", kind="dora"))
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))))
    batch = supervised_batch(2)
    monkeypatch.setenv("LORAKIT_KERNELS", "0")
    plain = loss_sum(model, batch)
    plain.backward()
    plain_grads = lora_grads(model)
    model.zero_grad()
    assert calls == []
    monkeypatch.setenv("LORAKIT_KERNELS", "1")
    fast = loss_sum(model, batch)
    fast.backward()
    assert len(calls) == len(list(lora_layers(model)))
    assert_rel(fast, plain)
    assert any("magnitude" in n for n in plain_grads)
    for name, grad in lora_grads(model).items():
        assert grad.abs().max() > 0, name
        assert_rel(grad, plain_grads[name], msg=name)
    model.eval()
    with torch.no_grad():
        fast_logits = model(batch["input_ids"]).logits
        monkeypatch.setenv("LORAKIT_KERNELS", "0")
        assert_rel(fast_logits, model(batch["input_ids"]).logits)
