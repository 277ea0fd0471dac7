"""`lorakit ...`: train, eval, generate, merge."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

import torch
import yaml

from lorakit import __version__
from lorakit.adapters.adalora import rank_report
from lorakit.adapters.io import read_adapter
from lorakit.adapters.merge import merge_and_unload
from lorakit.config import TrainConfig, from_dict, load_jobs_config, load_train_config, to_dict
from lorakit.data.tasks import make_task, task_name
from lorakit.devices import resolve_device
from lorakit.models import load, resolve
from lorakit.multi.store import AdapterStore
from lorakit.outputs import check_output
from lorakit.quant.checkpoint import save_4bit
from lorakit.quant.linear4bit import Linear4bit, dequantize_model, dequantize_weight, quantizable, quantize_model

# A command's own modules (training, generation, export, serving, plots, the benchmarks) are imported inside
# its function: a command loads only what it runs, and serve's fastapi or bench's peers stay optional.


def exec_torchrun(nproc: int, config: str | None, overrides: list[str]) -> None:
    """`lorakit train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m lorakit train ... distributed=ddp`
    (unless the config or an override sets `distributed`); one machine; across machines, call torchrun with
    rendezvous flags: docs/DISTRIBUTED.md."""
    file, items = (None, [config, *overrides]) if config is not None and "=" in config else (config, overrides)
    if load_train_config(file, items).distributed == "none":  # a file or override may say fsdp2
        overrides = [*overrides, "distributed=ddp"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "lorakit", "train", *([config] if config else []), *overrides]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def cmd_train(args: argparse.Namespace) -> int:
    config, overrides = args.config, list(args.overrides)
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1:
        exec_torchrun(args.nproc, config, overrides)
    if config is not None and "=" in config:  # `lorakit train key=value ...` without a file
        config, overrides = None, [config, *overrides]
    cfg = load_train_config(config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from lorakit.train.run import run

    run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone
        print(next_steps(cfg))
    return 0


DEMO_PROMPT = "Convert the date 2001-12-25 to the format 'Month D, YYYY'."


def task_prompt(name: str) -> str:
    """A prompt of the built-in task `name` to try the adapter on: the demo's, else a held-out row's first
    question (a follow-up alone would lack its context)."""
    if name == "demo":
        return DEMO_PROMPT
    return make_task(name, seed=0, n_train=0, n_eval=1)[1][0].messages[0]["content"]


def next_steps(cfg) -> str:
    """What a finished `lorakit train` wrote and three commands to try next, with the run's real paths, in
    the form the user called lorakit (`.venv/bin/lorakit`, `lorakit`, `python -m lorakit`)."""
    out = Path(cfg.output_dir)
    called = sys.argv[0] if Path(sys.argv[0]).name == "lorakit" else "lorakit"
    lines = [f"done: everything is in {out}/", f"  adapter  {out / 'adapter'}/"]
    files = [f for f in ("metrics.jsonl", "results.json") if (out / f).is_file()]
    lines.append("  metrics  " + ", ".join(str(out / f) for f in files))
    if (out / "loss.png").is_file():
        lines.append(f"  plot     {out / 'loss.png'}")
    task = task_name(cfg.dataset)
    own = task is not None or cfg.eval_dataset is not None or cfg.val_size  # `eval` finds the run's held-out rows
    held_out = "" if own else f" --dataset {shlex.quote(cfg.dataset) if isinstance(cfg.dataset, str) else 'FILE'}"
    prompt = shlex.quote(task_prompt(task) if task else "YOUR PROMPT")
    name = out.name if re.fullmatch(r"[A-Za-z0-9_-]+", out.name) else "mine"
    lines += ["next:",
              f"  {called} eval {out / 'adapter'}{held_out}",
              f"  {called} generate --adapter {out / 'adapter'} {prompt}",
              f"  {called} serve --adapters {name}={out / 'adapter'}"]
    return "\n".join(lines)


def cmd_train_multi(args: argparse.Namespace) -> int:
    from lorakit.train.multi import check_jobs, run_multi

    jobs = load_jobs_config(args.config, args.overrides)
    where = f"{args.config} + overrides" if args.overrides else args.config
    check_jobs(jobs, where)
    if args.print_config:
        print(yaml.safe_dump({"jobs": [to_dict(cfg) for cfg in jobs]}, sort_keys=False), end="")
        return 0
    run_multi(jobs, where)
    return 0


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when there is one, else cpu), cpu, cuda, cuda:N")


def cmd_eval(args: argparse.Namespace) -> int:
    from lorakit.data.files import read_rows
    from lorakit.generate import score_rows
    from lorakit.train.run import datasets

    device = resolve_device(args.device)  # before anything is read
    if args.dataset:
        held_out = read_rows(args.dataset)
        source = f"every row of {args.dataset}, training rows included if the adapter was trained on it"
        max_new_tokens = EVAL_MAX_NEW_TOKENS
    else:
        cfg, source = held_out_config(args.adapter, args.seed)
        held_out, max_new_tokens = datasets(cfg)[1], cfg.max_new_tokens
        if not held_out:
            raise ValueError(f"{source} held no rows out (no eval_dataset or val_size): pass --dataset FILE")
    model, tokenizer = load(args.base, adapters=[args.adapter] if args.adapter else [], device=device)
    em = score_rows(model, tokenizer, held_out, args.max_new_tokens or max_new_tokens)
    print(f"exact match: {em:.1%} ({len(held_out)} examples: {source})")
    return 0


EVAL_MAX_NEW_TOKENS = 24  # `lorakit eval --dataset FILE`: the answers' length is not known


def held_out_config(adapter: str, seed: int | None) -> tuple:
    """The training config whose held-out rows `lorakit eval ADAPTER` scores: the run's own (its
    results.json beside the adapter folder: same data, split and seed), else the demo's; and its name."""
    results = Path(adapter).parent / "results.json"
    if results.is_file():
        data = json.loads(results.read_text()).get("config")
        if isinstance(data, dict):
            data = {**data, **({"seed": seed} if seed is not None else {})}
            return from_dict(TrainConfig, data, str(results)), f"the held-out rows of the run in {results.parent}"
    cfg = load_train_config(None, [f"seed={seed or 0}"])
    return cfg, f"the demo task's {cfg.demo_eval} held-out dates, seed {cfg.seed}"


