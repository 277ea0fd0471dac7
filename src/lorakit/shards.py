"""Safetensors checkpoints written one tensor at a time (reading one tensor at a time is `lorakit.stream`).

The header is computed from the tensors' dtypes and shapes first, then each tensor's bytes are
appended as it is produced: a shard is never held in memory, and it is renamed into place only when
complete (temp file + fsync), readable as a plain `open()` would make it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lorakit.atomic import atomic_write_text, current_umask
from lorakit.stream import DTYPES, INDEX_FILE, SINGLE_FILE

SAFETENSORS_DTYPES = {v: k for k, v in DTYPES.items()}


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; a model folder is read by other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return total


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json` as transformers writes it (keys sorted)."""
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
