"""Mixed-adapter batches: every row must equal running it alone with only its own adapter active."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.adapters.dora import DoraAdapter
from lorakit.adapters.inject import adapter_chain, remove_adapter
from lorakit.adapters.layer import lora_layers
from lorakit.multi import routing
from lorakit.quant.linear4bit import quantize_model

ROWS = ["a", "b", None, "a", "c", "b"]


def with_adapters(model: nn.Module, specs: dict[str, lorakit.LoraSpec], seed: int = 1) -> nn.Module:
    """Inject each named adapter and give every factor (and DoRA magnitude) values that show."""
    for name, spec in specs.items():
        lorakit.inject(model, spec, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                for p in (adapter.lora_A, adapter.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                if isinstance(adapter, DoraAdapter):
                    adapter.magnitude.mul_(1 + 0.2 * torch.randn(adapter.magnitude.shape, generator=g))
    return model


def three_adapters(base: nn.Module, kind_c: str = "lora") -> nn.Module:
    """Different ranks and targets: a (r=2, all linears), b (r=4, embedding + MLP), c (r=3, attention)."""
    return with_adapters(base, {
        "a": lorakit.LoraSpec(r=2, alpha=4),
        "b": lorakit.LoraSpec(r=4, alpha=4, targets=["embed_tokens", "down_proj", "up_proj"]),
        "c": lorakit.LoraSpec(r=3, alpha=6, targets=["q_proj", "v_proj", "o_proj"], kind=kind_c),
    })


def alone(model: nn.Module, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one batch with only adapter `name` active (None = base)."""
    lorakit.set_active(model, [] if name is None else [name])
    return model(ids).logits


def tokens(rows: int, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def check_rows_equal_alone(model: nn.Module, rows: list[str | None]) -> None:
    ids = tokens(len(rows))
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model(ids).logits  # [rows, T, vocab]
    with torch.no_grad():
        base = alone(model, None, ids)
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], alone(model, name, ids[i : i + 1])[0], rtol=1e-5, atol=1e-5)
            if name is not None:  # the check can fail: each adapter really changes its row
                assert (mixed[i] - base[i]).abs().max() > 1e-2


def test_mixed_lora_ranks_and_targets_equal_each_row_alone():
    check_rows_equal_alone(three_adapters(tiny_llama()), ROWS)


def test_mixed_with_dora_equals_each_row_alone():
    check_rows_equal_alone(three_adapters(tiny_llama(), kind_c="dora"), ROWS)


def test_mixed_over_4bit_base_equals_each_row_alone():
    base = quantize_model(tiny_llama(), quant_type="nf4", blocksize=32, double_quant=True)
    model = three_adapters(base, kind_c="dora")
    assert model.model.layers[0].self_attn.q_proj.kind == "linear4bit"
    check_rows_equal_alone(model, ROWS)


def test_one_adapter_for_all_rows_and_all_base_rows():
    model = three_adapters(tiny_llama())
    check_rows_equal_alone(model, ["c", "c", "c"])
    check_rows_equal_alone(model, [None, None])


def test_route_ignores_active_set_and_restores_it():
    model = three_adapters(tiny_llama())
    lorakit.set_active(model, ["a", "b"])
    ids = tokens(2)
    with torch.no_grad():
        with lorakit.route(model, [None, None]):
            routed = model(ids).logits
        torch.testing.assert_close(routed, alone(model, None, ids))
    assert all(layer.routing is None for _, layer in lora_layers(model))


