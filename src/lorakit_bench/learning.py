"""`lorakit bench learning`: learning curves of LoRA's family, full fine-tuning and BitFit, on built-in tasks,
over seeds, with a learning-rate sweep.

Each (task, method, lr, seed) is one training run of the default model (`steps` steps, cosine schedule over the
run, batch `batch`) in a fresh process of its own (`finetune.run_in_process`; --quick: a tiny random model, in
this process). Held-out exact match (greedy generation, the task's scorer) is measured at the `evals` steps of
that one run, so a curve is one run seen at several points, not separate runs. The table gives each method's
mean and spread (sample standard deviation) over seeds at every eval step; the PNGs draw the curves (mean, with
the seeds' range shaded) and final exact match against the learning rate.

Step 0 is the base model itself for every method whose fresh adapter leaves the model's function exactly as it
was (B = 0; AdaLoRA's E = 0; DoRA's magnitude is the norm it divides by; full FT and BitFit before their first
step): it is measured once per (task, seed), by the first such run, and the later ones copy it (`step0_from`:
"measured" or "shared"). PiSSA (the base keeps a residual: the same model in exact arithmetic only) and QLoRA
(a 4-bit base) measure their own.

Order: every method on every task for the first seed, then the next seeds, then the lr sweep (`sweep` methods at
`sweep_lrs`, beside the method's own lr from the main runs), so a stopped run has already given the most useful
part. Resumable: `--json FILE` gets one JSON line per finished run, appended as it finishes; rerun with the same
FILE to skip the runs it holds (a FILE holding runs made with other settings is refused).

The budget (about two hours on two idle CPU cores; docs/RESULTS.md): 14 methods x 2 tasks x 3 seeds + 2 methods x
2 other lrs x 2 tasks x 3 seeds = 108 runs of about 70 s each: process start and model load ~8 s, 32 steps of 4
rows (under 100 tokens each) at ~1.3 s, four evaluations of 50 held-out rows at ~6 s. Batch 4 rather than the
demo's 8 buys twice the steps per second; the eval points crowd the first steps, where the methods differ (the
demo and json are learned within about 16 steps; units and roman are not learned in 32: 6% -> 10%). The harder
`units` task at 64 steps (`--set tasks=units --set steps=64 --set evals=0,8,16,32,64`, 54 runs) took 80 minutes
with `--threads 1 --set jobs=2` on the idle machine (2026-12-05): 147-317 s a run, two at once (docs/RESULTS.md).

Settings (`--set KEY=VALUE`, lists comma-separated): tasks (demo,json), methods (all of METHODS), seeds (0,1,2),
steps (32), evals (0,4,8,16,32; the last must be `steps`), n_train (1000), n_eval (50), batch (4), sweep (lora,dora),
sweep_lrs (5e-4,8e-3), plot (learning-curves.png; the lr plot beside it, -lr.png), table (learning.md),
max_runs (-1: every planned run not yet done; N: at most N of them now; 0: only the table and plots of the runs
done, reading --json without writing it, so it can report while another invocation is still appending), jobs (1:
runs at once, each in its own process with --threads threads; on two cores `--threads 1 --set jobs=2`: the
default model's small matrices keep a second thread of one run half idle).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from lorakit_bench.finetune import run_in_process, train_method
from lorakit_bench.settings import parse_settings
from lorakit_bench.variants import VARIANTS

LORA_LR = VARIANTS["lora"]["lr"]


def lora(label: str, r: int, **spec) -> dict:
    return {"label": label, "lora": {"r": r, "alpha": 16, **spec}, "lr": LORA_LR}


# The paper's claims each compare two of these (docs/RESULTS.md): LoRA at several ranks with alpha fixed at 16
# (alpha/r scaling), rsLoRA at the highest, DoRA at r and r/2, AdaLoRA at LoRA r=8's final budget. The methods
# `bench variants` also runs keep its recipes (one place for each).
METHODS: dict[str, dict] = {
    "full": VARIANTS["full"],
    "bitfit": VARIANTS["bitfit"],
    "lora_r1": lora("LoRA r=1", 1),
    "lora_r4": lora("LoRA r=4", 4),
    "lora": VARIANTS["lora"],
    "lora_r16": lora("LoRA r=16", 16),
    "lora_r64": lora("LoRA r=64", 64),
    "rslora": VARIANTS["rslora"],
    "dora_r4": lora("DoRA r=4", 4, kind="dora"),
    "dora": VARIANTS["dora"],
    "adalora": VARIANTS["adalora"],
    "loraplus": VARIANTS["loraplus"],
    "pissa": lora("PiSSA r=8", 8, init="pissa"),
    "qlora": {**lora("QLoRA r=8 (NF4+DQ)", 8), "quant": {"type": "nf4", "double_quant": True}},
}
OWN_STEP0 = ("pissa", "qlora")  # step 0 is not exactly the base model: measured in the run itself
CONFIG_KEYS = ("steps", "evals", "n_train", "n_eval", "batch")  # what makes one run's figures comparable to another's
MIB = 1 << 20


def settings(args: argparse.Namespace) -> dict:
    known = {"tasks": ["demo", "json"], "methods": list(METHODS), "seeds": [0, 1, 2], "steps": 32,
             "evals": [0, 4, 8, 16, 32], "n_train": 1000, "n_eval": 50, "batch": 4, "sweep": ["lora", "dora"],
             "sweep_lrs": [5e-4, 8e-3], "plot": "learning-curves.png", "table": "learning.md", "max_runs": -1,
             "jobs": 1}
    quick = {"steps": 4, "evals": [0, 2, 4], "n_train": 16, "n_eval": 4, "seeds": [0, 1]} if args.quick else None
    out = parse_settings("learning", getattr(args, "set", None), known, quick)
    from lorakit.data.tasks import TASKS

    for key, known_names in (("methods", METHODS), ("sweep", METHODS), ("tasks", TASKS)):
        unknown = [n for n in out[key] if n not in known_names]
        if unknown:
            raise ValueError(f"bench learning: --set {key}: unknown {unknown}; known: {list(known_names)}")
    if out["jobs"] < 1:
        raise ValueError(f"bench learning: --set jobs={out['jobs']}: at least 1 run at a time")
    evals = out["evals"]
    if evals != sorted(set(evals)) or evals[0] < 0 or evals[-1] != out["steps"]:
        raise ValueError(f"bench learning: evals must rise from >= 0 to steps={out['steps']}, got {evals}")
    return out


def run_key(record: dict) -> tuple:
    return record["task"], record["method"], record["lr"], record["seed"]


def planned_runs(s: dict) -> list[tuple]:
    """(task, method, lr, seed) in the order they run: the first seed of every method on every task, then the
    other seeds, then the lr sweep (its own lr excluded: the main runs have it)."""
    main = [(task, m, METHODS[m]["lr"], seed) for seed in s["seeds"] for task in s["tasks"] for m in s["methods"]]
    sweep = [(task, m, lr, seed) for seed in s["seeds"] for task in s["tasks"] for m in s["sweep"]
             for lr in s["sweep_lrs"] if lr != METHODS[m]["lr"]]
    return list(dict.fromkeys(main + sweep))


# ---- one run, in its own process -----------------------------------------------------------------

def train_run(request: dict) -> dict:
    """Train one (task, method, lr, seed) as `request` says, scoring held-out exact match at its eval steps."""
    from lorakit.generate import score_rows

    evals, steps = request["evals"], request["steps"]
    every = math.gcd(*[e for e in evals if e > 0]) if any(evals) else None
    curve: dict[int, float] = {}
    state = {"calls": 0, "eval_s": 0.0}

    def score(model, step: int) -> dict:
        t = time.perf_counter()
        curve[step] = score_rows(model, state["tokenizer"], state["held_out"], state["max_new_tokens"])
        state["eval_s"] += time.perf_counter() - t
        return {"exact_match": curve[step]}

    def before(model, tokenizer, held_out, max_new_tokens) -> None:
        state.update(tokenizer=tokenizer, held_out=held_out, max_new_tokens=max_new_tokens)
        if 0 in evals and request.get("step0") is None:
            score(model, 0)
        elif 0 in evals:
            curve[0] = request["step0"]

    def evaluate(model) -> dict:  # fit calls it every `every` steps and at the last
        state["calls"] += 1
        step = min(state["calls"] * every, steps)
        return score(model, step) if step in evals else {}

    method = METHODS[request["method"]]
    trained = train_method(method, request, evaluate=evaluate if every else None, eval_every=every, before=before)
    return {
        "suite": "learning", "task": request["task"], "method": request["method"], "label": method["label"],
        "seed": request["seed"], **trained.record, "lr": request["lr"],
        "eval_steps": list(curve), "exact_match_curve": list(curve.values()), "exact_match": curve[evals[-1]],
        "eval_s": state["eval_s"], "step0_from": "shared" if request.get("step0") is not None else "measured",
    }


# ---- records: read, append, summarize ------------------------------------------------------------

def read_records(path: Path, repair: bool = True) -> list[dict]:
    """The learning records of a --json file (none if it does not exist). Unreadable lines (a run killed
    mid-write) are skipped with a note and, when `repair`, dropped from the file, so that the next record
    starts a line of its own (not when only reporting: another process may be appending to the file)."""
    from lorakit.atomic import atomic_write_text

    if not path.is_file():
        return []
    kept, records = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}:{lineno}: unreadable line dropped (an interrupted write?)")
            continue
        kept.append(line)
        if isinstance(record, dict) and record.get("suite") == "learning":
            records.append(record)
    if repair and path.read_text() != "".join(f"{line}\n" for line in kept):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return records


def append_record(path: Path, record: dict) -> None:
    """One JSON line at the end of `path`, flushed to disk before the next run starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_same_settings(records: list[dict], config: dict, path: Path) -> None:
    for record in records:
        for key, value in config.items():
            if record["config"].get(key) != value:
                raise ValueError(f"{path} holds runs made with {key}={record['config'].get(key)!r}, not {value!r}: "
                                 "continue them with the same settings, or write to another --json file")


