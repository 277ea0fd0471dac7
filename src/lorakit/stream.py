"""Fill a model built on the meta device from a safetensors checkpoint folder, one tensor at a time.

Each tensor is read from its shard with a positioned read (not through a memory map: the pages of
a mapped file stay resident, and count in the process's memory, until the file is closed, so a
5 GB shard would cost 5 GB), moved to the device, checked against the parameter it fills, and put
in place in the file's dtype (or cast to `dtype`; the few a model keeps in fp32, `KeepFp32`, in fp32). The
weight of a linear layer that `quant` makes 4-bit goes straight into its `Linear4bit`; a folder already in the
bitsandbytes 4-bit layout is rebuilt from its packed bytes. So the full-precision model never exists: the peak
is the finished model plus one tensor in flight.

Mixture-of-experts checkpoints store each expert's projections apart (`experts.3.w1.weight`, ...), which
transformers merges into fused weights (`experts.gate_up_proj` [E, 2 * ff, hidden]); here each expert's
matrix is assembled from its parts (gate and up: two tensors in flight) and placed at once: quantized into
the `Experts4bit` that `quant` makes of the experts module, or copied into the fused weight.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.quant.linear4bit import (
    Experts4bit,
    Linear4bit,
    experts_targets,
    quantization_targets,
    quantize_layer,
    warn_full_precision,
)
from lorakit.quant.nf4 import _as_storage, from_state_dict_entries

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
PACKED_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file."""


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors shards of an HF model folder: those its index names, or model.safetensors."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (JSON with a weight_map): {e}") from None
        for name in names:
            if not (folder / name).is_file():
                raise CheckpointError(f"{index} names the shard {name}, which is missing from {folder}")
        return [folder / name for name in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    hint = (f"; it has {pickled[0]}, but lorakit loads safetensors only (pickle files can run code): convert "
            "it with transformers' save_pretrained(safe_serialization=True)") if pickled else ""
    raise CheckpointError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}{hint}")


@dataclass
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    end: int


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, from its header (8-byte length, then JSON)."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            entries[name] = TensorEntry(file, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin,
                                        8 + length + end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: unreadable header entry for tensor {name}: {info}") from None
    return entries


def stored_float_dtype(folder: Path) -> torch.dtype:
    """The dtype of the checkpoint's first float tensor (from the headers only): what `dtype: auto` stores."""
    for file in checkpoint_files(folder):
        for entry in read_header(file).values():
            if entry.dtype.is_floating_point:
                return entry.dtype
    return torch.float32


