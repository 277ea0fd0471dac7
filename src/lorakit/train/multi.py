"""Several adapters trained at once over one base model (`lorakit train-multi`).

    loss = sum over jobs j of  loss_j / tokens_j      (loss_j summed over job j's rows only)

Every step, one batch holds the rows of every job still running: job j's micro-batch k is the
one a lone `lorakit train` of that job reads at the same step, and `route` sends each row through
its own job's adapter. No adapter sees another job's rows and each job's loss is normalised by its
own supervised tokens, so each job gets exactly the gradient it would get alone; it then takes its
own clipped optimizer step on its own schedule (`fit.Run`: optimizer, resume, metrics, checkpoints,
evaluation, early stopping). The base model runs once per batch for all jobs instead of once per
job, which is where the speed comes from.

A job's output_dir receives what `lorakit train` writes there. Jobs may differ in data, rank and
targets, batch size, accumulation, lr, schedule, optimizer, steps and seed; they share the base
and everything that changes it (`SHARED`). With dropout the jobs draw their masks from one random
stream, so only runs without dropout are equal to training alone bit for bit (up to fp32 rounding).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters.inject import inject, set_active, trainable_report
from lorakit.adapters.io import save_adapter
from lorakit.adapters.layer import LoraLayer
from lorakit.adapters.loraplus import loraplus_param_groups
from lorakit.atomic import atomic_write_text
from lorakit.config import TrainConfig, to_dict
from lorakit.data.encode import CHAT_TEMPLATES, IGNORE
from lorakit.devices import device_metrics, resolve_device, resolve_precision
from lorakit.generate import score_rows
from lorakit.multi.routing import route
from lorakit.train import distributed
from lorakit.train.fit import FitResult, Run, micro_batch, peak_rss_mb
from lorakit.train.loop import head_loss_sum, model_inputs, on_device, plain_head
from lorakit.train.plot import plot_or_warn
from lorakit.train.run import check_output_dir, datasets, fit_summary, held_out_metrics, load_base, training_rows

# keys that build or change the one base model, or the batch layout, so every job must agree on them
SHARED = ("base", "dtype", "quant", "longlora", "gradient_checkpointing", "compile", "precision", "chat_template",
          "packing", "device")


def check_jobs(jobs: list[TrainConfig], where: str = "config") -> None:
    """Refuse what parallel training cannot do: different bases, one output folder for two jobs,
    and what changes the shared base or cannot be routed per row."""
    if not jobs:
        raise ValueError(f"{where}: no jobs to train")
    seen: dict[Path, int] = {}
    for i, cfg in enumerate(jobs):
        at = f"{where}, jobs[{i}]"
        for key in SHARED:
            if getattr(cfg, key) != getattr(jobs[0], key):
                raise ValueError(f"{at}: {key} is {getattr(cfg, key)!r} but jobs[0] has {getattr(jobs[0], key)!r}; "
                                 "jobs share one base model, so they must agree on it")
        folder = Path(cfg.output_dir).resolve()
        if folder in seen:
            raise ValueError(f"{at}: output_dir {cfg.output_dir!r} is also jobs[{seen[folder]}]'s; "
                             "each job needs its own folder")
        seen[folder] = i
        lora = cfg.lora
        refusals = [
            (cfg.distributed != "none", f"distributed={cfg.distributed!r}: train-multi runs in one process"),
            (bool(lora.modules_to_save) or bool(cfg.longlora and cfg.longlora.trainable),
             "lora.modules_to_save / longlora.trainable copy whole modules, which cannot be routed per row"),
            (lora.bias != "none", f"lora.bias={lora.bias!r} would train the base's biases, which all jobs share"),
            (lora.init == "pissa", "lora.init='pissa' changes the base weight, which all jobs share"),
            (lora.kind == "adalora", "kind='adalora' reallocates ranks over the whole model; train it alone"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"{at}: {why}")


@dataclass
class Job:
    """One adapter of a parallel run: its config, adapter name, encoded rows and training state."""

    cfg: TrainConfig
    name: str  # the adapter's name in the shared model ("job0", ...)
    rows: list
    held_out: list = field(default_factory=list)
    val_rows: list = field(default_factory=list)
    results: dict = field(default_factory=dict)
    run: Run | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The trainable parameters of adapter `name`, by their names in the model."""
    own = {id(p) for m in model.modules() if isinstance(m, LoraLayer) and name in m.adapters
           for p in m.adapters[name].parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in own and p.requires_grad}


