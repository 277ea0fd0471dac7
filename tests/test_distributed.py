"""DDP training under torchrun (2 CPU processes, gloo) ends with the adapter that one process
training on the same global batch ends with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import exec_torchrun
from lorakit.config import load_train_config
from lorakit.train.distributed import World, init, micro_indices
from lorakit.train.run import run

COMMON = ["lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "max_steps=4", "batch_size=2", "lr=0.01",
          "warmup_steps=1", "eval=false", "max_length=32", "log_every=1", "seed=0"]


def test_ranks_split_a_step_into_the_single_process_micro_batches():
    """Rank r of W reads micro-batches r, r+W, ... of the step; together: those of grad_accum x W."""
    for step in range(3):
        single = micro_indices(step, 6, World())
        split = [micro_indices(step, 2, World(r, 3)) for r in range(3)]
        assert sorted(sum(split, [])) == single
        assert split[1] == [step * 6 + 1, step * 6 + 4]


def test_plain_run_refuses_a_torchrun_launch_and_fsdp2_is_not_there_yet(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distributed=none"):
        init("none")
    with pytest.raises(ValueError, match="fsdp2 is not implemented"):
        init("fsdp2")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="needs a launcher"):
        init("ddp")
    with pytest.raises(ValueError, match="distributed must be"):
        load_train_config(None, ["distributed=dp"])


def test_train_nproc_execs_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    exec_torchrun(2, None, ["max_steps=3"])
    argv = calls[0]
    assert argv[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert argv[-2:] == ["max_steps=3", "distributed=ddp"]


@pytest.mark.parametrize("extra", [[], ["quant={}"]], ids=["lora", "qlora"])
def test_ddp_on_two_processes_equals_one_process_on_the_same_global_batch(tiny_model_dir, jsonl, tmp_path, extra):
    """... and a DDP checkpoint resumes in one process (another world size, same global batch)."""
    data = [f"base={tiny_model_dir}", f"dataset={jsonl}", *COMMON, *extra]
    one = load_train_config(None, [*data, "grad_accum=2", f"output_dir={tmp_path / 'one'}"])
    run(one, log=lambda _m: None)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lorakit", "train", *data, "grad_accum=1", "distributed=ddp", f"output_dir={tmp_path / 'two'}",
           "checkpoint_every=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    want = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want) and len(want) > 0
    assert max(float(w.abs().max()) for k, w in want.items() if "lora_B" in k) > 1e-3  # it trained
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=key)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone wrote, once per step
    for a, b in zip(records, ones, strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    resumed = load_train_config(None, [*data, "grad_accum=2", f"output_dir={tmp_path / 'three'}",
                                       f"resume={tmp_path / 'two' / 'checkpoint-2'}"])
    run(resumed, log=lambda _m: None)
    again = load_file(tmp_path / "three" / "adapter" / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(again[key], want[key], atol=1e-4, rtol=1e-4, msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]  # it did resume at step 2
