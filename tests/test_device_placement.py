"""Every batch, mask, label, position and token the loops make is made on the model's device.

CI has no GPU, so the model goes to PyTorch's `meta` device (shapes, no data) and `DeviceAudit` watches
every torch call: one that mixes a meta tensor with a host tensor (a batch left on the CPU, a mask made
without `device=`) is recorded with where it came from. On a real GPU each of those is an error ("expected
all tensors on the same device") or a silent copy per step; some, like CPU ids into a CUDA embedding, are
errors on CUDA but pass on meta, which is why the audit records them instead of relying on meta to raise.
The data-dependent reads the loops make (`loss.item()`, token counts, argmax lists) return placeholders
on meta, so the loops run through; these tests check placement, not numbers (tests/test_gpu.py
checks numbers on CUDA).
"""

from __future__ import annotations

import random
import traceback

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import lorakit
from conftest import tiny_llama, tiny_tokenizer
from lorakit.config import LoraSpec, TrainConfig
from lorakit.data.packing import pack
from lorakit.quant.linear4bit import quantize_model
from lorakit.quant.optim import make_optimizer
from lorakit.train.fit import rng_states, set_rng_states, train_step, trainable, validation_loss

READS = {Tensor.item, Tensor.tolist, Tensor.__int__, Tensor.__float__, Tensor.__bool__, Tensor.__index__}


def placeholder(func, t: Tensor):
    """What a data-dependent read of meta tensor `t` returns here: zeros of the right type, or a list of ones
    of its shape (tokens the serving loop takes, flags it reads as true)."""
    if func is Tensor.tolist:
        return torch.ones(t.shape, dtype=t.dtype).tolist()
    if func is Tensor.__bool__:
        return False
    if func is Tensor.__float__ or (func is Tensor.item and t.dtype.is_floating_point):
        return 0.0
    return 0


class DeviceAudit(TorchFunctionMode):
    """Records each torch call whose tensor arguments sit on more than one device (0-d CPU scalars
    excepted: CUDA ops take those), with the last lorakit / transformers frames that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[tuple[str, list[str], list[str]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS and args and isinstance(args[0], Tensor) and args[0].is_meta:
            return placeholder(func, args[0])
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                      if "lorakit" in f.filename or "transformers" in f.filename]
            self.mixed.append((getattr(func, "__name__", str(func)), sorted(map(str, devices)), frames[-3:]))
        return func(*args, **kwargs)


@pytest.fixture
def on_meta(monkeypatch):
    """Let the loops run with a meta model: autocast has no meta backend (its CPU one stands in: the
    loops ask for it by the model's device type), and boolean-mask indexing assumes every entry is set."""
    import torch.fx.experimental._config as fx_config

    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: autocast(
        "cpu" if device_type == "meta" else device_type, *a, **k))
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: enabled(*("cpu" if d == "meta" else d for d in a)))
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def meta_model(*names: str, quantized: bool = False) -> torch.nn.Module:
    model = tiny_llama()
    if quantized:  # QLoRA: 4-bit linears (quantized on the CPU here, then moved with the model)
        quantize_model(model, "nf4", 32, True)
    for name in names or ("default",):
        lorakit.inject(model, LoraSpec(r=2, dropout=0.1), name=name)
    return model.to("meta")


ROWS = [(list(range(3, 3 + n)), [-100] * 2 + list(range(5, 3 + n))) for n in (5, 9, 7, 12)]  # unequal lengths


def audit(fn) -> list:
    with DeviceAudit() as watch:
        fn()
    return watch.mixed


@pytest.mark.parametrize("extra", [{}, {"packing": True}, {"precision": "bf16", "grad_accum": 2}, {"quant": {}}],
                         ids=["padded", "packed", "bf16-accum", "qlora"])
