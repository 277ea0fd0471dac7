"""Context extension with LongLoRA, measured: perplexity by position and passkey retrieval, before and after.

Stages (each writes OUT/<stage>.json; `all` runs before, train, after):
  before  the base model as shipped (native RoPE), evaluated on held-out long text
  pi      the base with position interpolation only (no training): what the training adds beyond it
  train   LongLoRA: RoPE interpolated to --target-context, S2-Attn, LoRA + embeddings + norms trained on
          sequences of --train-length tokens of standard-library source (the training split)
  after   the trained adapter (full attention, interpolated RoPE restored from the adapter)
  report  the Markdown tables of whatever stages exist

Evaluation: perplexity of every token of --eval-docs held-out sequences of --eval-length tokens, by
position bucket of --bucket tokens; passkey retrieval (greedy) at each --passkey LENGTH@DEPTH.

    python scripts/longlora_extend.py --out runs/longlora all            # before, train, after
    python scripts/longlora_extend.py --out runs/longlora pi             # optional baseline
    python scripts/longlora_extend.py --out runs/longlora report

Stages can run in separate processes (e.g. the passkeys of `after` beside its perplexity:
`--out runs/pk --adapter runs/longlora/adapter after --eval-docs 0`, then `report --more runs/pk`).
A 16k-token forward of the default model takes minutes on a CPU; on a GPU, raise --steps,
--train-length (up to --target-context) and --eval-docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def env(args: argparse.Namespace) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
            "argv": sys.argv[1:]}


def evaluate(model, tokenizer, args: argparse.Namespace, name: str) -> dict:
    from lorakit.data.longtext import long_sequences, passkey_prompt
    from lorakit.longlora import bucket_perplexity, passkey_retrieved, token_nll

    result = {"stage": name, "env_start": env(args), "perplexity": [], "passkey": []}
    edges = list(range(0, args.eval_length + 1, args.bucket))
    docs = long_sequences(tokenizer, args.eval_length, args.eval_docs, split="held-out") if args.eval_docs else []
    for i, ids in enumerate(docs):
        t = time.perf_counter()
        nll = token_nll(model, ids)
        ppl = bucket_perplexity(nll, edges)
        result["perplexity"].append({"doc": i, "buckets": ppl, "seconds": round(time.perf_counter() - t, 1),
                                     "nll": [round(x, 4) for x in nll.tolist()]})  # to re-bucket later
        log(f"{name}: doc {i} perplexity by position {ppl} ({time.perf_counter() - t:.0f}s)")
    rng = random.Random(args.seed)
    for length, depth in args.passkey:
        key = rng.randrange(10000, 100000)
        prompt, answer = passkey_prompt(tokenizer, length, depth, key)
        t = time.perf_counter()
        ok, predicted = passkey_retrieved(model, prompt, answer)
        seconds = round(time.perf_counter() - t, 1)
        result["passkey"].append({"length": length, "depth": depth, "key": key, "retrieved": ok,
                                  "predicted": tokenizer.decode(predicted), "seconds": seconds})
        log(f"{name}: passkey length {length} depth {depth}: {'OK' if ok else 'miss'} "
            f"(key {key}, predicted {tokenizer.decode(predicted)!r}, {time.perf_counter() - t:.0f}s)")
    result["env_end"] = env(args)
    return result


def train_config(args: argparse.Namespace):
    from lorakit.config import load_train_config

    return load_train_config(None, [
        f"base={args.base}", f"output_dir={args.out / 'train'}", f"max_steps={args.steps}", f"lr={args.lr}",
        f"warmup_steps={args.warmup_steps}", "schedule=constant", "batch_size=1", f"max_length={args.train_length}",
        f"lora.r={args.r}", f"lora.alpha={2 * args.r}", f"lora.targets=[{args.targets}]", "eval=false",
        "gradient_checkpointing=true", f"longlora.group_size_ratio={args.group_size_ratio}",
        f"longlora.target_context={args.target_context}", "longlora.trainable=[embed, norm]", f"seed={args.seed}",
    ])  # fmt: skip


def train(args: argparse.Namespace) -> dict:
    """A LongLoRA run, as `lorakit train` does it (prepare_base, modules_to_save, fit, save) on long-text rows."""
    from lorakit.adapters.inject import inject, trainable_report
    from lorakit.adapters.io import save_adapter
    from lorakit.data.longtext import as_rows, long_sequences
    from lorakit.longlora import trainable_module_names
    from lorakit.models import load
    from lorakit.train.fit import fit
    from lorakit.train.run import prepare_base

    cfg = train_config(args)
    model, tokenizer = load(cfg.base)
    prepare_base(model, cfg)  # S2-Attn, RoPE interpolation, gradient checkpointing
    rows = as_rows(long_sequences(tokenizer, args.train_length, args.steps, split="train", seed=args.seed))
    extra = trainable_module_names(model, cfg.longlora.trainable)
    torch.manual_seed(cfg.seed)
    inject(model, dataclasses.replace(cfg.lora, modules_to_save=extra))
    log(trainable_report(model))
    start = env(args)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    fitted = fit(model, rows, cfg, tokenizer.pad_token_id, out=Path(cfg.output_dir), log=log)
    save_adapter(model, args.out / "adapter")
    log(f"adapter saved to {args.out / 'adapter'}: {fitted.steps} steps in {fitted.seconds:.0f}s, "
        f"loss {fitted.first_loss:.3f} -> {fitted.last_loss:.3f}")
    return {"stage": "train", "env_start": start, "env_end": env(args), "steps": fitted.steps,
            "seconds": round(fitted.seconds, 1), "first_loss": fitted.first_loss, "last_loss": fitted.last_loss,
            "losses": [h.get("loss") for h in fitted.history], "rope": model.config.rope_parameters}


def load_stage(args: argparse.Namespace, stage: str):
    from lorakit.cli import load_with_adapter
    from lorakit.longlora import interpolate_positions
    from lorakit.models import load

    if stage == "after":
        return load_with_adapter(None, str(args.adapter or args.out / "adapter"))
    model, tokenizer = load(args.base)
    if stage == "pi":
        interpolate_positions(model, args.target_context)
    return model, tokenizer


def gather(folders: list[Path]) -> dict[str, dict]:
    """Each stage's results from OUT and any --more folders (e.g. passkeys run in a separate process)."""
    found: dict[str, dict] = {}
    for folder in folders:
        for stage in STAGES:
            path = folder / f"{stage}.json"
            if not path.exists():
                continue
            r = json.loads(path.read_text())
            if stage not in found:
                found[stage] = r
            elif stage != "train":  # the first folder's training run is the one reported
                found[stage]["perplexity"] += r["perplexity"]
                found[stage]["passkey"] += r["passkey"]
                found[stage].setdefault("runs", []).append(r["env_start"])
    return found


