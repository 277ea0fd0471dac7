"""A 4-bit model folder in the transformers + bitsandbytes layout, written and read without bnb.

Writing: the model's `Linear4bit` layers already produce bitsandbytes' state-dict keys
(`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.*`);
config.json gets the `quantization_config` transformers writes, so
`AutoModelForCausalLM.from_pretrained(folder)` with bitsandbytes installed reads the folder.
Reading: the model is built on the meta device and each 4-bit weight is rebuilt from its packed
bytes, so nothing is quantized twice and no full-precision copy is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.quant.linear4bit import Linear4bit, quantizable, quantization_of
from lorakit.quant.nf4 import from_state_dict_entries


def bnb_quantization_config(quant: dict) -> dict:
    """transformers' BitsAndBytesConfig.to_dict() for a QuantConfig-like dict."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant["type"],
        "bnb_4bit_use_double_quant": quant["double_quant"],
        "bnb_4bit_compute_dtype": quant["compute_dtype"],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def save_4bit(model: nn.Module, folder: Path) -> None:
    """save_pretrained for a model whose linears are `Linear4bit` (into `folder`, not atomic itself)."""
    quant = quantization_of(model)
    if quant is None:
        raise ValueError("the model has no 4-bit layers to save")
    model.save_pretrained(folder)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = bnb_quantization_config(quant)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_4bit_folder(config) -> bool:
    q = getattr(config, "quantization_config", None)
    q = q if isinstance(q, dict) else (q.to_dict() if q is not None else {})
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit"))


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def load_4bit(folder: Path, config) -> nn.Module:
    """A model from a bitsandbytes-layout 4-bit folder, its 4-bit layers as our `Linear4bit`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    compute_dtype = getattr(torch, str(quant.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))
    config.__dict__.pop("quantization_config", None)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = checkpoint_tensors(folder)
    for name, module in list(model.named_modules()):
        if quantizable(module) and f"{name}.weight.absmax" in tensors:
            packed, state = from_state_dict_entries(f"{name}.", tensors)
            bias = tensors.pop(f"{name}.bias", None)
            for key in [k for k in tensors if k.startswith(f"{name}.weight")]:
                del tensors[key]
            parent, _, child = name.rpartition(".")
            layer = Linear4bit(packed, state, bias, compute_dtype, conv1d=not isinstance(module, nn.Linear))
            setattr(model.get_submodule(parent), child, layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensors {unexpected[:3]} in the checkpoint")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{folder}: the checkpoint has no tensor for {still_meta[0]}")
    return model.eval()