def combine(batches: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], list[slice]]:
    """One batch of the rows of `batches` (each right-padded to the longest), and each one's rows."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0, "position_ids": 0}
    parts: dict[str, list[torch.Tensor]] = {}
    spans, start = [], 0
    for b in batches:
        n, extra = b["input_ids"].shape[0], width - b["input_ids"].shape[1]
        spans.append(slice(start, start + n))
        start += n
        for key, t in b.items():
            if key == "lengths" or not extra:
                pass
            elif t.ndim == 4:  # packed rows' additive mask [b, 1, t, t]: padding attends to itself only
                mask = torch.full((n, 1, width, width), torch.finfo(t.dtype).min, dtype=t.dtype)
                mask[..., : t.shape[2], : t.shape[3]] = t
                mask[..., range(t.shape[2], width), range(t.shape[2], width)] = 0
                t = mask
            else:
                t = F.pad(t, (0, extra), value=fill[key])
            parts.setdefault(key, []).append(t)
    return {k: torch.cat(v) for k, v in parts.items()}, spans


def job_losses(model: nn.Module, batch: dict[str, torch.Tensor], spans: list[slice]) -> list[torch.Tensor]:
    """Summed next-token cross entropy of each span of rows (as `loop.loss_sum` computes it for a batch)."""
    labels = batch["labels"][:, 1:]  # [b, t-1]
    keep = labels != IGNORE
    head = plain_head(model)
    if head is not None and not isinstance(head, LoraLayer):  # no adapter on the head: it runs per job's tokens
        hidden = model.base_model(**model_inputs(batch), use_cache=False)[0]
        return [head_loss_sum(hidden[s, :-1][keep[s]], labels[s][keep[s]], head) for s in spans]
    logits = model(**model_inputs(batch), use_cache=False).logits  # a routed head needs whole rows
    return [F.cross_entropy(logits[s, :-1][keep[s]].float(), labels[s][keep[s]], reduction="sum") for s in spans]


def multi_step(model: nn.Module, jobs: list[Job], pad_id: int) -> list[dict]:
    """One optimizer step of each job, their micro-batches routed through the model together; one record
    per job as `fit.train_step` makes it (step_seconds: the shared step's time)."""
    t = time.perf_counter()
    device = next(iter(jobs[0].run.params.values())).device
    bf16 = resolve_precision(jobs[0].cfg.precision, device) == "bf16"
    micro = [[micro_batch(job.rows, job.cfg, pad_id, k)
              for k in distributed.micro_indices(job.run.step, job.cfg.grad_accum, distributed.SINGLE)]
             for job in jobs]
    n_tokens = [sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in m) for m in micro]
    totals = [0.0] * len(jobs)
    for i in range(max(len(m) for m in micro)):
        present = [j for j, m in enumerate(micro) if i < len(m)]  # jobs with a micro-batch i this step
        batch, spans = combine([micro[j][i] for j in present], pad_id)
        batch = on_device(batch, device)
        names = [jobs[j].name for j, s in zip(present, spans, strict=True) for _ in range(s.stop - s.start)]
        with route(model, names):  # backward inside too: gradient checkpointing re-runs the routed forward
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                losses = [loss / max(1, n_tokens[j]) for j, loss in zip(present, job_losses(model, batch, spans),
                                                                         strict=True)]
            sum(losses).backward()
        for j, loss in zip(present, losses, strict=True):
            totals[j] += loss.item()
    seconds = time.perf_counter() - t
    records = []
    for job, total, n, m in zip(jobs, totals, n_tokens, micro, strict=True):
        run, params = job.run, list(job.run.params.values())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, job.cfg.max_grad_norm))
        if math.isfinite(total) and math.isfinite(grad_norm):
            run.optimizer.step()
        run.schedule.step()
        run.optimizer.zero_grad(set_to_none=True)
        records.append({"step": run.step + 1, "loss": total, "lr": run.schedule.get_last_lr()[0],
                        "grad_norm": round(grad_norm, 6), "tokens": n,
                        "tokens_seen": sum(int(b["lengths"].sum()) for b in m), "step_seconds": seconds,
                        "peak_rss_mb": round(peak_rss_mb(), 1), **device_metrics(device)})
    return records


