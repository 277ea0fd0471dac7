"""One `lorakit train` run: load, inject, score before, fit, save, score after."""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.inject import inject, trainable_report
from lorakit.adapters.io import save_adapter
from lorakit.adapters.loraplus import loraplus_param_groups
from lorakit.atomic import atomic_write_text
from lorakit.config import TrainConfig, to_dict
from lorakit.data.encode import CHAT_TEMPLATES, encode_all
from lorakit.data.files import read_rows
from lorakit.data.formats import Row
from lorakit.data.packing import pack
from lorakit.data.tasks import make_task, task_name
from lorakit.devices import peak_memory_mb, resolve_device, resolve_precision
from lorakit.generate import score_rows
from lorakit.longlora import enable_s2_attention, interpolate_positions, trainable_module_names
from lorakit.models import load, resolve, storage_dtype
from lorakit.quant.linear4bit import quantization_of
from lorakit.stream import stored_float_dtype
from lorakit.train import distributed
from lorakit.train.fit import fit, resume_path, validation_loss
from lorakit.train.plot import plot_or_warn


def datasets(cfg: TrainConfig) -> tuple[list[Row], list[Row]]:
    """(train, held-out) rows: a built-in task's splits (the demo or `task:NAME`, sized by `demo_train` and
    `demo_eval`) or the dataset files, held-out from `eval_dataset` or split off by `val_size` (a fraction
    or a count, chosen with the seed)."""
    if cfg.dataset == LONG_TEXT:
        return [], []  # token rows, made with the tokenizer: `long_text_rows`
    task = task_name(cfg.dataset)
    if task is not None:
        train, held_out = make_task(task, cfg.seed, n_train=cfg.demo_train, n_eval=cfg.demo_eval)
    else:
        train, held_out = read_rows(cfg.dataset, cfg.format, cfg.seed), []
    if cfg.eval_dataset is not None:
        held_out = read_rows(cfg.eval_dataset, cfg.format, cfg.seed)
    elif cfg.val_size:
        n = int(cfg.val_size * len(train)) if cfg.val_size < 1 else int(cfg.val_size)
        if not 0 < n < len(train):
            raise ValueError(f"val_size={cfg.val_size} leaves no training or no validation rows of {len(train)}")
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        held_out, train = [train[i] for i in order[:n]], [train[i] for i in order[n:]]
    return train, held_out


LONG_TEXT = "stdlib"  # `dataset: stdlib`: long real text, the Python standard library's source files


def long_text_rows(cfg: TrainConfig, tokenizer) -> tuple[list[tuple[list[int], list[int]]], list]:
    """(training, validation) rows of exactly `max_length` tokens of the standard library's source
    (`lorakit.data.longtext`: files split by path into training and held-out, packed end to end): as many
    training rows as `max_steps` consumes, shuffled by the seed, and `val_size` held-out rows (default 1
    when `eval_every` is set) for validation loss. There are no answers to score: no exact match."""
    from lorakit.data.longtext import as_rows, long_sequences

    if cfg.max_steps is None:
        raise ValueError(f"dataset: {LONG_TEXT} is an open stream of text: set max_steps (not epochs)")
    count = cfg.max_steps * cfg.batch_size * cfg.grad_accum
    train = as_rows(long_sequences(tokenizer, cfg.max_length, count, split="train", seed=cfg.seed))
    n_val = int(cfg.val_size) if cfg.val_size and cfg.val_size >= 1 else (1 if cfg.eval_every else 0)
    val = as_rows(long_sequences(tokenizer, cfg.max_length, n_val, split="held-out")) if n_val else []
    return train, val


