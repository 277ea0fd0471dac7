"""Target matching, wrapping layers in place, activation, and the trainable-parameter report.

Matching follows PEFT's rules so the same `target_modules` select the same layers:
a string is a full-match regex on the module's dotted name, a list entry matches the exact
name or a dotted suffix, "all-linear" is every Linear/Conv1D except the output head.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import torch
from torch import nn

from lorakit.adapters.adalora import AdaLoraAdapter
from lorakit.adapters.copies import add_copy, module_copies
from lorakit.adapters.dora import DoraAdapter
from lorakit.adapters.layer import BaseWrapper, LoraLayer, base_kind, lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.adapters.params import ParamAdapter, ParamLoraLayer, param_layers, stacked_shape
from lorakit.adapters.spec import LoraSpec
from lorakit.adapters.state import adapters_of
from lorakit.quant.linear4bit import loose_weights

# Targets when none are given (`targets: null`), by `config.model_type`. PEFT's table
# (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21), entry for entry, so the same config
# adapts the same layers; tests/test_targets.py compares it with the installed peft's.
PEFT_DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}
# Ours where PEFT has none (it then asks for target_modules): the attention's query and value projections,
# as PEFT picks for the Llama-like models it lists; phi3 fuses them into qkv_proj.
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    **PEFT_DEFAULT_TARGETS,
    "phi3": ["qkv_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "qwen3_moe": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
    "cohere": ["q_proj", "v_proj"],
}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def name_matches(name: str, pattern: str | list[str]) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exact names or dotted suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def pattern_value(name: str, patterns: dict, default):
    """First `rank_pattern`/`alpha_pattern` key that matches a dotted suffix of `name` (PEFT's rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def candidate_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and base_kind(m) is not None and not in_adapter(n)]


def in_adapter(name: str) -> bool:
    return ".adapters." in f".{name}." or ".lora_copies." in f".{name}."


def match_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Dotted names of the modules `spec` selects; an error lists the candidates if none."""
    targets = spec.targets
    if targets is None and spec.target_parameters:  # PEFT's target_modules=None with target_parameters
        return []
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"no default targets for model type {model_type!r}; set targets "
                f"(e.g. 'all-linear'). Candidates: {describe_candidates(model)}"
            )
        targets = DEFAULT_TARGETS[model_type]
    check_layers(model, spec.layers)
    head = output_head(model)
    names = []
    for name in candidate_names(model):
        module = model.get_submodule(name)
        if targets == "all-linear":
            if base_kind(module) not in ("linear", "linear4bit", "conv1d") or module is head:
                continue
        elif not name_matches(name, targets):
            continue
        if spec.exclude is not None and name_matches(name, spec.exclude):
            continue
        if spec.layers is not None:
            found = LAYER_INDEX.search(name)
            if found is None or int(found.group(1)) not in spec.layers:
                continue
        names.append(name)
    if not names and not match_parameters(model, spec):
        raise ValueError(f"targets {targets!r} match no module. Candidates: {describe_candidates(model)}")
    return names


def held_weights(model: nn.Module) -> list[str]:
    """Full names of the weight matrices held as parameters outside linear layers (fused mixture-of-experts
    weights, routers), wrapped already or not."""
    wrapped = [f"{path}.{p}" for path, layer in param_layers(model) for p in layer.base_module._parameters
               if layer.base_module._parameters[p].dim() >= 2]
    return sorted(set(loose_weights(model)) | set(wrapped))


def match_parameters(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the held weight matrices `spec` adapts: those `target_parameters` names (PEFT's rule: the
    full name or a dotted suffix), those whose own or module's name `targets` matches, and with "all-linear"
    every one (as PEFT's all-linear adapts MoE experts and routers). Naming none that exists is an error."""
    held, targets = held_weights(model), spec.targets
    chosen = [n for n in held if name_matches(n, spec.target_parameters)] if spec.target_parameters else []
    if spec.target_parameters and not chosen:
        listed_ = ", ".join(held[:6]) or "none"
        raise ValueError(f"target_parameters {spec.target_parameters!r} match no parameter. Candidates: {listed_}")
    for name in held:
        if name in chosen or targets is None:
            continue
        if targets == "all-linear" or name_matches(name, targets) or name_matches(name.rpartition(".")[0], targets):
            chosen.append(name)
    if spec.exclude is not None:
        chosen = [n for n in chosen if not name_matches(n, spec.exclude)
                  and not name_matches(n.rpartition(".")[0], spec.exclude)]
    if spec.layers is not None:
        chosen = [n for n in chosen if (m := LAYER_INDEX.search(n)) and int(m.group(1)) in spec.layers]
    if chosen and (spec.kind != "lora" or spec.dropout > 0 or spec.init == "pissa"):
        raise ValueError(f"{chosen[0]} is a weight held as a parameter (fused mixture-of-experts weights, a "
                         f"router): its adapter takes no dropout, DoRA, AdaLoRA or PiSSA (as PEFT's "
                         f"target_parameters); got kind={spec.kind!r}, dropout={spec.dropout}, init={spec.init!r}. "
                         f"Exclude it or change those settings")
    return sorted(chosen)


def with_fused_ranks(model: nn.Module, spec: LoraSpec) -> LoraSpec:
    """PEFT's all-linear on a mixture-of-experts model gives a fused `gate_up_proj` twice the rank and alpha
    (one r for each of the gate and up projections it fuses): the same here, unless a pattern says otherwise."""
    if spec.targets != "all-linear" or not any(n.endswith(".gate_up_proj") for n in held_weights(model)):
        return spec
    key = r".*\.gate_up_proj"
    return dataclasses.replace(spec, rank_pattern={key: 2 * spec.r, **spec.rank_pattern},
                               alpha_pattern={key: 2 * spec.alpha, **spec.alpha_pattern})


def check_layers(model: nn.Module, layers: list[int] | None) -> None:
    """Refuse `layers` indices the model does not have (rather than blame the targets for matching nothing)."""
    if layers is None:
        return
    present = {int(m.group(1)) for n in candidate_names(model) if (m := LAYER_INDEX.search(n))}
    missing = sorted(set(layers) - present)
    if missing:
        have = f"{len(present)} layers, 0..{max(present)}" if present else "no numbered layers"
        raise ValueError(f"lora.layers: layer index {missing[0]} is out of range (the model has {have})")


def describe_candidates(model: nn.Module) -> str:
    leaves = Counter(n.rsplit(".", 1)[-1] for n in candidate_names(model))
    listed = ", ".join(f"{leaf} (x{count})" if count > 1 else leaf for leaf, count in leaves.items())
    return listed or "none (no Linear, Conv1D or Embedding layers)"


def wrap(model: nn.Module, name: str, wrapper: type[BaseWrapper] = LoraLayer) -> BaseWrapper:
    """Replace module `name` by a `wrapper` (LoraLayer, or ParamLoraLayer for held weights) around it (or
    return the existing one)."""
    module = model.get_submodule(name)
    if isinstance(module, wrapper):
        return module
    layer = wrapper(module)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def adapter_names(model: nn.Module) -> list[str]:
    return adapters_of(model).names


def adapted_modules(model: nn.Module) -> list[tuple[str, LoraLayer | ParamLoraLayer]]:
    """Every wrapper holding named adapters: LoRA layers and held-weight (expert) modules."""
    return [*lora_layers(model), *param_layers(model)]


def freeze_base(model: nn.Module) -> None:
    """Every parameter that is not an adapter's (or a module copy's) stops training."""
    own = {id(p) for _, layer in adapted_modules(model) for p in layer.adapters.parameters()}
    own |= {id(p) for _, copies in module_copies(model) for p in copies.copies.parameters()}
    for p in model.parameters():
        if id(p) not in own:
            p.requires_grad_(False)


def train_biases(model: nn.Module, mode: str) -> None:
    """PEFT's bias modes: "all" trains every bias, "lora_only" those of adapted layers."""
    if mode == "all":
        modules = list(model.modules())
    elif mode == "lora_only":
        modules = [layer for _, layer in lora_layers(model)]
    else:
        return
    for module in modules:
        bias = module._parameters.get("bias")
        if bias is not None:
            bias.requires_grad_(True)


def inject(model: nn.Module, spec: LoraSpec, name: str = "default", trainable: bool = True,
           parent: str | None = None) -> nn.Module:
    """Add LoRA adapter `name` to every module `spec` selects; the base is frozen. Returns `model`.
    `parent`: an adapter `name` stacks on (see `set_parent`); the new adapter and its chain are active."""
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
    if name in adapter_names(model):
        raise ValueError(f"model already has an adapter named {name!r}")
    if parent is not None and parent not in adapter_names(model):
        raise ValueError(f"parent adapter {parent!r} is not on the model; it has {adapter_names(model)}")
    spec = with_fused_ranks(model, spec)
    targets = match_targets(model, spec)
    params = match_parameters(model, spec)
    saved = resolve_modules_to_save(model, spec.modules_to_save or [])
    clash = set(targets) & set(saved)
    if clash:
        raise ValueError(f"modules {sorted(clash)} are both LoRA targets and modules_to_save")
    for target in targets:
        layer = wrap(model, target)
        r = pattern_value(target, spec.rank_pattern, spec.r)
        alpha = pattern_value(target, spec.alpha_pattern, spec.alpha)
        adapter = new_adapter(layer, spec, r, alpha, adapter_dtype(layer))
        adapter.init_from_base(layer)
        adapter.requires_grad_(trainable)
        layer.add(name, adapter)
    inject_parameters(model, spec, params, name, trainable)
    for path in saved:
        add_copy(model.get_submodule(path), name, trainable=trainable)
    register_adapter(model, name, spec, trainable, parent)
    return model


def register_adapter(model: nn.Module, name: str, spec: LoraSpec, trainable: bool, parent: str | None) -> None:
    """Record adapter `name`, just added (active) to the layers, on the model; freeze the base (training the
    biases `spec.bias` asks for, if `trainable`) and stack it on `parent`, if given. The tail that
    `inject` and `load_adapter` share."""
    record = adapters_of(model)
    record.specs[name] = spec
    record.active.append(name)
    freeze_base(model)
    if trainable:
        train_biases(model, spec.bias)
    if parent is not None:
        set_parent(model, name, parent)


def inject_parameters(model: nn.Module, spec: LoraSpec, params: list[str], name: str, trainable: bool) -> None:
    """Add adapter `name` on each of the held weights `params` (full names), one wrapper per module."""
    by_module: dict[str, dict[str, ParamAdapter]] = {}
    for full in params:
        path, _, param = full.rpartition(".")
        weight = model.get_submodule(path)._parameters[param]
        r = pattern_value(full, spec.rank_pattern, spec.r)
        alpha = pattern_value(full, spec.alpha_pattern, spec.alpha)
        dtype = weight.dtype if weight.dtype.is_floating_point and weight.dtype.itemsize >= 4 else torch.float32
        adapter = ParamAdapter(stacked_shape(weight), r, alpha, rslora=spec.rslora, init=spec.init,
                               device=weight.device, dtype=dtype)
        by_module.setdefault(path, {})[param] = adapter.requires_grad_(trainable)
    for path, adapters in by_module.items():
        wrap(model, path, ParamLoraLayer).add(name, adapters)


ADAPTER_KINDS: dict[str, type[LoraAdapter]] = {"lora": LoraAdapter, "dora": DoraAdapter, "adalora": AdaLoraAdapter}


def new_adapter(layer: LoraLayer, spec: LoraSpec, r: int, alpha: float, dtype: torch.dtype) -> LoraAdapter:
    """A fresh adapter of kind `spec.kind` for `layer` (initialised on its own; `init_from_base` is separate)."""
    in_features, out_features = layer.in_out
    return ADAPTER_KINDS[spec.kind](
        in_features, out_features, r, alpha, dropout=spec.dropout, rslora=spec.rslora, init=spec.init,
        embedding=layer.kind == "embedding", device=layer.weight.device, dtype=dtype,
    )


def adapter_dtype(layer: LoraLayer) -> torch.dtype:
    """Adapters train in fp32 unless the base already is another float type of 32+ bits."""
    dtype = layer.weight.dtype
    return dtype if dtype.is_floating_point and dtype.itemsize >= 4 else torch.float32


def resolve_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths named exactly or by dotted suffix; a name that matches nothing is an error."""
    found = []
    all_names = [n for n, _ in model.named_modules() if n and not in_adapter(n)]
    for entry in names:
        hits = [n for n in all_names if name_matches(n, [entry])]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module")
        found += [h for h in hits if h not in found]
    return found


# ----------------------------------------------------------------------------- stacks
# An adapter may sit on top of a parent adapter (`inject`/`load_adapter(..., parent=...)`): the parents
# form a forest, and an adapter is only ever active with its whole chain (root first). The relation is the
# record's `parents` (state.py); saving writes it to adapter_config.json (metadata.py).


def adapter_chain(model: nn.Module, name: str) -> list[str]:
    """`name`'s chain of parents, root first, ending with `name` itself."""
    return adapters_of(model).chain(name)


def adapter_children(model: nn.Module, name: str) -> list[str]:
    """Every adapter stacked on `name`, directly or not."""
    return adapters_of(model).children(name)


def set_parent(model: nn.Module, name: str, parent: str | None) -> None:
    """Stack adapter `name` on `parent` (None: make it a root); active, `name` now brings its chain."""
    known = adapter_names(model)
    for n in (name, parent):
        if n is not None and n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model has {known}")
    record = adapters_of(model)
    if parent is not None and (parent == name or name in record.chain(parent)):
        raise ValueError(f"adapter {parent!r} cannot be the parent of {name!r}: the chain would be a cycle")
    record.parents.pop(name, None)
    if parent is not None:
        record.parents[name] = parent
    if name in record.active:
        set_active(model, record.active)


def set_active(model: nn.Module, names: list[str]) -> None:
    """Make exactly these adapters active everywhere (their deltas add up); [] = base only. An adapter
    stacked on a parent brings its whole chain (root first)."""
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model has {known}")
    record = adapters_of(model)
    record.active = list(dict.fromkeys(c for n in names for c in record.chain(n)))
    for _, layer in adapted_modules(model):
        layer.active = [n for n in record.active if n in layer.adapters]
    for _, copies in module_copies(model):
        copies.active = [n for n in record.active if n in copies.copies]


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters (chains expanded, roots first), as `set_active` (or adding one) left them."""
    return list(adapters_of(model).active)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared (tied) parameters are counted once, as PEFT does."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * getattr(p, "lorakit_numel_factor", 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """PEFT's `print_trainable_parameters` line, character for character."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def remove_adapter(model: nn.Module, name: str) -> None:
    """Take adapter `name` off every layer (and its module copies); wrappers stay, possibly empty."""
    if name not in adapter_names(model):
        raise ValueError(f"unknown adapter {name!r}; the model has {adapter_names(model)}")
    children = adapter_children(model, name)
    if children:
        raise ValueError(f"adapter {name!r} is the parent of {children}; remove those first")
    layers = [(path, layer) for path, layer in adapted_modules(model) if name in layer.adapters]
    merged = [path for path, layer in layers if name in layer.merged]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[0]}; unmerge before removing it")
    for _, layer in layers:
        del layer.adapters[name]
        layer.active = [n for n in layer.active if n != name]
    for _, copies in module_copies(model):
        if name in copies.copies:
            del copies.copies[name]
            copies.active = [n for n in copies.active if n != name]
    adapters_of(model).forget(name)