def fit_multi(model: nn.Module, jobs: list[Job], pad_id: int, tokenizer=None, log=print) -> list[FitResult]:
    """Train every job's adapter (already injected under `job.name`) until each has done its steps."""
    torch.manual_seed(jobs[0].cfg.seed)  # dropout masks: one stream for all jobs
    for job in jobs:
        params = adapter_parameters(model, job.name)
        groups = None
        if job.cfg.loraplus_ratio:  # LoRA+ groups of this job's parameters only
            own = {id(p) for p in params.values()}
            groups = [{**g, "params": [p for p in g["params"] if id(p) in own]}
                      for g in loraplus_param_groups(model, job.cfg.lr, job.cfg.loraplus_ratio,
                                                     job.cfg.loraplus_embedding_lr, job.cfg.weight_decay)]
            groups = [g for g in groups if g["params"]]
        job.out.mkdir(parents=True, exist_ok=True)
        job.run = Run(model, params, job.cfg, len(job.rows), out=job.out,
                      evaluate=evaluator(job, tokenizer) if job.val_rows else None,
                      save_adapter=lambda path, n=job.name: save_adapter(model, path, name=n),
                      param_groups=groups, log=lambda message, n=job.name: log(f"[{n}] {message}"))
    model.train()
    bar = tqdm(total=sum(j.run.steps for j in jobs), initial=sum(j.run.start_step for j in jobs),
               desc=f"train {len(jobs)} adapters", dynamic_ncols=True)
    try:
        while running := [j for j in jobs if not j.run.done]:
            for job, record in zip(running, multi_step(model, running, pad_id), strict=True):
                job.run.book(record)
                bar.update()
            bar.set_postfix(loss=" ".join(f"{j.run.result.last_loss:.3f}" for j in jobs))
    except KeyboardInterrupt:
        for job in jobs:
            if not job.run.done:
                job.run.interrupted()
        raise
    finally:
        results = [job.run.close() for job in jobs]
        bar.close()
        model.eval()
    return results


def evaluator(job: Job, tokenizer):
    """`lorakit train`'s held-out metrics, of the job's adapter alone."""

    def evaluate(model: nn.Module) -> dict:
        set_active(model, [job.name])
        return held_out_metrics(model, job.cfg, tokenizer, job.val_rows, job.held_out)

    return evaluate


def run_multi(cfgs: list[TrainConfig], where: str = "config", log=print) -> tuple[nn.Module, list[dict]]:
    """Train one adapter per config at once over their shared base; each job's output_dir gets its
    adapter, metrics.jsonl, loss.png, checkpoints and results.json, as `lorakit train` writes them."""
    check_jobs(cfgs, where)
    for cfg in cfgs:  # before the model loads: each output_dir writable, its checkpoints this job's
        check_output_dir(cfg)
    first = cfgs[0]
    device = resolve_device(first.device)  # before any model loads
    model, tokenizer = load_base(first, device)
    if first.chat_template is not None:
        tokenizer.chat_template = CHAT_TEMPLATES.get(first.chat_template, first.chat_template)
    jobs = []
    for i, cfg in enumerate(cfgs):
        train, held_out = datasets(cfg)
        rows, val_rows = training_rows(cfg, tokenizer, train, held_out, log)
        job = Job(cfg, f"job{i}", rows, held_out, val_rows)
        job.results = {"config": to_dict(cfg), "train_examples": len(train), "eval_examples": len(held_out),
                       "parallel_jobs": len(cfgs)}
        if cfg.eval and held_out:  # the base alone, before any adapter
            job.results["exact_match_before"] = score_rows(model, tokenizer, held_out, cfg.max_new_tokens)
        jobs.append(job)
    for job in jobs:
        torch.manual_seed(job.cfg.seed)  # each adapter's initial A from its own seed, as a lone run draws it
        inject(model, job.cfg.lora, name=job.name)
    log(trainable_report(model))
    fitted = fit_multi(model, jobs, tokenizer.pad_token_id, tokenizer, log)
    for job, result in zip(jobs, fitted, strict=True):
        job.results.update(fit_summary(result, device), device=str(device))
        save_adapter(model, job.out / "adapter", name=job.name)
        log(f"[{job.name}] adapter saved to {job.out / 'adapter'} (loss {result.first_loss:.3f} -> "
            f"{result.last_loss:.3f})")
        if job.cfg.eval and job.held_out:
            set_active(model, [job.name])
            job.results["exact_match_after"] = score_rows(model, tokenizer, job.held_out, job.cfg.max_new_tokens)
            log(f"[{job.name}] held-out exact match: {job.results['exact_match_before']:.1%} -> "
                f"{job.results['exact_match_after']:.1%}")
        atomic_write_text(job.out / "results.json", json.dumps(job.results, indent=2) + "\n")
        plot_or_warn(job.out, log)
    return model, [job.results for job in jobs]