def report(args: argparse.Namespace) -> str:
    found = gather([args.out, *args.more])
    evals = {s: r for s, r in found.items() if s != "train"}
    lines = []
    scored = {s: r for s, r in evals.items() if r["perplexity"]}
    if scored:
        buckets = list(next(iter(scored.values()))["perplexity"][0]["buckets"])
        lines += ["| model | " + " | ".join(f"ppl @ {b}" for b in buckets) + " |", "|---|" + "---|" * len(buckets)]
        for stage, r in scored.items():
            ppl = [sum(d["buckets"][b] for d in r["perplexity"]) / len(r["perplexity"]) for b in buckets]
            lines.append(f"| {LABELS[stage]} | " + " | ".join(f"{p:.2f}" for p in ppl) + " |")
    keyed = {s: r for s, r in evals.items() if r["passkey"]}
    if keyed:
        trials = next(iter(keyed.values()))["passkey"]
        lines += ["", "| model | " + " | ".join(f"passkey {p['length']} @ {p['depth']}" for p in trials)
                  + " | retrieved |", "|---|" + "---|" * (len(trials) + 1)]
        for stage, r in keyed.items():
            cells = [f"{'yes' if p['retrieved'] else 'no'} ({p['predicted'].strip()!r} for {p['key']})"
                     for p in r["passkey"]]
            hits = sum(p["retrieved"] for p in r["passkey"])
            lines.append(f"| {LABELS[stage]} | " + " | ".join(cells) + f" | {hits}/{len(r['passkey'])} |")
    if "train" in found:
        t = found["train"]
        lines += ["", f"training: {t['steps']} steps in {t['seconds']:.0f}s, loss {t['first_loss']:.3f} -> "
                  f"{t['last_loss']:.3f}; losses {[round(x, 3) for x in t['losses'] if x is not None]}"]
    for stage, r in found.items():
        start, end = r["env_start"], r["env_end"]
        load = lambda e: tuple(round(x, 2) for x in e["loadavg"])
        lines.append(f"{stage}: started {start['date']}, torch {start['torch']}, threads {start['threads']}, "
                     f"load average {load(start)} -> {load(end)}")
    return "\n".join(lines)


STAGES = ("before", "pi", "train", "after")
LABELS = {"before": "base (native RoPE)", "pi": "base + interpolation, untrained", "after": "LongLoRA adapter"}


def trials(text: str) -> list[tuple[int, float]]:
    found = []
    for item in filter(None, text.split(",")):
        length, sep, depth = item.partition("@")
        if not sep:
            raise argparse.ArgumentTypeError(f"passkey trial {item!r} is not LENGTH@DEPTH")
        found.append((int(length), float(depth)))
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="+", choices=[*STAGES, "all", "report"])
    p.add_argument("--out", type=Path, default=Path("runs/longlora-extend"))
    p.add_argument("--more", type=Path, action="append", default=[], help="report: another result folder to merge in")
    p.add_argument("--base", default="default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-context", type=int, default=16384, help="RoPE interpolated to this (factor = / native)")
    p.add_argument("--eval-length", type=int, default=16384)
    p.add_argument("--eval-docs", type=int, default=1, help="held-out sequences for perplexity (0: none)")
    p.add_argument("--bucket", type=int, default=4096, help="perplexity per bucket of this many positions")
    p.add_argument("--adapter", type=Path, help="the adapter the after stage evaluates (default: OUT/adapter)")
    p.add_argument("--passkey", type=trials, default=trials("2048@0.25,2048@0.75,10240@0.5"),
                   help="passkey trials LENGTH@DEPTH,... (depth 0 = start of the filler, 1 = end)")
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--group-size-ratio", type=float, default=0.25)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in (["before", "train", "after"] if "all" in args.stages else args.stages) if s != "report"]
    for stage in stages:
        log(f"stage {stage}")
        if stage == "train":
            result = train(args)
        else:
            model, tokenizer = load_stage(args, stage)
            result = evaluate(model, tokenizer, args, stage)
            del model
        (args.out / f"{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
