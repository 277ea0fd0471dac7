"""LoRA over a 4-bit base: the formula, the base's state-dict layout, merging without re-quantizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.adapters.layer import LoraLayer
from lorakit.quant.linear4bit import Linear4bit, dequantize_weight, quantize_model
from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit


def quantized_llama() -> nn.Module:
    return quantize_model(tiny_llama(), quant_type="nf4", blocksize=32, double_quant=True)


def test_lora_over_4bit_is_the_formula():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    base = Linear4bit.from_linear(linear, quant_type="nf4", blocksize=64, double_quant=True)
    packed, state = quantize_4bit(linear.weight.detach(), "nf4", 64, True)
    w = dequantize_4bit(packed, state, torch.float32)  # independent dequantization of the same bytes
    model = lorakit.inject(nn.Sequential(base), lorakit.LoraSpec(r=4, alpha=8, targets=["0"]))
    randomize_adapters(model)
    a, b = model[0].adapters["default"].lora_A, model[0].adapters["default"].lora_B
    x = torch.randn(3, 64, requires_grad=True)
    y = model(x)
    expected = x @ w.T + linear.bias + 2.0 * (x @ a.T @ b.T)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and base.weight.grad is None


def test_state_dict_keeps_bitsandbytes_layout_and_reloads(tokens):
    model = lorakit.inject(quantized_llama(), lorakit.LoraSpec(r=2))
    randomize_adapters(model)
    sd = model.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert sd[key].dtype == torch.uint8
    for suffix in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        assert f"{key}.{suffix}" in sd
    assert "model.layers.0.self_attn.q_proj.adapters.default.lora_A" in sd
    other = lorakit.inject(quantize_model(tiny_llama(seed=7), blocksize=32), lorakit.LoraSpec(r=2))
    other.load_state_dict(sd)
    torch.testing.assert_close(other(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_moving_dtype_keeps_packed_bytes_and_shared_parameters():
    model = lorakit.inject(quantized_llama(), lorakit.LoraSpec(r=2))
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.detach().clone()
    model.to(torch.float64)
    assert torch.equal(layer.weight, before) and layer.weight is layer.base_module.weight
    assert layer.adapters["default"].lora_A.dtype == torch.float64


def test_merge_and_unload_dequantizes_without_requantizing(tokens):
    model = lorakit.inject(quantized_llama(), lorakit.LoraSpec(r=4, alpha=8))
    randomize_adapters(model)
    expected = model(tokens).logits
    with pytest.raises(ValueError, match="would re-quantize"):
        lorakit.merge(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    w = dequantize_weight(q_proj.base_module, torch.float32) + q_proj.adapters["default"].delta_weight()
    plain = lorakit.merge_and_unload(model)
    merged = plain.model.layers[0].self_attn.q_proj
    assert type(merged) is nn.Linear and not any(isinstance(m, (LoraLayer, Linear4bit)) for m in plain.modules()
                                                 if m is merged)
    torch.testing.assert_close(merged.weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_adapter_trained_on_4bit_loads_on_the_full_precision_base_and_in_peft(tmp_path, tokens):
    model = lorakit.inject(quantized_llama(), lorakit.LoraSpec(r=2, targets=["q_proj", "down_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    fp32 = tiny_llama()
    lorakit.load_adapter(fp32, tmp_path)  # the recorded base shapes are logical [out, in]
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(fp32(tokens).logits, peft_model(tokens).logits, rtol=1e-5, atol=1e-5)


def test_trainable_report_counts_4bit_weights_as_peft_does():
    model = lorakit.inject(quantized_llama(), lorakit.LoraSpec(r=2))
    trainable, total = lorakit.adapters.inject.count_parameters(model)
    fp32 = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    # PEFT counts a packed Params4bit as numel * 2: the same total as the unquantized model
    assert (trainable, total) == lorakit.adapters.inject.count_parameters(fp32)


def test_gradient_reaches_input_through_4bit_base_only():
    base = Linear4bit.from_linear(nn.Linear(32, 16))
    x = torch.randn(2, 32, requires_grad=True)
    F.mse_loss(base(x), torch.zeros(2, 16)).backward()
    assert x.grad is not None and base.weight.grad is None and not base.weight.requires_grad


def test_qlora_train_then_merge_reproduces_the_trained_model(tiny_model_dir, jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.config import load_train_config
    from lorakit.models import load
    from lorakit.train.run import run

    cfg = load_train_config(None, [f"base={tiny_model_dir}", f"dataset={jsonl}", f"output_dir={tmp_path / 'run'}",
                                   "max_steps=30", "lr=0.02", "lora.r=8", "quant.blocksize=32",
                                   "optim=adamw8bit", "eval=false"])
    trained, results = run(cfg, log=lambda *_: None)
    assert results["last_loss"] < 0.5 * results["first_loss"]
    assert trained.is_gradient_checkpointing  # on by default over a 4-bit base
    assert trained.model.layers[0].mlp.up_proj.kind == "linear4bit"
    ids = torch.tensor([[2, 117, 115, 101, 114, 10, 115, 97, 121, 32, 99, 97, 116, 1]])
    expected = trained(ids).logits
    # eval/generate rebuild the same 4-bit base from the adapter's metadata (the loader, base from the adapter)
    reloaded, _ = load(None, adapters=[tmp_path / "run" / "adapter"])
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-6)
    # merge writes full precision: dequantized base + delta, the trained model's function
    assert main(["merge", str(tmp_path / "run" / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def llama64(seed: int = 0) -> nn.Module:
    """Rows of 64+ weights: bitsandbytes' CPU 4-bit kernel mis-dequantizes blocks that span rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        initializer_range=0.2)).eval()


