"""Target selection follows PEFT's rules; a spec that selects nothing says what it could select."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer

import lorakit
from conftest import tiny_gpt2, tiny_llama
from lorakit.adapters.layer import LoraLayer


def ours(model, spec) -> set[str]:
    lorakit.inject(model, spec)
    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def theirs(model, **config) -> set[str]:
    peft_model = get_peft_model(model, LoraConfig(**config))
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, PeftLoraLayer)}


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        (lorakit.LoraSpec(targets="all-linear"), dict(target_modules="all-linear")),
        (lorakit.LoraSpec(targets=["q_proj", "mlp.up_proj"]), dict(target_modules=["q_proj", "mlp.up_proj"])),
        (lorakit.LoraSpec(targets=r".*\.1\.self_attn\.(k|v)_proj"),
         dict(target_modules=r".*\.1\.self_attn\.(k|v)_proj")),
        (lorakit.LoraSpec(targets=None), dict(target_modules=None)),
        (lorakit.LoraSpec(targets="all-linear", exclude=["o_proj"]), dict(target_modules="all-linear",
                                                                          exclude_modules=["o_proj"])),
        (lorakit.LoraSpec(targets=["q_proj", "down_proj"], layers=[1]),
         dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
        (lorakit.LoraSpec(targets=["embed_tokens", "q_proj"]), dict(target_modules=["embed_tokens", "q_proj"])),
    ],
)
def test_llama_selection_matches_peft(spec, config):
    selected = ours(tiny_llama(), spec)
    assert selected == theirs(tiny_llama(), **config)
    assert selected


def test_gpt2_defaults_and_all_linear_match_peft():
    assert ours(tiny_gpt2(), lorakit.LoraSpec(targets=None)) == theirs(tiny_gpt2(), target_modules=None)
    all_linear = ours(tiny_gpt2(), lorakit.LoraSpec(targets="all-linear"))
    assert all_linear == theirs(tiny_gpt2(), target_modules="all-linear")
    assert "lm_head" not in all_linear


def test_targets_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"match no module\. Candidates: .*q_proj \(x2\).*lm_head"):
        lorakit.inject(tiny_llama(), lorakit.LoraSpec(targets=["query"]))


def test_unknown_architecture_without_targets_is_an_error():
    from torch import nn

    with pytest.raises(ValueError, match="no default targets for model type None"):
        lorakit.inject(nn.Sequential(nn.Linear(2, 2)), lorakit.LoraSpec(targets=None))


def test_rank_and_alpha_patterns_follow_peft(tokens):
    spec = lorakit.LoraSpec(r=4, alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\..*": 6},
                            alpha_pattern={"q_proj": 3})
    model = lorakit.inject(tiny_llama(), spec)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                         rank_pattern=spec.rank_pattern,
                                                         alpha_pattern=spec.alpha_pattern))
    for name, module in peft_model.named_modules():
        if isinstance(module, PeftLoraLayer):
            layer = model.get_submodule(name.removeprefix("base_model.model."))
            adapter = layer.adapters["default"]
            assert adapter.r == module.r["default"], name
            assert adapter.scale == pytest.approx(module.scaling["default"]), name


def test_duplicate_adapter_name_and_bad_spec_are_refused():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lorakit.inject(model, lorakit.LoraSpec(r=2))
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lorakit.LoraSpec(r=0)
    with pytest.raises(ValueError, match="bias must be one of"):
        lorakit.LoraSpec(bias="some")
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        lorakit.inject(tiny_llama(), lorakit.LoraSpec(modules_to_save=["head"]))


def test_default_targets_are_peft_table_for_every_model_type_it_lists():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    from lorakit.adapters.inject import DEFAULT_TARGETS

    assert "gemma3_text" in PEFT_TABLE and "stablelm" in PEFT_TABLE  # the ones lorakit lacked
    for model_type, targets in PEFT_TABLE.items():
        assert DEFAULT_TARGETS.get(model_type) == targets, model_type
    assert DEFAULT_TARGETS["phi3"] == ["qkv_proj"] and "phi3" not in PEFT_TABLE  # ours where PEFT has none


@pytest.mark.parametrize("arch", ["gemma3_text", "stablelm", "qwen2", "bloom", "falcon"])
def test_default_targets_select_what_peft_selects(arch):
    from tiny_archs import tiny_model

    selected = ours(tiny_model(arch), lorakit.LoraSpec(targets=None))
    assert selected and selected == theirs(tiny_model(arch), target_modules=None)
