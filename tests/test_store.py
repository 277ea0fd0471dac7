"""The adapter store: 2,000 adapters on disk, LRU in RAM and on the model, prefetch, hit counts."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorakit
from conftest import tiny_llama
from lorakit.adapters.inject import adapter_names, remove_adapter
from lorakit.adapters.io import CONFIG_FILE, WEIGHTS_FILE
from lorakit.adapters.layer import lora_layers
from lorakit.multi import AdapterStore, UnknownAdapterError

N = 2000


def b_value(i: int) -> float:
    """Adapter i's lora_B entries all equal this, so a loaded adapter shows which file it came from."""
    return (i + 1) / 1000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """2,000 small adapters: one saved by lorakit, then copied with lora_B set to `b_value(i)`."""
    root = tmp_path_factory.mktemp("store")
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=1, alpha=1, targets=["q_proj"]))
    seed = lorakit.save_adapter(model, root / "seed")
    with safe_open(seed / WEIGHTS_FILE, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    for i in range(N):
        folder = root / f"ad{i:04d}"
        folder.mkdir()
        shutil.copyfile(seed / CONFIG_FILE, folder / CONFIG_FILE)
        own = {k: torch.full_like(t, b_value(i)) if "lora_B" in k else t for k, t in tensors.items()}
        save_file(own, folder / WEIGHTS_FILE, metadata=metadata)
    shutil.rmtree(seed)
    return root


def name(i: int) -> str:
    return f"ad{i:04d}"


def test_lists_and_reads_thousands_with_lru_in_ram(root):
    with AdapterStore(root, max_ram=100) as store:
        assert store.names() == [name(i) for i in range(N)]
        for i in range(N):
            assert float(next(iter(store.get(name(i)).lora.values()))["lora_B"][0, 0]) == pytest.approx(b_value(i))
        assert store.in_ram() == [name(i) for i in range(N - 100, N)]
        store.get(name(N - 1))  # a hit
        store.get(name(0))  # evicted long ago: a miss
        stats = store.stats()
    assert (stats["ram_hits"], stats["ram_misses"], stats["disk_reads"]) == (1, N + 1, N + 1)
    assert stats["ram_evictions"] == N + 1 - 100
    assert stats["ram_hit_rate"] == pytest.approx(1 / (N + 2))
    assert stats["in_ram"] == 100


def test_ram_lru_order_by_count_and_by_bytes(root):
    with AdapterStore(root, max_ram=3) as store:
        for i in (0, 1, 2, 0, 3):  # touching 0 makes 1 the least recently used
            store.get(name(i))
        assert store.in_ram() == [name(2), name(0), name(3)]
        assert store.stats()["ram_hits"] == 1
        one = store.stats()["ram_bytes"] / 3
    with AdapterStore(root, max_ram=100, max_ram_bytes=int(2.5 * one)) as store:
        for i in range(4):
            store.get(name(i))
        assert store.in_ram() == [name(2), name(3)]
        assert store.stats()["ram_bytes"] == 2 * one


def q_b(model) -> dict[str, float]:
    """Adapter name -> its lora_B value on the first q_proj."""
    layer = model.model.layers[0].self_attn.q_proj
    return {n: float(a.lora_B[0, 0]) for n, a in layer.adapters.items()}


def test_activate_evicts_least_recently_used_from_the_model(root):
    model = tiny_llama()
    with AdapterStore(root, max_device=2) as store:
        store.activate(model, name(5))
        store.activate(model, name(6))
        store.activate(model, name(5))  # a device hit; 6 is now the least recently used
        store.activate(model, name(7))
        assert store.on_model(model) == [name(5), name(7)]
        assert sorted(adapter_names(model)) == [name(5), name(7)]
        assert lorakit.active_adapters(model) == [name(7)]
        assert q_b(model) == pytest.approx({name(5): b_value(5), name(7): b_value(7)})
        stats = store.stats()
    assert (stats["device_hits"], stats["device_misses"], stats["device_evictions"]) == (1, 3, 1)
    assert (stats["ram_hits"], stats["ram_misses"]) == (0, 3)  # 5 came back from the model, not RAM

    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    alone = tiny_llama()
    lorakit.load_adapter(alone, root / name(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, alone(ids).logits)


def test_attach_a_routed_batch_keeps_the_active_set(root):
    model = tiny_llama()
    with AdapterStore(root, max_device=3) as store:
        store.activate(model, name(1))
        store.attach(model, [name(2), name(3)])
        assert lorakit.active_adapters(model) == [name(1)]
        store.attach(model, [name(4), name(3), name(2)])  # 1 goes, though active
        assert store.on_model(model) == [name(4), name(3), name(2)]
        assert lorakit.active_adapters(model) == []
        with pytest.raises(ValueError, match="4 adapters requested at once but the model has 3 slots"):
            store.attach(model, [name(i) for i in range(4)])
        ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), lorakit.route(model, [name(2), None, name(4)]):
            mixed = model(ids).logits
        with torch.no_grad():
            lorakit.set_active(model, [name(4)])
            torch.testing.assert_close(mixed[2], model(ids[2:]).logits[0], rtol=1e-5, atol=1e-5)


def test_prefetch_turns_misses_into_hits(root):
    wanted = [name(i) for i in range(100, 150)]
    with AdapterStore(root, max_ram=64) as store:
        futures = store.prefetch(wanted)
        assert len(futures) == 50
        for future in futures:
            future.result()
        assert store.prefetch(wanted) == []  # all in RAM already
        for n in wanted:
            store.get(n)
        stats = store.stats()
    assert (stats["ram_hits"], stats["ram_misses"], stats["prefetches"], stats["disk_reads"]) == (50, 0, 50, 50)
    assert stats["ram_hit_rate"] == 1.0


def test_get_waits_for_a_running_prefetch(root):
    with AdapterStore(root) as store:
        store.prefetch([name(i) for i in range(20)])
        adapter = store.get(name(19))  # most likely still on its way: waits rather than reading twice
        assert float(next(iter(adapter.lora.values()))["lora_B"][0, 0]) == pytest.approx(b_value(19))
        store.close()
        assert store.stats()["disk_reads"] == 20


def test_names_are_confined_to_the_root(root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / name(0), outside)
    (root / "escape").symlink_to(outside)
    try:
        with AdapterStore(root) as store:
            for bad in ("../x", "a/b", "", ".", "..", str(outside), "ad0001.x"):
                with pytest.raises(ValueError, match="plain folder name"):
                    store.get(bad)
            with pytest.raises(ValueError, match="outside the store root"):
                store.get("escape")
            with pytest.raises(UnknownAdapterError, match="no adapter 'nope'"):
                store.prefetch(["nope"])
            assert "escape" not in store.names() and name(0) in store.names()
    finally:
        (root / "escape").unlink()


def test_remove_adapter_takes_it_off_every_layer(root):
    model = tiny_llama()
    lorakit.load_adapter(model, root / name(1), name="one")
    lorakit.load_adapter(model, root / name(2), name="two")
    remove_adapter(model, "one")
    assert adapter_names(model) == ["two"]
    assert all("one" not in layer.adapters and "one" not in layer.active for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="unknown adapter 'one'"):
        remove_adapter(model, "one")
    lorakit.merge(model, ["two"])
    with pytest.raises(ValueError, match="unmerge before removing"):
        remove_adapter(model, "two")


def test_add_serves_deeper_folders_confined_to_the_root(root, tmp_path):
    nested = root / "team" / "one"
    shutil.copytree(root / name(3), nested)
    outside = tmp_path / "elsewhere"
    shutil.copytree(root / name(0), outside)
    (root / "team" / "out").symlink_to(outside)
    pickled = root / "team" / "pickled"
    shutil.copytree(root / name(0), pickled)
    (pickled / WEIGHTS_FILE).rename(pickled / "adapter_model.bin")
    try:
        with AdapterStore(root) as store:
            assert store.add("one", "team/one") == nested.resolve()
            assert "one" in store.names() and store.folder("one") == nested.resolve()
            b = next(iter(store.get("one").lora.values()))["lora_B"]  # the copied adapter 3's file
            assert float(b[0, 0]) == pytest.approx(b_value(3))
            for bad, message in ((str(outside), "relative"), ("../x", "without '..'"), ("team/../../x", "'..'"),
                                 ("team/out", "outside the store root"), ("", "non-empty"), (".", "outside"),
                                 ("team\\one", "relative")):
                with pytest.raises(ValueError, match=message):
                    store.add("two", bad)
            with pytest.raises(ValueError, match="only safetensors is loaded.*adapter_model.bin"):
                store.add("two", "team/pickled")
            with pytest.raises(ValueError, match="letters, digits"):
                store.add("a/b", "team/one")
            with pytest.raises(ValueError, match="already loaded"):
                store.add("one", "team/one")
            with pytest.raises(ValueError, match="already loaded"):
                store.add(name(5), name(5))  # a root folder is served already
            store.remove("one")
            assert "one" not in store.names() and "one" not in store.in_ram()
            with pytest.raises(UnknownAdapterError):
                store.folder("one")
            store.remove(name(5))  # a root folder: hidden until added again
            assert name(5) not in store.names()
            with pytest.raises(UnknownAdapterError, match="removed"):
                store.get(name(5))
            store.add(name(5), name(5))
            assert name(5) in store.names() and store.folder(name(5)) == root / name(5)
    finally:
        shutil.rmtree(root / "team")


def test_cached_says_whether_attaching_waits_for_the_disk(root):
    with AdapterStore(root, max_ram=2) as store:
        assert not store.cached(name(7))
        store.get(name(7))
        assert store.cached(name(7))
        store.get(name(8))
        store.get(name(9))
        assert not store.cached(name(7))  # evicted


def test_pin_memory_puts_the_ram_tier_in_page_locked_memory(root, monkeypatch):
    """`lorakit serve --device cuda` pins the RAM tier (the GPU copies from it directly); without it (the
    CPU) nothing is pinned. Pinning needs CUDA, so here `Tensor.pin_memory` records what it is asked."""
    pinned = []

    def fake_pin(t):
        copy = t.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    with AdapterStore(root) as plain:
        plain.get(name(1))
    assert pinned == []
    with AdapterStore(root, pin_memory=True) as store:
        adapter = store.get(name(1))
        tensors = [t for pair in adapter.lora.values() for t in pair.values()]
        assert tensors and all(any(t is p for p in pinned) for t in tensors)  # every RAM tensor is a pinned one
        model = tiny_llama()
        store.activate(model, name(1))
        b = [layer.adapters[name(1)].lora_B for _, layer in lora_layers(model)]
        assert b and all(torch.all(t == b_value(1)) for t in b)  # attached from the pinned copies
