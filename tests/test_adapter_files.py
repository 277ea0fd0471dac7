"""Bad adapter folders are refused with an error naming the file, the field or the module."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import randomize_adapters, tiny_gpt2, tiny_llama
from lorakit import AdapterFileError


@pytest.fixture
def saved(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def unchanged(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(AdapterFileError, match="does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    (saved / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json is missing"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_pickle_weights_are_refused(tmp_path, saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is missing .*only safetensors"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_corrupt_config_names_line(saved):
    (saved / "adapter_config.json").write_text('{\n  "r": 4,\n  "lora_alpha": \n}')
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: invalid JSON at line 4"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_bad_config_field_is_named(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["r"] = -1
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json: r must be a positive integer"):
        lorakit.load_adapter(tiny_llama(), saved)
    config["r"], config["lora_bias"] = 4, True
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="lora_bias=True is not supported"):
        lorakit.load_adapter(tiny_llama(), saved)
    config["lora_bias"], config["use_dora"] = False, True  # DoRA is supported, but needs its magnitudes
    (saved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="has no lora_magnitude_vector but the config says use_dora=True"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_corrupt_weights(saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    before = unchanged(model)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        lorakit.load_adapter(model, saved)
    assert_untouched(model, before)


def test_missing_factor_is_named(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, saved / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"'model\.layers\.1\.self_attn\.v_proj' has no lora_B"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_wrong_base_is_refused_naming_first_mismatch_unless_forced(saved):
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    before = unchanged(wider)
    with pytest.raises(AdapterFileError, match=r"differs from this model at 'model\.layers\.0\.self_attn\.v_proj': "
                                               r"weight \[16, 32\] there, \[32, 32\] here"):
        lorakit.load_adapter(wider, saved)
    assert_untouched(wider, before)
    # forcing skips the base check, but tensors that cannot fit are still refused
    with pytest.raises(AdapterFileError, match=r"v_proj' takes \[out=32, in=32\] but lora_A is \[4, 32\] "
                                               r"and lora_B is \[16, 4\]"):
        lorakit.load_adapter(wider, saved, force=True)
    assert_untouched(wider, before)


def test_module_missing_from_model(saved):
    with pytest.raises(AdapterFileError, match=r"differs from this model at 'model\.layers\.0\.self_attn\.q_proj'"
                                               r".*no such module"):
        lorakit.load_adapter(tiny_gpt2(), saved)
    with pytest.raises(AdapterFileError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' is not in the model"):
        lorakit.load_adapter(tiny_gpt2(), saved, force=True)


def test_unexpected_tensor_is_named(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.something"] = torch.zeros(2)
    save_file(tensors, saved / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterFileError, match=r"unexpected tensor 'base_model\.model\.model\.norm\.something'"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_save_is_atomic_and_replaces(tmp_path, saved):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2, targets=["k_proj"]))
    lorakit.save_adapter(model, saved)
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((saved / "adapter_config.json").read_text())["target_modules"] == ["k_proj"]


def test_save_refuses_merged_or_unknown_adapter(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    with pytest.raises(ValueError, match="model has no adapter 'x'"):
        lorakit.save_adapter(model, tmp_path, name="x")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="is merged into"):
        lorakit.save_adapter(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_saving_is_deterministic_and_stays_readable(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "one")
    lorakit.save_adapter(model, tmp_path / "two")  # safetensors itself writes metadata in hash order
    one = (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    assert int.from_bytes(one[:8], "little") % 8 == 0
    loaded = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert torch.equal(loaded["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A)
