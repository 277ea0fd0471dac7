"""AdaLoRA against its formula in plain torch, and against PEFT: budget schedule, masks, orthogonal
regularization, and the file format both ways (also pruned, down to rank 0)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import tiny_gpt2, tiny_llama
from lorakit.adapters.adalora import AdaLoraAdapter, adalora_adapters, final_ranks, make_allocator
from lorakit.adapters.state import adapters_of
from lorakit.config import AdaLoraSpec, LoraSpec, TrainConfig
from lorakit.train.fit import fit
from test_train import toy_rows

TARGETS = ["q_proj", "v_proj", "down_proj"]


def adalora_spec(r: int = 4, alpha: float = 8, targets=TARGETS, **settings) -> LoraSpec:
    settings = {"target_r": 2, **settings}
    return LoraSpec(r=r, alpha=alpha, targets=targets, kind="adalora", adalora=AdaLoraSpec(**settings))


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-zero A, E, B (a fresh adapter's E is zero, so it would show nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in adalora_adapters(model, "default"):
            for p in (adapter.lora_A, adapter.lora_E, adapter.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def random_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, adapter in adalora_adapters(model, "default"):
        for p in (adapter.lora_A, adapter.lora_E, adapter.lora_B):
            p.grad = torch.randn(p.shape, generator=g)


def peft_factor(peft_model: PeftModel, path: str, factor: str) -> nn.Parameter:
    return getattr(peft_model.base_model.model.get_submodule(path), factor)["default"]


def one_layer(base: nn.Module, **spec) -> tuple[nn.Module, AdaLoraAdapter]:
    model = lorakit.inject(nn.Sequential(base), adalora_spec(targets=["0"], **spec))
    randomize(model)
    return model, model[0].adapters["default"]


def test_fresh_adapter_is_peft_init_and_leaves_output_unchanged(tokens):
    model = tiny_llama()
    before = model(tokens).logits
    lorakit.inject(model, adalora_spec(r=6))
    torch.testing.assert_close(model(tokens).logits, before, rtol=0, atol=0)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.shape == (6, 32) and adapter.lora_E.shape == (6, 1) and adapter.lora_B.shape == (32, 6)
    assert torch.count_nonzero(adapter.lora_E) == 0
    for factor in (adapter.lora_A, adapter.lora_B):
        assert abs(float(factor.detach().std()) - 0.02) < 0.005
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_E", "lora_B"}


def test_linear_forward_is_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    model, ada = one_layer(base, r=3, alpha=5)
    x = torch.randn(4, 6, 12)
    a, e, b = ada.lora_A, ada.lora_E, ada.lora_B
    expected = x @ base.weight.T + base.bias + (x @ (a * e).T @ b.T) * 5 / (3 + 1e-5)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_conv1d_forward_and_dropout_in_training_are_the_formula():
    torch.manual_seed(0)
    base = Conv1D(9, 12)  # weight [12 in, 9 out]
    nn.init.normal_(base.weight)
    model, ada = one_layer(base, r=4, alpha=8, target_r=2)
    model[0].adapters["default"].dropout = nn.Dropout(0.5)
    x = torch.randn(3, 5, 12)
    model.train()
    torch.manual_seed(1)
    y = model(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    a, e, b = ada.lora_A, ada.lora_E, ada.lora_B
    expected = x @ base.weight + base.bias + (xd @ (a * e).T @ b.T) * 8 / (4 + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_restores_and_merged_logits_agree(make, tokens):
    model = make()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, adalora_spec(targets="all-linear"))
    randomize(model)
    unmerged = model(tokens).logits
    lorakit.merge(model)
    torch.testing.assert_close(model(tokens).logits, unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="not embeddings"):
        lorakit.inject(tiny_llama(), adalora_spec(targets=["embed_tokens"]))
    with pytest.raises(ValueError, match="no rank_pattern"):
        LoraSpec(kind="adalora", rank_pattern={"q_proj": 2})
    with pytest.raises(ValueError, match="exceeds the initial rank"):
        adalora_spec(r=4, target_r=8)
    with pytest.raises(ValueError, match="kind is 'lora'"):
        LoraSpec(adalora=AdaLoraSpec())
    with pytest.raises(ValueError, match="leave no pruning steps"):
        AdaLoraSpec(tinit=5, tfinal=5, total_step=10)
    assert LoraSpec(kind="adalora").adalora == AdaLoraSpec()


def test_config_overrides_reach_the_adalora_section():
    from lorakit.config import load_train_config

    cfg = load_train_config(None, ["lora.kind=adalora", "lora.r=6", "lora.adalora.target_r=3", "lora.adalora.deltaT=5"])
    assert cfg.lora.adalora == AdaLoraSpec(target_r=3, deltaT=5)


def peft_adalora(make=tiny_llama, targets=TARGETS, **settings) -> PeftModel:
    settings = {"init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10, **settings}
    return get_peft_model(make(), AdaLoraConfig(target_modules=targets, **settings))


@pytest.mark.parametrize(("tinit", "tfinal", "delta_t", "total"), [(0, 0, 1, 10), (2, 3, 2, 20), (5, 1, 3, 37)])
def test_budget_schedule_is_peft_for_every_step_and_reaches_the_target(tinit, tfinal, delta_t, total):
    peft_model = peft_adalora(init_r=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total)
    theirs = peft_model.base_model.rankallocator
    model = lorakit.inject(tiny_llama(), adalora_spec(r=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t))
    ours = make_allocator(model, total)
    modules = 3 * 2  # three targets in each of two layers
    assert (ours.init_budget, ours.target_budget) == (theirs.init_bgt, theirs.target_bgt) == (6 * modules, 2 * modules)
    for step in range(total + 3):
        assert ours.budget_schedule(step) == theirs.budget_schedule(step), step
    assert ours.budget_schedule(total - tfinal)[0] == 2 * modules


def test_allocator_masks_and_budgets_equal_peft_on_the_same_parameters_and_gradients():
    settings = dict(target_r=2, tinit=2, tfinal=3, deltaT=2, beta1=0.7, beta2=0.9)
    total = 14
    peft_model = peft_adalora(total_step=total, **settings)
    model = lorakit.inject(tiny_llama(), adalora_spec(r=4, total_step=total, **settings))
    allocator = make_allocator(model, total)
    masked_steps = 0
    for step in range(1, total + 1):  # new parameters and gradients every step, the same in both
        randomize(model, seed=step)
        random_grads(model, seed=100 + step)
        for path, adapter in adalora_adapters(model, "default"):
            for factor in ("lora_A", "lora_E", "lora_B"):
                theirs, ours = peft_factor(peft_model, path, factor), getattr(adapter, factor)
                with torch.no_grad():
                    theirs.copy_(ours)
                theirs.grad = ours.grad.clone()
        peft_model.base_model.update_and_allocate(step)
        allocator.step(step)
        pattern = peft_model.peft_config["default"].rank_pattern
        for path, adapter in adalora_adapters(model, "default"):
            assert torch.equal(adapter.lora_E, peft_factor(peft_model, path, "lora_E")), (step, path)
            if pattern is not None:
                assert adapter.rank_mask.tolist() == pattern[f"{path}.lora_E.default"], (step, path)
        masked_steps += pattern is not None
    assert masked_steps > 0
    ranks = final_ranks(model, "default")
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1  # budget met, unevenly spread


def test_orthogonal_regularization_is_peft_loss_term(tokens):
    peft_model = peft_adalora(orth_reg_weight=0.3)
    model = lorakit.inject(tiny_llama(), adalora_spec(orth_reg_weight=0.3, total_step=10))
    randomize(model)
    with torch.no_grad():
        for path, adapter in adalora_adapters(model, "default"):
            for factor in ("lora_A", "lora_E", "lora_B"):
                peft_factor(peft_model, path, factor).copy_(getattr(adapter, factor))
    expected = peft_model.base_model(input_ids=tokens, labels=tokens).loss  # AdaLoraModel.forward adds the term
    ours = model(input_ids=tokens, labels=tokens).loss + make_allocator(model, 10).orth_loss()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def mask_some(model: nn.Module, budget: int) -> None:
    """Run the allocator once on random gradients and prune to `budget` triplets in all."""
    allocator = make_allocator(model, 10)
    random_grads(model, seed=7)
    allocator.update_scores()
    allocator.mask_to_budget(budget)


CASES = [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])]


@pytest.mark.parametrize("masked", [False, True], ids=["full", "pruned"])
@pytest.mark.parametrize(("make", "targets"), CASES, ids=["llama", "gpt2-conv1d"])
def test_lorakit_adalora_loads_in_peft(make, targets, masked, tmp_path, tokens):
    model = lorakit.inject(make(), adalora_spec(targets=targets, total_step=10, tinit=1))
    randomize(model)
    if masked:
        mask_some(model, budget=5)  # 5 of 4 x (3 or 2) x 2 triplets: some modules go to rank 0
    expected = model(tokens).logits
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_r"], config["target_r"], config["total_step"]) == ("ADALORA", 4, 2, 10)
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as f:
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}  # noqa: SIM118
    assert {k.rsplit(".", 1)[-1] for k in shapes} == {"lora_A", "lora_E", "lora_B"}
    if masked:
        pattern = config["rank_pattern"]
        assert sum(sum(mask) for mask in pattern.values()) == 5 and min(sum(m) for m in pattern.values()) == 0
        for key, mask in pattern.items():
            assert shapes[f"base_model.model.{key}"] == (sum(mask), 1)  # saved at the pruned rank
    else:
        assert config["rank_pattern"] is None
    peft_model = PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "pruned"])
def test_peft_adalora_loads_in_lorakit(masked, tmp_path, tokens):
    peft_model = peft_adalora(tinit=1, tfinal=2)
    g = torch.Generator().manual_seed(3)
    for p in peft_model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            p.grad = torch.randn(p.shape, generator=g)
    if masked:
        peft_model.base_model.update_and_allocate(5)  # scores, and a mask on the way down
        peft_model.base_model.update_and_allocate(8)  # the final allocation: budget 2 x modules
    peft_model.eval()
    expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)
    spec = adapters_of(model).specs["default"]
    assert (spec.kind, spec.r, spec.adalora.target_r, spec.adalora.tfinal) == ("adalora", 4, 2, 2)
    torch.testing.assert_close(model(tokens).logits, expected, rtol=1e-5, atol=1e-5)
    ranks = final_ranks(model, "default")
    assert sum(ranks.values()) == (2 if masked else 4) * len(ranks)
    lorakit.save_adapter(model, tmp_path / "again")
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == theirs["rank_pattern"]
    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "again" / "adapter_model.safetensors", framework="pt") as b:
        assert set(a.keys()) == set(b.keys())  # noqa: SIM118
        for key in b.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_mismatched_rank_pattern_is_refused(tmp_path):
    model = lorakit.inject(tiny_llama(), adalora_spec(total_step=10))
    randomize(model)
    mask_some(model, budget=12)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    key = next(k for k, m in config["rank_pattern"].items() if not all(m))
    config["rank_pattern"][key] = [True] * 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorakit.AdapterFileError, match="has rank .* but the config says 4"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_training_prunes_to_the_target_budget_and_saves_what_peft_loads(tmp_path, tokens):
    model = lorakit.inject(tiny_llama(), adalora_spec(r=4, target_r=2, tinit=2, tfinal=2, deltaT=2))
    fit(model, toy_rows(), TrainConfig(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=1), pad_id=1,
        log=lambda *_: None)
    assert adapters_of(model).specs["default"].adalora.total_step == 10  # the run's steps, recorded for saving
    ranks = final_ranks(model, "default")
    assert sum(ranks.values()) == 2 * len(ranks)
    for _, adapter in adalora_adapters(model, "default"):
        assert torch.count_nonzero(adapter.lora_E[~adapter.rank_mask]) == 0  # held masked in the final phase
        assert torch.count_nonzero(adapter.lora_E) > 0
    expected = model(tokens).logits
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["total_step"] == 10
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(peft_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_inspect_shows_the_final_rank_per_module(tmp_path, capsys):
    from lorakit.cli import main

    model = lorakit.inject(tiny_llama(), adalora_spec(total_step=10))
    randomize(model)
    mask_some(model, budget=7)
    lorakit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "kind: adalora  r: 4  target_r: 2"
    assert lines[-1].split() == ["total", "7", "(target", "12)"]
    rows = dict(line.split() for line in lines[2:-1])
    assert len(rows) == 6
    for path, rank in final_ranks(model, "default").items():
        assert rows[path] == f"{rank}/4"


def test_a_lora_file_calling_itself_adalora_is_refused(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraSpec(r=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "ADALORA", "init_r": 2,
                                                              "target_r": 1, "total_step": 10}))
    with pytest.raises(lorakit.AdapterFileError, match="has no lora_E tensor"):
        lorakit.read_adapter(tmp_path)


def adalora_run(out, **overrides):
    """A tiny AdaLoRA run that prunes between steps 2 and 8 of 10 (every 2 steps), checkpointing every 3."""
    model = lorakit.inject(tiny_llama(), adalora_spec(r=4, target_r=2, tinit=2, tfinal=2, deltaT=2))
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=3, keep_checkpoints=5,
                      **overrides)
    out.mkdir(parents=True, exist_ok=True)
    fit(model, toy_rows(), cfg, pad_id=1, out=out, log=lambda *_: None)
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {f"{path}.{f}": getattr(a, f).detach().clone() for path, a in adalora_adapters(model, "default")
            for f in ("lora_A", "lora_E", "lora_B")} | {f"{path}.mask": a.rank_mask
                                                        for path, a in adalora_adapters(model, "default")}


def test_resume_mid_pruning_gives_the_uninterrupted_adapter(tmp_path, monkeypatch):
    whole = adapter_state(adalora_run(tmp_path / "whole"))
    state = torch.load(tmp_path / "whole" / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    assert set(state["allocator"]) == {"ema_ipt", "ema_unc", "masks"} and state["allocator"]["masks"]
    # a fresh model resumed from step 6 (mid-pruning: scores and masks matter) ends where the whole run ended
    resumed = adapter_state(adalora_run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-6")))
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, first {differ[0]}"
    # and the allocator's state is what makes it so: resumed without it, the masks come out otherwise
    monkeypatch.setattr("lorakit.train.fit.resume_allocator", lambda allocator, path: None)
    forgetful = adapter_state(adalora_run(tmp_path / "forgetful", resume=str(tmp_path / "whole" / "checkpoint-6")))
    assert any(not torch.equal(whole[k], forgetful[k]) for k in whole)


def test_training_draws_the_final_ranks_as_a_heat_map(tmp_path):
    from lorakit.adapters.adalora import rank_grid

    model = adalora_run(tmp_path)
    png = tmp_path / "adalora_ranks.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranks = final_ranks(model, "default")
    layers, modules, grid = rank_grid(ranks)
    assert layers == [0, 1] and modules == ["q_proj", "v_proj", "down_proj"]
    for path, r in ranks.items():  # e.g. model.layers.1.mlp.down_proj
        parts = path.split(".")
        assert grid[int(parts[2])][modules.index(parts[-1])] == r
    assert sum(r for row in grid for r in row) == 2 * 6  # the target budget
