"""Every architecture in tests/tiny_archs.py through every feature, one test id per (feature, arch).

References: PEFT (target selection, parameter counts, adapter files both ways with equal logits, DoRA),
the model's own forward before a merge, and each row run alone for a mixed-adapter batch. Where an
architecture cannot do a thing, the test asserts the clear message: mixture-of-experts models get their
fused expert parameters and routers adapted (PEFT's `target_parameters`; more in tests/test_moe.py), their
experts stored 4-bit under quantization (tests/test_moe4bit.py), but they cannot be routed per row (an error).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import randomize_adapters
from lorakit.adapters.layer import LoraLayer, lora_layers
from lorakit.adapters.params import ParamLoraLayer, param_layers
from lorakit.quant.linear4bit import Experts4bit, Linear4bit, quantize_model
from tiny_archs import ARCHS, tiny_model

MOE = {"mixtral", "qwen3_moe"}  # fused expert parameters [experts, out, in] and a router matrix
PREFIX = "base_model.model."


@functools.cache
def _built(arch: str) -> nn.Module:
    return tiny_model(arch)


@pytest.fixture(scope="module", autouse=True)
def _drop_built_models():
    """The cache lives as long as this module's tests: later tests may count the tensors alive."""
    yield
    _built.cache_clear()


def fresh(arch: str) -> nn.Module:
    """The architecture's tiny model, built once while this module runs, and copied."""
    return copy.deepcopy(_built(arch))