def test_4bit_folder_is_read_by_transformers_with_bitsandbytes_and_back(tmp_path, tokens):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.models import load
    from lorakit.quant.checkpoint import save_4bit

    ours = quantize_model(llama64())
    expected = ours(tokens).logits
    save_4bit(ours, tmp_path / "ours")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    torch.testing.assert_close(theirs(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    # and a folder that transformers + bitsandbytes quantized and wrote loads into our layers
    llama64().save_pretrained(tmp_path / "fp32")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                    bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=bnb_config, device_map="cpu")
    theirs.save_pretrained(tmp_path / "bnb")
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "bnb")
    mine, _ = load(str(tmp_path / "bnb"))
    assert isinstance(mine.model.layers[1].self_attn.o_proj, Linear4bit)
    torch.testing.assert_close(mine(tokens).logits, theirs(tokens).logits, rtol=1e-5, atol=1e-5)


def test_merge_requantize_writes_4bit_and_reports_error(tiny_model_dir, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.models import load

    model, _ = load(str(tiny_model_dir))
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "q"), "--requantize", "nf4"]) == 0
    printed = capsys.readouterr().out
    error = float(printed.split("relative weight error of ")[1].split()[0])
    assert 0.01 < error < 0.2  # NF4 at blocksize 64 on Gaussian weights: about 0.09
    reloaded, _ = load(str(tmp_path / "q"))
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, Linear4bit)


def test_qlora_over_a_base_with_biased_linears_matches_its_dequantized_base():
    """Qwen2-style q/k/v biases: the LoRA wrapper adds its delta in place into the 4-bit layer's output,
    which therefore must not be a view made inside the 4-bit Function (autograd refuses to change those).
    Loss and adapter gradients equal those over the full-precision model holding the dequantized weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, initializer_range=0.2)
    ours = quantize_model(LlamaForCausalLM(config), blocksize=32)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "proj.weight" not in k}, strict=False)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Linear4bit):
                plain.get_submodule(name).weight.copy_(dequantize_weight(module, torch.float32))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (ours, plain):
        torch.manual_seed(2)
        lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets="all-linear"))
        randomize_adapters(model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) == 4 * 7
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], rtol=1e-4, atol=1e-6)
