"""4-bit mixture-of-experts weights (QLoRA) on tiny Mixtral and Qwen3-MoE: `quant.linear4bit.Experts4bit`.

References, none of them lorakit code: bitsandbytes (each expert's [out, in] matrix quantized by
`bitsandbytes.functional.quantize_4bit`, dequantized by its `dequantize_4bit` on its pure-PyTorch backend),
the model's own full-precision experts module holding those dequantized weights, and plain-torch per-expert
LoRA updates W_e + scale * B_e A_e.
"""

from __future__ import annotations

import copy
import warnings

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import lorakit
from conftest import add_expert_updates, randomize_adapters, tiny_tokenizer
from lorakit.adapters.params import ParamLoraLayer, param_layers
from lorakit.models import load
from lorakit.quant import linear4bit
from lorakit.quant.linear4bit import Experts4bit, quantize_model
from tiny_archs import tiny_model

ARCHS = ["mixtral", "qwen3_moe"]
FUSED = ("gate_up_proj", "down_proj")


@pytest.fixture(autouse=True)
def bnb_reference(monkeypatch):
    """bitsandbytes' dequantizer on its pure-PyTorch backend (its AVX-512 CPU kernel is wrong when blocks
    straddle rows, see tests/test_quant_nf4.py), run eagerly (its torch.compile wrapper is only slower here)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    packet = torch.ops.bitsandbytes.dequantize_4bit
    op = packet.default
    monkeypatch.setattr(packet, "default", lambda *args, _op=op: _op.redispatch(keys, *args))
    with torch._dynamo.config.patch(disable=True):
        yield


def ids(rows: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0))


def logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if batch is None else batch).logits


def experts_of(model) -> list[tuple[str, torch.nn.Module]]:
    """(path, experts module) of every block, through an expert wrapper to its base."""
    return [(n, getattr(m, "base_module", m)) for n, m in model.named_modules() if n.endswith("mlp.experts")]


def bnb_expert(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 32, double_quant: bool = True):
    """bitsandbytes' (packed, QuantState) of one expert's matrix [out, in]."""
    return bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)


def bnb_dequantized_model(fp_model, quant_type: str = "nf4", blocksize: int = 32):
    """A copy of the full-precision model whose every quantized weight (linears but the head, each expert of
    each fused expert weight) is bitsandbytes' quantize-then-dequantize of it: the 4-bit model, in plain torch."""
    ref = copy.deepcopy(fp_model)
    head = ref.get_output_embeddings()
    with torch.no_grad():
        for _, module in ref.named_modules():
            if type(module) is torch.nn.Linear and module is not head:
                module.weight.copy_(bnbf.dequantize_4bit(*bnb_expert(module.weight, quant_type, blocksize)))
        for _, experts in experts_of(ref):
            for name in FUSED:
                weight = experts._parameters[name]
                for e in range(weight.shape[0]):
                    weight[e].copy_(bnbf.dequantize_4bit(*bnb_expert(weight[e], quant_type, blocksize)))
    return ref


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", ["quantize_model", "load"])
def test_experts_are_4bit_with_the_bytes_bitsandbytes_gives_each_expert(arch, how, tmp_path):
    """After `quantize_model` or a 4-bit `load` (the checkpoint stores experts one by one), every fused expert
    weight is packed uint8 [E, out * in / 2], and expert e's bytes, absmax, nested absmax and offset are
    bitsandbytes' quantize_4bit of W_e [out, in]."""
    fp = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing is reported as left in full precision
        if how == "load":
            fp.save_pretrained(tmp_path)
            tiny_tokenizer().save_pretrained(tmp_path)
            model, _ = load(str(tmp_path), quant={"blocksize": 32})
        else:
            model = quantize_model(copy.deepcopy(fp), blocksize=32)
    assert len(experts_of(model)) == 2
    for path, experts in experts_of(model):
        assert isinstance(experts, Experts4bit)
        source = fp.get_submodule(path)
        for name in FUSED:
            weight = source._parameters[name].detach()  # [E, out, in]
            n_experts, n_out, n_in = weight.shape
            packed = experts._parameters[name]
            assert packed.dtype == torch.uint8 and tuple(packed.shape) == (n_experts, n_out * n_in // 2)
            assert not packed.requires_grad
            state = experts.quant_states[name]
            for e in range(n_experts):
                ref_packed, ref = bnb_expert(weight[e])
                assert torch.equal(packed[e], ref_packed.reshape(-1)), (path, name, e)
                assert torch.equal(state.absmax[e], ref.absmax) and torch.equal(state.offset[e], ref.offset)
                assert torch.equal(state.nested_absmax[e], ref.state2.absmax)
    # parameter counts: a packed byte holds two weights, as PEFT counts bitsandbytes' Params4bit
    assert lorakit.adapters.inject.count_parameters(model)[1] == sum(p.numel() for p in fp.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_model_equals_the_bitsandbytes_dequantized_model(arch, quant_type):
    """The forward of the 4-bit model (experts dequantized one at a time in lorakit's loop) equals the
    model's own forward with bitsandbytes' dequantized weights in place; fp32, so only summation order
    differs."""
    fp = tiny_model(arch)
    model = quantize_model(copy.deepcopy(fp), quant_type, blocksize=32)
    torch.testing.assert_close(logits(model, ids(4, 11)), logits(bnb_dequantized_model(fp, quant_type), ids(4, 11)),
                               rtol=1e-5, atol=1e-5)


def wide(arch: str) -> torch.nn.Module:
    """A Mixtral / Qwen3-MoE of width 128 at transformers' default initialization (std 0.02), where weights
    look like a trained model's to NF4 (the tiny test models' std 0.2 at width 32 amplifies any error)."""
    common = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    config = (MixtralConfig(**common, intermediate_size=256, num_local_experts=4) if arch == "mixtral" else
              Qwen3MoeConfig(**common, moe_intermediate_size=128, num_experts=4, head_dim=32, mlp_only_layers=[]))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_experts_stay_close_to_full_precision(arch):
    """NF4 at blocksize 64 moves a Gaussian weight matrix by a relative (Frobenius) error of about 0.09.
    An expert's output goes through three such matrices (gate and up multiplied, then down), independent
    errors adding in quadrature: about sqrt(3) * 0.09 = 0.16 (0.16 measured): bound 0.25. The logits of
    the whole 4-bit model (every linear and expert, two blocks, errors adding in quadrature through the
    residual stream) moved by 0.16-0.17 (relative to their spread) when this was written: bound 0.25.
    Quantizing the experts on top of the linears adds little (the experts' share of the error): at most
    1.2 times the linears-only error. (Each expert read with the first one's scales moves the output by 0.4.)
    """
    fp = wide(arch)
    batch = ids(4, 16)
    hidden = torch.randn(24, 128, generator=torch.Generator().manual_seed(1)) * 0.5
    route = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:2] for i in range(24)])
    weights = torch.softmax(torch.randn(24, 2, generator=torch.Generator().manual_seed(2)), -1)
    source = fp.model.layers[0].mlp.experts
    experts = Experts4bit.from_experts(copy.deepcopy(source), blocksize=64)
    with torch.no_grad():
        want, got = source(hidden, route, weights), experts(hidden, route, weights)
    assert 0 < (got - want).norm() / want.norm() < 0.25
    relative = lambda x, ref: float((x - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm())
    reference = logits(fp, batch)
    linears_only = relative(logits(quantize_model(copy.deepcopy(fp), experts=False), batch), reference)
    everything = relative(logits(quantize_model(copy.deepcopy(fp)), batch), reference)
    assert linears_only < everything < min(0.25, 1.2 * linears_only)


def reference_with_adapters(fp_model, model) -> torch.nn.Module:
    """The bitsandbytes-dequantized model with `model`'s expert adapters as plain per-expert updates of its
    expert weights: W_e + scale * B_e A_e, expert by expert."""
    return add_expert_updates(bnb_dequantized_model(fp_model), model)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_adapter_over_4bit_experts_is_the_per_expert_update(arch):
    fp = tiny_model(arch)
    model = quantize_model(copy.deepcopy(fp), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=3, alpha=5, targets=None, target_parameters=list(FUSED)))
    randomize_adapters(model)
    assert all(isinstance(layer.base_module, Experts4bit) for _, layer in param_layers(model))
    torch.testing.assert_close(logits(model), logits(reference_with_adapters(fp, model)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_step_with_expert_lora_trains_the_factors_only(arch):
    """A QLoRA step with adapters on every linear and expert weight: the loss's gradients reach the expert
    factors (equal to the reference's, where the same factors sit on bitsandbytes-dequantized full-precision
    experts) and nothing of the base changes, its packed bytes included."""
    fp = tiny_model(arch)
    model = quantize_model(copy.deepcopy(fp), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    ref = bnb_dequantized_model(fp)
    lorakit.inject(ref, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapters." in k}, strict=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed = {(path, p): e._parameters[p].detach().clone() for path, e in experts_of(model) for p in FUSED}
    batch = ids()
    model.train(), ref.train()
    model(batch, labels=batch).loss.backward()
    ref(batch, labels=batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters.default." in n and ".lora_" in n for n in grads)
    assert sum(".experts.adapters." in n for n in grads) == 2 * 2 * 2  # two blocks, two fused weights, A and B
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert ref_grads.keys() == grads.keys()
    for n, g in grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6)
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default." in n and ".lora_" in n for n in changed)
    assert any(".experts.adapters." in n for n in changed)
    assert all(torch.equal(e._parameters[p], packed[(path, p)]) for path, e in experts_of(model) for p in FUSED)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_of_an_expert_adapter_on_4bit_experts_is_the_dequantized_update(arch):
    """merge_and_unload gives the model's own experts class holding bitsandbytes' dequantized W_e plus
    scale * B_e A_e (nothing re-quantized), and the adapted logits; in-place merge is refused (lossy)."""
    fp = tiny_model(arch)
    model = quantize_model(copy.deepcopy(fp), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets=["experts"]))
    randomize_adapters(model)
    expected = reference_with_adapters(fp, model)
    adapted = logits(model)
    with pytest.raises(ValueError, match="re-quantize them"):
        lorakit.merge(model)
    merged = lorakit.merge_and_unload(model)
    for path, experts in experts_of(merged):
        assert type(experts) is type(fp.get_submodule(path))
        for name in FUSED:
            torch.testing.assert_close(experts._parameters[name], expected.get_submodule(path)._parameters[name],
                                       rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, ParamLoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


def save_folder(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def qlora_adapter(folder, out, targets, seed: int = 1):
    """An adapter trained (here: randomized) over the 4-bit base `load` makes of `folder`; the adapted model."""
    model, _ = load(str(folder), quant={"blocksize": 32})
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets=targets))
    randomize_adapters(model, seed)
    lorakit.save_adapter(model, out)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_a_qlora_adapter_reloads_onto_the_same_4bit_experts(arch, tmp_path):
    """The adapter records its base's quantization; `load` with it re-quantizes the experts byte for byte."""
    folder = save_folder(tiny_model(arch), tmp_path / "m")
    trained = qlora_adapter(folder, tmp_path / "a", ["experts", "q_proj"])
    model, _ = load(str(folder), adapters=[tmp_path / "a"])
    for (path, mine), (_, theirs) in zip(experts_of(model), experts_of(trained), strict=True):
        assert isinstance(mine, Experts4bit) and isinstance(model.get_submodule(path), ParamLoraLayer)
        for name in FUSED:
            assert torch.equal(mine._parameters[name], theirs._parameters[name])
            assert torch.equal(mine.quant_states[name].nested_absmax, theirs.quant_states[name].nested_absmax)
    torch.testing.assert_close(logits(model), logits(trained), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("targets", [["experts", "q_proj"], ["q_proj", "v_proj"]], ids=["experts", "attention"])
def test_cli_merge_of_a_qlora_adapter_on_4bit_experts(arch, targets, tmp_path):
    """`lorakit merge` writes the model the adapter was trained as: every 4-bit weight dequantized, experts
    too (an attention-only adapter's untouched experts as much as an expert adapter's), plus the updates; so
    the merged folder, read by transformers, gives the adapted 4-bit model's logits."""
    from lorakit.cli import main

    folder = save_folder(tiny_model(arch), tmp_path / "m")
    adapted = logits(qlora_adapter(folder, tmp_path / "a", targets))
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "out"), "--base", str(folder)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)
    assert (logits(merged) - logits(tiny_model(arch))).abs().max() > 1e-3  # not the original weights


def test_cli_merge_into_original_weights_refuses_an_expert_adapter_saying_why(tmp_path, capsys):
    from lorakit.cli import main

    folder = save_folder(tiny_model("mixtral"), tmp_path / "m")
    qlora_adapter(folder, tmp_path / "a", ["experts"])
    args = ["merge", str(tmp_path / "a"), str(tmp_path / "out"), "--base", str(folder), "--qlora-base", "original"]
    assert main(args) == 2
    assert "--qlora-base original merges shard by shard" in capsys.readouterr().err


def test_generate_and_serve_over_4bit_experts_hold_no_full_precision_expert(tmp_path):
    """Inference over 4-bit experts (with an expert adapter, and with an attention adapter through the server)
    dequantizes one expert matrix at a time, for its matmul only: at every dequantization no earlier expert's
    full-precision matrix is alive, and afterwards none."""
    import threading

    from lorakit.generate import generate
    from lorakit.serve import Engine
    from test_loader import alive_tensors, float_weights_shaped_like

    folder = save_folder(tiny_model("mixtral"), tmp_path / "m")
    before = alive_tensors()
    qlora_adapter(folder, tmp_path / "experts", ["experts"])
    qlora_adapter(folder, tmp_path / "attention", ["q_proj", "v_proj"])
    model, tokenizer = load(str(folder), adapters={"experts": tmp_path / "experts"})
    shapes = {(96, 32), (32, 48)}  # one expert's gate_up [2 * ff, hidden] and down [hidden, ff]
    assert {tuple(e.quant_states[n].shape[1:]) for _, e in experts_of(model) for n in FUSED} == shapes
    seen, real = [], linear4bit.dequantize

    def watched(packed, state, dtype=None):
        if tuple(state.shape) in shapes:
            seen.append(float_weights_shaped_like(shapes, before))
        return real(packed, state, dtype)

    assert float_weights_shaped_like(shapes, before) == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear4bit, "dequantize", watched)
        generate(model, tokenizer, ["say cat"], 4)
    assert seen and all(alive == [] for alive in seen)
    assert float_weights_shaped_like(shapes, before) == []
    del model
    model, tokenizer = load(str(folder), adapters={"attention": tmp_path / "attention"})
    engine = Engine(model, tokenizer, base_id="tiny", adapters={"attention": tmp_path / "attention"})
    try:
        done = threading.Event()
        job = engine.prepare({"model": "attention", "prompt": "say cat", "max_tokens": 4, "temperature": 0},
                             chat=False)
        engine.submit(job, lambda item: done.set() if item is None else None)
        assert done.wait(30)
        assert float_weights_shaped_like(shapes, before) == []
    finally:
        engine.close()
    kept = experts_of(model)[0][1].dequantized("down_proj")  # the measure sees a kept copy
    assert (32, 48) not in float_weights_shaped_like(shapes, before)  # [E, 32, 48] is not an expert's shape
    kept = kept[0].clone()
    assert float_weights_shaped_like(shapes, before) == [(32, 48)]
    del kept


def test_a_qlora_step_keeps_no_full_precision_expert_between_dequantizations(monkeypatch):
    """Training: the forward keeps the packed bytes for the backward, which dequantizes W_e again: at each
    dequantization of the step no other expert matrix in full precision is alive."""
    from test_loader import alive_tensors, float_weights_shaped_like

    before = alive_tensors()
    model = quantize_model(tiny_model("qwen3_moe"), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets=["experts"]))
    randomize_adapters(model)
    shapes = {(48, 32), (32, 24)}
    seen, real = [], linear4bit.dequantize

    def watched(packed, state, dtype=None):
        if tuple(state.shape) in shapes:
            seen.append(float_weights_shaped_like(shapes, before))
        return real(packed, state, dtype)

    monkeypatch.setattr(linear4bit, "dequantize", watched)
    batch = ids(2, 5)
    model.train()
    model(batch, labels=batch).loss.backward()
    forward_and_backward = len(seen)
    assert forward_and_backward >= 2 * 2 * 2 and all(alive == [] for alive in seen)