def ids(rows: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def inject(arch: str, **spec) -> nn.Module:
    model = fresh(arch)
    spec.setdefault("targets", "all-linear")
    with no_warning():
        lorakit.inject(model, lorakit.LoraSpec(**spec))
    return model


def peft_model(arch: str, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes (fan_in_fan_out on GPT-2, ...)
        return get_peft_model(fresh(arch), LoraConfig(**config))


def peft_wrapped_linears(model: nn.Module) -> set[str]:
    """Modules PEFT wrapped whose base is a linear layer (not its wrappers of expert parameters)."""
    return {n.removeprefix(PREFIX) for n, m in model.named_modules()
            if isinstance(m, PeftLoraLayer) and isinstance(m.get_base_layer(), nn.Linear | Conv1D)}


def wrapped(model: nn.Module) -> set[str]:
    return {n for n, _ in lora_layers(model)}


def randomize_peft(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def train_steps(model: nn.Module, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one batch (training mode, fixed dropout masks); the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=lr)
    batch, losses = ids(), []
    model.train()
    for step in range(steps):
        torch.manual_seed(step)
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_all_linear(arch):
    """The same layers as PEFT's all-linear, and the same parameter report (MoE: experts and routers too)."""
    model = inject(arch, r=4, alpha=8)
    theirs = peft_model(arch, r=4, lora_alpha=8, target_modules="all-linear")
    assert wrapped(model) and wrapped(model) == peft_wrapped_linears(theirs)
    assert all(layer.kind in ("linear", "conv1d") for _, layer in lora_layers(model))
    assert lorakit.adapters.inject.count_parameters(model) == theirs.get_nb_trainable_parameters()
    assert bool(list(param_layers(model))) == (arch in MOE)


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_default_targets(arch):
    model = inject(arch, r=4, targets=None)
    if arch in PEFT_DEFAULTS:  # (PEFT's own None lookup fails on MoE models: its MoE conversion runs first)
        assert wrapped(model) == peft_wrapped_linears(peft_model(arch, r=4, target_modules=PEFT_DEFAULTS[arch]))
    else:  # PEFT has no default here and says so; ours: the attention's query and value projections
        with pytest.raises(ValueError, match="target_modules"):
            peft_model(arch, r=4, target_modules=None)
        assert {n.rsplit(".", 1)[-1] for n in wrapped(model)} <= {"q_proj", "v_proj", "qkv_proj"}
    assert wrapped(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_steps_lower_the_loss(arch):
    model = inject(arch, r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default." in n and ".lora_" in n for n in changed)  # the base is frozen
    assert any(".experts." in n for n in changed) == (arch in MOE)


def assert_peft_reads_the_same_model(arch: str, model: nn.Module, folder, rtol: float = 1e-5) -> None:
    """Save `model`'s adapter with lorakit, load it in PEFT over a fresh base: equal logits."""
    with torch.no_grad():
        expected = model(ids()).logits
    lorakit.save_adapter(model, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(fresh(arch), folder)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, expected, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_adapter_loads_in_peft(arch, tmp_path):
    model = inject(arch, r=4, alpha=8)
    randomize_adapters(model)
    assert_peft_reads_the_same_model(arch, model, tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_in_lorakit(arch, tmp_path):
    theirs = peft_model(arch, r=4, lora_alpha=8, target_modules="all-linear")
    randomize_peft(theirs)
    with torch.no_grad():
        expected = theirs(ids()).logits
    theirs.save_pretrained(tmp_path / "a")
    model = fresh(arch)
    lorakit.load_adapter(model, tmp_path / "a")
    assert wrapped(model) == peft_wrapped_linears(theirs)
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_gives_the_adapted_logits(arch):
    model = inject(arch, r=4, alpha=8)
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(ids()).logits
        base = fresh(arch)(ids()).logits
        merged = lorakit.merge_and_unload(model)
        assert not any(isinstance(m, LoraLayer | ParamLoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids()).logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2  # the adapter shows


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_training_step(arch):
    model = fresh(arch)
    with no_warning():  # nothing is left in full precision but the head, embeddings, norms and routers
        quantize_model(model, blocksize=32)
    head = model.get_output_embeddings()
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D) and m is not head]
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # MoE: fused experts are 4-bit
    with no_warning():
        lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    assert all(layer.kind == "linear4bit" for _, layer in lora_layers(model))
    experts = [layer for _, layer in param_layers(model) if isinstance(layer.base_module, Experts4bit)]
    assert len(experts) == (2 if arch in MOE else 0)  # expert adapters over 4-bit experts, one per block
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_steps(model, steps=3)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default." in n and ".lora_" in n for n in changed)  # the base is frozen
    assert any(".experts.adapters." in n for n in changed) == (arch in MOE)


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_equals_peft_and_trains(arch, tmp_path):
    if arch in MOE:  # no DoRA on expert weights and routers, as in PEFT: refused, then left out
        with pytest.raises(ValueError, match="takes no dropout, DoRA"):
            inject(arch, r=4, alpha=8, kind="dora")
    model = inject(arch, r=4, alpha=8, kind="dora", exclude=["experts", "gate"] if arch in MOE else None)
    randomize_adapters(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            magnitude = layer.adapters["default"].magnitude
            magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=g))
    assert_peft_reads_the_same_model(arch, model, tmp_path, rtol=1e-4)
    losses = train_steps(model, steps=3)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_adapter_batch_equals_rows_alone(arch):
    model = fresh(arch)
    if arch in MOE:  # expert adapters cannot be routed per row: refused, then the test runs without them
        lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets="all-linear"), name="a")
        with pytest.raises(ValueError, match="mixed-adapter batch cannot route"), lorakit.route(model, ["a", None]):
            pass
        lorakit.adapters.inject.remove_adapter(model, "a")
    exclude = ["experts", "gate"] if arch in MOE else None
    lorakit.inject(model, lorakit.LoraSpec(r=2, alpha=4, targets="all-linear", exclude=exclude), name="a")
    assert not [path for path, layer in param_layers(model) if "a" in layer.adapters]
    lorakit.inject(model, lorakit.LoraSpec(r=3, alpha=6, targets=None, kind="dora"), name="b")
    randomize_adapters(model)
    rows, batch = ["a", None, "b", "a"], ids(4)
    with torch.no_grad():
        with lorakit.route(model, rows):
            mixed = model(batch).logits
        for i, name in enumerate(rows):
            lorakit.set_active(model, [] if name is None else [name])
            torch.testing.assert_close(mixed[i], model(batch[i : i + 1]).logits[0], rtol=1e-5, atol=1e-5)
        assert (mixed[0] - mixed[2]).abs().max() > 1e-3  # the rows' adapters differ
        # greedy decoding through the model's cache, each row with its own adapter
        greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        with lorakit.route(model, rows):
            generated = model.generate(batch, attention_mask=torch.ones_like(batch), **greedy)
        for i, name in enumerate(rows):
            lorakit.set_active(model, [] if name is None else [name])
            alone = model.generate(batch[i : i + 1], attention_mask=torch.ones_like(batch[i : i + 1]), **greedy)
            assert generated[i].tolist() == alone[0].tolist(), f"row {i} ({name})"


def test_every_linear_of_every_architecture_is_4bit_or_reported():
    """No architecture keeps a linear layer in full precision silently."""
    for arch in ARCHS:
        model = fresh(arch)
        with no_warning():
            quantize_model(model, blocksize=32)
        assert any(isinstance(m, Linear4bit) for m in model.modules()), arch
        assert any(isinstance(m, Experts4bit) for m in model.modules()) == (arch in MOE), arch


@pytest.mark.parametrize("arch", ARCHS)
def test_load_and_load_time_quantization(arch, tmp_path):
    """`models.load` reads the folder transformers saved (its old key names, per-expert MoE weights) into the
    same model; with `quant=` (4-bit as each tensor is read) it gives quantize_model's model, and says the
    same about what it keeps in full precision (nothing but the head, embeddings, norms and routers)."""
    from conftest import tiny_tokenizer
    from lorakit.models import load

    fresh(arch).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    plain, _ = load(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids()).logits, fresh(arch)(ids()).logits, rtol=0, atol=0)
    with no_warning():
        loaded, _ = load(str(tmp_path), quant={"blocksize": 32})
        expected = quantize_model(fresh(arch), blocksize=32)
    kinds = {n: type(m) for n, m in expected.named_modules()}
    assert {n: type(m) for n, m in loaded.named_modules()} == kinds and Linear4bit in kinds.values()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, expected(ids()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(MOE))
@pytest.mark.parametrize("targets, adapted", [(["experts"], {"experts.gate_up_proj", "experts.down_proj"}),
                                              (["q_proj", "gate_up_proj"], {"experts.gate_up_proj"}),
                                              (r".*\.mlp\.gate", {"gate.weight"})])
def test_naming_expert_parameters_adapts_them(arch, targets, adapted):
    model = fresh(arch)
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=targets))
    got = {f"{path.rsplit('.', 1)[-1]}.{p}" for path, layer in param_layers(model) for p in layer.adapters["default"]}
    assert got == adapted
    assert {n.rsplit(".", 1)[-1] for n in wrapped(model)} == ({"q_proj"} if "q_proj" in targets else set())