def iter_tensors(file: Path, device: torch.device | str = "cpu") -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for each tensor of a safetensors file, in file order, each read on its own."""
    entries = sorted(read_header(file).items(), key=lambda item: item[1].start)
    with open(file, "rb") as f:
        for name, entry in entries:
            yield name, read_tensor(f, entry).to(device)


def read_grouped(headers: dict[Path, dict[str, TensorEntry]], renames: KeyRenames, device: torch.device | str = "cpu"
                 ) -> Iterator[tuple[Path, str, Tensor]]:  # fmt: skip
    """(file, name, tensor) for each tensor of the checkpoint (`headers`: file -> its header), file by file
    in file order, but one expert's parts of a fused expert weight together, at the first one's place: they
    may lie far apart (transformers 5 saves each projection of all experts together), and an expert's matrix
    is only whole, and then placed and freed, with all its parts."""
    groups: dict[tuple[str, int], list[tuple[int, Path, str]]] = {}
    for file, entries in headers.items():
        for key in entries:
            piece = renames.expert_piece(key)
            if piece is not None:
                groups.setdefault((renames.rename(key)[0], piece[0]), []).append((piece[1], file, key))
    group_of = {(file, key): group for group, members in groups.items() for _, file, key in members}
    with contextlib.ExitStack() as stack:
        opened = {file: stack.enter_context(open(file, "rb")) for file in headers}
        for file, entries in headers.items():
            for key in sorted(entries, key=lambda k: entries[k].start):  # reads go forward
                group = groups.pop(group_of[(file, key)], None) if (file, key) in group_of else [(0, file, key)]
                for _, at, name in sorted(group or []):
                    yield at, name, read_tensor(opened[at], headers[at][name]).to(device)


def read_tensor(f, entry: TensorEntry) -> Tensor:
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    f.seek(entry.start)
    if f.readinto(buffer.numpy()) != buffer.numel():
        raise CheckpointError(f"{entry.file} is truncated: it ends inside a tensor")
    itemsize = torch.empty(0, dtype=entry.dtype).element_size()
    if buffer.numel() != itemsize * _numel(entry.shape):
        raise CheckpointError(f"{entry.file}: a tensor's byte range does not fit its shape {list(entry.shape)}")
    return buffer.view(entry.dtype).reshape(entry.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class Fill:
    """What `fill_model` does with the tensors it reads."""

    quant: dict | None = None  # quantize the linear layers (`quant_record`), or keep them as stored
    dtype: torch.dtype | None = None  # cast float tensors (not packed 4-bit bytes) to it; None: keep
    device: torch.device = torch.device("cpu")
    quant_storage: torch.dtype = torch.uint8
    packed_compute_dtype: torch.dtype = torch.float32  # for layers stored 4-bit in the folder


def fill_model(model: nn.Module, folder: Path, how: Fill) -> nn.Module:
    """Load every tensor of the checkpoint in `folder` into `model` (built on the meta device), quantizing on
    the way as `how` says; ties the weights and moves the buffers to the device. Returns the model."""
    files = checkpoint_files(folder)
    expected = dict(model.state_dict(keep_vars=True))  # params and persistent buffers, still on meta
    headers = {file: read_header(file) for file in files}
    packed = {key.split(".weight.quant_state.")[0] for h in headers.values() for key in h
              if ".weight.quant_state." in key}  # fmt: skip  # layers stored 4-bit (bitsandbytes layout)
    to_quantize = _names_to_quantize(model, packed) if how.quant is not None else {}
    for name, experts in experts_targets(model) if how.quant is not None else []:  # filled expert by expert
        q = how.quant
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Experts4bit(
            experts, q["type"], q["blocksize"], q["double_quant"], getattr(torch, q["compute_dtype"]),
            how.quant_storage))  # fmt: skip
    fused = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Experts4bit) for p in m.quantized}
    pending: dict[str, dict[str, Tensor]] = {name: {} for name in packed}
    renames, parts, keep_fp32 = KeyRenames.of(model), ExpertParts(), KeepFp32.of(model)
    for file, key, tensor in read_grouped(headers, renames, how.device):
        name = _model_key(model, key, expected, renames)
        piece = renames.expert_piece(key)
        if piece is not None and name in expected:  # one expert's part of a fused expert weight
            tensor = keep_fp32.cast(name, tensor, how.dtype)
            parts.add(model, name, *piece, tensor, tuple(expected[name].shape), file)
            continue
        module_name, _, attr = name.rpartition(".")
        owner = name.split(".weight", 1)[0]  # "x.q_proj.weight.absmax" -> "x.q_proj"
        if owner in pending and owner != name:  # an entry of a layer stored 4-bit
            pending[owner][name] = tensor
            continue
        if name not in expected:
            if _ignored(model, key):
                continue
            raise CheckpointError(f"{file}: tensor {key} is not a parameter or buffer of {type(model).__name__}")
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{file}: tensor {key} has shape {list(tensor.shape)}, but the model built "
                                  f"from config.json expects {list(expected[name].shape)}")
        tensor = keep_fp32.cast(name, tensor, how.dtype)
        if attr == "weight" and module_name in to_quantize:
            _put_4bit(model, to_quantize[module_name], tensor, how)
        elif name in fused:  # a fused expert weight stored whole, into its Experts4bit
            for e, matrix in enumerate(tensor):
                model.get_submodule(module_name).set_expert(attr, e, matrix)
        else:
            _put(model, name, tensor)
    parts.check(folder)
    for name, entries in pending.items():
        _put_packed(model, name, entries, how, folder)
    model.tie_weights()
    for module in model.modules():  # buffers made at construction (rotary inv_freq) follow the weights
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[key] = buffer.to(how.device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{folder}: the checkpoint has no tensor for {left[0]}"
                              + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    if how.quant is not None:
        warn_full_precision(model)
    return model


def _names_to_quantize(model: nn.Module, packed: set[str]) -> dict[str, list[str]]:
    """A layer to quantize as it is read -> every name it has (not those stored 4-bit already). Names
    only: a reference to a layer here would keep its full-precision weight alive once it is read."""
    by_id: dict[int, list[str]] = {}
    for name, module in quantization_targets(model):
        by_id.setdefault(id(module), []).append(name)
    return {names[0]: names for names in by_id.values() if not packed.intersection(names)}


@dataclass
class KeepFp32:
    """The tensors a model keeps in fp32 whatever the load's dtype, as transformers' from_pretrained does:
    `_keep_in_fp32_modules` when the tensors are fp16 (GPT-OSS's norms), `_keep_in_fp32_modules_strict` when
    fp16 or bf16 (the routers and `e_score_correction_bias` of DeepSeek-V3, GLM-4-MoE, ...: rounded to bf16
    they would change which experts a token goes to). Patterns as transformers reads them: a regex searched
    in the parameter's name, `*` any text."""

    loose: re.Pattern | None
    strict: re.Pattern | None

    @classmethod
    def of(cls, model: nn.Module) -> KeepFp32:
        def pattern(attr: str) -> re.Pattern | None:  # the top model holds its submodels' lists (post_init)
            names = sorted(getattr(model, attr, None) or ())
            return re.compile("|".join(f"(?:{n.replace('*', '.*')})" for n in names)) if names else None

        return cls(pattern("_keep_in_fp32_modules"), pattern("_keep_in_fp32_modules_strict"))

    def cast(self, name: str, tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
        """`tensor` (of parameter or buffer `name`) in `dtype` (None: as stored), or in fp32 where kept."""
        if not tensor.is_floating_point():
            return tensor
        target = dtype or tensor.dtype
        if (target == torch.float16 and self.loose is not None and self.loose.search(name)) or \
                (target in (torch.float16, torch.bfloat16) and self.strict is not None and self.strict.search(name)):
            target = torch.float32
        return tensor.to(target)


@dataclass
class KeyRenames:
    """transformers' own checkpoint-key transforms for a model (`get_model_conversion_mapping`): renamings of
    one key (GPT-NeoX's `embed_out` is `lm_head`), and converters that merge several tensors into one
    (per-expert `experts.N.w1` of Mixtral into the fused `experts.gate_up_proj`). transformers 5 saves the
    original names, so its own folders need them too."""

    renamings: list
    converters: list

    @classmethod
    def of(cls, model: nn.Module) -> KeyRenames:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model) if hasattr(model, "config") else []
        return cls([t for t in transforms if isinstance(t, WeightRenaming)],
                   [t for t in transforms if isinstance(t, WeightConverter)])

    def expert_piece(self, key: str) -> tuple[int, int, int] | None:
        """(expert, part, parts) when checkpoint tensor `key` is one expert's part of a fused expert weight, as
        transformers' MoE converters merge them: each source pattern's experts stacked (MergeModulelist(dim=0)),
        several patterns (gate, up) then concatenated (Concatenate(dim=1)), so expert e's matrix is its parts
        concatenated on dim 0, in pattern order. None for any other key or converter."""
        from transformers.core_model_loading import Concatenate, MergeModulelist, apply_renamings

        if not self.converters:
            return None
        renamed = apply_renamings(key, self.renamings)
        for converter in self.converters:  # the first that matches, as transformers takes it
            pattern = converter.rename_source_key(renamed)[1]
            if pattern is None:
                continue
            ops, patterns = converter.operations, converter.source_patterns
            stacked = isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
            joined = (len(ops) == 1 and len(patterns) == 1) or (
                len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1)  # fmt: skip
            found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
            if not (stacked and joined and found):
                return None
            return int(found.group(1)), patterns.index(pattern), len(patterns)
        return None

    def rename(self, key: str) -> tuple[str, bool]:
        """(the model's name for checkpoint `key`, whether a converter must merge it with other tensors)."""
        from transformers.core_model_loading import rename_source_key

        if not self.renamings and not self.converters:
            return key, False
        name, converter = rename_source_key(key, self.renamings, self.converters)
        return name, converter is not None


def merged_keys(model: nn.Module, folder: Path) -> list[str]:
    """The checkpoint keys that transformers merges with others on load and a tensor-by-tensor fill cannot
    place (per-expert MoE weights of a converter other than `KeyRenames.expert_piece`'s)."""
    renames = KeyRenames.of(model)
    return [key for file in checkpoint_files(folder) for key in read_header(file)
            if renames.rename(key)[1] and renames.expert_piece(key) is None]


@dataclass
class ExpertParts:
    """Per-expert tensors of fused expert weights, held until an expert's matrix is whole (its gate and up
    parts), then placed: quantized into the `Experts4bit` holding the weight, or copied into the fused
    full-precision weight (made on the first expert)."""

    waiting: dict = field(default_factory=dict)  # (fused name, expert) -> {part: tensor}
    placed: dict = field(default_factory=dict)  # fused name -> (experts placed, experts wanted)

    def add(self, model: nn.Module, name: str, expert: int, part: int, parts: int, tensor: Tensor,
            shape: tuple[int, ...], file: Path) -> None:  # fmt: skip
        got = self.waiting.setdefault((name, expert), {})
        got[part] = tensor
        if len(got) < parts:
            return
        matrix = torch.cat([got[i] for i in range(parts)]) if parts > 1 else got[0]  # [out, in] as stored
        got.clear()  # the parts are freed before the matrix is placed
        del self.waiting[(name, expert)]
        if tuple(matrix.shape) != shape[1:] or not 0 <= expert < shape[0]:
            raise CheckpointError(f"{file}: expert {expert} of {name} is {list(matrix.shape)}, but the model built "
                                  f"from config.json has {shape[0]} experts of {list(shape[1:])}")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, Experts4bit):
            module.set_expert(attr, expert, matrix)
        else:
            if module._parameters[attr].is_meta:
                _put(model, name, torch.empty(shape, dtype=matrix.dtype, device=matrix.device))
            with torch.no_grad():
                module._parameters[attr][expert].copy_(matrix)
        done, _ = self.placed.get(name, (0, shape[0]))
        self.placed[name] = (done + 1, shape[0])

    def check(self, folder: Path) -> None:
        """Every fused weight begun has all its experts, every expert all its parts."""
        for (name, expert), got in self.waiting.items():
            raise CheckpointError(f"{folder}: the checkpoint has only parts {sorted(got)} of expert {expert} of {name}")
        for name, (done, wanted) in self.placed.items():
            if done != wanted:
                raise CheckpointError(f"{folder}: the checkpoint has {done} of the {wanted} experts of {name}")