def test_a_4bit_load_holds_one_expert_matrix_in_flight(tmp_path, monkeypatch):
    """Each expert is quantized as soon as its parts are read (gate and up: two tensors, read together even
    where transformers saved all experts' gates before their ups), so the float matrices alive at any
    expert's quantization are the embedding, the head, the routers (and a few tensors of bytes) and that
    expert's matrix with its last part: never the experts of a layer, let alone the model's."""
    from test_loader import float_matrix_bytes_alive

    fp = wide("mixtral")
    folder = save_folder(fp, tmp_path / "m", max_shard_size="200KB")
    expert_bytes = sum(p.numel() * 4 for n, p in fp.named_parameters() if ".experts." in n)
    largest = 2 * 256 * 128 * 4  # one expert's gate_up [2 * ff, hidden], fp32
    embed_and_head = 2 * 128 * 128 * 4
    del fp
    baseline = float_matrix_bytes_alive()
    alive, real = [], Experts4bit.set_expert

    def watched(self, *args):
        alive.append(float_matrix_bytes_alive() - baseline)
        return real(self, *args)

    monkeypatch.setattr(Experts4bit, "set_expert", watched)
    model, _ = load(str(folder), quant={})
    assert len(alive) == 2 * 2 * 4 and all(isinstance(e, Experts4bit) for _, e in experts_of(model))
    small = 8192  # two routers [4, 128] in fp32 (4 KiB), and the few bytes of tiny tensors
    assert max(alive) <= embed_and_head + 1.5 * largest + small < 0.25 * expert_bytes
    assert float_matrix_bytes_alive() - baseline <= embed_and_head + small


