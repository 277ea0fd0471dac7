"""What an adapter folder records besides its tensors: written and read here, and only here.

adapter_config.json holds PEFT's LoraConfig fields (its AdaLoraConfig fields for AdaLoRA, see adalora.py),
made from the adapter's spec and read back into one, and lorakit's "lorakit_parent": the adapter it was
saved stacked on (the record's `parents`, state.py). The safetensors file's metadata holds PEFT's
{"format": "pt"} and lorakit's account of the base the adapter was saved for. PEFT ignores lorakit's keys:

    lorakit.base         the base's name or path
    lorakit.base_shapes  {adapted module or held weight: its weight's shape ([out, in] for a layer)}, JSON
    lorakit.fingerprint  a hash of base_shapes
    lorakit.context      the RoPE parameters and context length it was trained with (LongLoRA), JSON
    lorakit.quant        how the 4-bit base it was trained over was made (QuantConfig fields), JSON
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.adapters import adalora
from lorakit.adapters.inject import candidate_names, name_matches
from lorakit.adapters.params_io import exact_parameters
from lorakit.adapters.spec import LoraSpec
from lorakit.adapters.state import adapters_of
from lorakit.longlora import context_of
from lorakit.quant.linear4bit import quantization_of

PARENT_KEY = "lorakit_parent"  # in adapter_config.json: the adapter it was saved stacked on

UNSUPPORTED = {  # PEFT config field -> its default; anything else we cannot honour yet
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


class AdapterFileError(ValueError):
    """An adapter folder that is missing, corrupt, or does not fit the model."""

# ----------------------------------------------------------------------------- write


def adapter_config(model: nn.Module, name: str, spec: LoraSpec, targets: list[str], saved: list[str],
                   params: list[str]) -> dict:
    """adapter_config.json for adapter `name` of `model`, saved as `spec` (its PEFT fields: `targets` the
    adapted layers, `saved` the copied modules, `params` the adapted held weights), and its parent, if any."""
    config = peft_config(model, spec, targets, saved, params)
    if spec.kind == "adalora":
        config = adalora.peft_config(config, model, name, spec)
    parent = adapters_of(model).parents.get(name)
    if parent is not None:  # an adapter stack: the parent's name
        config[PARENT_KEY] = parent
    return config


def base_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def fingerprint(base_shapes: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(base_shapes, sort_keys=True).encode()).hexdigest()[:16]


def peft_config(model: nn.Module, spec: LoraSpec, targets: list[str], saved: list[str], params: list[str]) -> dict:
    """The LoraConfig fields PEFT writes for this adapter (targets as the exact set adapted)."""
    from transformers import GenerationMixin

    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if isinstance(model, GenerationMixin) else None,
        "base_model_name_or_path": base_name(model),
        "inference_mode": True,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": exact_targets(model, targets) if targets else None,
        "target_parameters": exact_parameters(model, params) if params else None,
        "exclude_modules": None,
        "bias": spec.bias,
        "use_rslora": spec.rslora,
        "modules_to_save": saved or None,
        "init_lora_weights": spec.init if spec.init in ("gaussian", "pissa") else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "fan_in_fan_out": any(model.get_submodule(t).fan_in_fan_out for t in targets),
        "use_dora": spec.kind == "dora",
        "lora_bias": False,
    }


def exact_targets(model: nn.Module, targets: list[str]) -> list[str] | str:
    """Leaf names if they select exactly `targets` under PEFT's rules, else a full-match regex."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    if {n for n in candidate_names(model) if name_matches(n, leaves)} == set(targets):
        return leaves
    return "(" + "|".join(re.escape(t) for t in targets) + ")"

def base_metadata(model: nn.Module, base_shapes: dict[str, list[int]]) -> dict[str, str]:
    """The safetensors metadata: PEFT's format key and lorakit's account of the base (see above)."""
    metadata = {
        "format": "pt",
        "lorakit.base": base_name(model),
        "lorakit.base_shapes": json.dumps(base_shapes, sort_keys=True),
        "lorakit.fingerprint": fingerprint(base_shapes),
    }
    if context_of(model) is not None:  # RoPE and context length, restored on load (LongLoRA's interpolation)
        metadata["lorakit.context"] = json.dumps(context_of(model), sort_keys=True)
    if quantization_of(model) is not None:  # trained over a 4-bit base: say how, to rebuild it
        metadata["lorakit.quant"] = json.dumps(quantization_of(model), sort_keys=True)
    return metadata


# ----------------------------------------------------------------------------- read


def spec_from_peft(config: dict, where: Path) -> LoraSpec:
    """The spec an adapter_config.json describes; a field lorakit cannot honour is an error naming it."""
    if config.get("peft_type", "LORA") not in ("LORA", "ADALORA"):
        raise AdapterFileError(f"{where}: peft_type {config.get('peft_type')!r} is not LORA or ADALORA")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, False, [], {}):
            raise AdapterFileError(f"{where}: {key}={config[key]!r} is not supported by lorakit yet")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterFileError(f"{where}: missing field {key!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init not in ("gaussian", "pissa", "eva", "orthogonal"):
        raise AdapterFileError(f"{where}: init_lora_weights={init!r} changes the base weights in a way lorakit "
                               "cannot redo; save the adapter converted for the original base instead")
    try:
        if config.get("peft_type") == "ADALORA":
            return adalora.spec_from_peft(config)
        return LoraSpec(
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout") or 0.0,
            targets=None if config.get("target_parameters") and not config.get("target_modules")
            else config.get("target_modules"),  # PEFT writes [] beside target_parameters
            target_parameters=list(config["target_parameters"]) if config.get("target_parameters") else None,
            bias=config.get("bias") or "none",
            rslora=bool(config.get("use_rslora", False)),
            init=init if init in ("gaussian", "pissa") else "kaiming",
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            modules_to_save=config.get("modules_to_save"),
            kind="dora" if config.get("use_dora") else "lora",
        )
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from None


def parent_from_config(config: dict, where: Path) -> str | None:
    """The adapter an adapter_config.json says its adapter was saved stacked on, if any."""
    parent = config.get(PARENT_KEY)
    if parent is not None and (not isinstance(parent, str) or not parent or "." in parent):
        raise AdapterFileError(f"{where}: {PARENT_KEY} must be an adapter name, got {parent!r}")
    return parent


def saved_base(metadata: dict[str, str], config: dict) -> str | None:
    """The base an adapter was saved for: lorakit's metadata, else PEFT's config."""
    return metadata.get("lorakit.base") or config.get("base_model_name_or_path")


def saved_json(metadata: dict[str, str], key: str) -> Any:
    """What lorakit recorded as JSON under "lorakit.<key>" (base_shapes, context, quant), or None."""
    return json.loads(metadata[f"lorakit.{key}"]) if f"lorakit.{key}" in metadata else None