def shared_step0(records: list[dict], task: str, seed: int) -> float | None:
    """The base model's exact match on (task, seed)'s held-out rows, measured by an earlier run, or None."""
    for r in records:
        if r["task"] == task and r["seed"] == seed and r["method"] not in OWN_STEP0 and r["step0_from"] == "measured":
            return r["exact_match_curve"][r["eval_steps"].index(0)]
    return None


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(records: list[dict]) -> dict[tuple, dict]:
    """(task, method, lr) -> {"label", "seeds", "eval_steps", "mean", "sd", "min", "max" (per eval step),
    "trainable_params", "total_params", "step_s" (median over seeds)}, in the records' order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["lr"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        steps = runs[0]["eval_steps"]
        columns = [[r["exact_match_curve"][i] for r in runs] for i in range(len(steps))]
        stats = [mean_sd(c) for c in columns]
        out[key] = {"label": runs[0]["label"], "seeds": sorted(r["seed"] for r in runs), "eval_steps": steps,
                    "mean": [m for m, _ in stats], "sd": [sd for _, sd in stats],
                    "min": [min(c) for c in columns], "max": [max(c) for c in columns],
                    "trainable_params": runs[0]["trainable_params"], "total_params": runs[0]["total_params"],
                    "step_s": statistics.median(r["step_s"] for r in runs)}
    return out


def cell(mean: float, sd: float | None) -> str:
    return f"{100 * mean:.0f}" if sd is None else f"{100 * mean:.0f} ± {100 * sd:.0f}"


def table(records: list[dict], s: dict) -> str:
    """Markdown: per task, each method at its own lr (exact match % mean ± sd over seeds at each eval step);
    then the lr sweep (final exact match per lr)."""
    summary = summarize(records)
    lines = []
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [(m, summary[(task, m, METHODS[m]["lr"])]) for m in METHODS if (task, m, METHODS[m]["lr"]) in summary]
        if not rows:
            continue
        steps = rows[0][1]["eval_steps"]
        lines += [f"**{task}** — held-out exact match %, mean ± sd over seeds, after N steps", "",
                  "| method | lr | trainable params | % of model | seeds | "
                  + " | ".join(f"step {n}" for n in steps) + " | s/step |",
                  "|" + "---|" * (6 + len(steps))]
        for m, g in rows:
            curve = " | ".join(cell(mean, sd) for mean, sd in zip(g["mean"], g["sd"], strict=True))
            lines.append(f"| {g['label']} | {METHODS[m]['lr']:g} | {g['trainable_params']:,} "
                         f"| {100 * g['trainable_params'] / g['total_params']:.2f} | {len(g['seeds'])} | {curve} "
                         f"| {g['step_s']:.2f} |")
        lines.append("")
    sweep = [(k, g) for k, g in summary.items() if k[1] in s["sweep"]]
    if any(k[2] != METHODS[k[1]]["lr"] for k, _ in sweep):
        steps = sweep[0][1]["eval_steps"]
        lines += ["**learning-rate sweep** — held-out exact match %, mean ± sd over seeds, after N steps", "",
                  "| task | method | lr | seeds | " + " | ".join(f"step {n}" for n in steps) + " |",
                  "|" + "---|" * (4 + len(steps))]
        for (task, _m, lr), g in sorted(sweep, key=lambda kg: kg[0]):
            curve = " | ".join(cell(mean, sd) for mean, sd in zip(g["mean"], g["sd"], strict=True))
            lines.append(f"| {task} | {g['label']} | {lr:g} | {len(g['seeds'])} | {curve} |")
    return "\n".join(lines).rstrip() + "\n"


# ---- plots ---------------------------------------------------------------------------------------

PANELS = {"size: full FT, BitFit, LoRA by rank, rsLoRA": ("full", "bitfit", "lora_r1", "lora_r4", "lora", "lora_r16",
                                                           "lora_r64", "rslora"),
          "kind at r=8 (LoRA r=8 for reference)": ("lora", "dora_r4", "dora", "adalora", "loraplus", "pissa", "qlora")}


def plot_curves(records: list[dict], path: Path, title: str) -> list[Path]:
    """`path`: exact match against steps, a row per task and a panel per group of methods (`PANELS`; mean over
    seeds, the range shaded); beside it (-lr.png): final exact match against lr for the swept methods.
    Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    summary = summarize(records)
    tasks = list(dict.fromkeys(k[0] for k in summary))
    colors = dict(zip(METHODS, plt.get_cmap("tab20").colors, strict=False))
    written = []
    fig, axes = plt.subplots(len(tasks), len(PANELS), figsize=(6.5 * len(PANELS), 3.8 * len(tasks)), dpi=110,
                             squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        for ax, (panel, methods) in zip(row, PANELS.items(), strict=True):
            for m in methods:
                g = summary.get((task, m, METHODS[m]["lr"]))
                if g is None:
                    continue
                ax.plot(g["eval_steps"], [100 * v for v in g["mean"]], color=colors[m], marker="o", ms=3, lw=1.3,
                        label=f"{g['label']} ({len(g['seeds'])})")
                ax.fill_between(g["eval_steps"], [100 * v for v in g["min"]], [100 * v for v in g["max"]],
                                color=colors[m], alpha=0.12, lw=0)
            ax.set_title(f"{task} — {panel}\n{title}", fontsize=8)
            ax.set_xlabel("training step")
            ax.set_ylabel("held-out exact match %")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=6.5, loc="lower right", title="method (seeds); mean, range shaded",
                          title_fontsize=6.5)
    written.append(save(fig, path))
    sweep = {k: g for k, g in summary.items() if any(k2[1] == k[1] and k2[2] != k[2] for k2 in summary)}
    if sweep:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), dpi=110, squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for method in dict.fromkeys(k[1] for k in sweep if k[0] == task):
                keys = sorted((k for k in sweep if k[0] == task and k[1] == method), key=lambda k: k[2])
                ax.errorbar([k[2] for k in keys], [100 * sweep[k]["mean"][-1] for k in keys],
                            yerr=[100 * (sweep[k]["sd"][-1] or 0) for k in keys], marker="o", capsize=3, lw=1.2,
                            label=sweep[keys[0]]["label"])
            ax.set_xscale("log")
            ax.set_title(f"{task}: final exact match vs lr", fontsize=9)
            ax.set_xlabel("peak learning rate")
            ax.set_ylabel("exact match % (mean ± sd)")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        written.append(save(fig, path.with_name(path.stem + "-lr.png")))
    return written


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


