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
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lorakit_bench.settings import parse_settings

# name -> (what trains, settings). Learning rates: the demo's 2e-3 for the adapters and BitFit; full
# fine-tuning at 5e-5 (2e-3 diverges on every weight); LoRA+ at 1e-3 with B at 16x (the paper's ratio).
VARIANTS: dict[str, dict] = {
    "full": {"label": "full fine-tuning", "train": "full", "lr": 5e-5},
    "bitfit": {"label": "BitFit (bias/norm)", "train": "bitfit", "lr": 2e-3},
    "lora": {"label": "LoRA r=8", "lora": {"r": 8, "alpha": 16}, "lr": 2e-3},
    "rslora": {"label": "rsLoRA r=64", "lora": {"r": 64, "alpha": 16, "rslora": True}, "lr": 2e-3},
    "dora": {"label": "DoRA r=8", "lora": {"r": 8, "alpha": 16, "kind": "dora"}, "lr": 2e-3},
    "adalora": {"label": "AdaLoRA r=12 -> 8", "lora": {"r": 12, "alpha": 16, "kind": "adalora"}, "lr": 2e-3,
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

def tiny_model_and_tokenizer(seed: int):
    """A tiny random Llama and a character-level ChatML tokenizer (ids < 128) for --quick."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorakit.data.encode import CHAT_TEMPLATES

    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "<|im_end|>": 1, "<|im_start|>": 2, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = 1
    return model, tok


def set_trainable(model, variant: dict, seed: int):
    """Make the variant's parameters trainable (inject its adapter); returns its LoRA spec or None."""
    import torch

    from lorakit.adapters.inject import inject
    from lorakit.config import AdaLoraSpec, LoraSpec

    model.requires_grad_(False)
    if variant.get("train") == "full":
        model.requires_grad_(True)
        return None
    if variant.get("train") == "bitfit":  # biases and normalization scales only
        norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
        for module in norms:
            module.requires_grad_(True)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        return None
    ada = AdaLoraSpec(**variant["adalora"]) if "adalora" in variant else None
    spec = LoraSpec(**variant["lora"], adalora=ada)
    torch.manual_seed(seed)
    inject(model, spec)
    return spec


def train_variant(request: dict) -> dict:
    """Train one variant as `request` says; its figures and loss curve."""
    import torch

    from lorakit.adapters.loraplus import loraplus_param_groups
    from lorakit.config import TrainConfig
    from lorakit.data.demo import make_demo
    from lorakit.data.encode import encode_all
    from lorakit.generate import score_rows
    from lorakit.models import load
    from lorakit.train.fit import fit
    from lorakit_bench.measure import peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(request["threads"])
    variant, seed = VARIANTS[request["variant"]], request["seed"]
    model, tokenizer = tiny_model_and_tokenizer(seed) if request["quick"] else load("default")
    train, held_out = make_demo(seed, n_train=request["n_train"], n_eval=request["n_eval"])
    cfg = TrainConfig(max_steps=request["steps"], lr=variant["lr"], loraplus_ratio=variant.get("loraplus_ratio"),
                      seed=seed, eval=False, warmup_steps=min(5, request["steps"] // 4))
    rows = encode_all(tokenizer, train, cfg.max_length, warn=lambda _m: None)
    spec = set_trainable(model, variant, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    groups = loraplus_param_groups(model, cfg.lr, cfg.loraplus_ratio, None, cfg.weight_decay) \
        if cfg.loraplus_ratio else None
    setup_rss = peak_rss_bytes()
    reset_peak_rss()
    result = fit(model, rows, cfg, tokenizer.pad_token_id, param_groups=groups, log=lambda _m: None)
    train_rss = peak_rss_bytes()
    ends = [r["seconds"] for r in result.history]
    step_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # the first step (allocations) left out
    t = time.perf_counter()
    exact = score_rows(model, tokenizer, held_out, cfg.max_new_tokens)
    record = {
        "variant": request["variant"], "label": variant["label"], "lr": variant["lr"],
        "exact_match": exact, "trainable_params": trainable, "total_params": total,
        "step_s": statistics.median(step_s) if step_s else result.seconds, "train_s": result.seconds,
        "peak_rss": train_rss, "setup_peak_rss": setup_rss, "eval_s": time.perf_counter() - t,
        "first_loss": result.first_loss, "last_loss": result.last_loss,
        "losses": [r["loss"] for r in result.history],
    }
    if spec is not None and spec.kind == "adalora":
        from lorakit.adapters.adalora import final_ranks

        ranks = final_ranks(model, "default")
        record["adalora_total_rank"] = sum(ranks.values())
        record["adalora_target_rank"] = spec.adalora.target_r * len(ranks)
    return record


def run_variant_process(request: dict) -> dict:
    """`train_variant` in a fresh Python process (its peak RSS its own); the record it prints."""
    threads = str(request["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, "-m", "lorakit_bench.variants", json.dumps(request)],
                          capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"variant {request['variant']} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


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
        record = train_variant(request) if args.quick else run_variant_process(request)
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
