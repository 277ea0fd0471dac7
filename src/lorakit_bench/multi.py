"""`lorakit bench multi`: many adapters over one base, lorakit beside PEFT, in one run.

Records (each `ours`, `peer`, `ratios` = ours / peer for every number both have):
  mixed-prefill, mixed-generate, a batch of `rows` prompts over `adapters` different adapters (r, all
  mixed-decode                   linears) vs the same batch through one adapter, lorakit's `route`
                                 beside PEFT's `adapter_names=`; prefill = one forward of the prompts
                                 (last-position logits), generate = `new_tokens` greedy tokens with
                                 `generate` (prefill included), decode = `new_tokens` greedy steps from
                                 the prompts' KV cache (the prefill before each run is untimed).
                                 `mixed_over_single` is each library's cost of mixing.
  train-parallel                 `train_jobs` adapters trained together (train-multi's step: one batch
                                 of every job's rows) vs the same steps one job after another (peer).
  adapter-switch                 time to first token for an adapter only in the AdapterStore's RAM
                                 cache (attach + prefill + 1 token) vs one already on the model (peer).

Settings (--set KEY=VALUE): parts=mixed,train,switch (which records), model=default, adapters=8,
rows=16, prompt=64, new_tokens=16, r=16, train_jobs=4, train_rows=4, train_seq=64, train_steps=2,
device=cpu (or cuda: models and batches there, each timed run ends with a synchronize), dtype=float32.
All sides time in one process, alternating (`measure.time_sides`); the load average before and
after each record is in its env.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from lorakit_bench.settings import parse_settings

PARTS = ("mixed", "train", "switch")
DEFAULTS = {"parts": list(PARTS), "model": "default", "adapters": 8, "rows": 16, "prompt": 64, "new_tokens": 16,
            "r": 16, "train_jobs": 4, "train_rows": 4, "train_seq": 64, "train_steps": 2, "device": "cpu",
            "dtype": "float32"}
QUICK = {"model": "tiny", "adapters": 3, "rows": 6, "prompt": 8, "new_tokens": 3, "r": 4, "train_jobs": 2,
         "train_rows": 2, "train_seq": 16, "train_steps": 1}
TARGETS = {"mixed-prefill": {"mixed_over_single_max": 1.15, "tokens_per_s_ratio_min": 1.2},
           "mixed-generate": {"mixed_over_single_max": 1.15, "tokens_per_s_ratio_min": 2.0},
           "mixed-decode": {"mixed_over_single_max": 1.15, "tokens_per_s_ratio_min": 2.0},
           "train-parallel": {"tokens_per_s_ratio_min": 2.5}}  # issue 10's bars


def settings(items: list[str], quick: bool) -> dict:
    """DEFAULTS, then QUICK's under --quick, then each --set KEY=VALUE."""
    found = parse_settings("multi", items, DEFAULTS, QUICK if quick else None)
    if not found["parts"] or not set(found["parts"]) <= set(PARTS):
        raise ValueError(f"bench multi: --set parts={','.join(found['parts'])}: parts are some of {', '.join(PARTS)}")
    for key, value in found.items():
        if isinstance(value, int) and value < 1:
            raise ValueError(f"bench multi: --set {key}={value}: {key} must be a positive integer")
    if found["device"] != "cpu" and not found["device"].startswith("cuda"):
        raise ValueError(f"bench multi: --set device={found['device']}: device is cpu or cuda[:N]")
    if found["device"] != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"bench multi: --set device={found['device']}: no CUDA device here")
    if found["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"bench multi: --set dtype={found['dtype']}: dtype is float32, bfloat16 or float16")
    return found


def run(args: argparse.Namespace) -> list[dict]:
    """Every record of the suite; prints the table, writes --json, returns the records."""
    import torch

    from lorakit_bench.report import measured_environment, write_records
    from lorakit_bench.workload import Workload, resolve_model

    cfg = settings(args.set, args.quick)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    w = resolve_model(Workload(model=cfg["model"], r=cfg["r"], alpha=2.0 * cfg["r"], threads=threads,
                               dtype=cfg["dtype"]))
    records = []
    chosen = {"mixed": mixed_records, "train": train_record, "switch": switch_record}
    for measure in [chosen[part] for part in PARTS if part in cfg["parts"]]:
        before = os.getloadavg()[0]
        found = measure(w, cfg, args)
        env = measured_environment(threads, before)
        for record in found if isinstance(found, list) else [found]:
            record.update(suite="multi", config={**cfg, "reps": args.reps, "warmup": args.warmup}, env=env)
            if record["scenario"] in TARGETS:
                record["targets"] = TARGETS[record["scenario"]]
            records.append(record)
        if args.json:
            write_records(args.json, records)
    print(table(records))
    return records


def record(scenario: str, summary: str, ours: dict, peer: dict) -> dict:
    from lorakit_bench.report import ratios

    return {"scenario": scenario, "summary": summary, "ours": ours, "peer": peer, "ratios": ratios(ours, peer)}


def timed(tasks: dict, args: argparse.Namespace, cfg: dict) -> dict[str, float]:
    """Median seconds of each side, the sides alternating (on CUDA each run ends with a synchronize)."""
    import torch

    from lorakit_bench.measure import time_sides
    from lorakit_bench.workload import Task

    if cfg["device"] != "cpu":
        tasks = {side: Task(lambda t=t: [t.run(), torch.cuda.synchronize()][0], reset=t.reset, keep=t.keep)
                 for side, t in tasks.items()}
    found = time_sides(tasks, args.reps, args.warmup)
    return {side: statistics.median(found[side]["seconds"]) for side in tasks}


# ----------------------------------------------------------------------------- mixed batches

def mixed_records(w, cfg: dict, args: argparse.Namespace) -> list[dict]:
    """Prefill and greedy generation, mixed vs one adapter, lorakit beside PEFT."""
    import torch

    from lorakit_bench.workload import Task

    g = torch.Generator().manual_seed(w.seed)
    ours, peer = lorakit_model(w, cfg), peft_model(w, cfg)
    names = [f"a{i}" for i in range(cfg["adapters"])]
    per_row = [names[i % len(names)] for i in range(cfg["rows"])]
    ids = torch.randint(3, ours.config.vocab_size, (cfg["rows"], cfg["prompt"]), generator=g).to(cfg["device"])
    n = cfg["new_tokens"]
    greedy = {"attention_mask": torch.ones_like(ids), "max_new_tokens": n, "min_new_tokens": n, "do_sample": False,
              "pad_token_id": 0, "eos_token_id": None}
    prefill = {"logits_to_keep": 1, "use_cache": False}
    calls = {"prefill": lambda m, **kw: m(input_ids=ids, **prefill, **kw),
             "generate": lambda m, **kw: m.generate(ids, **greedy, **kw)}
    through = {"ours_mixed": lambda call: lorakit_routed(ours, per_row, call),  # each side's way to run a call
               "ours_single": lambda call: lorakit_single(ours, names[0], call),
               "peer_mixed": lambda call: no_grad(call, peer, adapter_names=per_row),
               "peer_single": lambda call: no_grad(call, peer)}
    records = []
    for kind, count in (("prefill", ids.numel()), ("generate", cfg["rows"] * n), ("decode", cfg["rows"] * n)):
        tasks = {}
        for side, run_call in through.items():
            if kind == "decode":  # the prefill (untimed) before each run gives the run a fresh KV cache
                state: dict = {}
                tasks[side] = Task(lambda run_call=run_call, state=state: run_call(
                                       lambda m, **kw: decode(m, state, n, **kw)),
                                   reset=lambda run_call=run_call, state=state: run_call(
                                       lambda m, **kw: state.update(prefilled(m, ids, **kw))))  # fmt: skip
            else:
                tasks[side] = Task(lambda run_call=run_call, call=calls[kind]: run_call(call))
        seconds = timed(tasks, args, cfg)
        found = {}
        for side, name in (("ours", "lorakit route"), ("peer", "peft adapter_names")):
            mixed, single = seconds[f"{side}_mixed"], seconds[f"{side}_single"]
            found[side] = {"name": name, "seconds": mixed, "single_seconds": single,
                           "mixed_over_single": mixed / single, "tokens_per_s": count / mixed}
        what = {"prefill": "", "generate": f"; {n} greedy new tokens, prefill included",
                "decode": f"; {n} greedy decoding steps from the prompts' KV cache (prefill untimed)"}[kind]
        summary = (f"{cfg['rows']} rows x {cfg['prompt']} tokens over {cfg['adapters']} adapters (r={w.r}, all "
                   f"linears) vs one adapter{what}")
        records.append({**record(f"mixed-{kind}", summary, found["ours"], found["peer"]), "tokens": count})
    return records


def prefilled(model, ids, **kw) -> dict:
    """The prompts' KV cache and each row's first greedy token [rows, 1]: a decode run's starting point."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    return {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}


def decode(model, state: dict, steps: int, **kw):
    """`steps` greedy decoding steps, one token a row through the KV cache (as `generate` decodes).
    Returns the tokens [rows, 1 + steps], the prefill's first one included."""
    import torch

    tokens = [state["token"]]
    for _ in range(steps):
        out = model(input_ids=tokens[-1], past_key_values=state["cache"], use_cache=True, **kw)
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def lorakit_model(w, cfg: dict):
    """The base with `adapters` lorakit adapters a0, a1, ... (seeded, non-zero B), not trainable."""
    import torch

    from lorakit.adapters.inject import inject
    from lorakit.adapters.layer import lora_layers
    from lorakit_bench.ours import lora_spec, randomize_lora_B
    from lorakit_bench.workload import load_base

    model = load_base(w).to(cfg["device"])
    for i in range(cfg["adapters"]):
        torch.manual_seed(w.seed + i)
        inject(model, lora_spec(w), name=f"a{i}", trainable=False)
    randomize_lora_B([a.lora_B for _, layer in lora_layers(model) for a in layer.adapters.values()], w.seed)
    return model


def peft_model(w, cfg: dict):
    """The same adapters' shapes in PEFT (its own seeded init, non-zero B)."""
    import torch

    from lorakit_bench.ours import randomize_lora_B
    from lorakit_bench.peers import need, peft_config
    from lorakit_bench.workload import load_base

    peft = need("peft")
    torch.manual_seed(w.seed)
    model = peft.get_peft_model(load_base(w).to(cfg["device"]), peft_config(w), adapter_name="a0")
    for i in range(1, cfg["adapters"]):
        model.add_adapter(f"a{i}", peft_config(w))
    model.set_adapter("a0")
    randomize_lora_B([p for n, p in model.named_parameters() if ".lora_B." in n], w.seed)
    return model.eval()


def no_grad(call, model, **kw):
    import torch

    with torch.no_grad():
        call(model, **kw)


def lorakit_routed(model, per_row: list[str], call) -> None:
    import torch

    from lorakit.multi.routing import route

    with torch.no_grad(), route(model, per_row):
        call(model)


def lorakit_single(model, name: str, call) -> None:
    from lorakit.adapters.inject import set_active

    set_active(model, [name])
    no_grad(call, model)


# ----------------------------------------------------------------------------- parallel training

def train_record(w, cfg: dict, args: argparse.Namespace) -> dict:
    """train-multi's step over `train_jobs` jobs vs the same steps of each job alone, one after another."""
    import torch

    from lorakit.adapters.inject import inject, set_active
    from lorakit.config import TrainConfig
    from lorakit.data.encode import IGNORE
    from lorakit.train.fit import Run, train_step
    from lorakit.train.multi import Job, adapter_parameters, multi_step
    from lorakit_bench.ours import lora_spec
    from lorakit_bench.workload import Task, load_base

    model = load_base(w).to(cfg["device"])
    g = torch.Generator().manual_seed(w.seed)
    seq, half = cfg["train_seq"], cfg["train_seq"] // 2
    jobs = []
    for i in range(cfg["train_jobs"]):
        torch.manual_seed(w.seed + i)
        inject(model, lora_spec(w), name=f"t{i}")
        rows = [(ids, [IGNORE] * half + ids[half:]) for ids in
                torch.randint(3, model.config.vocab_size, (4 * cfg["train_rows"], seq), generator=g).tolist()]
        job_cfg = TrainConfig(batch_size=cfg["train_rows"], max_steps=10**6, lr=w.lr, warmup_steps=1, seed=i)
        jobs.append(Job(job_cfg, f"t{i}", rows))
    for job in jobs:
        job.run = Run(model, adapter_parameters(model, job.name), job.cfg, len(job.rows), log=lambda *_: None)
    model.train()

    def together() -> None:
        for _ in range(cfg["train_steps"]):
            for job, step in zip(jobs, multi_step(model, jobs, pad_id=0), strict=True):
                job.run.step = step["step"]

    def one_after_another() -> None:
        for job in jobs:
            set_active(model, [job.name])
            params = list(job.run.params.values())
            for _ in range(cfg["train_steps"]):
                train_step(model, job.rows, job.cfg, 0, job.run.step, params, job.run.optimizer, job.run.schedule)
                job.run.step += 1

    seconds = timed({"ours": Task(together), "peer": Task(one_after_another)}, args, cfg)
    tokens = cfg["train_jobs"] * cfg["train_steps"] * cfg["train_rows"] * seq
    summary = (f"{cfg['train_jobs']} adapters (r={w.r}, all linears), {cfg['train_steps']} steps of {cfg['train_rows']}"
               f" rows x {seq} tokens each: in one batch vs one job after another")
    out = record("train-parallel", summary,
                 {"name": "lorakit train-multi (jobs in one batch)", "seconds": seconds["ours"],
                  "tokens_per_s": tokens / seconds["ours"]},
                 {"name": "lorakit train, one job after another", "seconds": seconds["peer"],
                  "tokens_per_s": tokens / seconds["peer"]})
    out["tokens"] = tokens
    return out


# ----------------------------------------------------------------------------- adapter switch

def switch_record(w, cfg: dict, args: argparse.Namespace) -> dict:
    """Time to first token of one prompt when its adapter is in the store's RAM only vs on the model."""
    import torch

    from lorakit.adapters.inject import inject, remove_adapter
    from lorakit.adapters.io import save_adapter
    from lorakit.multi.store import AdapterStore
    from lorakit_bench.ours import lora_spec
    from lorakit_bench.workload import Task, load_base

    model = load_base(w).to(cfg["device"])
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-store-"))
    for name in ("ram", "device"):
        inject(model, lora_spec(w), name=name, trainable=False)
        save_adapter(model, root / name, name=name)
        remove_adapter(model, name)
    ids = torch.randint(3, model.config.vocab_size, (1, cfg["prompt"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(cfg["device"])
    store = AdapterStore(root, max_ram=4, max_device=2)
    try:
        def first_token(name: str) -> None:
            store.activate(model, name)
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                               pad_token_id=0)

        def only_in_ram() -> None:  # untimed: off the model, read into RAM
            if "ram" in store.on_model(model):
                store.detach(model, "ram")
            store.get("ram")

        tasks = {"ours": Task(lambda: first_token("ram"), reset=only_in_ram),
                 "peer": Task(lambda: first_token("device"), reset=lambda: store.attach(model, ["device"]))}
        seconds = timed(tasks, args, cfg)
        stats = store.stats()
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    out = record("adapter-switch", f"time to first token, 1 prompt of {cfg['prompt']} tokens, adapter r={w.r} all "
                 "linears: only in the AdapterStore's RAM cache vs already on the model",
                 {"name": "adapter in RAM only (attach + first token)", "seconds": seconds["ours"]},
                 {"name": "adapter on the model (first token)", "seconds": seconds["peer"]})
    out["attach_seconds"] = seconds["ours"] - seconds["peer"]
    out["store"] = {k: stats[k] for k in ("ram_hits", "ram_misses", "device_hits", "device_misses")}
    return out


# ----------------------------------------------------------------------------- table

def table(records: list[dict]) -> str:
    """One Markdown table: each record's two sides and their ratio."""
    lines = ["| scenario | lorakit | s | peer | s | seconds ratio | tokens/s ratio | mixed/single (ours, peer) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ours, peer, ratio = r["ours"], r["peer"], r["ratios"]
        mixing = (f"{ours['mixed_over_single']:.2f}, {peer['mixed_over_single']:.2f}"
                  if "mixed_over_single" in ours else "-")
        per_token = f"{ratio['tokens_per_s']:.2f}" if "tokens_per_s" in ratio else "-"
        lines.append(f"| {r['scenario']} | {ours['name']} | {ours['seconds']:.3f} | {peer['name']} | "
                     f"{peer['seconds']:.3f} | {ratio['seconds']:.2f} | {per_token} | {mixing} |")
    env = records[-1]["env"] if records else {}
    lines += ["", f"torch {env.get('torch')}, {env.get('threads')} threads, {env.get('cpu')}, "
              f"load average {', '.join(str(r['env']['loadavg_1m_before']) for r in records)} (1 min, per record)"]
    return "\n".join(lines)
