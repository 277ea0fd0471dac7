"""The training loop: optimizer, schedule, accumulation, checkpoints and exact resume, metrics.

One optimizer step sees `batch_size * grad_accum` rows. The loss is the mean over every
supervised token of the whole step (not a mean of micro-batch means), so accumulating gives
the same update as one large batch. Micro-batch k of the run is a pure function of (rows, seed,
k), so a resumed run reads exactly the batches an uninterrupted one would have.

A checkpoint (`output_dir/checkpoint-STEP/`, written atomically, the last `keep_checkpoints`
kept) holds the trainable parameters, optimizer, schedule, RNG states (CPU, Python, and the CUDA
device's when training on one) and step: resuming from it ends with the same adapter, bit for bit on the
CPU, as a run never stopped.

A checkpoint also records the settings that make a run what it is (`RUN_KEYS`, in `run.json`): a
checkpoint written with other values there is another run's. An output_dir holding checkpoints is
refused unless `resume` is set, and resuming (`auto` or a path) refuses another run's checkpoint,
naming the first setting that differs; pruning deletes only this run's checkpoints.

Devices: batches are made on the host and moved to the trained parameters' device; `precision: auto`
is bf16 autocast on a CUDA device with bf16 support and fp32 elsewhere (`lorakit.devices`); on CUDA every
record carries the peak device memory (`peak_device_mb`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters.adalora import final_ranks, make_allocator
from lorakit.atomic import atomic_dir, atomic_write_text
from lorakit.config import TrainConfig
from lorakit.data.encode import IGNORE, collate
from lorakit.data.packing import collate_packed
from lorakit.devices import device_metrics, model_device, resolve_precision
from lorakit.quant.optim import make_optimizer
from lorakit.train import distributed
from lorakit.train.loop import loss_sum, on_device
from lorakit.train.plot import plot_ranks
from lorakit.train.tensorboard import open_tensorboard, write_scalars

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"  # in a checkpoint: the values of RUN_KEYS of the run that wrote it
RUN_KEYS = ("base", "dataset", "format", "chat_template", "train_on_prompt", "truncation", "packing", "max_length",
            "demo_train", "demo_eval", "val_size", "lora", "quant", "longlora", "optim", "seed", "batch_size")
ROWS_PER_STEP = "rows_per_step (batch_size x grad_accum x processes)"  # grad_accum may change with the processes
# RUN_KEYS and ROWS_PER_STEP: what the batches, the model and the adapter are; lr, steps, schedule may change


@dataclass
class FitResult:
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    skipped_steps: int = 0
    best_val_loss: float | None = None
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    """Multiplier of the peak lr: linear from 1/warmup up to 1, then cosine or linear down to 0 at
    `total`, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.epochs is None:
        raise ValueError("set max_steps or epochs")
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum)))


def micro_batch(rows: list, cfg: TrainConfig, pad_id: int, k: int) -> dict[str, torch.Tensor]:
    """Micro-batch k of the run: epochs of seeded shuffles, the last partial batch of each dropped."""
    size = min(cfg.batch_size, len(rows))
    per_epoch = len(rows) // size
    epoch, i = divmod(k, per_epoch)
    order = list(range(len(rows)))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    chosen = [rows[j] for j in order[i * size : (i + 1) * size]]
    return collate_packed(chosen, pad_id) if cfg.packing else collate(chosen, pad_id)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, schedule, cfg: TrainConfig,
                    save_adapter: Callable[[Path], None] | None, params: dict[str, nn.Parameter] | None = None,
                    extra: dict | None = None, write: bool = True) -> Path:
    """output_dir/checkpoint-STEP: trainer state (+ the adapter in PEFT format), atomically. `params`: the
    parameters this run trains (default: every trainable one of the model); `extra`: more state to keep
    (AdaLoRA's allocator). Under FSDP2 every rank calls this (to gather the shards); only `write` writes."""
    params = trainable(model) if params is None else params
    state = {
        "step": step,
        "params": {n: distributed.full(p).detach().clone() for n, p in params.items()},  # FSDP2: gathered
        "optimizer": distributed.full_state(optimizer.state_dict()),
        "schedule": schedule.state_dict(),
        **rng_states(next(iter(params.values())).device),
        **(extra or {}),
    }

    def fill(tmp: Path) -> None:
        torch.save(state, tmp / STATE_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(run_identity(cfg), indent=1, sort_keys=True) + "\n")
        if save_adapter is not None:
            save_adapter(tmp / "adapter")

    path = out / f"checkpoint-{step}"
    with distributed.gathered(model):  # FSDP2: the adapter whole, for save_adapter
        if write:
            atomic_dir(path, fill)
            prune_checkpoints(out, cfg.keep_checkpoints, run_identity(cfg))
    return path