def cmd_generate(args: argparse.Namespace) -> int:
    from lorakit.generate import generate

    device = resolve_device(args.device)  # before anything is read
    model, tokenizer = load(args.base, adapters=[args.adapter] if args.adapter else [], device=device)
    print(generate(model, tokenizer, [args.prompt], args.max_new_tokens)[0])
    return 0


def check_out(args: argparse.Namespace, kind: str) -> None:
    """Refuse, before loading anything, an output that would delete a user's files (`lorakit.outputs`):
    not empty and not lorakit's own output of this kind (without --overwrite), or holding an input."""
    adapter = args.adapter or getattr(args, "adapter_only", None)
    base = args.base or (read_adapter(adapter).base if adapter else None)
    check_output(args.out, kind, [adapter, base], args.overwrite)


def cmd_merge(args: argparse.Namespace) -> int:
    from lorakit import export
    from lorakit.export import write_merged_folder

    device = resolve_device(args.device)  # before anything is read
    check_out(args, "merged")
    base, found = export.merge_inputs(args.base, args.adapter)
    dequantized = args.qlora_base == "dequantized"
    if not args.requantize and export.streamable(base, found, dequantized):  # shard by shard
        export.write_merged_streamed(base, found, args.out, dequantized=dequantized)
        print(f"merged model written to {args.out}")
        return 0
    if found.quant and not dequantized:
        raise ValueError(f"--qlora-base original merges shard by shard, which {args.adapter} cannot (it adapts "
                         "weights held as parameters, or the base is a 4-bit folder): merge it into its "
                         "dequantized 4-bit base (the default)")
    model, tokenizer = load(base, adapters=[found], device=device)  # in memory: a 4-bit base folder, or --requantize
    merged = merge_and_unload(model, safe=True)  # full precision, a 4-bit base dequantized
    if args.requantize:
        error = requantize(merged, args.requantize)
        print(f"re-quantizing to {args.requantize} adds a relative weight error of {error['mean']:.4f} "
              f"(mean over {error['layers']} layers, worst {error['max']:.4f} in {error['worst']})")
    write_merged_folder(merged, tokenizer, args.out, writer=save_4bit if args.requantize else None)
    print(f"merged model written to {args.out}")
    return 0


