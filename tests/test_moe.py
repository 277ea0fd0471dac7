"""LoRA on fused mixture-of-experts parameters (adapters/params.py) on tiny Mixtral and Qwen3-MoE.

References: a plain-torch per-expert update of a fresh base (W_e + alpha / r * B_e A_e, expert by expert),
and PEFT (`target_parameters`): equal logits with its adapter files both ways, equal trainable counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper

import lorakit
from conftest import add_expert_updates, randomize_adapters
from lorakit.adapters.inject import count_parameters
from lorakit.adapters.params import ParamLoraLayer, param_layers
from tiny_archs import tiny_model

ARCHS = ["mixtral", "qwen3_moe"]


def ids(rows: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (rows, length), generator=torch.Generator().manual_seed(0))


def logits(model, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if batch is None else batch).logits


def reference(arch: str, model) -> torch.Tensor:
    """Logits of a fresh base whose held weights are W_e + scale * B_e A_e, computed expert by expert."""
    return logits(add_expert_updates(tiny_model(arch), model))


def peft_model(arch: str, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_model(arch), LoraConfig(**config))


def randomize_peft(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_adapter_is_the_per_expert_update(arch):
    model = tiny_model(arch)
    lorakit.inject(model, lorakit.LoraSpec(r=3, alpha=5, targets=None, target_parameters=["gate_up_proj", "down_proj"]))
    randomize_adapters(model)
    assert {n.rsplit(".", 1)[-1] for n, _ in param_layers(model)} == {"experts"}
    assert not torch.allclose(logits(model), logits(tiny_model(arch)), atol=1e-3)  # the update shows
    torch.testing.assert_close(logits(model), reference(arch, model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_base_keeps_its_names_and_loads_its_checkpoint(arch):
    model = tiny_model(arch)
    base_state = tiny_model(arch, seed=3).state_dict()
    lorakit.inject(model, lorakit.LoraSpec(r=2))
    keys = set(model.state_dict())
    assert set(base_state) <= keys
    assert all(".adapters.default." in k for k in keys - set(base_state))
    model.load_state_dict(base_state, strict=False)
    lorakit.set_active(model, [])
    torch.testing.assert_close(logits(model), logits(tiny_model(arch, seed=3)))


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_adapts_what_peft_all_linear_adapts(arch):
    model = tiny_model(arch)
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8))
    theirs = peft_model(arch, r=4, lora_alpha=8, target_modules="all-linear")
    assert count_parameters(model) == theirs.get_nb_trainable_parameters()
    held = {f"{p}.{n}" for p, layer in param_layers(model) for n in layer.adapters["default"]}
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in held} == {
        "experts.gate_up_proj", "experts.down_proj", "gate.weight"}


@pytest.mark.parametrize("arch", ARCHS)
def test_training_moves_the_expert_factors(arch):
    model = tiny_model(arch)
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ParamLoraLayer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = ids(), []
    for _ in range(4):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert experts.adapters["default"]["gate_up_proj"].lora_B.abs().sum() > 0
    assert not experts.gate_up_proj.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", [dict(r=2, alpha=4), dict(r=3, alpha=4, targets=["experts"]),
                                  dict(r=2, alpha=4, targets=None, target_parameters=["mlp.gate.weight"]),
                                  dict(r=2, alpha=4, targets=["experts", "q_proj"], layers=[1])])
def test_lorakit_expert_adapter_loads_in_peft(arch, spec, tmp_path):
    model = tiny_model(arch)
    lorakit.inject(model, lorakit.LoraSpec(**spec))
    randomize_adapters(model)
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(tiny_model(arch), tmp_path)
    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [dict(target_modules="all-linear"),
                                    dict(target_modules=None, target_parameters=["down_proj"], r=3),
                                    dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"])])
def test_peft_expert_adapter_loads_in_lorakit(arch, config, tmp_path):
    config = {"r": 2, "lora_alpha": 4, **config}
    theirs = peft_model(arch, **config)
    randomize_peft(theirs)
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path)
    model = tiny_model(arch)
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    wrappers = [(p, m) for p, m in theirs.named_modules() if isinstance(m, ParamWrapper)]
    assert wrappers
    for path, module in wrappers:  # PEFT's own per-expert delta = ours, parameter by parameter
        owner = path.removeprefix("base_model.model.").replace(".base_layer", "")
        ours = model.get_submodule(owner).adapters["default"][module.parameter_name]
        delta = ours.delta_weight().reshape(module.get_param().shape)
        torch.testing.assert_close(delta, module.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    assert count_parameters(model)[0] == 0  # loaded frozen; as many factors as PEFT's
    assert sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n) == \
        theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_gives_the_adapted_logits(arch):
    model = tiny_model(arch)
    lorakit.inject(model, lorakit.LoraSpec(r=2))
    randomize_adapters(model)
    adapted = logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    lorakit.set_active(model, [])
    torch.testing.assert_close(logits(model), logits(tiny_model(arch)), rtol=1e-5, atol=1e-5)
    lorakit.set_active(model, ["default"])
    lorakit.merge_and_unload(model)
    assert not list(param_layers(model)) and type(model.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)


def test_two_expert_adapters_add_up_and_save_apart(tmp_path):
    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=None, target_parameters=["down_proj"]), name="a")
    lorakit.inject(model, lorakit.LoraSpec(r=3, targets=None, target_parameters=["down_proj"]), name="b")
    randomize_adapters(model)
    lorakit.set_active(model, ["a", "b"])
    torch.testing.assert_close(logits(model), reference("mixtral", model), rtol=1e-5, atol=1e-5)
    lorakit.set_active(model, ["b"])
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path, name="b")
    fresh = tiny_model("mixtral")
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-5, atol=1e-5)


def test_mixed_adapter_batch_is_refused_saying_why():
    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]), name="a")
    with pytest.raises(ValueError, match=r"'a' adapts weights held as parameters .*experts.*cannot route"), \
            lorakit.route(model, ["a", None, None]):
        pass


def test_routing_a_linear_adapter_switches_expert_adapters_off():
    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]), name="experts")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["q_proj"]), name="attn")
    randomize_adapters(model)
    lorakit.set_active(model, ["experts", "attn"])  # active, but a routed row sees only its own adapter
    with lorakit.route(model, ["attn", None, "attn"]):
        routed = logits(model)
    lorakit.set_active(model, ["attn"])
    alone = logits(model)
    lorakit.set_active(model, [])
    torch.testing.assert_close(routed[[0, 2]], alone[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], logits(model)[1], rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].mlp.experts.active == []  # restored as they were before set_active
    lorakit.set_active(model, ["experts", "attn"])


@pytest.mark.parametrize("spec, message", [
    (dict(dropout=0.1), "takes no dropout"),
    (dict(kind="dora"), "takes no dropout, DoRA"),
    (dict(targets=None, target_parameters=["up_proj"]), "target_parameters .* match no parameter"),
])
def test_unsupported_expert_settings_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        lorakit.inject(tiny_model("mixtral"), lorakit.LoraSpec(**{"r": 2, **spec}))


def test_adapter_file_whose_expert_tensors_do_not_fit_is_refused(tmp_path):
    theirs = peft_model("mixtral", r=2, lora_alpha=4, target_modules=None, target_parameters=["down_proj"])
    theirs.save_pretrained(tmp_path)
    model = tiny_model("qwen3_moe")  # other expert sizes; PEFT's file carries no shapes of the base
    with pytest.raises(lorakit.AdapterFileError, match=r"down_proj' is \[experts=4, out=32, in=24\] but lora_A"):
        lorakit.load_adapter(model, tmp_path)


def test_server_refuses_an_expert_adapter_saying_why(tmp_path):
    from lorakit.adapters.io import read_adapter
    from lorakit.serve.engine import serving_problem

    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]))
    lorakit.save_adapter(model, tmp_path / "moe")
    problem = serving_problem(tiny_model("mixtral"), read_adapter(tmp_path / "moe"))
    assert problem is not None and "adapts mixture-of-experts parameters" in problem and "lorakit merge" in problem


def test_llama_cpp_adapter_export_refuses_expert_adapters(tmp_path):
    from lorakit.adapters.io import read_adapter
    from lorakit.export import write_adapter_gguf

    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]))
    lorakit.save_adapter(model, tmp_path / "moe")
    with pytest.raises(ValueError, match="weights held as parameters"):
        write_adapter_gguf(read_adapter(tmp_path / "moe"), model.config, tmp_path / "a.gguf")


def test_the_training_loop_trains_expert_adapters_with_loraplus_and_checkpointing():
    from lorakit.adapters.loraplus import loraplus_roles
    from lorakit.config import TrainConfig
    from lorakit.train.fit import fit
    from test_train import toy_rows

    model = lorakit.inject(tiny_model("mixtral"), lorakit.LoraSpec(r=2))
    down = model.model.layers[1].mlp.experts.adapters["default"]["down_proj"]
    before = down.lora_A.detach().clone()
    cfg = TrainConfig(max_steps=3, batch_size=4, loraplus_ratio=4.0, gradient_checkpointing=True)
    result = fit(model, toy_rows(), cfg, pad_id=0, log=lambda *_: None)
    assert result.skipped_steps == 0
    assert not torch.equal(down.lora_A, before) and down.lora_B.abs().sum() > 0
    roles = loraplus_roles(model)  # LoRA+ gives expert B factors the B learning rate
    assert roles[id(down.lora_A)] == "A" and roles[id(down.lora_B)] == "B"


def test_inspect_says_which_rows_are_expert_parameters(tmp_path, capsys):
    from lorakit.cli import main

    model = tiny_model("mixtral")
    lorakit.inject(model, lorakit.LoraSpec(r=2, targets=["experts"]))
    lorakit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target_parameters: down_proj, gate_up_proj (rows of their modules show rank x experts" in out
    assert "model.layers.0.mlp.experts.base_layer  8" in out  # gate_up_proj, adapted first: r 2 x 4 experts