def run_identity(cfg: TrainConfig) -> dict:
    """The RUN_KEYS of `cfg`, sections flattened to dotted keys (`lora.r`), and the rows per optimizer step,
    as JSON would give them back."""
    flat: dict = {ROWS_PER_STEP: cfg.batch_size * cfg.grad_accum * distributed.current(cfg.distributed).size}
    for key in RUN_KEYS:
        value = getattr(cfg, key)
        if dataclasses.is_dataclass(value):
            flat.update({f"{key}.{k}": v for k, v in dataclasses.asdict(value).items()})
        else:
            flat[key] = value
    return json.loads(json.dumps(flat))


def identity_of(checkpoint: Path) -> dict | None:
    """The run identity a checkpoint recorded, or None (written by a lorakit before run.json)."""
    try:
        return json.loads((checkpoint / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def identity_difference(saved: dict, own: dict) -> str | None:
    """The first setting in which two run identities differ, as "key: saved there, own here"; None if equal."""
    for key in sorted(set(saved) | set(own)):
        if saved.get(key, "(unset)") != own.get(key, "(unset)"):
            return f"{key} is {saved.get(key, '(unset)')!r} there, {own.get(key, '(unset)')!r} here"
    return None


def prune_checkpoints(out: Path, keep: int, identity: dict | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints of the run `identity` (default: any), and the
    remains of a deletion that a kill interrupted; each is renamed away first, so a half-deleted one is never
    taken for whole. Another run's checkpoints are left alone."""
    own = [p for p in checkpoints(out) if identity is None or identity_of(p) == identity]
    kept = set(own[-keep:])
    for path in own:
        if path not in kept:
            trash = path.with_name(f".{path.name}.deleting")
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in `out`, oldest first."""
    found = [p for p in out.glob("checkpoint-*") if (p / STATE_FILE).is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def remove_stale_temps(out: Path) -> None:
    """The remains of checkpoint writes and deletions that a kill -9 interrupted (`.checkpoint-N.*.tmp`,
    `.checkpoint-N.old`, `.checkpoint-N.deleting`): never a complete checkpoint, so never needed."""
    for path in out.glob(".checkpoint-*"):
        if path.is_dir() and path.name.endswith((".tmp", ".old", ".deleting")):
            shutil.rmtree(path, ignore_errors=True)


def resume_path(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint this run continues from (None: from the start). An output_dir holding checkpoints
    needs `resume`, and every checkpoint there, and the one resumed, must be this run's (`RUN_KEYS`)."""
    found = checkpoints(out) if out.is_dir() else []
    if cfg.resume is None:
        if found:
            raise ValueError(f"output_dir {out} holds checkpoints of an earlier run ({found[-1].name}): set "
                             "resume=auto to continue it, or choose another output_dir (a new run there would "
                             "replace that run's checkpoints and adapter)")
        return None
    if cfg.resume == "auto":
        path = found[-1] if found else None
    else:
        path = Path(cfg.resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume={cfg.resume!r}: {path / STATE_FILE} does not exist")
    own = run_identity(cfg)
    for checkpoint in dict.fromkeys([*([path] if path is not None else []), *reversed(found)]):  # resumed first
        saved = identity_of(checkpoint)
        if saved is None and checkpoint == path and cfg.resume != "auto":
            continue  # written before run.json: resumed only when named explicitly
        if saved is None:
            raise ValueError(f"{checkpoint} has no {RUN_FILE} (an older lorakit), so it cannot be told from another "
                             f"run's: name it (resume={checkpoint}) to continue from it, or use another output_dir")
        difference = identity_difference(saved, own)
        if difference is not None:
            raise ValueError(f"{checkpoint} is another run's checkpoint: {difference}; a run resumes only with the "
                             "same base, data, adapter settings, seed and rows per step (docs/CONFIG.md, `resume`); "
                             "choose another output_dir for a new run")
    return path


def truncate_metrics(path: Path, step: int, log: Callable[[str], None]) -> None:
    """Keep the records of metrics.jsonl up to `step` (the checkpoint resumed): the steps after it, done
    before the run stopped, are done again. A torn line (a kill mid-write) is dropped with a warning."""
    if not path.is_file():
        return
    kept, torn = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn.append(lineno)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if torn:
        log(f"warning: {path}: dropped unreadable line{'s' * (len(torn) > 1)} {', '.join(map(str, torn))}")
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def load_checkpoint(path: Path, model: nn.Module, optimizer, schedule,
                    params: dict[str, nn.Parameter] | None = None) -> int:
    """Restore the state saved by `save_checkpoint`; returns the step to continue from."""
    state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")  # any device: copied to the run's
    params = trainable(model) if params is None else params
    if set(state["params"]) != set(params):
        missing = sorted(set(params) ^ set(state["params"]))[0]
        raise ValueError(f"{path}: the checkpoint's trainable parameters differ from the model's (first: {missing})")
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(distributed.like(value, params[name]))  # FSDP2: this rank's shard
    optimizer.load_state_dict(distributed.sharded_state(state["optimizer"], optimizer))
    schedule.load_state_dict(state["schedule"])
    set_rng_states(state, next(iter(params.values())).device)
    return state["step"]


def rng_states(device: torch.device) -> dict:
    """The random states a resumed run needs: CPU and Python, and on CUDA the state of `device`'s generator
    (this process's GPU only: asking for every GPU's would start a CUDA context on each)."""
    states = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(state: dict, device: torch.device) -> None:
    """Put back the states `rng_states` saved; a CUDA state goes to `device` when it is a CUDA device (a
    checkpoint moved to the CPU leaves it unused)."""
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


@torch.no_grad()
def validation_loss(model: nn.Module, rows: list, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean loss per supervised token over `rows`, and its perplexity."""
    model.eval()
    total, n = 0.0, 0
    device = model_device(model)
    for i in range(0, len(rows), batch_size):
        batch = on_device(collate(rows[i : i + batch_size], pad_id), device)
        total += float(loss_sum(model, batch))
        n += int((batch["labels"][:, 1:] != IGNORE).sum())
    loss = total / max(1, n)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    """One adapter's training between optimizer steps: its optimizer and schedule (resumed from a
    checkpoint when `cfg.resume` says so), and the bookkeeping after each step: skipped non-finite
    steps, metrics.jsonl, evaluation, checkpoints, early stopping with the best parameters kept.

    `fit` drives one; `lorakit.train.multi` drives several over one base model. `params` are the
    parameters this run trains; `out` is where checkpoints are read from, and, when `write`, where
    metrics and checkpoints go.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], cfg: TrainConfig, n_rows: int,
                 out: Path | None = None, write: bool = True, evaluate: Callable[[nn.Module], dict] | None = None,
                 save_adapter: Callable[[Path], None] | None = None, param_groups: list[dict] | None = None,
                 log: Callable[[str], None] = print, world: distributed.World = distributed.SINGLE) -> None:
        if not params:
            raise ValueError("the model has no trainable parameters (inject an adapter first)")
        self.model, self.params, self.cfg, self.log = model, params, cfg, log
        self.evaluate, self.save_adapter = evaluate, save_adapter
        self.optimizer = make_optimizer(cfg.optim, param_groups or list(params.values()), lr=cfg.lr,
                                        weight_decay=cfg.weight_decay)
        self.steps = total_steps(cfg, n_rows)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                          lr_lambda(cfg.warmup_steps, self.steps, cfg.schedule))
        self.step = 0  # optimizer steps done
        self.allocator = None  # AdaLoRA's rank allocator, set by `fit`; its state is checkpointed too
        self.resumed_from = path = resume_path(cfg, out) if out is not None else None
        progress = {}
        if path is not None:
            self.step = load_checkpoint(path, model, self.optimizer, self.schedule, params)
            progress = torch.load(path / STATE_FILE, weights_only=True).get("progress", {})
            log(f"resumed from {path} at step {self.step}")
        self.start_step = self.step
        self.out = out if write else None
        self.out_dir, self.world = out, world  # FSDP2: every rank takes part in a checkpoint, rank 0 writes it
        if self.out and self.step:
            truncate_metrics(out / "metrics.jsonl", self.step, log)
        if self.out:
            remove_stale_temps(out)
        self.metrics = open(out / "metrics.jsonl", "a" if self.step else "w") if self.out else None  # noqa: SIM115
        self.tensorboard = open_tensorboard(out / "tensorboard") if self.out and cfg.tensorboard else None
        self.result = FitResult(self.steps, progress.get("first_loss", float("nan")), float("nan"), 0.0,
                                progress.get("skipped_steps", 0))  # the whole run's, across resumes
        self.bad_in_a_row, self.since_best, self.best_params = 0, 0, None
        self.stopped = False
        self.start = time.perf_counter() - progress.get("seconds", 0.0)

    @property
    def done(self) -> bool:
        return self.stopped or self.step >= self.steps

    def book(self, record: dict) -> dict:
        """Account for the step `record` (from `train_step`) reports; returns it completed."""
        cfg, result, step = self.cfg, self.result, record["step"] - 1
        if not math.isfinite(record["loss"]) or not math.isfinite(record["grad_norm"]):
            result.skipped_steps += 1
            self.bad_in_a_row += 1
            self.log(f"step {step + 1}: non-finite loss or gradient, update skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= cfg.max_bad_steps:
                raise FloatingPointError(f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                                         f"(last at step {step + 1}); lower lr or check the data")
        else:
            self.bad_in_a_row = 0
            result.first_loss = record["loss"] if math.isnan(result.first_loss) else result.first_loss
            result.last_loss = record["loss"]
        self.step = step + 1
        record["seconds"] = round(time.perf_counter() - self.start, 3)
        record["tokens_per_s"] = round(record["tokens_seen"] / max(1e-9, record.pop("step_seconds")), 1)
        due = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.steps)
        if self.evaluate is not None and due:
            record.update(self.evaluate(self.model))
            self.model.train()
            if "val_loss" in record:  # other metrics `evaluate` returns are only recorded (bench learning: exact match)
                self.track_best(record["val_loss"])
        result.history.append(record)
        if self.metrics and (step % cfg.log_every == 0 or self.step == self.steps or "val_loss" in record):
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.tensorboard is not None:
                write_scalars(self.tensorboard, record)
        collective = self.world.mode == "fsdp2" and self.out_dir is not None
        if (self.out is not None or collective) and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            self.checkpoint()
        if cfg.early_stopping_patience and self.since_best >= cfg.early_stopping_patience:
            self.log(f"early stop at step {self.step}: no better val_loss in {self.since_best} evaluations")
            result.stopped_early = self.stopped = True
        return record

    def track_best(self, val_loss: float) -> None:
        """Count evaluations since the best val_loss; keep the best parameters when early stopping."""
        if self.result.best_val_loss is None or val_loss < self.result.best_val_loss:
            self.result.best_val_loss, self.since_best = val_loss, 0
            if self.cfg.early_stopping_patience:
                self.best_params = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            self.since_best += 1

    def checkpoint(self) -> Path:
        extra = {"allocator": self.allocator.state_dict()} if self.allocator is not None else {}
        extra["progress"] = {"first_loss": self.result.first_loss, "skipped_steps": self.result.skipped_steps,
                             "seconds": time.perf_counter() - self.start}  # results.json: the whole run's
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.schedule, self.cfg,
                               self.save_adapter, self.params, extra, write=self.out is not None)

    def interrupted(self) -> None:
        """Ctrl-C: write a checkpoint of the steps done, to resume from (not under FSDP2: gathering the
        shards needs every rank, and they are stopping)."""
        if self.out is not None and self.world.mode != "fsdp2":
            path = self.checkpoint()
            self.log(f"interrupted: checkpoint written to {path}; resume with resume=auto")

    def close(self) -> FitResult:
        """Close metrics.jsonl and put the best parameters back (early stopping); the run's result."""
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.best_params is not None:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.best_params[name])
            self.log(f"kept the best adapter (val_loss {self.result.best_val_loss:.4f})")
            self.best_params = None
        self.result.seconds = time.perf_counter() - self.start
        self.result.steps = self.step  # the steps run: fewer than planned after early stopping or an interrupt
        return self.result


