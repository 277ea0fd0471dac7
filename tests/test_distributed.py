"""DDP and FSDP2 training under torchrun (2 CPU processes, gloo) end with the adapter that one process
training on the same global batch ends with; their checkpoints resume in another world size."""

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
from lorakit.train import distributed
from lorakit.train.distributed import World, backend_for, init, micro_indices, process_device
from lorakit.train.run import run

COMMON = ["lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "max_steps=4", "batch_size=2", "lr=0.01",
          "warmup_steps=1", "eval=false", "max_length=32", "log_every=1", "seed=0",
          "device=cpu"]  # the gloo paths, also on a machine with GPUs


def test_ranks_split_a_step_into_the_single_process_micro_batches():
    """Rank r of W reads micro-batches r, r+W, ... of the step; together: those of grad_accum x W."""
    for step in range(3):
        single = micro_indices(step, 6, World())
        split = [micro_indices(step, 2, World(r, 3)) for r in range(3)]
        assert sorted(sum(split, [])) == single
        assert split[1] == [step * 6 + 1, step * 6 + 4]


def test_plain_run_refuses_a_torchrun_launch_and_distributed_needs_a_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="distributed=none"):
        init("none")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK", raising=False)
    for mode in ("ddp", "fsdp2"):
        with pytest.raises(ValueError, match="needs a launcher"):
            init(mode)
    with pytest.raises(ValueError, match="distributed must be"):
        load_train_config(None, ["distributed=dp"])
    with pytest.raises(ValueError, match="fsdp2 supports optim=adamw only"):
        load_train_config(None, ["distributed=fsdp2", "optim=adamw8bit"])