def _model_key(model: nn.Module, key: str, expected: dict, renames: KeyRenames | None = None) -> str:
    """The model's name for a checkpoint key: after transformers' renamings, and with the base model's
    prefix, which a base model's checkpoint (GPT-2's) lacks."""
    key = key if renames is None or key in expected else renames.rename(key)[0]
    prefix = getattr(model, "base_model_prefix", "")
    if key not in expected and prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    return key


def _ignored(model: nn.Module, key: str) -> bool:
    """Tensors transformers itself skips on load (recomputed buffers such as rotary inv_freq)."""
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []), r"rotary_emb\.inv_freq$"]
    return any(re.search(p, key) for p in patterns)


def _put(model: nn.Module, name: str, tensor: Tensor) -> None:
    """Assign `tensor` as the parameter or buffer `name` (no copy; a parameter keeps its requires_grad)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
    else:
        module._buffers[attr] = tensor


def _put_4bit(model: nn.Module, names: list[str], weight: Tensor, how: Fill) -> None:
    """Replace the layer `names[0]` (and its other names) by its 4-bit form, made from `weight`."""
    _put(model, f"{names[0]}.weight", weight)
    q = how.quant
    layer = quantize_layer(model.get_submodule(names[0]), q["type"], q["blocksize"], q["double_quant"],
                           getattr(torch, q["compute_dtype"]), how.quant_storage)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def _put_packed(model: nn.Module, name: str, entries: dict[str, Tensor], how: Fill, folder: Path) -> None:
    """Replace the linear `name` by a `Linear4bit` rebuilt from its bitsandbytes-layout entries."""
    linear = model.get_submodule(name)
    try:
        packed, state = from_state_dict_entries(f"{name}.", entries)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{folder}: 4-bit layer {name}: {e.args[0]}") from None
    conv1d = not isinstance(linear, nn.Linear)  # GPT-2's Conv1D: weight [in, out], stored 4-bit as [out, in]
    shape = tuple(linear.weight.shape[::-1] if conv1d else linear.weight.shape)
    if tuple(state.shape) != shape:
        raise CheckpointError(f"{folder}: 4-bit layer {name} has shape {list(state.shape)}, but the model built "
                              f"from config.json expects {list(shape)}")
    layer = Linear4bit(_as_storage(packed.view(torch.uint8), how.quant_storage), state, linear.bias,
                       how.packed_compute_dtype, conv1d)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