def requantize(model, quant_type: str) -> dict:
    """Quantize a merged model's linears again (blocksize 64, double quant) and measure the
    relative Frobenius error ||Q(W) - W|| / ||W|| that this adds, per layer."""
    from transformers.pytorch_utils import Conv1D

    dequantize_model(model)  # the 4-bit layers no adapter touched (a QLoRA adapter on some layers), experts too
    before = {n: (m.weight.T if isinstance(m, Conv1D) else m.weight).detach().clone()  # [out, in]
              for n, m in model.named_modules() if quantizable(m)}
    quantize_model(model, quant_type, 64, True, torch.float32, experts=False)  # bitsandbytes has no 4-bit experts
    errors = {n: float((dequantize_weight(m, torch.float32) - before[n]).norm() / before[n].norm())
              for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    worst = max(errors, key=errors.get)
    return {"mean": sum(errors.values()) / len(errors), "max": errors[worst], "worst": worst, "layers": len(errors)}


def cmd_export(args: argparse.Namespace) -> int:
    """`lorakit export merged|gguf`: the merge path of `lorakit merge`, written in a chosen format."""
    from lorakit import export

    device = resolve_device(args.device)  # before anything is read
    check_out(args, "merged" if args.format == "merged" else "gguf-adapter" if args.adapter_only else "gguf-model")
    if args.format == "gguf" and args.adapter_only:
        from transformers import AutoConfig

        found = read_adapter(args.adapter_only)
        config = AutoConfig.from_pretrained(resolve(args.base or found.base or "default"))
        export.write_adapter_gguf(found, config, args.out, args.dtype or "f32")
        print(f"llama.cpp LoRA adapter written to {args.out}")
        return 0
    base, found = export.merge_inputs(args.base, args.adapter)
    if export.streamable(base, found):  # shard by shard
        if args.format == "gguf":
            export.write_merged_gguf_streamed(base, found, args.out, args.dtype or "f16")
        else:
            export.write_merged_streamed(base, found, args.out, args.dtype)
        print(f"merged model written to {args.out}")
        return 0
    model, tokenizer = load(base, adapters=[found], device=device)  # in memory: a 4-bit base folder
    merged = merge_and_unload(model, safe=True)
    if args.format == "gguf":
        export.write_model_gguf(merged, tokenizer, args.out, args.dtype or "f16")
    else:
        export.write_merged_folder(merged, tokenizer, args.out, args.dtype or "f32")
    print(f"merged model written to {args.out}")
    return 0


OVERWRITE_HELP = "replace an existing output that lorakit did not write (its contents are deleted)"


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="merged model (HF folder or GGUF) or adapter (llama.cpp GGUF) for serving")
    formats = x.add_subparsers(dest="format", required=True)
    m = formats.add_parser("merged", help="base + adapter as one transformers folder (safetensors, tokenizer)")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("out", help="output folder")
    m.add_argument("--dtype", choices=["f32", "bf16", "f16"], help="weight dtype (default: the base checkpoint's)")
    m.add_argument("--base", help="base model (default: the one the adapter was saved for)")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_device_argument(m)
    m.set_defaults(func=cmd_export, adapter_only=None)
    g = formats.add_parser("gguf", help="llama.cpp GGUF: a merged llama model, or the adapter alone")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--merged", dest="adapter", metavar="ADAPTER", help="merge this adapter, write the model")
    which.add_argument("--adapter", dest="adapter_only", metavar="ADAPTER",
                       help="write this adapter as a llama.cpp LoRA adapter (llama-cli --lora)")
    g.add_argument("out", help="output .gguf file")
    g.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="2-D tensor type (default: f16 for a model, f32 for an adapter; 1-D tensors stay f32)")
    g.add_argument("--base", help="base model (default: the one the adapter was saved for)")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_device_argument(g)
    g.set_defaults(func=cmd_export)


# `lorakit bench SUITE`: suites that are not one ours-vs-peer batch; each module has
# `run(args: argparse.Namespace) -> list[dict]` (records, also written to --json); it reads the common
# options (--reps, --warmup, --threads, --json, --quick, --no-memory) and its own `--set KEY=VALUE`s.
BENCH_SUITES = {
    "multi": "lorakit_bench.multi",
    "variants": "lorakit_bench.variants",
    "learning": "lorakit_bench.learning",
    "longlora": "lorakit_bench.longlora",
    "ddp": "lorakit_bench.ddp",
    "gpu": "lorakit_bench.gpu",
    "serve": "lorakit_bench.serve",
    "scale": "lorakit_bench.scale",
}


