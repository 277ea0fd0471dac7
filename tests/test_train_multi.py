"""Parallel multi-adapter training: N jobs at once must give the adapters of N lone runs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.config import load_jobs_config, load_train_config
from lorakit.train.multi import check_jobs, run_multi
from lorakit.train.run import run

WORDS = [["cat", "dog", "sun", "sky", "red", "map", "cup", "pen"],
         ["one", "two", "six", "ten", "owl", "elk", "ant", "bee", "fox", "yak"],
         ["alpha", "beta", "gamma", "delta", "kappa", "sigma"]]


def write_jobs(tmp_path, base) -> dict:
    """Three jobs over one tiny base: own data (different lengths), rank, targets, lr, schedule,
    batch size, accumulation, steps and seed."""
    files = []
    for i, words in enumerate(WORDS):
        path = tmp_path / f"data{i}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"say {w} " * (i + 1), "completion": w}) + "\n" for w in words))
        files.append(str(path))
    return {
        "base": str(base), "eval": False, "warmup_steps": 1,
        "jobs": [
            {"dataset": files[0], "output_dir": str(tmp_path / "a"), "lr": 0.02, "seed": 3, "batch_size": 4,
             "max_steps": 6, "checkpoint_every": 3, "lora": {"r": 2, "alpha": 4}},
            {"dataset": files[1], "output_dir": str(tmp_path / "b"), "lr": 0.005, "seed": 7, "batch_size": 3,
             "grad_accum": 2, "max_steps": 4, "schedule": "linear",
             "lora": {"r": 8, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}},
            {"dataset": files[2], "output_dir": str(tmp_path / "c"), "lr": 0.01, "seed": 11, "batch_size": 2,
             "max_steps": 5, "optim": "adamw", "weight_decay": 0.1, "lora": {"r": 4, "alpha": 16, "kind": "dora"}},
        ],
    }


def test_parallel_jobs_equal_training_each_alone(tiny_model_dir, tmp_path):
    spec = write_jobs(tmp_path, tiny_model_dir)
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfgs = load_jobs_config(path)
    run_multi(cfgs, log=lambda *_: None)
    for i, job in enumerate(spec["jobs"]):
        alone_dir = tmp_path / f"alone{i}"
        overrides = [f"{k}={json.dumps(v)}" for k, v in {**spec, **job}.items() if k not in ("jobs", "lora")]
        overrides += [f"lora.{k}={json.dumps(v)}" for k, v in job["lora"].items()]
        run(load_train_config(None, [*overrides, f"output_dir={alone_dir}"]), log=lambda *_: None)
        together = load_file(tmp_path / "abc"[i] / "adapter" / "adapter_model.safetensors")
        alone = load_file(alone_dir / "adapter" / "adapter_model.safetensors")
        assert together.keys() == alone.keys()
        assert len(alone) > 0
        for key, value in alone.items():
            torch.testing.assert_close(together[key], value, rtol=1e-5, atol=1e-5, msg=f"job {i}: {key}")
        assert any(k.endswith("lora_B.weight") and value.abs().max() > 1e-3 for k, value in alone.items())  # trained
        steps_together = [json.loads(line) for line in (tmp_path / "abc"[i] / "metrics.jsonl").read_text().splitlines()]
        steps_alone = [json.loads(line) for line in (alone_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in steps_together] == [r["step"] for r in steps_alone] == list(range(1, job["max_steps"]
                                                                                                      + 1))
        for a, b in zip(steps_together, steps_alone, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == pytest.approx(b["lr"])
            assert a["tokens"] == b["tokens"]
        results = json.loads((tmp_path / "abc"[i] / "results.json").read_text())
        assert results["parallel_jobs"] == 3 and results["steps"] == job["max_steps"]
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not list((tmp_path / "b").glob("checkpoint-*"))


def test_bad_job_lists_are_refused_with_the_job_named(tiny_model_dir, tmp_path, capsys):
    spec = write_jobs(tmp_path, tiny_model_dir)
    path = tmp_path / "jobs.yaml"

    def refused(data: dict, *overrides: str) -> str:
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ValueError) as e:
            check_jobs(load_jobs_config(path, list(overrides)), str(path))
        return str(e.value)

    assert "jobs[2]: unknown key 'lrr' (did you mean 'lr'?)" in refused(spec, "jobs.2.lrr=0.1")
    same = {**spec, "jobs": [spec["jobs"][0], {**spec["jobs"][1], "output_dir": spec["jobs"][0]["output_dir"]}]}
    assert "jobs[1]: output_dir" in refused(same) and "also jobs[0]'s" in refused(same)
    assert "jobs[1]: base is" in refused(spec, "jobs.1.base=other")
    assert "jobs[0]: lora.init='pissa'" in refused(spec, "jobs.0.lora.init=pissa")
    assert "'jobs' must be a non-empty list" in refused({"base": "x"})
    assert "jobs[1], section 'lora': r must be a positive integer" in refused(spec, "jobs.1.lora.r=0")
    path.write_text(yaml.safe_dump(same))
    assert main(["train-multi", str(path)]) == 2  # the CLI says so and stops before loading anything
    assert "each job needs its own folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_defaults_and_overrides_reach_every_job(tiny_model_dir, tmp_path):
    spec = write_jobs(tmp_path, tiny_model_dir)
    spec["lora"] = {"dropout": 0.1, "alpha": 32}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfgs = load_jobs_config(path, ["warmup_steps=2", "jobs.1.lr=0.5"])
    assert [c.warmup_steps for c in cfgs] == [2, 2, 2]
    assert [c.lr for c in cfgs] == [0.02, 0.5, 0.01]
    assert [(c.lora.r, c.lora.alpha, c.lora.dropout) for c in cfgs] == [(2, 4, 0.1), (8, 8, 0.1), (4, 16, 0.1)]
    assert cfgs[1].lora.targets == ["q_proj", "v_proj", "down_proj"] and cfgs[0].lora.targets == "all-linear"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_combined_batches_give_each_batch_its_own_loss(packed):
    """Batches of different widths, right-padded into one: each span's loss is that batch's loss alone."""
    from conftest import tiny_llama
    from lorakit.data.encode import collate
    from lorakit.data.packing import collate_packed, pack
    from lorakit.train.loop import loss_sum
    from lorakit.train.multi import combine, job_losses
    from test_train import toy_rows

    model = tiny_llama()
    rows = [toy_rows(4, seed=1), toy_rows(6, seed=2)[:3]]
    rows[1] = [(ids + ids[:5], labels + labels[:5]) for ids, labels in rows[1]]  # longer rows: a wider batch
    batches = [collate_packed(pack(r, 40), pad_id=1) if packed else collate(r, pad_id=1) for r in rows]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    batch, spans = combine(batches, pad_id=1)
    with torch.no_grad():
        together = job_losses(model, batch, spans)
        for b, loss in zip(batches, together, strict=True):
            torch.testing.assert_close(loss, loss_sum(model, b), rtol=1e-5, atol=1e-4)


def test_interrupted_parallel_run_resumes_to_the_same_adapters(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C checkpoints every unfinished job; resume=auto continues each to the adapter of an unbroken run."""
    from lorakit.train import multi as multi_train

    spec = write_jobs(tmp_path, tiny_model_dir)
    spec["jobs"] = spec["jobs"][:2]
    for job in spec["jobs"]:
        job.pop("checkpoint_every", None)

    def jobs_in(folder: str, *overrides: str):
        path = tmp_path / f"{folder}.yaml"
        data = {**spec, "jobs": [{**j, "output_dir": str(tmp_path / folder / str(i))} for i, j in
                                 enumerate(spec["jobs"])]}
        path.write_text(yaml.safe_dump(data))
        return load_jobs_config(path, list(overrides))

    run_multi(jobs_in("whole"), log=lambda *_: None)
    real, calls = multi_train.multi_step, []

    def interrupt_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(multi_train, "multi_step", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run_multi(jobs_in("broken"), log=lambda *_: None)
    assert all((tmp_path / "broken" / str(i) / "checkpoint-2").is_dir() for i in range(2))
    resumed_steps, messages = [], []
    monkeypatch.setattr(multi_train, "multi_step", lambda *args: resumed_steps.append(1) or real(*args))
    run_multi(jobs_in("broken", "resume=auto"), log=messages.append)
    assert len(resumed_steps) == 6 - 2  # the longer job's remaining steps (from scratch: 6)
    assert sum("resumed from" in m and "at step 2" in m for m in messages) == 2
    for i in range(2):
        a = load_file(tmp_path / "whole" / str(i) / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "broken" / str(i) / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=f"job {i}: {key}")