def test_transposed_biased_experts_with_their_own_gate_gpt_oss(tmp_path):
    """transformers' experts flags beyond Mixtral's: GPT-OSS stores its experts [E, in, out] (is_transposed),
    with biases and its own clamped, interleaved gate. Each expert is quantized as its [out, in] matrix
    W_e^T (bitsandbytes' bytes of it), biases stay in full precision, and the forward equals the model's own
    with bitsandbytes' dequantized weights in place. Its checkpoint holds the fused weights whole: a 4-bit
    load quantizes them expert by expert into the same model."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING["gpt_oss"](vocab_size=128, hidden_size=32, intermediate_size=48, num_local_experts=4,
                                       num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, initializer_range=0.2, sliding_window=16,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    fp = AutoModelForCausalLM.from_config(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = quantize_model(copy.deepcopy(fp), blocksize=32)
    ref = copy.deepcopy(fp)
    head = ref.get_output_embeddings()
    with torch.no_grad():
        for module in ref.modules():
            if type(module) is torch.nn.Linear and module is not head:
                module.weight.copy_(bnbf.dequantize_4bit(*bnb_expert(module.weight)))
        for path, experts in experts_of(model):
            assert isinstance(experts, Experts4bit) and experts.is_transposed and experts.has_bias
            assert experts.gate_up_proj_bias.dtype == torch.float32  # biases: full precision
            for name in FUSED:
                stored = ref.get_submodule(path)._parameters[name]  # [E, in, out]
                for e in range(stored.shape[0]):
                    packed, state = bnb_expert(stored[e].T.contiguous())  # W_e [out, in]
                    assert torch.equal(experts._parameters[name][e], packed.reshape(-1))
                    stored[e].copy_(bnbf.dequantize_4bit(packed, state).T)
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)
    save_folder(fp, tmp_path)
    loaded, _ = load(str(tmp_path), quant={"blocksize": 32})
    assert all(isinstance(e, Experts4bit) for _, e in experts_of(loaded))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip_and_a_full_precision_checkpoint_into_4bit_experts(arch):
    """A 4-bit model's state dict holds, per fused weight, the packed bytes and stacked quant state; expert
    e's slices, with its nested offset put in the JSON, are what bitsandbytes' QuantState.from_dict reads,
    and dequantize to W_e. It loads back into another 4-bit model (equal logits); a full-precision checkpoint
    loads into a 4-bit model by quantizing each expert (as quantize_model of that checkpoint)."""
    import json

    model = quantize_model(tiny_model(arch), blocksize=32)
    state = model.state_dict()
    key = "model.layers.1.mlp.experts.down_proj"
    suffixes = {k.removeprefix(key) for k in state if k.startswith(key)}
    assert suffixes == {"", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".nested_offset",
                        ".quant_state.bitsandbytes__nf4"}
    experts = model.model.layers[1].mlp.experts
    for e in range(4):
        fields = json.loads(bytes(state[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))
        fields["nested_offset"] = float(state[f"{key}.nested_offset"][e])
        one = {"absmax": state[f"{key}.absmax"][e], "quant_map": state[f"{key}.quant_map"],
               "nested_absmax": state[f"{key}.nested_absmax"][e], "nested_quant_map": state[f"{key}.nested_quant_map"],
               **fields}
        theirs = bnbf.dequantize_4bit(state[key][e], bnbf.QuantState.from_dict(one, torch.device("cpu")))
        assert torch.equal(theirs, experts.dequantized("down_proj")[e])
    other = quantize_model(tiny_model(arch, seed=3), blocksize=32)
    assert not torch.equal(logits(other), logits(model))
    assert not other.load_state_dict(state).unexpected_keys
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)
    other.load_state_dict(tiny_model(arch, seed=5).state_dict())
    torch.testing.assert_close(logits(other), logits(quantize_model(tiny_model(arch, seed=5), blocksize=32)),
                               rtol=0, atol=0)


def test_bf16_packed_storage_and_bf16_compute():
    """Packed bytes viewed as bf16 (FSDP2 shards them with the float parameters) give the same model; a bf16
    compute dtype dequantizes each expert and multiplies in bf16: within bf16's rounding (2^-8 relative per
    operation, a few dozen operations deep) of the fp32 compute."""
    fp = wide("mixtral")
    model = quantize_model(copy.deepcopy(fp))
    stored = quantize_model(copy.deepcopy(fp), quant_storage=torch.bfloat16)
    assert {e._parameters[n].dtype for _, e in experts_of(stored) for n in FUSED} == {torch.bfloat16}
    torch.testing.assert_close(logits(stored), logits(model), rtol=0, atol=0)
    bf16 = quantize_model(copy.deepcopy(fp), compute_dtype=torch.bfloat16)
    hidden = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    route = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))[:2] for i in range(24)])
    with torch.no_grad():
        args = (hidden, route, torch.full((24, 2), 0.5))
        want, got = model.model.layers[0].mlp.experts(*args), bf16.model.layers[0].mlp.experts(*args)
    assert got.dtype == torch.float32 and 0 < (got - want).norm() / want.norm() < 0.02


def test_experts_of_an_unknown_kind_stay_in_full_precision_with_a_warning():
    """A module holding [E, out, in] weights without the flags of transformers' experts forward (so lorakit
    cannot know how it multiplies) is left as it is, and the warning names its weights."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.stacked = torch.nn.Parameter(torch.randn(4, 8, 8))

    model = torch.nn.Module()
    model.block = Block()
    with pytest.warns(UserWarning, match=r"1 weight matrices outside linear layers stay in full precision.*stacked"):
        quantize_model(model, blocksize=32)
    assert model.block.stacked.dtype == torch.float32 and not any(isinstance(m, Experts4bit) for m in model.modules())