def test_training_step_makes_everything_on_the_model_device(on_meta, extra):
    model = meta_model(quantized="quant" in extra)
    if "quant" in extra:
        packed = [p for p in model.parameters() if p.dtype == torch.uint8]
        assert packed and all(p.is_meta for p in packed)  # the 4-bit bytes moved with the model
    extra = {k: v for k, v in extra.items() if k != "quant"}
    rows = pack(ROWS * 2, 24) if extra.get("packing") else ROWS  # packed: several examples a row
    cfg = TrainConfig(batch_size=2, max_steps=2, **extra)
    params = list(trainable(model).values())
    optimizer = make_optimizer("adamw", params, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert audit(lambda: train_step(model, rows, cfg, 0, 0, params, optimizer, schedule)) == []
    assert all(p.device.type == "meta" for p in params)


def test_validation_loss_makes_its_batches_on_the_model_device(on_meta):
    model = meta_model()
    assert audit(lambda: validation_loss(model, ROWS, 3, 0)) == []


def test_the_audit_catches_a_batch_left_on_the_host(on_meta, monkeypatch):
    """The check can fail: without the move to the model's device, the embedding and the loss mix devices."""
    import lorakit.train.fit as fit

    monkeypatch.setattr(fit, "on_device", lambda batch, device: batch)
    mixed = audit(lambda: validation_loss(meta_model(), ROWS, 3, 0))
    assert {"embedding", "__getitem__"} <= {name for name, _, _ in mixed}
    assert all(devices == ["cpu", "meta"] for _, devices, _ in mixed)


def test_train_multi_step_routes_rows_on_the_model_device(on_meta, tmp_path):
    from lorakit.train.fit import Run
    from lorakit.train.multi import Job, multi_step

    model = meta_model("a", "b")
    jobs = []
    for i, name in enumerate(("a", "b")):
        cfg = TrainConfig(batch_size=2, max_steps=1, precision="fp32", output_dir=str(tmp_path / name), seed=i)
        job = Job(cfg, name, ROWS[i:], [], [])
        job.run = Run(model, lorakit.train.multi.adapter_parameters(model, name), cfg, len(job.rows), out=None)
        jobs.append(job)
    assert audit(lambda: multi_step(model, jobs, 0)) == []


def test_serving_makes_ids_masks_positions_and_tokens_on_the_model_device(on_meta):
    """Prefill and decoding steps of a mixed batch (two adapters and the base), rows joining and leaving."""
    from lorakit.serve.batch import Batcher, Sequence

    model = meta_model("a", "b")
    batcher = Batcher(model, eos=None)  # not started: this thread runs its steps
    seqs = [Sequence(a, p, 6, lambda _t: None) for a, p in [("a", [5, 6, 7]), ("b", [8, 9]), (None, [3, 4, 5, 6])]]

    def serve() -> None:
        batcher.join(seqs[:2], *batcher.prefill(seqs[:2]))
        batcher.step()
        batcher.join(seqs[2:], *batcher.prefill(seqs[2:]))
        batcher.step()
        seqs[0].cancelled = True
        batcher.step()

    assert audit(serve) == []
    assert batcher.rows.mask.device.type == "meta" and batcher.steps == 3 and batcher.peak == 3


def test_generate_hands_the_model_its_prompts_on_its_device(on_meta, monkeypatch):
    """`generate` tokenizes on the host and moves the batch; transformers' generate then stays there."""
    from lorakit.generate import generate

    model = meta_model()
    seen = []

    def fake_generate(input_ids, attention_mask, max_new_tokens, **_):
        seen.append((input_ids.device, attention_mask.device))
        return torch.zeros(input_ids.shape[0], input_ids.shape[1] + max_new_tokens, dtype=torch.long)

    monkeypatch.setattr(model, "generate", fake_generate)
    generate(model, tiny_tokenizer(), ["hi", "a longer prompt"], max_new_tokens=2)
    assert seen == [(torch.device("meta"), torch.device("meta"))]


# ---- RNG states in checkpoints ---------------------------------------------------------------------------


def test_cpu_rng_round_trip_is_bit_exact():
    torch.manual_seed(3)
    random.seed(3)
    saved = rng_states(torch.device("cpu"))
    assert "cuda_rng" not in saved  # no CUDA in use: nothing of it saved (nor a CUDA context started)
    want = (torch.rand(5), torch.randn(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_states(saved, torch.device("cpu"))
    got = (torch.rand(5), torch.randn(3), random.random())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_cuda_rng_state_of_the_training_device_is_saved_and_restored(monkeypatch):
    state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state if device == torch.device(
        "cuda", 1) else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append((s, device)))
    saved = rng_states(torch.device("cuda", 1))
    assert saved["cuda_rng"] is state
    set_rng_states(saved, torch.device("cuda", 1))
    assert len(restored) == 1 and restored[0][0] is state and restored[0][1] == torch.device("cuda", 1)
    set_rng_states(saved, torch.device("cpu"))  # a CUDA checkpoint resumed on the CPU: the state is unused
    assert len(restored) == 1


# ---- adapter initialization ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_adapter_init_is_drawn_on_the_cpu_whatever_the_device(kind):
    """As PEFT: the same seed gives the same initial adapter on a GPU as on the CPU (a CUDA generator would
    draw other numbers), so a GPU run can be compared with, and reproduces, a CPU run."""
    from lorakit.adapters.adalora import AdaLoraAdapter
    from lorakit.adapters.lora import LoraAdapter

    make = {"lora": LoraAdapter, "adalora": AdaLoraAdapter}[kind]
    torch.manual_seed(5)
    on_cpu = make(16, 8, 4, 8.0)
    after_cpu = torch.get_rng_state()
    torch.manual_seed(5)
    on_meta = make(16, 8, 4, 8.0, device="meta")
    assert on_meta.lora_A.is_meta and on_meta.lora_B.is_meta
    assert torch.equal(torch.get_rng_state(), after_cpu)  # the meta adapter drew its values from the CPU generator
    assert on_cpu.lora_A.abs().sum() > 0
