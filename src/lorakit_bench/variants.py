"""`lorakit bench variants`: LoRA's family against full fine-tuning and BitFit on the demo task.

Every variant trains the default model on the built-in demo task (ISO date -> long form) for the
same number of steps with the same seed, batch and data order, each in a fresh Python process of
its own (so its peak RSS is its own; --quick: a tiny random model, all in this process); then
held-out exact match is scored by greedy generation. AdaLoRA's loss includes its orthogonal
regularization (as it is trained).
The table lists held-out exact match, trainable parameters, median step time (and its ratio to
LoRA r=8) and peak RSS during training; a PNG holds the loss curves.

A second part times one training step of DoRA against LoRA, lorakit and PEFT side by side in one
process (alternating repetitions, the same batch): the issue's target is lorakit DoRA <= 1.2x
lorakit LoRA.

Settings (`--set KEY=VALUE`): steps (default 30, the demo's), variants (comma list, default all),
n_train (1000), n_eval (100), plot (PNG path, default variants-loss.png), dora (1: time the DoRA
step; 0: skip), peft (1: with PEFT's sides; 0: lorakit only), seq (128: tokens per row of the DoRA
step timing). `variants=` (empty) runs the DoRA timing alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lorakit.config import ADALORA_LR
from lorakit_bench.finetune import run_in_process, tiny_model_and_tokenizer, train_method
from lorakit_bench.settings import parse_settings

__all__ = ["VARIANTS", "run", "tiny_model_and_tokenizer", "train_variant"]  # the tiny model: tests build it too

# name -> (what trains, settings). Learning rates: the demo's 2e-3 for the adapters and BitFit; full
# fine-tuning at 5e-5 (2e-3 diverges on every weight); LoRA+ at 1e-3 with B at 16x (the paper's ratio);
# AdaLoRA at its own default, 1e-2 (`config.ADALORA_LR`: at 2e-3 it reached 59% in 30 steps).
VARIANTS: dict[str, dict] = {
    "full": {"label": "full fine-tuning", "train": "full", "lr": 5e-5},
    "bitfit": {"label": "BitFit (bias/norm)", "train": "bitfit", "lr": 2e-3},
    "lora": {"label": "LoRA r=8", "lora": {"r": 8, "alpha": 16}, "lr": 2e-3},
    "rslora": {"label": "rsLoRA r=64", "lora": {"r": 64, "alpha": 16, "rslora": True}, "lr": 2e-3},
    "dora": {"label": "DoRA r=8", "lora": {"r": 8, "alpha": 16, "kind": "dora"}, "lr": 2e-3},
    "adalora": {"label": "AdaLoRA r=12 -> 8", "lora": {"r": 12, "alpha": 16, "kind": "adalora"}, "lr": ADALORA_LR,
                "adalora": {"target_r": 8}},
    "loraplus": {"label": "LoRA+ r=8 (ratio 16)", "lora": {"r": 8, "alpha": 16}, "lr": 1e-3, "loraplus_ratio": 16.0},
}
MIB = 1 << 20


def settings(args: argparse.Namespace) -> dict:
    known = {"steps": 30, "variants": ",".join(VARIANTS), "n_train": 1000, "n_eval": 100,
             "plot": "variants-loss.png", "dora": 1, "peft": 1, "seq": 128}
    out = parse_settings("variants", getattr(args, "set", None), known)
    names = [n for n in out["variants"].split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--set variants: unknown {unknown}; known: {list(VARIANTS)}")
    out["variants"] = names
    if args.quick:
        out.update(steps=min(out["steps"], 4), n_train=16, n_eval=4, seq=16)
    return out


# ---- one variant, in its own process -------------------------------------------------------------

def train_variant(request: dict) -> dict:
    """Train one variant as `request` says (the demo task); its figures, loss curve and held-out exact match."""
    from lorakit.generate import score_rows

    variant = VARIANTS[request["variant"]]
    trained = train_method(variant, request)
    t = time.perf_counter()
    exact = score_rows(trained.model, trained.tokenizer, trained.held_out, trained.max_new_tokens)
    return {"variant": request["variant"], "label": variant["label"], **trained.record, "exact_match": exact,
            "eval_s": time.perf_counter() - t}


# ---- DoRA vs LoRA step time, lorakit and PEFT ----------------------------------------------------

def dora_step_times(quick: bool, threads: int, reps: int, warmup: int, seq: int, peft: bool) -> dict[str, float]:
    """Median seconds of one training step (AdamW, clipping) per side, alternating in one process."""
    import dataclasses

    import lorakit
    from lorakit.config import LoraSpec
    from lorakit.train.loop import loss_sum
    from lorakit_bench.measure import medians, time_sides
    from lorakit_bench.ours import train_step_task
    from lorakit_bench.workload import QUICK, Workload, load_base, make_batch, resolve_model, supervised_tokens

    w = Workload(batch=8, seq=seq, r=8, alpha=16.0, threads=threads)
    if quick:
        w = dataclasses.replace(w, **{**QUICK, "r": 8, "alpha": 16.0})
    w = resolve_model(w)

    def ours(kind: str):
        def build():
            model = load_base(w)
            lorakit.inject(model, LoraSpec(r=w.r, alpha=w.alpha, targets=w.targets, kind=kind))
            model.train()
            batch = make_batch(w, model.config.vocab_size)
            n = supervised_tokens(batch)
            return train_step_task(model, batch, w.lr, lambda: loss_sum(model, batch) / n)
        return build

    def theirs(use_dora: bool):
        def build():
            from lorakit_bench.peers import need

            peft_lib = need("peft")
            config = peft_lib.LoraConfig(r=w.r, lora_alpha=w.alpha, target_modules=w.targets, use_dora=use_dora,
                                         task_type="CAUSAL_LM")
            model = peft_lib.get_peft_model(load_base(w), config)
            model.train()
            batch = make_batch(w, model.config.vocab_size)
            return train_step_task(model, batch, w.lr, lambda: model(**batch, use_cache=False).loss)
        return build

    builders = {"lorakit LoRA": ours("lora"), "lorakit DoRA": ours("dora")}
    if peft:
        builders |= {"PEFT LoRA": theirs(False), "PEFT DoRA": theirs(True)}
    tasks = {name: build() for name, build in builders.items()}
    return {name: medians(samples)["seconds"] for name, samples in time_sides(tasks, reps, warmup).items()}


# ---- the suite -----------------------------------------------------------------------------------

def plot_losses(records: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for r in records:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["label"], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss per supervised token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def table(records: list[dict], dora: dict[str, float]) -> str:
    base = next((r for r in records if r["variant"] == "lora"), records[0] if records else None)
    header = ["| variant | lr | held-out exact match | trainable params | % of model | step s | x LoRA step "
              "| peak RSS MiB | loss first -> last |", "|" + "---|" * 9]
    lines = header if records else []
    for r in records:
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['exact_match']:.0%} | {r['trainable_params']:,} "
                     f"| {100 * r['trainable_params'] / r['total_params']:.2f} | {r['step_s']:.3f} "
                     f"| {r['step_s'] / base['step_s']:.2f} | {r['peak_rss'] / MIB:.0f} "
                     f"| {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    if dora:
        lines += ["", "| training step (same batch, alternating) | median s | x lorakit LoRA |", "|---|---|---|"]
        unit = dora["lorakit LoRA"]
        lines += [f"| {name} | {s:.3f} | {s / unit:.2f} |" for name, s in dora.items()]
        if "PEFT DoRA" in dora:
            lines += ["", f"lorakit DoRA / PEFT DoRA: {dora['lorakit DoRA'] / dora['PEFT DoRA']:.2f}; "
                          f"PEFT DoRA / PEFT LoRA: {dora['PEFT DoRA'] / dora['PEFT LoRA']:.2f}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict]:
    """Train every variant (one process each), time DoRA's step, print the table, draw the loss plot."""
    from lorakit_bench.report import environment, write_records

    s = settings(args)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or 2
    env = {**environment(threads), "loadavg_before": list(os.getloadavg())}
    records = []
    for name in s["variants"]:
        request = {"variant": name, "quick": bool(args.quick), "steps": s["steps"], "n_train": s["n_train"],
                   "n_eval": s["n_eval"], "seed": 0, "threads": threads}
        record = train_variant(request) if args.quick else run_in_process("lorakit_bench.variants", request)
        print(f"{record['label']}: exact match {record['exact_match']:.0%}, {record['step_s']:.3f} s/step, "
              f"peak RSS {record['peak_rss'] / MIB:.0f} MiB (load {os.getloadavg()[0]:.1f})", flush=True)
        records.append(record)
    dora = dora_step_times(bool(args.quick), threads, args.reps, args.warmup, s["seq"], bool(s["peft"])) \
        if s["dora"] else {}
    env["loadavg_after"] = list(os.getloadavg())
    config = {k: v for k, v in s.items() if k != "plot"} | {"model": "tiny" if args.quick else "default"}
    title = f"demo task, {s['steps']} steps, batch 8, seed 0 ({config['model']} model)"
    plot = plot_losses(records, Path(s["plot"]), title) if records else None
    print(table(records, dora))
    print(f"\nloss plot: {plot}; load average before {env['loadavg_before']}, after {env['loadavg_after']}")
    out = [{"suite": "variants", **r, "config": config, "env": env} for r in records]
    if dora:
        out.append({"suite": "variants", "dora_step_s": dora, "config": config, "env": env})
    if args.json:
        write_records(args.json, out)
    return out


if __name__ == "__main__":
    print(json.dumps(train_variant(json.loads(sys.argv[1]))))
