"""A 4-bit model folder in the transformers + bitsandbytes layout, written and read without bnb.

Writing: the model's `Linear4bit` layers already produce bitsandbytes' state-dict keys
(`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_*`, `weight.quant_state.*`);
config.json gets the `quantization_config` transformers writes, so
`AutoModelForCausalLM.from_pretrained(folder)` with bitsandbytes installed reads the folder.
Reading (`lorakit.models.load`, through `lorakit.stream`): the model is built on the meta device and
each 4-bit weight is rebuilt from its packed bytes, so nothing is quantized twice and no
full-precision copy is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit.quant.linear4bit import Experts4bit, quantization_of


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
    if any(isinstance(m, Experts4bit) for m in model.modules()):
        raise ValueError("transformers + bitsandbytes have no layout for 4-bit mixture-of-experts weights: save "
                         "the experts in full precision (quantize_model(..., experts=False))")
    model.save_pretrained(folder)
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = bnb_quantization_config(quant)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_4bit_folder(config) -> bool:
    q = getattr(config, "quantization_config", None)
    q = q if isinstance(q, dict) else (q.to_dict() if q is not None else {})
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit"))


def folder_compute_dtype(config) -> torch.dtype | None:
    """The compute dtype of a bitsandbytes-layout 4-bit folder's layers (None: not such a folder)."""
    if not is_4bit_folder(config):
        return None
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return getattr(torch, str(quant.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))