def test_backend_is_nccl_between_gpus_and_gloo_between_cpus():
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for(torch.device("cuda", 3)) == "nccl"


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    for asked in ("cuda", "cuda:0", "cuda:3"):  # under torchrun: one GPU per process, whatever the config named
        assert process_device(torch.device(asked), "ddp") == torch.device("cuda", 2)
        assert process_device(torch.device(asked), "fsdp2") == torch.device("cuda", 2)
    assert process_device(torch.device("cuda", 3), "none") == torch.device("cuda", 3)  # a plain run: as named
    assert process_device(torch.device("cpu"), "ddp") == torch.device("cpu")  # gloo on CPUs: unchanged
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=4 has no GPU of its own: this machine has 4"):
        process_device(torch.device("cuda"), "ddp")


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_init_binds_the_gpu_before_joining_the_group(monkeypatch, device, backend):
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(calls) and calls[-1][0] == "init")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda b: calls.append(("init", b)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert init("ddp", torch.device(device)) == World(1, 2, "ddp")
    want = [("init", backend)] if device == "cpu" else [("set_device", torch.device(device)), ("init", backend)]
    assert calls == want


def test_train_nproc_execs_torchrun(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append(argv))
    exec_torchrun(2, None, ["max_steps=3"])
    argv = calls[0]
    assert argv[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert argv[-2:] == ["max_steps=3", "distributed=ddp"]
    yaml_file = tmp_path / "sharded.yaml"
    yaml_file.write_text("distributed: fsdp2\nmax_steps: 3\n")
    exec_torchrun(2, str(yaml_file), ["lr=0.01"])
    assert calls[1][-2:] == [str(yaml_file), "lr=0.01"]  # the file's fsdp2 stands


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
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the norm of the whole gradient

    resumed = load_train_config(None, [*data, "grad_accum=2", f"output_dir={tmp_path / 'three'}",
                                       f"resume={tmp_path / 'two' / 'checkpoint-2'}"])
    run(resumed, log=lambda _m: None)
    again = load_file(tmp_path / "three" / "adapter" / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(again[key], want[key], atol=1e-4, rtol=1e-4, msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]  # it did resume at step 2


def torchrun(args: list[str], timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lorakit", "train", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_adapter(got_dir, want_dir, tol: float = 1e-4) -> None:
    want = load_file(want_dir / "adapter_model.safetensors")
    got = load_file(got_dir / "adapter_model.safetensors")
    assert set(got) == set(want) and len(want) > 0
    for key in want:
        assert got[key].shape == want[key].shape, key  # whole tensors, not one rank's shard
        torch.testing.assert_close(got[key], want[key], atol=tol, rtol=tol, msg=key)
    assert json.loads((got_dir / "adapter_config.json").read_text()) == json.loads(
        (want_dir / "adapter_config.json").read_text())


@pytest.mark.parametrize("extra", [[], ["quant={}"]], ids=["lora", "qlora"])
def test_fsdp2_on_two_processes_equals_one_process_on_the_same_global_batch(tiny_model_dir, jsonl, tmp_path, extra):
    """FSDP2 shards the base (4-bit too) and the adapter; the adapter it saves, and the one in its
    checkpoint (gathered whole, written by rank 0 in PEFT's format), equal one process's."""
    data = [f"base={tiny_model_dir}", f"dataset={jsonl}", *COMMON, *extra, "checkpoint_every=2"]
    one = load_train_config(None, [*data, "grad_accum=2", f"output_dir={tmp_path / 'one'}"])
    run(one, log=lambda _m: None)
    torchrun([*data, "grad_accum=1", "distributed=fsdp2", f"output_dir={tmp_path / 'two'}"])

    want = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert max(float(w.abs().max()) for k, w in want.items() if "lora_B" in k) > 1e-3  # it trained
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter")
    assert_same_adapter(tmp_path / "two" / "checkpoint-2" / "adapter", tmp_path / "one" / "checkpoint-2" / "adapter")
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone wrote, once per step
    for a, b in zip(records, ones, strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the norm of the whole gradient


def test_fsdp2_resumes_a_checkpoint_and_writes_one_that_resumes_in_one_process(tiny_model_dir, jsonl, tmp_path):
    """One process checkpoints at step 2; FSDP2 on 2 processes resumes there (the adapter and Adam's
    moments become shards), checkpoints at step 3 (gathered whole), and one process resumes that.
    LoRA+ gives the optimizer two parameter groups (A, B), built before sharding and mapped to the shards."""
    data = [f"base={tiny_model_dir}", f"dataset={jsonl}", *COMMON, "loraplus_ratio=4"]
    one = load_train_config(None, [*data, "grad_accum=2", "checkpoint_every=2", f"output_dir={tmp_path / 'one'}"])
    run(one, log=lambda _m: None)
    torchrun([*data, "grad_accum=1", "distributed=fsdp2", "checkpoint_every=3", f"output_dir={tmp_path / 'two'}",
              f"resume={tmp_path / 'one' / 'checkpoint-2'}"])
    assert_same_adapter(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter")
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]  # it did resume at step 2

    three = load_train_config(None, [*data, "grad_accum=2", f"output_dir={tmp_path / 'three'}",
                                     f"resume={tmp_path / 'two' / 'checkpoint-3'}"])
    run(three, log=lambda _m: None)
    assert_same_adapter(tmp_path / "three" / "adapter", tmp_path / "one" / "adapter")


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages this rank's parameters live in, the hidden base modules' included."""
    from lorakit.adapters.layer import lora_layers

    storages = {}
    for module in [*model.modules(), *(layer.base_module for _, layer in lora_layers(model))]:
        for p in module._parameters.values():
            if p is not None:
                local = p.to_local() if hasattr(p, "to_local") else p
                storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def fsdp2_worker(rank: int, store: str, out: str) -> None:
    """Shard a tiny QLoRA model over 2 ranks; what this rank holds, and the logits and loss it computes."""
    import torch.distributed as dist

    from conftest import tiny_llama
    from lorakit.adapters.inject import inject
    from lorakit.config import LoraSpec
    from lorakit.quant.linear4bit import quantize_model
    from lorakit.train.distributed import World, wrap

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = quantize_model(tiny_llama(), quant_storage=torch.float32)
    torch.manual_seed(0)
    inject(model, LoraSpec(r=4, alpha=8, targets="all-linear"))
    before = held_bytes(model)
    wrap(model, World(rank, 2, "fsdp2"))
    sharded = held_bytes(model)
    ids = torch.arange(24).reshape(2, 12) % 128
    logits = model(input_ids=ids).logits
    logits.sum().backward()
    dist.barrier()
    torch.save({"before": before, "sharded": sharded, "after_step": held_bytes(model), "logits": logits.detach()},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_fsdp2_shards_the_hidden_base_weights_and_gathers_exact_4bit_codes(tmp_path):
    """The LoRA wrapper keeps its base module out of the module tree; FSDP2 swaps the parameters the
    wrapper registers, and the base module must follow, so that each rank holds about half of the
    model (the base's own references would keep every whole tensor alive) and the gathered 4-bit
    bytes (float storage) dequantize to the unsharded model's logits."""
    from conftest import tiny_llama
    from lorakit.adapters.inject import inject
    from lorakit.config import LoraSpec
    from lorakit.quant.linear4bit import quantize_model

    torch.multiprocessing.spawn(fsdp2_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    reference = quantize_model(tiny_llama())  # uint8 storage, one process
    torch.manual_seed(0)
    inject(reference, LoraSpec(r=4, alpha=8, targets="all-linear"))
    want = reference(input_ids=torch.arange(24).reshape(2, 12) % 128).logits
    for got in ranks:
        assert got["before"] == held_bytes(reference)
        assert got["sharded"] <= 0.55 * got["before"] and got["after_step"] <= 0.55 * got["before"]
        torch.testing.assert_close(got["logits"], want, atol=1e-5, rtol=1e-5)


def test_bench_ddp_quick_counts_the_adapter_gradients_it_all_reduces(tmp_path):
    """`lorakit bench ddp --quick`: the bytes DDP's buckets carry per step (a comm hook) are the adapter's
    fp32 gradients, r x (in + out) x 4 bytes per adapted linear, counted here from the model's shapes."""
    import argparse

    from lorakit_bench import ddp
    from lorakit_bench.workload import tiny_model

    args = argparse.Namespace(reps=2, warmup=1, threads=1, json=str(tmp_path / "ddp.jsonl"), quick=True,
                              no_memory=True, set=[])
    one, two = ddp.run(args)
    model = tiny_model(0)
    r = ddp.QUICK["r"]
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    want = sum(r * (m.in_features + m.out_features) * 4 for m in linears)
    assert one["processes"] == 1 and one["allreduce_bytes"] == 0 and one["grad_accum"] == 2
    assert two["processes"] == 2 and two["grad_accum"] == 1 and two["allreduce_calls"] >= 1
    assert two["allreduce_bytes"] == want == two["adapter_grad_bytes"]
    assert two["all_param_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + want
    assert ddp.ring_bytes(want, 8) == pytest.approx(2 * 7 / 8 * want)
    assert len((tmp_path / "ddp.jsonl").read_text().splitlines()) == 2


def test_float_quant_storage_refuses_a_layer_it_cannot_hold_and_names_it():
    """FSDP2's QLoRA stores the packed bytes as floats: 3 weights (2 bytes) do not make an fp32 element."""
    from lorakit.quant.linear4bit import quantize_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"^1: 6 packed bytes cannot be viewed as torch.float32"):
        quantize_model(model, quant_storage=torch.float32)
    held = quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), quant_storage=torch.float32)
    assert held[0].weight.dtype == torch.float32 and held[0].weight.shape == (4, 1)  # 32 weights: 16 bytes
