"""Adapter store: thousands of adapters on disk, the recent ones in RAM, a few on the model.

    disk (PEFT folders root/<name>/) --read--> RAM (LRU by count and bytes) --load--> model (LRU slots)

With `pin_memory` (a model on CUDA: `lorakit serve --device cuda` sets it) the RAM tier is page-locked
host memory, which the GPU copies from directly when an adapter is attached; on the CPU it stays plain.

One base model serves many adapters: reading a folder costs disk I/O and parsing, attaching it
costs a copy into the model's memory, so both levels keep the least recently used out. Reads can
run ahead on a background thread (`prefetch`), so a request for an adapter that is coming does
not wait for the disk. Every look-up is counted (`stats`) to size the two caches.

Names are single folder names under `root` (letters, digits, `_`, `-`, at most 255); a name that resolves
outside `root` (a symlink) is refused, so a name taken from a request cannot reach other files.
`add(name, relpath)` names a folder deeper under the root (a server's runtime load); the path is
confined the same way (relative, no `..`, no symlink out), and only safetensors folders are taken.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from torch import nn

from lorakit.adapters.inject import active_adapters, adapter_children, remove_adapter, set_active
from lorakit.adapters.io import CONFIG_FILE, WEIGHTS_FILE, AdapterFile, load_adapter, read_adapter
from lorakit.adapters.metadata import parent_from_config
from lorakit.adapters.state import adapters_of

NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")  # a folder name (255: the longest most file systems allow)


class UnknownAdapterError(LookupError):
    """No adapter of that name under the store's root."""


def confined(root: Path, relpath: str) -> Path:
    """The folder `relpath` under the (resolved) `root`, or a ValueError: absolute paths, `..`,
    backslashes and anything that resolves outside the root (a symlink) are refused."""
    if not isinstance(relpath, str) or not relpath.strip():
        raise ValueError("an adapter path must be a non-empty path relative to the store root")
    parts = PurePosixPath(relpath).parts
    if relpath.startswith(("/", "~")) or "\\" in relpath or re.match(r"[A-Za-z]:", relpath) or ".." in parts:
        raise ValueError(f"adapter path {relpath!r} must be relative to the store root, without '..'")
    if "\0" in relpath:
        raise ValueError(f"adapter path {relpath!r} holds a NUL character")
    try:
        path = (root / relpath).resolve()
    except OSError as e:  # too long for the file system, a symlink loop
        raise ValueError(f"adapter path {relpath!r}: {e.strerror or e}") from None
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"adapter path {relpath!r} resolves outside the store root {root}")
    return path


def check_safetensors(folder: Path) -> None:
    """Refuse a folder without `adapter_model.safetensors` (pickled weights are never read)."""
    if not (folder / CONFIG_FILE).is_file():
        raise UnknownAdapterError(f"no adapter under {folder.name!r}: {CONFIG_FILE} is missing")
    if not (folder / WEIGHTS_FILE).is_file():
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        hint = f" (found {other}: pickled weights are refused)" if other else ""
        raise ValueError(f"adapter {folder.name!r} has no {WEIGHTS_FILE}: only safetensors is loaded{hint}")


