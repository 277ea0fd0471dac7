"""Save and load adapters in PEFT's on-disk format, checked against the base they go onto.

A folder holds `adapter_config.json` (PEFT's LoraConfig fields) and
`adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`, ... with the
adapter name stripped, metadata `{"format": "pt"}`). lorakit adds to that metadata the base's
name and the names and weight shapes of the adapted modules; loading onto a base that differs
is refused unless forced (PEFT ignores these metadata keys). What the config and the metadata
say is written and read in metadata.py; here are the tensors and the checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lorakit.adapters import adalora
from lorakit.adapters.copies import add_copy, module_copies
from lorakit.adapters.inject import adapter_names, name_matches, new_adapter, pattern_value, register_adapter, wrap
from lorakit.adapters.layer import LoraLayer, base_kind, in_out, lora_layers
from lorakit.adapters.lora import LoraAdapter
from lorakit.adapters.metadata import (
    AdapterFileError,
    adapter_config,
    base_metadata,
    parent_from_config,
    saved_base,
    saved_json,
    spec_from_peft,
)
from lorakit.adapters.params import held_shape
from lorakit.adapters.params_io import (
    check_param_pairs,
    held_params,
    load_params,
    param_tensors,
    split_params,
)
from lorakit.adapters.spec import LoraSpec
from lorakit.adapters.state import adapters_of
from lorakit.atomic import atomic_write_bytes, atomic_write_text

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
LORA_SUFFIXES = {  # PEFT key suffix -> (our parameter, is embedding)
    "lora_A.weight": ("lora_A", False),
    "lora_B.weight": ("lora_B", False),
    "lora_embedding_A": ("lora_A", True),
    "lora_embedding_B": ("lora_B", True),
    "lora_magnitude_vector": ("magnitude", False),  # DoRA, [out]
    "lora_A": ("lora_A", False),  # AdaLoRA, [r, in]
    "lora_E": ("lora_E", False),  # AdaLoRA, [r, 1]
    "lora_B": ("lora_B", False),  # AdaLoRA, [out, r]
}


# ----------------------------------------------------------------------------- save


def save_adapter(model: nn.Module, path: str | Path, name: str = "default", convert_pissa: bool = True) -> Path:
    """Write adapter `name` to folder `path` in PEFT's format (atomically, file by file).

    A PiSSA adapter is written, by default, as the plain LoRA adapter of rank 2r that gives the same
    model on the untouched base (PEFT's `path_initial_model_for_weight_conversion`); with
    `convert_pissa=False` it is written as is, for its residual base (`init_lora_weights: "pissa"`,
    which PEFT and lorakit rebuild by redoing the SVD when loading).
    """
    specs = adapters_of(model).specs
    if name not in specs:
        raise ValueError(f"model has no adapter {name!r}; it has {list(specs)}")
    spec = specs[name]
    convert = spec.init == "pissa" and convert_pissa
    tensors: dict[str, torch.Tensor] = {}
    base_shapes: dict[str, list[int]] = {}
    for path_, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged into {path_}; unmerge before saving")
        adapter = layer.adapters[name]
        own = pissa_as_lora(adapter) if convert else {}
        if isinstance(adapter, adalora.AdaLoraAdapter):  # AdaLoRA: saved at the pruned ranks
            own = adalora.saved_factors(adapter)
        for ours, theirs in adapter.peft_names().items():
            tensors[f"{PREFIX}{path_}.{theirs}"] = own.get(ours, getattr(adapter, ours))
        base_shapes[path_] = list(reversed(layer.in_out))  # [out, in], whatever the storage
    params = param_tensors(model, name, tensors, base_shapes, PREFIX)
    tensors.update(bias_tensors(model, spec.bias))
    saved_modules = []
    for path_, copies in module_copies(model):
        if name in copies.copies:
            saved_modules.append(path_)
            for key, t in copies.copies[name].state_dict().items():
                tensors[f"{PREFIX}{path_}.{key}"] = t
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = base_metadata(model, base_shapes)
    targets = sorted(set(base_shapes) - set(params))
    config = adapter_config(model, name, pissa_converted_spec(spec) if convert else spec, targets, saved_modules,
                            params)
    folder = Path(path)
    atomic_write_bytes(folder / WEIGHTS_FILE, sorted_header(safetensors_bytes(tensors, metadata=metadata)))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes the metadata in
    hash order, so equal adapters would not give equal bytes. Data offsets are relative to the end of
    the header, so only the header changes (re-padded to 8 bytes, as safetensors does)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def bias_tensors(model: nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """PEFT's bias entries: a wrapped layer's bias is keyed `<module>.base_layer.bias`."""
    if mode == "none":
        return {}
    out = {}
    for path, module in model.named_modules():
        if ".adapters." in f".{path}." or ".lora_copies." in f".{path}.":
            continue
        wrapped = isinstance(module, LoraLayer)
        bias = module._parameters.get("bias")
        if bias is None or (mode == "lora_only" and not wrapped):
            continue
        out[f"{PREFIX}{path}.base_layer.bias" if wrapped else f"{PREFIX}{path}.bias"] = bias
    return out


def pissa_as_lora(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """A PiSSA adapter as plain LoRA factors for the untouched base W = W_res + s B0 A0:
    W_res + s B A = W + s [B, -B0] [A; A0], so A' = [A; A0] ([2r, in]) and B' = [B, -B0] ([out, 2r]),
    with alpha chosen so that the scale stays s (see `pissa_converted_spec`)."""
    return {"lora_A": torch.cat([adapter.lora_A, adapter.lora_A0.to(adapter.lora_A.dtype)], dim=0),
            "lora_B": torch.cat([adapter.lora_B, -adapter.lora_B0.to(adapter.lora_B.dtype)], dim=1)}


def pissa_converted_spec(spec: LoraSpec) -> LoraSpec:
    """The spec of `pissa_as_lora`'s adapter: ranks doubled, alphas scaled to keep every scale."""
    factor = math.sqrt(2) if spec.rslora else 2  # alpha / r or alpha / sqrt(r) stays the same
    return dataclasses.replace(
        spec, r=2 * spec.r, alpha=factor * spec.alpha, init="kaiming",
        rank_pattern={k: 2 * v for k, v in spec.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in spec.alpha_pattern.items()},
    )


# ----------------------------------------------------------------------------- load


@dataclass
class AdapterFile:
    """A parsed, not yet applied adapter folder."""

    folder: Path
    spec: LoraSpec
    lora: dict[str, dict[str, torch.Tensor]]  # module -> {"lora_A": [r, in], "lora_B": [out, r]}
    embedding: set[str]  # modules whose tensors are PEFT embedding ones
    biases: dict[str, torch.Tensor]  # module -> bias
    copies: dict[str, dict[str, torch.Tensor]]  # module -> its state dict
    base_weights: dict[str, torch.Tensor]  # module -> base weight PEFT saved beside (embeddings)
    metadata: dict[str, str] = field(default_factory=dict)
    base: str | None = None  # the base it was saved for: lorakit's metadata, else PEFT's config
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # AdaLoRA: module -> kept triplets [init_r]
    parent: str | None = None  # the adapter it was saved stacked on ("lorakit_parent")

    @property
    def quant(self) -> dict | None:
        """How the 4-bit base it was trained on was made (QuantConfig fields), if it was."""
        return saved_json(self.metadata, "quant")

    @property
    def context(self) -> dict | None:
        """The positional setup (RoPE parameters, context length) it was trained with, if it records one."""
        return saved_json(self.metadata, "context")

    @property
    def base_shapes(self) -> dict[str, list[int]] | None:
        """The weight shapes of the base modules it was saved for, by name (lorakit's files only)."""
        return saved_json(self.metadata, "base_shapes")


def read_adapter(path: str | Path) -> AdapterFile:
    """Parse and check an adapter folder on its own; every error names the file and the field."""
    folder = Path(path)
    if folder.is_file():
        raise AdapterFileError(f"{folder} is a file, expected an adapter folder (holding {CONFIG_FILE} and "
                               f"{WEIGHTS_FILE})")
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist")
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise AdapterFileError(f"{config_file} is missing")
    if not weights_file.is_file():
        other = [p.name for p in folder.glob("adapter_model.*")]
        hint = f" (found {other}: only safetensors is loaded, for safety)" if other else ""
        raise AdapterFileError(f"{weights_file} is missing{hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{config_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object")
    spec = spec_from_peft(config, config_file)
    try:
        with safe_open(weights_file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights_file} is not a readable safetensors file: {e}") from None
    adapter = split_tensors(folder, spec, tensors, metadata, weights_file)
    check_finite(adapter)
    adapter.base = saved_base(metadata, config)
    if spec.kind == "adalora":
        adapter.masks = adalora.masks_from_peft(config)
    adapter.parent = parent_from_config(config, config_file)
    return adapter


def split_tensors(folder: Path, spec: LoraSpec, tensors: dict, metadata: dict, where: Path) -> AdapterFile:
    """Sort PEFT keys into LoRA factors, biases and module copies; unknown keys are an error."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    embedding, biases, copies, base_weights = set(), {}, {}, {}
    saved = spec.modules_to_save or []
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, (ours, is_embedding) in LORA_SUFFIXES.items():
            if name.endswith("." + suffix):
                module = name[: -len(suffix) - 1]
                lora.setdefault(module, {})[ours] = t
                if is_embedding:
                    embedding.add(module)
                break
        else:
            owner = next((m for m in copy_owners(name, saved)), None)
            if owner is not None:
                copies.setdefault(owner, {})[name[len(owner) + 1 :]] = t
            elif name.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers
                base_weights[name.removesuffix(".base_layer.weight")] = t
            elif name.endswith(".base_layer.bias"):
                biases[name.removesuffix(".base_layer.bias")] = t
            elif name.endswith(".bias") and spec.bias != "none":
                biases[name.removesuffix(".bias")] = t
            else:
                raise AdapterFileError(f"{where}: unexpected tensor {key!r} (not a LoRA, bias or saved-module key)")
    for module, pair in lora.items():
        missing = {"lora_A", "lora_B"} - set(pair)
        if missing:
            raise AdapterFileError(f"{where}: module {module!r} has no {sorted(missing)[0]} tensor")
        if ("magnitude" in pair) != (spec.kind == "dora"):
            has = "has no" if spec.kind == "dora" else "has a"
            raise AdapterFileError(f"{where}: module {module!r} {has} lora_magnitude_vector but the config "
                                   f"says use_dora={spec.kind == 'dora'}")
        if ("lora_E" in pair) != (spec.kind == "adalora"):
            raise AdapterFileError(f"{where}: module {module!r} {'has a' if 'lora_E' in pair else 'has no'} lora_E "
                                   f"tensor but the config's peft_type is {'not ' * (spec.kind != 'adalora')}ADALORA")
    if not lora and not copies:
        raise AdapterFileError(f"{where}: holds no adapter tensors")
    return AdapterFile(folder, spec, lora, embedding, biases, copies, base_weights, metadata)


def check_finite(adapter: AdapterFile) -> None:
    """Refuse an adapter holding NaN or Inf (a diverged run): it would silently turn every output it
    touches to NaN (empty generations, 0% exact match, a server's whole batch). Names the first bad tensor."""
    biases = {module: {"bias": b} for module, b in adapter.biases.items()}
    for modules in (adapter.lora, biases, adapter.copies):  # module -> {tensor name: tensor}
        for module in sorted(modules):
            for key, t in modules[module].items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad = int((~torch.isfinite(t)).sum())
                    raise AdapterFileError(f"{adapter.folder / WEIGHTS_FILE}: tensor {module}.{key} holds {bad} "
                                           f"NaN/Inf value{'s' * (bad > 1)} of {t.numel()}; the adapter is broken "
                                           "(a diverged run?) and is refused")


def copy_owners(name: str, saved: list[str]):
    """Candidate module paths (prefixes of `name`) that `modules_to_save` names."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if name_matches(prefix, saved):
            yield prefix


def base_mismatch(model: nn.Module, adapter: AdapterFile) -> str | None:
    """Where `model` differs from the base the adapter was saved for (the adapted modules' names and weight
    shapes its file records), or None; None also for a file that records none (PEFT's)."""
    shapes = adapter.base_shapes
    if not shapes:
        return None
    modules = dict(model.named_modules())
    for path, shape in shapes.items():
        module = modules.get(path)
        got = list(reversed(in_out(module))) if module is not None and base_kind(module) else None
        owner, _, param = path.rpartition(".")
        if got is None and owner in modules and param in held_params(modules[owner]):  # a held weight
            got = list(held_shape(held_params(modules[owner])[param]))
        if got != shape:
            return (f"saved for base {adapter.base!r}, which differs from this model at "
                    f"{path!r}: weight {shape} there, {got if got is not None else 'no such module'} here")
    return None


def check_fits(model: nn.Module, adapter: AdapterFile, force: bool = False) -> None:
    """Refuse, naming the first mismatch, an adapter whose modules or shapes do not fit `model`."""
    where = adapter.folder / WEIGHTS_FILE
    modules = dict(model.named_modules())
    mismatch = None if force else base_mismatch(model, adapter)
    if mismatch:
        raise AdapterFileError(f"{adapter.folder} was {mismatch} (to try anyway from Python: "
                               "load_adapter(..., force=True))")
    try:
        layers, params = split_params(model, adapter.spec, adapter.lora)
        check_param_pairs(model, adapter.spec, params)
    except ValueError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    for path, pair in layers.items():
        module = modules.get(path)
        if module is None:
            raise AdapterFileError(f"{where}: module {path!r} is not in the model")
        kind = base_kind(module)
        if kind is None:
            raise AdapterFileError(f"{where}: module {path!r} is a {type(module).__name__}, which LoRA cannot wrap")
        if (kind == "embedding") != (path in adapter.embedding):
            raise AdapterFileError(f"{where}: module {path!r} is a {kind} but the file holds "
                                   f"{'embedding' if path in adapter.embedding else 'linear'} LoRA tensors")
        n_in, n_out = in_out(module)
        a, b = pair["lora_A"].shape, pair["lora_B"].shape
        r = a[0]
        if a != (r, n_in) or b != (n_out, r):
            raise AdapterFileError(
                f"{where}: module {path!r} takes [out={n_out}, in={n_in}] but lora_A is {list(a)} "
                f"and lora_B is {list(b)} (expected [r, {n_in}] and [{n_out}, r])"
            )
        if "magnitude" in pair and tuple(pair["magnitude"].shape) != (n_out,):
            got = list(pair["magnitude"].shape)
            raise AdapterFileError(f"{where}: module {path!r} has lora_magnitude_vector {got}, expected [{n_out}]")
        if adapter.spec.init == "pissa" and kind == "linear4bit":
            raise AdapterFileError(f"{where}: a PiSSA adapter saved for its residual base cannot go onto the "
                                   f"4-bit module {path!r}")
        if adapter.spec.kind == "adalora":  # ranks from the rank_pattern masks
            problem = adalora.factor_problem(pair, adapter.masks.get(path), adapter.spec.r)
            if problem:
                raise AdapterFileError(f"{where}: module {path!r} {problem}")
        elif r != (expected_r := pattern_value(path, adapter.spec.rank_pattern, adapter.spec.r)):
            raise AdapterFileError(f"{where}: module {path!r} has rank {r} but the config says {expected_r}")
    for path, bias in adapter.biases.items():
        module = modules.get(path)
        own = module._parameters.get("bias") if module is not None else None
        if own is None or own.shape != bias.shape:
            raise AdapterFileError(f"{where}: bias for {path!r} does not fit the model")
    for path, weight in adapter.base_weights.items():
        module = modules.get(path)
        if module is None or not torch.equal(module.weight.detach().cpu(), weight.to(module.weight.dtype)):
            raise AdapterFileError(
                f"{where}: the file carries its own base weight for {path!r} that differs from this model's "
                "(a resized vocabulary?); lorakit does not replace base weights from an adapter"
            )
    for path, state in adapter.copies.items():
        if path not in modules:
            raise AdapterFileError(f"{where}: saved module {path!r} is not in the model")
        own = modules[path].state_dict()
        for key, t in state.items():
            if key not in own or own[key].shape != t.shape:
                raise AdapterFileError(f"{where}: saved module tensor {path}.{key} does not fit the model")


def load_adapter(
    model: nn.Module, path: str | Path | AdapterFile, name: str | None = None, trainable: bool = False,
    force: bool = False, parent: str | None = None,
) -> str:
    """Load a PEFT-format adapter (a folder, or one already read) onto `model`, wrapping layers
    where needed; returns its name. Everything is checked before the model is touched. The loaded
    adapter becomes active. `parent` (default: the one its file records, if any) stacks it on an adapter
    already on the model: it is then active with its whole chain."""
    adapter = path if isinstance(path, AdapterFile) else read_adapter(path)
    check_fits(model, adapter, force=force)
    existing = adapter_names(model)
    parent = parent if parent is not None else adapter.parent
    if parent is not None and parent not in existing:
        raise ValueError(f"{adapter.folder}: parent adapter {parent!r} is not on the model (load it first); "
                         f"it has {existing}")
    if name is None:
        name = "default" if "default" not in existing else re.sub(r"\W", "_", adapter.folder.resolve().name)
    if name in existing:
        raise ValueError(f"model already has an adapter named {name!r}")
    spec = adapter.spec
    layers, params = split_params(model, adapter.spec, adapter.lora)
    load_params(model, adapter.spec, params, name, trainable)
    for path_ in layers:
        attach(wrap(model, path_), adapter, path_, name, trainable)
    with torch.no_grad():
        for path_, bias in adapter.biases.items():
            model.get_submodule(path_).bias.copy_(bias)
    for path_, state in adapter.copies.items():
        copies = add_copy(model.get_submodule(path_), name, trainable=trainable)
        copies.copies[name].load_state_dict(state, strict=False)
    register_adapter(model, name, spec, trainable, parent)
    return name



def attach(layer: LoraLayer, adapter: AdapterFile, path: str, name: str, trainable: bool = False) -> None:
    """Add the adapter file's factors for module `path` to `layer` as adapter `name` (of the file's kind)."""
    spec, pair = adapter.spec, adapter.lora[path]
    alpha = pattern_value(path, spec.alpha_pattern, spec.alpha)
    lora = new_adapter(layer, spec, pair["lora_A"].shape[0], alpha, pair["lora_A"].dtype)
    if spec.init == "pissa":  # saved for the residual base: redo the SVD that made it (as PEFT does)
        lora.init_from_base(layer)
    with torch.no_grad():
        for ours, t in pair.items():
            getattr(lora, ours).copy_(t)
    if spec.kind == "adalora":
        adalora.restore_masks(lora, spec.r, adapter.masks.get(path))
    lora.requires_grad_(trainable)
    layer.add(name, lora)
