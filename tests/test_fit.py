"""The loop's promises: exact resume after kill -9, skipped non-finite steps, early stopping, schedules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import tiny_llama
from lorakit.config import TrainConfig
from lorakit.train import fit as fit_module
from lorakit.train.fit import fit, lr_lambda
from test_train import toy_rows


def cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def test_kill_9_then_resume_gives_the_same_adapter_bitwise(tiny_model_dir, jsonl, tmp_path):
    common = [f"base={tiny_model_dir}", f"dataset={jsonl}", "max_steps=30", "batch_size=4", "checkpoint_every=3",
              "lora.dropout=0.1", "eval=false", "lr=0.01"]  # dropout: the RNG state must resume too
    whole = cli("train", *common, f"output_dir={tmp_path / 'whole'}")
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = cli("train", *common, f"output_dir={tmp_path / 'killed'}")
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-9").is_dir():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter").exists()  # it really died mid-run
    stale = tmp_path / "killed" / ".checkpoint-99.x1y2.tmp"  # what a kill -9 inside a checkpoint write leaves
    stale.mkdir()
    (stale / "trainer_state.pt").write_bytes(b"half")
    resumed = cli("train", *common, f"output_dir={tmp_path / 'killed'}", "resume=auto")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert "30/30" in output  # the progress bar ends at the last step
    assert not stale.exists()
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))  # the steps after the checkpoint are not repeated
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds)  # time counts from the start of the whole run, across the resume
    whole, resumed_run = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert resumed_run["first_loss"] == whole["first_loss"]  # the whole run's, not the resumed part's
    assert resumed_run["train_seconds"] >= round(seconds[-1], 1)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, first {differ[0]}; resume log:\n{output}"
    kept = sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*"))
    assert kept == ["checkpoint-27", "checkpoint-30"]  # keep_checkpoints=2


def test_non_finite_steps_are_skipped_then_stop(monkeypatch):
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    real = fit_module.loss_sum
    calls = {"n": 0}

    def sometimes_nan(m, batch):
        calls["n"] += 1
        loss = real(m, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(fit_module, "loss_sum", sometimes_nan)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = fit(model, toy_rows(), TrainConfig(max_steps=3, batch_size=8), pad_id=1, log=lambda *_: None)
    assert result.skipped_steps == 1 and result.history[1]["loss"] != result.history[1]["loss"]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    monkeypatch.setattr(fit_module, "loss_sum", lambda m, b: real(m, b) * float("inf"))
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss"):
        fit(model, toy_rows(), TrainConfig(max_steps=10, max_bad_steps=3), pad_id=1, log=lambda *_: None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_early_stopping_keeps_the_best_adapter():
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    seen = []

    def evaluate(m):  # validation gets worse after the second evaluation
        seen.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return {"val_loss": [3.0, 2.0, 2.5, 2.6, 2.7, 2.8][len(seen) - 1]}

    cfg = TrainConfig(max_steps=20, eval_every=2, early_stopping_patience=2, lr=1e-2)
    result = fit(model, toy_rows(), cfg, pad_id=1, evaluate=evaluate, log=lambda *_: None)
    assert result.stopped_early and len(seen) == 4 and result.best_val_loss == 2.0
    assert result.steps == 8  # the steps run (4 evaluations, every 2 steps), not the 20 planned
    assert all(torch.equal(p, seen[1][n]) for n, p in model.named_parameters() if p.requires_grad)
    assert not all(torch.equal(p, seen[3][n]) for n, p in model.named_parameters() if p.requires_grad)


def test_schedules():
    assert [lr_lambda(2, 10, "linear")(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert [lr_lambda(2, 10, "constant")(s) for s in (0, 5, 10)] == [0.5, 1.0, 1.0]


def test_config_file_and_overrides_give_identical_adapters(tiny_model_dir, jsonl, tmp_path):
    from lorakit.cli import main

    settings = {"base": str(tiny_model_dir), "dataset": str(jsonl), "max_steps": 4, "eval": False,
                "lora": {"r": 4, "alpha": 8}}
    (tmp_path / "c.yaml").write_text(json.dumps({**settings, "output_dir": str(tmp_path / "a")}))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["train", f"base={tiny_model_dir}", f"dataset={jsonl}", "max_steps=4", "eval=false", "lora.r=4",
                 "lora.alpha=8", f"output_dir={tmp_path / 'b'}"]) == 0
    a = (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def default_sigint() -> None:
    """In the child before exec: Ctrl-C's default action, even when this run was started in the
    background by a shell (which ignores SIGINT there, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_writes_a_checkpoint_that_resumes(tiny_model_dir, jsonl, tmp_path):
    common = [f"base={tiny_model_dir}", f"dataset={jsonl}", "max_steps=400", "batch_size=4", "eval=false",
              f"output_dir={tmp_path / 'run'}"]
    run = cli("train", *common, preexec_fn=default_sigint)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert run.poll() is None and time.time() < deadline, run.stdout.read()
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    output = run.communicate(timeout=120)[0]
    assert run.returncode == 130, output
    saved = [p.name for p in (tmp_path / "run").glob("checkpoint-*")]
    assert len(saved) == 1 and "interrupted: checkpoint written" in output
    step = int(saved[0].split("-")[1])
    assert 3 <= step < 400
    resumed = cli("train", *common, "resume=auto", "max_steps=" + str(step + 2))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and f"resumed from {tmp_path / 'run' / saved[0]} at step {step}" in output


def test_tensorboard_mirrors_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    cfg = TrainConfig(max_steps=4, lr=1e-2, tensorboard=True)
    fit(model, toy_rows(), cfg, pad_id=1, out=tmp_path, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["step"] for r in records] == [1, 2, 3, 4]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_tensorboard_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=2))
    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(model, toy_rows(), TrainConfig(max_steps=1, tensorboard=True), pad_id=1, out=tmp_path, log=print)