# ---- the suite -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> list[dict]:
    """Every planned run not yet in --json (appending each as it finishes); then the table and the plots."""
    from lorakit.atomic import atomic_write_text
    from lorakit_bench.report import environment

    s = settings(args)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or 2
    config = {k: s[k] for k in CONFIG_KEYS} | {"model": "tiny" if args.quick else "default"}
    path = Path(args.json) if args.json else None
    records = read_records(path, repair=s["max_runs"] != 0) if path else []
    if path:
        check_same_settings(records, config, path)
    done = {run_key(r) for r in records}
    plan = planned_runs(s)
    todo = [key for key in plan if key not in done][: None if s["max_runs"] < 0 else s["max_runs"]]
    print(f"bench learning: {len(plan)} runs planned, {len(set(plan) & done)} already "
          f"in {path}, {len(todo)} to run now "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    known = len(records)
    lock = threading.Lock()  # the job threads share `records` (step 0 is read from it), the file and the count

    def one(key: tuple) -> None:
        task, method, lr, seed = key
        with lock:
            step0 = None if method in OWN_STEP0 else shared_step0(records, task, seed)
        request = {"task": task, "method": method, "lr": lr, "seed": seed, "quick": bool(args.quick),
                   "steps": s["steps"], "evals": s["evals"], "n_train": s["n_train"], "n_eval": s["n_eval"],
                   "batch": s["batch"], "threads": threads, "step0": step0}
        load_before, t = os.getloadavg()[0], time.perf_counter()
        in_here = args.quick and s["jobs"] == 1  # runs side by side need processes of their own (torch's seeds)
        record = train_run(request) if in_here else run_in_process("lorakit_bench.learning", request)
        record |= {"config": config, "env": {**environment(threads), "jobs": s["jobs"],
                                             "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
                                             "wall_s": time.perf_counter() - t}}
        with lock:  # recorded before this thread takes its next run, so that run can share this one's step 0
            records.append(record)
            if path:
                append_record(path, record)
            curve = " ".join(f"{n}:{100 * v:.0f}" for n, v in zip(record["eval_steps"], record["exact_match_curve"],
                                                                  strict=True))
            print(f"[{len(records) - known}/{len(todo)}] {task} {record['label']} lr={lr:g} seed={seed}: "
                  f"exact match % {curve}; {record['step_s']:.2f} s/step, eval {record['eval_s']:.0f} s, "
                  f"wall {record['env']['wall_s']:.0f} s (load {load_before:.1f})", flush=True)

    # jobs=1: one run after another, in the planned order; jobs=N: N at once, started in the planned order and
    # appended as each finishes. Each run has --threads threads (on 2 cores: --threads 1 --set jobs=2).
    with ThreadPoolExecutor(max_workers=s["jobs"]) as pool:
        futures = [pool.submit(one, key) for key in todo]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for f in futures:  # the runs not started yet; those running finish and are recorded
                f.cancel()
            raise
    ran = {run_key(r) for r in records}
    shown = [r for r in records if run_key(r) in set(plan) & ran]  # this invocation's plan, as far as it got
    text = table(shown, s)
    atomic_write_text(s["table"], text)
    title = f"{s['steps']} steps, batch {s['batch']}, {s['n_eval']} held-out rows ({config['model']} model)"
    plots = plot_curves(shown, Path(s["plot"]), title) if shown else []
    print(text)
    print(f"table: {s['table']}; plots: {', '.join(map(str, plots)) or 'none'}")
    return shown


if __name__ == "__main__":
    print(json.dumps(train_run(json.loads(sys.argv[1]))))
