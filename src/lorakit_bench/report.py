"""One record per scenario (the JSON line `--json` writes) and its printed table."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from lorakit.atomic import atomic_write_text
from lorakit_bench.peers import version
from lorakit_bench.scenarios import Scenario
from lorakit_bench.workload import Workload

MIB = 1 << 20
REFERENCE_NAMES = {"forward": "frozen base, no grad", "floor": "frozen fwd + bwd to inputs, supervised head",
                   "plain": "lorakit, LORAKIT_KERNELS=0", "lora": "lorakit LoRA, fp32 base",
                   "floor_compiled": "the floor, blocks compiled"}
UNITS = ("forward", "floor")  # references every other side is also given as a multiple of


def side_metrics(name: str, timing: dict[str, float], memory: dict, w: Workload, scenario: Scenario,
                 references: dict[str, dict[str, float]]) -> dict:
    """Medians of one side plus tokens/s, multiples of the references, and peak RSS."""
    metrics: dict = {"name": name, **timing}
    if scenario.per_token:
        metrics["tokens_per_s"] = w.tokens / timing["seconds"]
    for ref, ref_timing in references.items():
        metrics[f"over_{ref}"] = timing["seconds"] / ref_timing["seconds"]
    metrics.update({k: v for k, v in memory.items() if v is not None})
    return metrics


def ratios(ours: dict, peer: dict) -> dict[str, float]:
    """ours / peer for every number both sides have."""
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    return {k: ours[k] / peer[k] for k in ours if k in peer and number(ours[k]) and number(peer[k]) and peer[k]}


def make_record(name: str, scenario: Scenario, timings: dict[str, dict[str, float]], memory: dict[str, dict],
                w: Workload, config: dict, env: dict) -> dict:
    units = {side: t for side, t in timings.items() if side in UNITS}
    metrics = lambda side, label: side_metrics(label, timings[side], memory.get(side, {}), w, scenario,
                                               {} if side in UNITS else units)
    ours, peer = metrics("ours", "lorakit"), metrics("peer", scenario.peer_name())
    references = [side for side in timings if side in REFERENCE_NAMES]
    reference = {side: metrics(side, REFERENCE_NAMES[side]) for side in references}
    extra = {"vs_lora": ratios(ours, reference["lora"])} if "lora" in reference else {}
    return {
        "scenario": name,
        "ours": ours,
        "peer": peer,
        "ratios": ratios(ours, peer),
        "reference": reference,
        **extra,
        "config": {**w.to_dict(), **config, "summary": scenario.summary},
        "env": env,
    }


def measured_environment(threads: int, load_before: float) -> dict:
    """`environment` plus the 1-minute load average before (given) and after (now) a measurement."""
    return {**environment(threads), "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}


def write_records(path: str | Path, records: list[dict]) -> None:
    """The records as JSON lines, written atomically (a reader never sees half a file)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def environment(threads: int) -> dict:
    """What the figures depend on: versions, CPU, threads, date; the load is added by the caller."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "device": "cpu",
    }


def cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown"


COLUMNS = ("side", "median s", "tokens/s", "x forward", "x floor", "peak RSS MiB", "setup RSS MiB", "extras")


def table(record: dict) -> str:
    """The record as a Markdown table, references first, then lorakit and the peer, then the ratios."""
    rows = [(f"{side} ({m['name']})", m) for side, m in record["reference"].items()]
    rows += [("lorakit", record["ours"]), (record["peer"]["name"], record["peer"])]
    lines = [f"### {record['scenario']}: {record['config']['summary']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for label, m in rows:
        lines.append("| " + " | ".join([label, *row_cells(m)]) + " |")
    r = record["ratios"]
    shown = ", ".join(f"{k} {r[k]:.2f}" for k in ("tokens_per_s", "seconds", "peak_rss", "setup_peak_rss",
                                                   "quantize_s", "dequantize_s") if k in r)
    lines += ["", f"lorakit / {record['peer']['name']}: {shown}"]
    if "vs_lora" in record:
        r = record["vs_lora"]
        shown = ", ".join(f"{k} {r[k]:.3f}" for k in ("tokens_per_s", "peak_rss", "base_weight_mib",
                                                       "linear_weight_mib") if k in r)
        lines += ["", f"lorakit QLoRA / lorakit LoRA (fp32 base): {shown}"]
    for side, ops in record.get("profile", {}).items():
        listed = ", ".join(f"{o['op']} {o['self_s']:.3g}s x{o['calls']}" for o in ops)
        lines += ["", f"profile {side}: {listed}"]
    return "\n".join(lines)


def row_cells(m: dict) -> list[str]:
    fmt = lambda key, spec, scale=1: format(m[key] / scale, spec) if key in m else "-"
    extras = ", ".join(f"{k} {m[k]:.4g}" for k in m if k.endswith(("loss", "_s", "_mib")) and k != "tokens_per_s")
    return [fmt("seconds", ".3f"), fmt("tokens_per_s", ".0f"), fmt("over_forward", ".2f"), fmt("over_floor", ".2f"),
            fmt("peak_rss", ".0f", MIB), fmt("setup_peak_rss", ".0f", MIB), extras or "-"]