def training_rows(cfg: TrainConfig, tokenizer, train: list[Row], held_out: list[Row], log=print) -> tuple[list, list]:
    """(training rows, validation rows) as (ids, labels): `train` encoded (and packed when asked) and
    `held_out` encoded when validation runs (`eval_every`); for `dataset: stdlib`, rows of long text."""
    if cfg.dataset == LONG_TEXT:
        rows, val_rows = long_text_rows(cfg, tokenizer)
        log(f"{len(rows)} rows of {cfg.max_length} tokens of standard-library source ({len(val_rows)} held out)")
        return rows, val_rows
    rows = encode_all(tokenizer, train, cfg.max_length, cfg.train_on_prompt, cfg.truncation, warn=log)
    if cfg.packing:
        rows = pack(rows, cfg.max_length)
        log(f"packed {len(train)} examples into {len(rows)} rows of at most {cfg.max_length} tokens")
    val_rows = encode_all(tokenizer, held_out, cfg.max_length, cfg.train_on_prompt, cfg.truncation,
                          warn=log) if held_out and cfg.eval_every else []
    return rows, val_rows


def load_base(cfg: TrainConfig, device: torch.device = distributed.CPU) -> tuple[nn.Module, object]:
    """(model, tokenizer) for a run on `device`: the base loaded there as `cfg` says (4-bit as it is read when
    `quant` is set, so the device never holds its full-precision weights; float weights in `dtype`), then
    prepared for training (`prepare_base`)."""
    storage, quant = torch.uint8, cfg.quant
    if quant is not None:
        quant = dataclasses.replace(quant, compute_dtype=str(compute_dtype(cfg, device)).removeprefix("torch."))
        if cfg.distributed == "fsdp2":  # FSDP2 shards the packed bytes as floats
            storage = storage_dtype(cfg.dtype) or stored_float_dtype(resolve(cfg.base))
    model, tokenizer = load(cfg.base, quant=quant, dtype=cfg.dtype, device=device, quant_storage=storage)
    prepare_base(model, cfg)
    return model, tokenizer


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The 4-bit layers' compute dtype: `quant.compute_dtype`, where `auto` is bf16 when the run trains in
    bf16 on CUDA (`precision`), else fp32 (bf16 matmuls are slower than fp32 on most CPUs)."""
    name = cfg.quant.compute_dtype
    if name == "auto":
        bf16 = device.type == "cuda" and resolve_precision(cfg.precision, device) == "bf16"
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def prepare_base(model: nn.Module, cfg: TrainConfig) -> None:
    """Ready a loaded base for training: gradient checkpointing (default on with `quant`), LongLoRA, compile.

    With `quant`, the base must be 4-bit already (`models.load` quantizes as it reads). Layers kept in full
    precision (embeddings, norms, head) keep the stored dtype (`dtype`): norms are not raised to fp32 as PEFT's
    prepare_model_for_kbit_training does, since an fp32 norm output would reach a bf16 head (PEFT raises
    every such layer to fp32, the memory `dtype: auto` saves); RMSNorm computes in fp32 inside anyway.
    """
    if cfg.quant is not None and quantization_of(model) is None:
        raise ValueError("quant is set but the base has no 4-bit layers: load it with "
                         "lorakit.models.load(base, quant=...), which quantizes as it reads")
    if cfg.longlora is not None:
        enable_s2_attention(model, cfg.longlora.group_size_ratio)
        if cfg.longlora.target_context:
            interpolate_positions(model, cfg.longlora.target_context)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cfg.quant is not None
    if checkpointing:
        enable_checkpointing(model)
    if cfg.compile:
        compile_blocks(model)


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient (activation) checkpointing with non-reentrant autograd. transformers 5 renamed the method
    (`gradient_checkpointing_enable` still works there but prints a FutureWarning); older versions have
    only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (the classes the model names in
    `_no_split_modules`), so each block's norms, RoPE and activations fuse; LoRA layers and 4-bit
    weights compile with them. Returns how many blocks were compiled."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"compile: {type(model).__name__} names no transformer block class (_no_split_modules)")
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def check_output_dir(cfg: TrainConfig) -> None:
    """Before any model loads: output_dir is (or can become) a folder this process may write in, and its
    checkpoints are this run's when `resume` is set, or there are none (`fit.resume_path`). Creates nothing."""
    out = Path(cfg.output_dir)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is inside {existing}, which is a file"
        raise ValueError(f"output_dir {out} {where}; it must be a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"output_dir {out}: cannot write in {existing} ({e.strerror})") from None
    resume_path(cfg, out)


def run(cfg: TrainConfig, log=print) -> tuple[nn.Module, dict]:
    """Train one adapter as `cfg` says. Returns the trained model and a summary, which is also
    written to output_dir/results.json; the adapter is saved to output_dir/adapter."""
    out = Path(cfg.output_dir)
    device = distributed.process_device(resolve_device(cfg.device), cfg.distributed)  # before any model loads
    world = distributed.init(cfg.distributed, device)  # distributed: only rank 0 logs, scores and saves
    log = log if world.main else (lambda _message: None)
    train, held_out = datasets(cfg)
    check_output_dir(cfg)
    model, tokenizer = load_base(cfg, device)
    if cfg.chat_template is not None:
        tokenizer.chat_template = CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template)
    rows, val_rows = training_rows(cfg, tokenizer, train, held_out, log)
    results: dict = {"config": to_dict(cfg), "train_examples": len(train), "eval_examples": len(held_out),
                     "device": str(device), "precision": resolve_precision(cfg.precision, device)}
    if cfg.eval and held_out and world.main:  # the base alone, before an adapter (PiSSA's init changes the base)
        t = time.perf_counter()
        results["exact_match_before"] = score_rows(model, tokenizer, held_out, cfg.max_new_tokens)
        results["eval_seconds_before"] = round(time.perf_counter() - t, 1)
        log(f"held-out exact match before training: {results['exact_match_before']:.1%} ({len(held_out)} examples)")
    torch.manual_seed(cfg.seed)  # the adapter's initial A comes from the seed too
    spec = cfg.lora
    if cfg.longlora is not None and cfg.longlora.trainable:  # trained and saved whole, as PEFT's modules_to_save
        extra = trainable_module_names(model, cfg.longlora.trainable)
        spec = dataclasses.replace(spec, modules_to_save=[*(spec.modules_to_save or []), *extra])
    inject(model, spec)
    log(trainable_report(model))
    out.mkdir(parents=True, exist_ok=True)

    def evaluate(m: nn.Module) -> dict:
        """Validation loss and perplexity, and the task's own metric (exact match) when `eval` is on."""
        metrics = validation_loss(m, val_rows, cfg.batch_size, tokenizer.pad_token_id)
        if cfg.eval and held_out:
            metrics["exact_match"] = score_rows(m, tokenizer, held_out, cfg.max_new_tokens)
        return metrics
    groups = loraplus_param_groups(model, cfg.lr, cfg.loraplus_ratio, cfg.loraplus_embedding_lr,
                                   cfg.weight_decay) if cfg.loraplus_ratio else None
    fitted = fit(model, rows, cfg, tokenizer.pad_token_id, out=out, evaluate=evaluate if val_rows else None,
                 save_adapter=lambda path: save_adapter(model, path), param_groups=groups, log=log)
    results.update(steps=fitted.steps, first_loss=fitted.first_loss, last_loss=fitted.last_loss,
                   train_seconds=round(fitted.seconds, 1), skipped_steps=fitted.skipped_steps,
                   best_val_loss=fitted.best_val_loss, stopped_early=fitted.stopped_early,
                   peak_device_mb=peak_memory_mb(device))  # None on the CPU
    sharded = world.mode == "fsdp2"  # every rank takes part in gathering the adapter and in forward passes
    if not world.main and not sharded:
        distributed.finish(world)
        return model, results
    with distributed.gathered(model):
        if world.main:  # the adapter first: nothing after it (evaluation, the plot) may lose it
            save_adapter(model, out / "adapter")
    log(f"adapter saved to {out / 'adapter'} ({fitted.steps} steps in {fitted.seconds:.0f}s, "
        f"loss {fitted.first_loss:.3f} -> {fitted.last_loss:.3f})")
    if cfg.eval and held_out:
        t = time.perf_counter()
        results["exact_match_after"] = score_rows(model, tokenizer, held_out, cfg.max_new_tokens)
        results["eval_seconds_after"] = round(time.perf_counter() - t, 1)
        if world.main:
            log(f"held-out exact match after training: {results['exact_match_after']:.1%} "
                f"(before: {results['exact_match_before']:.1%})")
    if world.main:
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        plot_or_warn(out, log)
    distributed.finish(world)
    return model, results