def cmd_bench(args: argparse.Namespace) -> int:
    from lorakit_bench.run import run_bench

    suites = [s for s in args.scenarios if s in BENCH_SUITES]
    try:
        if suites:
            if len(args.scenarios) > 1:
                raise ValueError(f"bench suite {suites[0]!r} runs alone; got {args.scenarios}")
            importlib.import_module(BENCH_SUITES[suites[0]]).run(args)
            return 0
        run_bench(args.scenarios, reps=args.reps, warmup=args.warmup, threads=args.threads, json_out=args.json,
                  quick=args.quick, memory=not args.no_memory, profile=args.profile,
                  plain=args.plain, checkpointing=args.checkpointing, compile=args.compile)
    except (ImportError, ValueError) as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lorakit.train.plot import plot_run

    path = plot_run(args.run_dir)
    if path is None:
        return 2
    print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    adapter = read_adapter(args.adapter)
    print(rank_report(adapter.spec, adapter.lora, adapter.masks))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from lorakit.serve import Engine, Server, make_app

    adapters = {}
    for entry in args.adapter:
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapters takes NAME=DIR, got {entry!r}")
        adapters[name] = folder
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY")
    if args.allow_runtime_adapters and not (api_key and args.store):
        raise ValueError("--allow-runtime-adapters needs --store ROOT and an API key (--api-key or LORAKIT_API_KEY)")
    device = resolve_device(args.device)  # before the model loads
    if args.store and not os.path.isdir(args.store):  # before the model loads; a typo must not serve an empty store
        raise ValueError(f"--store {args.store}: no such folder (create it first: mkdir -p {shlex.quote(args.store)}; "
                         "it may start empty)")
    model, tokenizer = load(args.base, adapters=adapters, device=device)  # the base they need (4-bit, RoPE)
    store = AdapterStore(args.store, max_ram=args.max_ram, max_device=args.max_device,
                         pin_memory=device.type == "cuda") if args.store else None  # RAM tier pinned for the GPU
    engine = Engine(model, tokenizer, base_id=args.base_name or args.base, adapters=adapters, store=store,
                    max_tokens_limit=args.max_tokens_limit, max_prompt_tokens=args.max_prompt_tokens,
                    max_batch=args.max_batch, max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens)
    app = make_app(engine, api_key=api_key, allow_runtime_adapters=args.allow_runtime_adapters,
                   max_body_bytes=args.max_body_bytes)
    try:
        with Server(app, args.host, args.port) as server:
            print(f"serving on {server.url}/v1", flush=True)
            while server.thread.is_alive():
                time.sleep(0.5)
    finally:
        engine.close()
    return 0


