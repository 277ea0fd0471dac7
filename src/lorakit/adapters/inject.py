"""Target matching, wrapping layers in place, activation, and the trainable-parameter report.

Matching follows PEFT's rules so the same `target_modules` select the same layers:
a string is a full-match regex on the module's dotted name, a list entry matches the exact
name or a dotted suffix, "all-linear" is every Linear/Conv1D except the output head.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import torch
from torch import nn

from lorakit.adapters.adalora import AdaLoraAdapter
from lorakit.adapters.copies import ModuleCopies, add_copy, module_copies
from lorakit.adapters.dora import DoraAdapter
from lorakit.adapters.layer import LoraLayer, base_kind, lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.config import LoraSpec
from lorakit.quant.linear4bit import listed, loose_weights

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
    loose = loose_weights(model)
    if targets != "all-linear":  # named expert parameters (or their module) cannot be adapted: say so
        named = [n for n in loose if name_matches(n, targets) or name_matches(n.rpartition(".")[0], targets)]
        if named:
            raise ValueError(f"targets {targets!r} name {listed(named)}: weight matrices held outside linear "
                             f"layers (fused mixture-of-experts parameters, routers), which lorakit cannot adapt "
                             f"yet (PEFT does, through target_parameters). Candidates: {describe_candidates(model)}")
    if not names:
        raise ValueError(f"targets {targets!r} match no module. Candidates: {describe_candidates(model)}")
    if targets == "all-linear" and loose:
        warnings.warn(f"all-linear leaves {len(loose)} weight matrices without an adapter: they are held outside "
                      f"linear layers (fused mixture-of-experts parameters, routers), which lorakit cannot adapt "
                      f"yet (PEFT's all-linear adapts them through target_parameters): {listed(loose)}",
                      stacklevel=3)
    return names


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


def wrap(model: nn.Module, name: str) -> LoraLayer:
    """Replace module `name` by a LoraLayer around it (or return the existing one)."""
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return layer


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "lorakit_specs", {}))


def freeze_base(model: nn.Module) -> None:
    """Every parameter that is not an adapter's (or a module copy's) stops training."""
    own = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
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
    targets = match_targets(model, spec)
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
    for path in saved:
        add_copy(model.get_submodule(path), name, trainable=trainable)
    model.lorakit_specs = {**getattr(model, "lorakit_specs", {}), name: spec}
    freeze_base(model)
    if trainable:
        train_biases(model, spec.bias)
    if parent is not None:
        set_parent(model, name, parent)
    return model


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
# form a forest, and an adapter is only ever active with its whole chain (root first), like a path in a
# tree of adapters. The relation is `model.lorakit_parents` {child: parent}; saving records it in
# adapter_config.json under "lorakit_parent" (PEFT ignores the key).


def adapter_chain(model: nn.Module, name: str) -> list[str]:
    """`name`'s chain of parents, root first, ending with `name` itself."""
    parents = getattr(model, "lorakit_parents", {})
    chain = [name]
    while chain[0] in parents:
        chain.insert(0, parents[chain[0]])
    return chain


def adapter_children(model: nn.Module, name: str) -> list[str]:
    """Every adapter stacked on `name`, directly or not."""
    return [n for n in getattr(model, "lorakit_parents", {}) if name in adapter_chain(model, n)[:-1]]


def set_parent(model: nn.Module, name: str, parent: str | None) -> None:
    """Stack adapter `name` on `parent` (None: make it a root); active, `name` now brings its chain."""
    known = adapter_names(model)
    for n in (name, parent):
        if n is not None and n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model has {known}")
    parents = {k: v for k, v in getattr(model, "lorakit_parents", {}).items() if k != name}
    if parent is not None:
        if parent == name or name in adapter_chain(model, parent):
            raise ValueError(f"adapter {parent!r} cannot be the parent of {name!r}: the chain would be a cycle")
        parents[name] = parent
    model.lorakit_parents = parents
    active = active_adapters(model)
    if name in active:
        set_active(model, active)


def set_active(model: nn.Module, names: list[str]) -> None:
    """Make exactly these adapters active everywhere (their deltas add up); [] = base only. An adapter
    stacked on a parent brings its whole chain (root first)."""
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; the model has {known}")
    names = list(dict.fromkeys(c for n in names for c in adapter_chain(model, n)))
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
    for _, copies in module_copies(model):
        copies.active = [n for n in names if n in copies.copies]


def active_adapters(model: nn.Module) -> list[str]:
    active = []
    for _, module in model.named_modules():
        if isinstance(module, LoraLayer | ModuleCopies):
            active += [n for n in module.active if n not in active]
    return active


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
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.adapters]
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
    model.lorakit_specs = {k: v for k, v in model.lorakit_specs.items() if k != name}
    model.lorakit_parents = {k: v for k, v in getattr(model, "lorakit_parents", {}).items() if k != name}