def test_the_training_loop_trains_expert_adapters_over_4bit_experts_with_checkpointing():
    """`fit` with gradient checkpointing (the default with `quant`): the checkpointed blocks run the 4-bit
    experts again in the backward, and the expert factors train."""
    from lorakit.config import TrainConfig
    from lorakit.train.fit import fit
    from test_train import toy_rows

    model = quantize_model(tiny_model("mixtral"), blocksize=32)
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]))
    down = model.model.layers[1].mlp.experts.adapters["default"]["down_proj"]
    before = down.lora_A.detach().clone()
    result = fit(model, toy_rows(), TrainConfig(max_steps=3, batch_size=4, gradient_checkpointing=True), pad_id=0,
                 log=lambda *_: None)
    assert result.skipped_steps == 0
    assert not torch.equal(down.lora_A, before) and down.lora_B.abs().sum() > 0


def test_cli_merge_requantize_keeps_the_experts_in_full_precision(tmp_path, capsys):
    """`lorakit merge --requantize` writes transformers + bitsandbytes' 4-bit layout, which has no 4-bit
    experts: the linears are 4-bit, the merged experts full precision (the warning says so), and the folder
    loads back in lorakit with those experts as written."""
    from lorakit.cli import main

    folder = save_folder(tiny_model("mixtral"), tmp_path / "m")
    qlora_adapter(folder, tmp_path / "a", ["experts", "q_proj"])
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "full"), "--base", str(folder)]) == 0
    with pytest.warns(UserWarning, match=r"weight matrices outside linear layers stay in full precision.*experts"):
        code = main(["merge", str(tmp_path / "a"), str(tmp_path / "4bit"), "--base", str(folder), "--requantize",
                     "nf4"])
    assert code == 0
    reloaded, _ = load(str(tmp_path / "4bit"))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert any(isinstance(m, linear4bit.Linear4bit) for m in reloaded.modules())
    for path, experts in experts_of(reloaded):
        assert not isinstance(experts, Experts4bit)
        for name in FUSED:
            assert torch.equal(experts._parameters[name], full.get_submodule(path)._parameters[name])