def adapter_bytes(adapter: AdapterFile) -> int:
    """Bytes the adapter's tensors take in RAM."""
    tensors = [t for pair in adapter.lora.values() for t in pair.values()]
    tensors += list(adapter.biases.values()) + list(adapter.base_weights.values())
    tensors += [t for state in adapter.copies.values() for t in state.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def pin(adapter: AdapterFile) -> None:
    """Move the adapter's tensors into page-locked host memory, in place (needs CUDA)."""
    adapter.lora = {m: {k: t.pin_memory() for k, t in pair.items()} for m, pair in adapter.lora.items()}
    adapter.biases = {m: t.pin_memory() for m, t in adapter.biases.items()}
    adapter.base_weights = {m: t.pin_memory() for m, t in adapter.base_weights.items()}
    adapter.copies = {m: {k: t.pin_memory() for k, t in state.items()} for m, state in adapter.copies.items()}


class AdapterStore:
    """Adapters under `root`, at most `max_ram` (and `max_ram_bytes`) in RAM and `max_device` on a model."""

    def __init__(self, root: str | Path, max_ram: int = 256, max_device: int = 8,
                 max_ram_bytes: int | None = None, force: bool = False, pin_memory: bool = False) -> None:
        if max_ram < 1 or max_device < 1:
            raise ValueError(f"max_ram and max_device must be at least 1, got {max_ram} and {max_device}")
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"adapter store root {self.root} is not a folder")
        self.max_ram, self.max_device, self.max_ram_bytes, self.force = max_ram, max_device, max_ram_bytes, force
        self.pin_memory = pin_memory
        self.ram: OrderedDict[str, AdapterFile] = OrderedDict()  # least recently used first
        self.ram_bytes = 0
        self.slots: weakref.WeakKeyDictionary[nn.Module, OrderedDict[str, None]] = weakref.WeakKeyDictionary()
        self.pending: dict[str, Future] = {}
        self.extra: dict[str, Path] = {}  # names added with `add`, to folders deeper under the root
        self.hidden: set[str] = set()  # root folders taken out with `remove`
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-store")

    # ------------------------------------------------------------------------- disk

    def names(self) -> list[str]:
        """Every adapter under the root (none that resolves outside it, none removed) and every added one, sorted."""
        found = {p.name for p in self.root.iterdir()
                 if NAME.fullmatch(p.name) and p.resolve().parent == self.root and (p / CONFIG_FILE).is_file()
                 and (p / WEIGHTS_FILE).is_file()}
        return sorted((found - self.hidden) | set(self.extra))

    def folder(self, name: str) -> Path:
        """The folder of adapter `name`, confined to the root."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r} must be a plain folder name (letters, digits, '_', '-', at most "
                             "255)")
        if name in self.extra:
            return self.extra[name]
        if name in self.hidden:
            raise UnknownAdapterError(f"adapter {name!r} was removed")
        path = self.root / name
        if path.resolve().parent != self.root:
            raise ValueError(f"adapter {name!r} resolves outside the store root {self.root}")
        if not (path / CONFIG_FILE).is_file():
            raise UnknownAdapterError(f"no adapter {name!r} under {self.root}")
        if not (path / WEIGHTS_FILE).is_file():
            raise UnknownAdapterError(f"adapter {name!r} has no {WEIGHTS_FILE} (only safetensors is served)")
        return path

    def read(self, name: str) -> AdapterFile:
        """Read from disk into RAM (most recently used), evicting the least recently used."""
        adapter = read_adapter(self.folder(name))
        if self.pin_memory:
            pin(adapter)
        size = adapter_bytes(adapter)
        with self.lock:
            self.counts["disk_reads"] += 1
            if name in self.ram:
                self.ram_bytes -= adapter_bytes(self.ram.pop(name))
            self.ram[name] = adapter
            self.ram_bytes += size
            self.evict_ram()
        return adapter

    def add(self, name: str, relpath: str) -> Path:
        """Serve the folder `relpath` (under the root) as adapter `name`; its config and safetensors file
        must be there. Returns the folder. A name already served is refused."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' (at most 255)")
        folder = confined(self.root, relpath)
        if not folder.is_dir():
            raise UnknownAdapterError(f"no adapter folder {relpath!r} under the store root")
        check_safetensors(folder)
        with self.lock:
            if name in self.names():
                raise ValueError(f"adapter {name!r} is already loaded")
            self.hidden.discard(name)
            if folder != self.root / name:
                self.extra[name] = folder
        return folder

    def remove(self, name: str) -> None:
        """Stop serving adapter `name` (added, or a folder of the root) and drop it from RAM; taking it
        off a model is the caller's (`detach`), once no batch uses it."""
        self.folder(name)  # unknown -> UnknownAdapterError
        with self.lock:
            self.extra.pop(name, None)
            if (self.root / name / CONFIG_FILE).is_file():
                self.hidden.add(name)
            if name in self.ram:
                self.ram_bytes -= adapter_bytes(self.ram.pop(name))

    def cached(self, name: str) -> bool:
        """Whether adapter `name` is in RAM, so that attaching it waits for no disk read."""
        with self.lock:
            return name in self.ram

    def evict_ram(self) -> None:
        """Drop least recently used adapters until within both limits (the newest always stays). Holds the lock."""
        while len(self.ram) > 1 and (len(self.ram) > self.max_ram or
                                     (self.max_ram_bytes is not None and self.ram_bytes > self.max_ram_bytes)):
            _, dropped = self.ram.popitem(last=False)
            self.ram_bytes -= adapter_bytes(dropped)
            self.counts["ram_evictions"] += 1

    # ------------------------------------------------------------------------- RAM

    def get(self, name: str) -> AdapterFile:
        """Adapter `name` from RAM (a hit), else from disk (a miss; waits for its prefetch if one is running)."""
        with self.lock:
            if name in self.ram:
                self.counts["ram_hits"] += 1
                self.ram.move_to_end(name)
                return self.ram[name]
            self.counts["ram_misses"] += 1
            future = self.pending.get(name)
        if future is not None:
            future.result()
            with self.lock:
                if name in self.ram:
                    self.ram.move_to_end(name)
                    return self.ram[name]
        return self.read(name)

    def prefetch(self, names: Iterable[str]) -> list[Future]:
        """Start reading into RAM, on a background thread, those of `names` neither in RAM nor on the way."""
        futures = []
        for name in names:
            self.folder(name)  # a bad or unknown name fails here, not later in the thread
            with self.lock:
                if name in self.ram or name in self.pending:
                    continue
                future = self.pool.submit(self.read, name)
                self.pending[name] = future
                self.counts["prefetches"] += 1
            future.add_done_callback(lambda _, n=name: self.forget_pending(n))
            futures.append(future)
        return futures

    def forget_pending(self, name: str) -> None:
        with self.lock:
            self.pending.pop(name, None)

    def in_ram(self) -> list[str]:
        """Names in RAM, least recently used first."""
        with self.lock:
            return list(self.ram)

    # ------------------------------------------------------------------------- model

    def on_model(self, model: nn.Module) -> list[str]:
        """Adapters this store attached to `model`, least recently used first."""
        return list(self.slots.get(model, {}))

    def attach(self, model: nn.Module, names: Iterable[str]) -> None:
        """Make all of `names` present on `model` (e.g. the adapters of one routed batch), evicting the
        least recently used others beyond `max_device`. The set of active adapters is kept. An adapter
        saved stacked on a parent brings its chain of parents (named as in the store), loaded first."""
        wanted = list(dict.fromkeys(c for n in names for c in self.chain(n)))
        if len(wanted) > self.max_device:
            raise ValueError(f"{len(wanted)} adapters requested at once but the model has {self.max_device} slots")
        slots = self.slots.setdefault(model, OrderedDict())
        missing = [n for n in wanted if n not in slots]
        self.counts["device_hits"] += len(wanted) - len(missing)
        self.counts["device_misses"] += len(missing)
        for name in [n for n in slots if n not in wanted][: max(0, len(slots) + len(missing) - self.max_device)]:
            self.detach(model, name)
            self.counts["device_evictions"] += 1
        active = active_adapters(model)
        try:
            for name in missing:
                load_adapter(model, self.get(name), name=name, force=self.force)
                slots[name] = None
        finally:  # loading activates an adapter: put the active set back, even after a failed load
            set_active(model, [n for n in active if n in adapters_of(model).specs])
        for name in wanted:
            slots.move_to_end(name)

    def activate(self, model: nn.Module, name: str) -> str:
        """Attach adapter `name` to `model` (evicting as needed) and make it the only active one."""
        self.attach(model, [name])
        set_active(model, [name])
        return name

    def detach(self, model: nn.Module, name: str) -> None:
        """Take adapter `name` off `model`, and first the adapters stacked on it (useless without it)."""
        if name not in adapters_of(model).specs:
            return  # already taken off with its parent
        for child in reversed(adapter_children(model, name)):
            remove_adapter(model, child)
            self.slots.get(model, OrderedDict()).pop(child, None)
        remove_adapter(model, name)
        self.slots.get(model, OrderedDict()).pop(name, None)

    def chain(self, name: str) -> list[str]:
        """`name` after its parents (root first), as their files record them."""
        chain = [name]
        while (parent := self.parent_of(chain[0])) is not None:
            if parent in chain:
                raise ValueError(f"adapter {name!r}: its parents form a cycle {[parent, *chain]}")
            chain.insert(0, parent)
        return chain

    def parent_of(self, name: str) -> str | None:
        """The parent adapter_config.json records for `name` (from RAM if there; not counted in `stats`). An
        unreadable config says None here: loading the adapter reports what is wrong with it."""
        with self.lock:
            cached = self.ram.get(name)
        if cached is not None:
            return cached.parent
        config_file = self.folder(name) / CONFIG_FILE
        try:
            return parent_from_config(json.loads(config_file.read_text()), config_file)
        except (OSError, ValueError, AttributeError):
            return None

    # ------------------------------------------------------------------------- report

    def stats(self) -> dict[str, float]:
        """Counts of hits, misses, evictions, reads and prefetches, and the two hit rates."""
        with self.lock:
            counts = dict(self.counts)
            in_ram, ram_bytes = len(self.ram), self.ram_bytes
        keys = ("ram_hits", "ram_misses", "device_hits", "device_misses", "ram_evictions", "device_evictions",
                "disk_reads", "prefetches")
        out: dict[str, float] = {k: counts.get(k, 0) for k in keys}
        for level in ("ram", "device"):
            looked = out[f"{level}_hits"] + out[f"{level}_misses"]
            out[f"{level}_hit_rate"] = out[f"{level}_hits"] / looked if looked else 0.0
        out["in_ram"], out["ram_bytes"] = in_ram, ram_bytes
        return out

    def close(self) -> None:
        """Wait for running prefetches and stop the background thread."""
        self.pool.shutdown(wait=True)

    def __enter__(self) -> AdapterStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