def test_generate_under_route_equals_each_row_alone():
    """Left-padded prompts of different lengths, greedy decoding through the KV cache."""
    model = three_adapters(tiny_llama())
    rows = ["a", None, "c", "b"]
    prompts = [tokens(1, n, seed=n)[0] for n in (5, 8, 3, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model.generate(ids, attention_mask=mask, **greedy)[:, width:]
    with torch.no_grad():
        for i, (name, p) in enumerate(zip(rows, prompts, strict=True)):
            lorakit.set_active(model, [] if name is None else [name])
            single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **greedy)
            assert mixed[i].tolist() == single[0, len(p) :].tolist(), f"row {i} ({name})"
    assert len({tuple(r.tolist()) for r in mixed}) > 1  # the adapters make the rows differ


def adapter_grads(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {f"{path}.{k}": p.grad.clone() for path, layer in lora_layers(model) if name in layer.adapters
            for k, p in layer.adapters[name].named_parameters()}


def loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over rows and tokens (so rows add, whatever the batch)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def test_backward_trains_each_adapter_as_if_alone():
    check_grads_equal_alone(three_adapters(tiny_llama(), kind_c="dora"))


def check_grads_equal_alone(model: nn.Module) -> None:
    """One backward through the routed batch gives adapters a, b, c the gradients of their own rows alone."""
    ids = tokens(len(ROWS))
    with lorakit.route(model, ROWS):
        loss_sum(model(ids).logits, ids).backward()
    mixed = {name: adapter_grads(model, name) for name in ("a", "b", "c")}
    for name in ("a", "b", "c"):
        model.zero_grad()
        rows = [i for i, n in enumerate(ROWS) if n == name]
        loss_sum(alone(model, name, ids[rows]), ids[rows]).backward()
        own = adapter_grads(model, name)
        assert own.keys() == mixed[name].keys()
        for key, grad in own.items():
            assert grad.abs().max() > 0, key
            # fp32 sums over other batch compositions: gradients up to ~20 agree to ~1e-5 absolute
            torch.testing.assert_close(mixed[name][key], grad, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("all_adapters_max", [0, 10**6], ids=["grouped", "stacked-masked"])
def test_grouped_and_stacked_products_equal_each_row_alone(monkeypatch, all_adapters_max):
    """Plain LoRA adapters of different ranks, by groups of rows (prefill) or stacked, every row times every
    adapter masked to its own (decoding); forward and backward."""
    monkeypatch.setattr(routing, "ALL_ADAPTERS_MAX", all_adapters_max)
    model = with_adapters(tiny_llama(), {"a": lorakit.LoraSpec(r=2, alpha=4), "b": lorakit.LoraSpec(r=5, alpha=3),
                                         "c": lorakit.LoraSpec(r=3, alpha=6, targets=["q_proj", "down_proj"])})
    stacked = []
    real = routing.Stack.add_to
    monkeypatch.setattr(routing.Stack, "add_to", lambda self, x, y: stacked.append(len(self.names)) or real(self, x, y))
    check_rows_equal_alone(model, ROWS)
    assert max(stacked, default=0) == (3 if all_adapters_max else 0)  # the path under test, all three adapters
    check_grads_equal_alone(model)


def test_route_refuses_what_it_cannot_honour():
    model = three_adapters(tiny_llama())
    with pytest.raises(ValueError, match="unknown adapter 'zz'"), lorakit.route(model, ["a", "zz"]):
        pass
    with lorakit.route(model, ["a", "b"]):
        with pytest.raises(ValueError, match="routed for 2 rows but a layer got 3"):
            model(tokens(3))
        with pytest.raises(ValueError, match="do not nest"), lorakit.route(model, ["a", "b"]):
            pass
    lorakit.merge(model, ["a"])
    with pytest.raises(ValueError, match="merged into the base weight"), lorakit.route(model, ["a", "b"]):
        pass


def test_module_copies_are_refused_for_routed_rows_and_off_for_others():
    model = three_adapters(tiny_llama())
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"], modules_to_save=["lm_head"]), name="d")
    with torch.no_grad():
        model.lm_head.lora_copies.copies["d"].weight.mul_(2)  # "d" now changes every row through its head
    with pytest.raises(ValueError, match="replaces the whole module 'lm_head'"), lorakit.route(model, ["d"]):
        pass
    lorakit.set_active(model, ["a", "d"])
    ids = tokens(2)
    with torch.no_grad(), lorakit.route(model, ["a", None]):
        mixed = model(ids).logits
    assert model.lm_head.lora_copies.active == ["d"]  # switched off while routed, back after
    with torch.no_grad():  # d's head copy reached no row
        torch.testing.assert_close(mixed[0], alone(model, "a", ids[:1])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], alone(model, None, ids[1:])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("all_adapters_max", [0, 10**6], ids=["grouped", "stacked-masked"])
def test_stacked_adapter_row_takes_its_parent_chain(monkeypatch, all_adapters_max):
    """A row routed to an adapter stacked on a parent (on a grandparent) gets the whole chain's deltas, as
    activating that adapter alone does; rows of the parent alone get the parent only."""
    monkeypatch.setattr(routing, "ALL_ADAPTERS_MAX", all_adapters_max)
    model = with_adapters(tiny_llama(), {"a": lorakit.LoraSpec(r=2, alpha=4), "b": lorakit.LoraSpec(r=5, alpha=3),
                                         "c": lorakit.LoraSpec(r=3, alpha=6, targets=["q_proj", "down_proj"])})
    lorakit.set_parent(model, "b", "a")
    lorakit.set_parent(model, "c", "b")
    assert routing.group_rows(["c", None, "a"], lambda n: adapter_chain(model, n))[0][0] == "a"
    check_rows_equal_alone(model, ["c", "a", None, "b", "c"])
    check_rows_equal_alone(model, ["c", "c"])  # every row takes a, b and c: three whole-batch groups


def test_stacked_factors_are_kept_across_routings_until_a_factor_changes(monkeypatch):
    """Serving opens one routing per decoding step: the stacked copies of the factors are built once per
    layer and reused, and rebuilt when a factor changes in place or an adapter is replaced."""
    monkeypatch.setattr(routing, "ALL_ADAPTERS_MAX", 10**6)
    monkeypatch.setattr(routing, "_STACKED", lorakit.kernels.FactorCache())
    model = with_adapters(tiny_llama(), {"a": lorakit.LoraSpec(r=2, alpha=4), "b": lorakit.LoraSpec(r=3, alpha=3)})
    ids = tokens(3, length=1)

    def stacks() -> dict:
        with torch.no_grad(), lorakit.route(model, ["a", "b", None]):
            model(ids)
        return {layer: entry[2] for layer, entry in routing._STACKED.entries.items()}

    first = stacks()
    assert len(first) == len(list(lora_layers(model)))
    again = stacks()
    assert all(again[layer] is value for layer, value in first.items())  # reused, not rebuilt
    layer = next(layer for _, layer in lora_layers(model))
    with torch.no_grad():
        layer.adapters["b"].lora_B.mul_(2.0)
    changed = stacks()
    assert changed[layer] is not first[layer] and sum(changed[k] is not v for k, v in first.items()) == 1
    check_rows_equal_alone(model, ["a", "b", None])  # the rebuilt stack holds the new factor
    remove_adapter(model, "b")
    with_adapters(model, {"b": lorakit.LoraSpec(r=3, alpha=3)}, seed=5)
    assert all(stacks()[k] is not v for k, v in first.items())
    check_rows_equal_alone(model, ["a", "b", None])


def test_model_that_flattens_rows_routes_each_row_as_alone():
    """OPT reshapes [batch, seq, hidden] to [batch * seq, hidden] before its MLP: those token rows are mapped
    back to their batch rows (forward, backward and greedy decoding through the KV cache)."""
    from tiny_archs import tiny_model

    model = with_adapters(tiny_model("opt"), {
        "a": lorakit.LoraSpec(r=2, alpha=4, targets="all-linear"),
        "b": lorakit.LoraSpec(r=4, alpha=4, targets=["fc1", "fc2"]),  # only the flattened layers
        "c": lorakit.LoraSpec(r=3, alpha=6, targets=["q_proj", "fc2"], kind="dora"),
    })
    check_rows_equal_alone(model, ROWS)
    check_grads_equal_alone(model)
    rows, ids = ["b", None, "c"], tokens(3, 5)
    greedy = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), lorakit.route(model, rows):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    with torch.no_grad():
        for i, name in enumerate(rows):
            lorakit.set_active(model, [] if name is None else [name])
            assert mixed[i].tolist() == model.generate(ids[i : i + 1], **greedy)[0].tolist(), f"row {i}"


def test_flattened_rows_that_do_not_split_into_the_batch_are_refused():
    model = with_adapters(nn.Sequential(nn.Linear(8, 8)), {"a": lorakit.LoraSpec(r=2, targets=["0"]),
                                                           "b": lorakit.LoraSpec(r=2, targets=["0"])})
    x = torch.randn(4, 8)  # two routed rows of two tokens each, flattened
    with torch.no_grad(), lorakit.route(model, ["a", "b"]):
        mixed = model(x)
        with pytest.raises(ValueError, match="got 3 flattened token rows, which are not 2 rows of equal length"):
            model(x[:3])
    with torch.no_grad():
        for i, name in enumerate(["a", "b"]):
            lorakit.set_active(model, [name])
            torch.testing.assert_close(mixed[2 * i : 2 * i + 2], model(x[2 * i : 2 * i + 2]))
