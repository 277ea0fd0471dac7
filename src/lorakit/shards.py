"""Safetensors checkpoints read and written one tensor at a time, so that a 7B model never needs
its whole size in memory.

Reading opens a shard (memory-mapped) for each tensor and closes it again, so the mapped pages of a
multi-GB shard do not accumulate in the process. Writing computes the safetensors header from the
tensors' dtypes and shapes first, then appends each tensor's bytes as it is produced: the file is
never held in memory, and it is renamed into place only when complete (temp file + fsync).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives, and its dtype and shape (read from the header only)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def shard_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files in index order (`model.safetensors.index.json`, else
    `model.safetensors`); a missing file is an error naming it."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{folder} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is listed in {index} but missing")
    return files


def shard_tensors(file: Path) -> list[TensorInfo]:
    """The tensors of one shard, in the file's order, from its header (no data read)."""
    with safe_open(file, framework="pt") as f:
        infos = []
        for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            s = f.get_slice(name)
            infos.append(TensorInfo(name, file, TORCH_DTYPES[s.get_dtype()], tuple(s.get_shape())))
    return infos


def checkpoint_tensors(folder: str | Path) -> dict[Path, list[TensorInfo]]:
    """Every shard's tensors (headers only), shard by shard."""
    return {file: shard_tensors(file) for file in shard_files(folder)}


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read from its shard; the mapping is closed again, so only the copy stays resident."""
    with safe_open(info.file, framework="pt") as f:
        return f.get_tensor(info.name)


def header_bytes(infos: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (8-byte length + JSON, padded to 8 bytes) for tensors laid out in this order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in infos:
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_streamed(
    path: str | Path,
    infos: list[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors (name, dtype, shape) are `infos`, calling `produce(name)`
    for each one in turn and writing its bytes before asking for the next; atomic. Returns the
    bytes of tensor data written. A produced tensor of another dtype or shape is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    total = 0
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header_bytes(infos, metadata))
            for name, dtype, shape in infos:
                t = produce(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{path}: tensor {name!r} was announced as {dtype} {list(shape)} "
                                     f"but is {t.dtype} {list(t.shape)}")
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                total += data.nbytes
                del t, data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return total


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json` as transformers writes it (keys sorted)."""
    from lorakit.atomic import atomic_write_text

    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def plan_shards(infos: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    """Group tensors in order into shards of at most `max_bytes` (a bigger tensor gets a shard of its own),
    as transformers' `save_pretrained(max_shard_size=...)` does."""
    shards: list[list] = [[]]
    size = 0
    for info in infos:
        n = info[1].itemsize
        for d in info[2]:
            n *= d
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += n
    return shards


def shard_name(i: int, count: int) -> str:
    return SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """(info, tensor) for every tensor of the checkpoint, one at a time."""
    for infos in checkpoint_tensors(folder).values():
        for info in infos:
            yield info, read_tensor(info)