class DefaultsHelp(argparse.HelpFormatter):
    """`--help` shows each option's default where it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return __version__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning with PEFT-format adapters")
    p.add_argument("--version", action="version", version=f"lorakit {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune an adapter (no arguments: the built-in demo)")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (lora.r=16)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train on N processes: re-runs itself under torchrun with distributed=ddp (default)")
    t.set_defaults(func=cmd_train)

    tm = sub.add_parser("train-multi", help="train several adapters at once over one base (a `jobs:` list)")
    tm.add_argument("config", help="YAML file: `jobs:` (one training config each) + shared defaults")
    tm.add_argument("overrides", nargs="*", help="key=value defaults for every job, or jobs.N.key=value for one")
    tm.add_argument("--print-config", action="store_true", help="print every job's resolved config and exit")
    tm.set_defaults(func=cmd_train_multi)

    e = sub.add_parser("eval", help="held-out exact match of an adapter (default: the demo task)")
    e.add_argument("adapter", help="adapter folder")
    e.add_argument("--dataset", help="score every row of this file or folder, any supported format, training rows "
                   "included (default: the held-out rows of the run that saved the adapter, read from its "
                   "results.json; else the demo task's)")
    e.add_argument("--base", help="base model (default: the one the adapter was saved for)")
    e.add_argument("--seed", type=int, help="the split's seed (default: the run's, else 0)")
    e.add_argument("--max-new-tokens", type=positive_int, help="generation length (default: the run's "
                   f"max_new_tokens when scoring its held-out rows, else {EVAL_MAX_NEW_TOKENS})")
    add_device_argument(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy completion of one prompt")
    g.add_argument("prompt")
    g.add_argument("--adapter", help="adapter folder")
    g.add_argument("--base", help="base model (default: the adapter's, else the built-in default)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    add_device_argument(g)
    g.set_defaults(func=cmd_generate)

    pl = sub.add_parser("plot", help="draw RUN_DIR/loss.png again from RUN_DIR/metrics.jsonl")
    pl.add_argument("run_dir")
    pl.set_defaults(func=cmd_plot)

    m = sub.add_parser("merge", help="write base + adapter as one plain transformers model folder")
    m.add_argument("adapter", help="adapter folder")
    m.add_argument("out", help="output folder")
    m.add_argument("--base", help="base model (default: the one the adapter was saved for)")
    m.add_argument("--requantize", choices=["nf4", "fp4"],
                   help="write a 4-bit model (bitsandbytes layout) instead of full precision; reports the error")
    m.add_argument("--qlora-base", choices=["dequantized", "original"], default="dequantized",
                   help="an adapter trained over a 4-bit base merges into that base dequantized (the model it "
                   "was trained as; default) or into the checkpoint's original weights (docs/DEPLOY.md)")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_device_argument(m)
    m.set_defaults(func=cmd_merge)

    add_export_parser(sub)

    i = sub.add_parser("inspect", help="an adapter folder's rank per module (AdaLoRA: kept of the initial rank)")
    i.add_argument("adapter", help="adapter folder")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="lorakit vs PEFT (+ bitsandbytes) side by side: times, memory, ratios")
    b.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help="forward, floor, train-lora, train-qlora, merge, quant (default: all), qlora; or one suite: "
                   + ", ".join(BENCH_SUITES))
    b.add_argument("--json", metavar="OUT", help="write one JSON record per scenario per line")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions per side (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    b.add_argument("--threads", type=int, help="torch threads (default: torch's current setting)")
    b.add_argument("--quick", action="store_true", help="a tiny random model and batch: seconds, for tests")
    b.add_argument("--no-memory", action="store_true", help="skip the per-side peak-RSS subprocesses")
    b.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one run of each side and list its N most expensive operators")
    b.add_argument("--checkpointing", action="store_true",
                   help="gradient checkpointing in both sides' training steps (lorakit's QLoRA default; PEFT's "
                   "prepare_model_for_kbit_training default); the forward/floor references stay without")
    b.add_argument("--compile", action="store_true",
                   help="lorakit's training step with compiled blocks (compile: true), the floor both ways")
    b.add_argument("--plain", action="store_true",
                   help="also measure lorakit with its fast paths off (LORAKIT_KERNELS=0) in the same run")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a suite's own setting, e.g. --set lengths=2048,4096 (each suite lists its keys)")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible server (FastAPI): /v1/models, /v1/completions, "
                       "/v1/chat/completions; requests for any adapters batched together",
                       formatter_class=DefaultsHelp)
    s.add_argument("--base", default="default", help="base model: the built-in one, an HF folder or a .gguf file")
    s.add_argument("--base-name", help="the base model's id in requests (default: --base as given)")
    s.add_argument("--adapters", "--adapter", dest="adapter", action="extend", nargs="+", default=[],
                   metavar="NAME=DIR", help="adapters attached at start; the base is made to fit them (4-bit, RoPE)")
    s.add_argument("--store", metavar="ROOT",
                   help="an existing folder of adapter folders, served on demand by folder name")
    s.add_argument("--max-ram", type=int, default=256, help="store: adapters kept in RAM")
    s.add_argument("--max-device", type=int, default=64, help="store: adapters kept on the model (one batch's most)")
    s.add_argument("--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt, in tokens")
    s.add_argument("--max-batch", type=int, default=64, help="requests decoded together at most")
    s.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens (padding included) prefilled together in one forward at most")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting at most (more: 429)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (more: 413)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $LORAKIT_API_KEY)")
    s.add_argument("--allow-runtime-adapters", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --store and an API key; "
                   "paths relative to the store root, safetensors only)")
    add_device_argument(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    s.set_defaults(func=cmd_serve)
    return p


def quiet_dependencies() -> None:
    """Drop two deprecation notices of transformers 5 that a user of lorakit cannot act on, exactly these (by
    message, and category for the warning): the server's KV-cache calls use `past_key_values`, the name every
    supported transformers version knows (5.x logs that it is now `cache`), and PEFT calls the deprecated
    `is_gradient_checkpointing` (`lorakit bench`'s reference side). Progress, figures and errors stay."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    notice = "`past_key_values`/`cache_params` are deprecated"
    logging.getLogger("transformers.utils.generic").addFilter(lambda record: notice not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_dependencies()
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # OSError: a path that cannot be read or written, a full disk
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