def fit(
    model: nn.Module,
    rows: list[tuple[list[int], list[int]]],
    cfg: TrainConfig,
    pad_id: int,
    out: Path | None = None,
    evaluate: Callable[[nn.Module], dict] | None = None,
    save_adapter: Callable[[Path], None] | None = None,
    param_groups: list[dict] | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train the model's trainable parameters on encoded rows.

    `out`: where metrics.jsonl and checkpoints go (None: nowhere). `evaluate(model)` returns
    metrics every `eval_every` steps and at the last: a "val_loss" there drives early stopping and the
    best parameters kept; every metric is recorded in the step's record. `param_groups` replaces the
    default single group (LoRA+). Ctrl-C writes a checkpoint before it stops the run.
    """
    torch.manual_seed(cfg.seed)
    world = distributed.current(cfg.distributed)  # distributed: one step reads world.size x the rows
    names = {id(p): n for n, p in model.named_parameters()}
    net = distributed.wrap(model, world)  # DDP all-reduces adapter gradients; FSDP2 shards the model in place,
    param_groups = distributed.regroup(param_groups, names, model)  # with new parameter objects: the optimizer after
    run = Run(model, trainable(model), cfg, len(rows) // world.size, out=out, write=world.main, evaluate=evaluate,
              save_adapter=save_adapter, param_groups=param_groups, log=log,
              world=world)  # metrics, checkpoints: rank 0
    params = list(run.params.values())
    allocator = make_allocator(model, run.steps)  # AdaLoRA: rank allocation and orthogonal regularization; else None
    if allocator is not None:
        run.allocator = allocator
        if run.resumed_from is not None:
            resume_allocator(allocator, run.resumed_from)
    model.train()
    bar = tqdm(range(run.start_step, run.steps), desc="train", dynamic_ncols=True, initial=run.start_step,
               total=run.steps, disable=not world.main)
    try:
        for step in bar:
            record = run.book(train_step(net, rows, cfg, pad_id, step, params, run.optimizer, run.schedule, world,
                                         allocator))
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=record["tokens_per_s"],
                            **({"mem_mb": record["peak_device_mb"]} if "peak_device_mb" in record else {}))
            if run.stopped:  # early stop; the last step ends the loop itself, so the bar shows N/N
                break
    except KeyboardInterrupt:
        run.interrupted()
        raise
    finally:
        result = run.close()
        model.eval()
    if allocator is not None and run.out is not None:  # AdaLoRA: where the budget went
        plot_ranks(final_ranks(model, allocator.name), run.out / "adalora_ranks.png", log=log)
    return result


def resume_allocator(allocator, checkpoint: Path) -> None:
    """Put AdaLoRA's allocator back as the checkpoint saved it (EMAs and masks)."""
    state = torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
    if "allocator" not in state:
        raise ValueError(f"{checkpoint / STATE_FILE}: no AdaLoRA allocator state (written by an older lorakit?); "
                         "resuming would restart the importance scores, so start the run again")
    allocator.load_state_dict(state["allocator"])


def train_step(model, rows, cfg: TrainConfig, pad_id: int, step: int, params, optimizer, schedule,
               world: distributed.World = distributed.SINGLE, allocator=None) -> dict:
    """One optimizer step over `grad_accum` micro-batches (on each rank); a non-finite step changes nothing.

    Distributed, the loss is normalised by the supervised tokens of all ranks and scaled by the
    world size, which DDP's gradient averaging divides out again.
    """
    t = time.perf_counter()
    device = params[0].device
    bf16 = resolve_precision(cfg.precision, device) == "bf16"
    indices = distributed.micro_indices(step, cfg.grad_accum, world)
    micro = [on_device(micro_batch(rows, cfg, pad_id, k), device) for k in indices]
    n_tokens = int(distributed.all_sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro), world))
    total = 0.0
    for i, b in enumerate(micro):
        with distributed.sync_gradients(model, last=i == len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                ddp = isinstance(model, nn.parallel.DistributedDataParallel)  # around a StepLoss (loss_sum)
                loss = (model(b) if ddp else loss_sum(model, b)) / max(1, n_tokens)
            if allocator is not None:  # AdaLoRA: the orthogonal regularization, once per step over all micro-batches
                loss = loss + allocator.orth_loss() / (len(micro) * world.size)
            (loss * world.size).backward()
        total += loss.item()
    total = distributed.all_sum(total, world)
    grad_norm = distributed.grad_norm(params, cfg.max_grad_norm)
    if math.isfinite(total) and math.isfinite(grad_norm):
        optimizer.step()
        if allocator is not None:  # AdaLoRA: update importance, mask to the budget (PEFT: after the step)
            allocator.step(step + 1)
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": total, "lr": schedule.get_last_lr()[0], "grad_norm": round(grad_norm, 6),
            "tokens": n_tokens, "tokens_seen": sum(int(b["lengths"].sum()) for b in micro),
            "step_seconds": time.perf_counter() - t, "peak_rss_mb": round(peak_rss_mb(), 1), **device_metrics(device)}
