"""On a CUDA device: training equals the CPU run within a stated tolerance, resume reproduces the run,
QLoRA trains through the Triton kernels, a served mixed batch equals single-adapter decoding, torchrun
over NCCL trains. Marked `gpu`: CI has no GPU, so there these are skipped and reported as NOT RUN
(conftest); `scripts/gpu_check.sh` runs them on a lent GPU.

Each test is `check_*(device)` called with "cuda", so the comparisons themselves can be exercised on the
CPU (`check_*("cpu")`: the reference then is the CPU itself) while the tests are being written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.config import load_train_config
from lorakit.train.fit import STATE_FILE
from lorakit.train.run import run

pytestmark = pytest.mark.gpu

COMMON = ["lora.r=4", "lora.alpha=8", "max_steps=4", "batch_size=2", "lr=0.01", "warmup_steps=1", "eval=false",
          "max_length=32", "log_every=1", "seed=0"]

# Tolerances, CUDA against the CPU, fp32 (TF32 off, torch's default for matmuls): kernels differ in summation
# order only, ~1e-6 relative per op; over 4 AdamW steps the adapter stays within these.
FP32_LOSS_RTOL = 1e-4
FP32_ADAPTER_TOL = 1e-4  # atol and rtol
BF16_LOSS_RTOL = 3e-2  # bf16 autocast against the fp32 CPU run: activations rounded to 8 bits of mantissa
QLORA_LOSS_RTOL = 1e-3  # Triton dequantization is bit-exact; the fused/cuBLAS matmuls differ in order only
RESUME_TOL = 1e-6  # same device, same kernels: bitwise where deterministic (SDPA's backward may not be)


def train(base, data, out: Path, *extra: str) -> dict:
    cfg = load_train_config(None, [f"base={base}", f"dataset={data}", *COMMON, f"output_dir={out}", *extra])
    return run(cfg, log=lambda _m: None)[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want) and want
    assert max(float(t.abs().max()) for k, t in want.items() if "lora_B" in k) > 1e-3  # it trained
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=tol, rtol=tol, msg=key)


# ---- devices -------------------------------------------------------------------------------------------


def test_cuda_names_resolve_and_a_missing_index_is_named():
    from lorakit.devices import resolve_device

    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=rf"device '{missing}' does not exist \(available: cpu, cuda:0"):
        resolve_device(missing)


# ---- training ------------------------------------------------------------------------------------------


def check_training_equals_cpu(device: str, base, data, tmp: Path) -> None:
    """fp32 on `device` = fp32 on the CPU within FP32_*; precision auto (bf16 on a GPU) within BF16_LOSS_RTOL;
    peak device memory recorded on CUDA."""
    cpu = train(base, data, tmp / "cpu", "device=cpu", "precision=fp32")
    dev = train(base, data, tmp / "dev", f"device={device}", "precision=fp32")
    assert dev["device"].startswith(device) and dev["precision"] == "fp32"
    for a, b in zip(metrics(tmp / "dev"), metrics(tmp / "cpu"), strict=True):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=FP32_LOSS_RTOL)
    assert_same_adapter(adapter(tmp / "dev"), adapter(tmp / "cpu"), FP32_ADAPTER_TOL)

    auto = train(base, data, tmp / "auto", f"device={device}")
    want = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    assert auto["precision"] == want
    for a, b in zip(metrics(tmp / "auto"), metrics(tmp / "cpu"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=BF16_LOSS_RTOL)
    if device == "cuda":
        assert all(r["peak_device_mb"] > 0 for r in metrics(tmp / "dev"))
        assert dev["peak_device_mb"] > 0 and cpu["peak_device_mb"] is None
    assert cpu["first_loss"] > cpu["last_loss"]  # it learns


def test_training_on_cuda_equals_the_cpu_run(tiny_model_dir, jsonl, tmp_path):
    check_training_equals_cpu("cuda", tiny_model_dir, jsonl, tmp_path)


def check_resume_reproduces_the_run(device: str, base, data, tmp: Path) -> None:
    """Stopped at step 2 and resumed = never stopped, with dropout on (the device's RNG matters); the same
    resume without the saved CUDA RNG state differs, so the state is what makes it equal."""
    extra = [f"device={device}", "lora.dropout=0.2", "precision=fp32"]
    train(base, data, tmp / "straight", *extra, "checkpoint_every=2")
    train(base, data, tmp / "resumed", *extra, f"resume={tmp / 'straight' / 'checkpoint-2'}")
    assert [r["step"] for r in metrics(tmp / "resumed")] == [3, 4]
    assert_same_adapter(adapter(tmp / "resumed"), adapter(tmp / "straight"), RESUME_TOL)
    state = torch.load(tmp / "straight" / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert ("cuda_rng" in state) == (device == "cuda")
    if device != "cuda":
        return
    forgetful = tmp / "forgetful" / "checkpoint-2"
    shutil.copytree(tmp / "straight" / "checkpoint-2", forgetful)  # the same checkpoint, but:
    del state["cuda_rng"]
    torch.save(state, forgetful / STATE_FILE)
    train(base, data, tmp / "without", *extra, f"resume={forgetful}")
    diff = max(float((a - b).abs().max()) for a, b in zip(adapter(tmp / "without").values(),
                                                        adapter(tmp / "straight").values(), strict=True))
    assert diff > 10 * RESUME_TOL  # other dropout masks without it


def test_resume_on_cuda_reproduces_the_run(tiny_model_dir, jsonl, tmp_path):
    check_resume_reproduces_the_run("cuda", tiny_model_dir, jsonl, tmp_path)


def check_qlora(device: str, base, data, tmp: Path) -> None:
    """QLoRA on `device` (4-bit weights quantized as they are loaded there; Triton kernels on CUDA) = the
    CPU's plain path, in fp32 compute, within QLORA_LOSS_RTOL."""
    from lorakit import kernels

    extra = ["quant={}", "quant.compute_dtype=float32", "precision=fp32"]
    train(base, data, tmp / "cpu", "device=cpu", *extra)
    train(base, data, tmp / "dev", f"device={device}", *extra)
    for a, b in zip(metrics(tmp / "dev"), metrics(tmp / "cpu"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=QLORA_LOSS_RTOL)
    assert_same_adapter(adapter(tmp / "dev"), adapter(tmp / "cpu"), 10 * FP32_ADAPTER_TOL)
    if device == "cuda":
        assert kernels.use_triton(torch.zeros(1, device=device))  # the Triton paths served the 4-bit layers
        auto = train(base, data, tmp / "auto", f"device={device}", "quant={}")  # bf16 compute by default
        assert auto["precision"] == "bf16" and auto["last_loss"] < auto["first_loss"]


def test_qlora_on_cuda_equals_the_cpu_plain_path(tiny_model_dir, jsonl, tmp_path):
    check_qlora("cuda", tiny_model_dir, jsonl, tmp_path)


def test_paged_adamw8bit_trains_on_cuda(tiny_model_dir, jsonl, tmp_path):
    """The paged 8-bit optimizer in a real run on CUDA: state pages through pinned host memory each step and
    the run equals the unpaged 8-bit one (tests/test_optim8bit.py checks the optimizer alone)."""
    paged = train(tiny_model_dir, jsonl, tmp_path / "paged", "device=cuda", "optim=paged_adamw8bit", "precision=fp32")
    plain = train(tiny_model_dir, jsonl, tmp_path / "plain", "device=cuda", "optim=adamw8bit", "precision=fp32")
    assert paged["last_loss"] == pytest.approx(plain["last_loss"], rel=RESUME_TOL)
    assert_same_adapter(adapter(tmp_path / "paged"), adapter(tmp_path / "plain"), RESUME_TOL)  # same kernels


# ---- serving -------------------------------------------------------------------------------------------


def check_serving_mixed_batch(device: str, tmp: Path) -> None:
    """An engine on `device` (adapter store with a pinned RAM tier on CUDA) decodes 8 requests over 4 adapters
    together; each answer equals greedy decoding with only its adapter, on the same device."""
    import threading

    import lorakit
    from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
    from lorakit.multi.store import AdapterStore
    from lorakit.serve import Engine

    root = tmp / "store"
    for i in range(4):
        model = lorakit.inject(tiny_llama(), lorakit.LoraSpec(r=4, alpha=8))
        randomize_adapters(model, seed=10 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.ndim == 2:
                    p.mul_(5)  # big enough to change greedy tokens
        lorakit.save_adapter(model, root / f"s{i}")
    tok = tiny_tokenizer()
    words = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain"]
    jobs = [(f"s{i % 4}", f"say {words[i]}", 5 + i) for i in range(8)]

    def alone(name: str, prompt: str, n: int) -> list[int]:
        model = tiny_llama().to(device)
        lorakit.load_adapter(model, root / name)
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=1, eos_token_id=1)
        new = out[0, ids.shape[1]:].tolist()
        return new[: new.index(1) + 1] if 1 in new else new

    store = AdapterStore(root, max_device=4, pin_memory=device == "cuda")
    for future in store.prefetch([f"s{i}" for i in range(4)]):  # all in (pinned) RAM: the 8 rows join at once
        future.result()
    engine = Engine(tiny_llama().to(device), tok, base_id="tiny", store=store, max_tokens_limit=32)
    try:
        out = {i: [] for i in range(len(jobs))}
        done = [threading.Event() for _ in jobs]
        for i, (name, prompt, n) in enumerate(jobs):
            job = engine.prepare({"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0}, chat=False)
            engine.submit(job, lambda item, i=i: done[i].set() if item is None or isinstance(item, BaseException)
                          else out[i].append(item))
        assert all(d.wait(120) for d in done)
        assert [out[i] for i in range(len(jobs))] == [alone(*job) for job in jobs]
        assert engine.batcher.peak >= 4  # rows of different adapters shared decoding steps
        assert {p.device.type for p in engine.model.parameters()} == {device}  # base and attached adapters
    finally:
        engine.close()


def test_serving_a_mixed_batch_on_cuda_equals_single_adapter_decoding(tmp_path):
    check_serving_mixed_batch("cuda", tmp_path)


# ---- torchrun over NCCL --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_torchrun_over_nccl_equals_one_process(tiny_model_dir, jsonl, tmp_path, mode):
    """One GPU per process (LOCAL_RANK), NCCL; as many processes as GPUs, up to 2 (1 on a one-GPU machine,
    which still exercises the NCCL group, the device binding and FSDP2's CUDA mesh)."""
    n = min(2, torch.cuda.device_count())
    data = [f"base={tiny_model_dir}", f"dataset={jsonl}", *COMMON, "device=cuda", "precision=fp32"]
    one = load_train_config(None, [*data, f"grad_accum={n}", f"output_dir={tmp_path / 'one'}"])
    run(one, log=lambda _m: None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "lorakit", "train", *data, "grad_accum=1", f"distributed={mode}", f"output_dir={tmp_path / 'n'}"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_adapter(adapter(tmp_path / "n"), adapter(tmp_path / "one"), FP32_ADAPTER_TOL)
    assert json.loads((tmp_path / "n" / "results.json").read_text())["device"] == "cuda:0"
