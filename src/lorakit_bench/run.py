"""`lorakit bench`: run scenarios side by side, print a table each, write JSON records."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit_bench.measure import measure_memory, medians, profile_sides, time_sides
from lorakit_bench.report import make_record, measured_environment, table, write_records
from lorakit_bench.scenarios import SCENARIOS, sides_of
from lorakit_bench.workload import QUICK, Workload, resolve_model

DEFAULT_SCENARIOS = ("forward", "floor", "train-lora", "train-qlora", "merge", "quant")


def run_bench(
    names: list[str] | None = None, reps: int = 3, warmup: int = 1, threads: int | None = None,
    json_out: str | Path | None = None, quick: bool = False, memory: bool = True, profile: int = 0,
    log: Callable[[str], None] = print, **workload,
) -> list[dict]:  # fmt: skip
    """Measure each named scenario (default: all) and return its records; `quick` uses a tiny random
    model and batch (seconds, for tests); `profile` > 0 adds each side's top operators of one profiled
    run; `workload` overrides Workload fields (batch=4, r=8, ...)."""
    names = list(names or DEFAULT_SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    w = resolve_model(Workload(**{**(QUICK if quick else {}), **workload, "threads": threads}))
    records: list[dict] = []
    for name in names:
        records.append(run_scenario(name, w, reps, warmup, memory, profile))
        log(table(records[-1]) + "\n")
        if json_out:
            write_records(json_out, records)
    return records


def run_scenario(name: str, w: Workload, reps: int, warmup: int, memory: bool, profile: int = 0) -> dict:
    """Time every side in this process, alternating; then measure each side's memory alone."""
    scenario = SCENARIOS[name]
    load_before = os.getloadavg()[0]
    torch.manual_seed(w.seed)
    builders = sides_of(name, w)
    kernels_env = os.environ.get("LORAKIT_KERNELS")  # lorakit's sides switch it before each run
    try:
        tasks = {side: build(w) for side, build in builders.items()}
        timings = {side: medians(samples) for side, samples in time_sides(tasks, reps, warmup).items()}
        profiles = profile_sides(tasks, profile) if profile else None
    finally:
        os.environ.pop("LORAKIT_KERNELS", None)
        if kernels_env is not None:
            os.environ["LORAKIT_KERNELS"] = kernels_env
    del tasks
    gc.collect()
    mem = {side: measure_memory(name, side, w, scenario.memory_runs) for side in builders} if memory else {}
    env = measured_environment(w.threads, load_before)
    config = {"reps": reps, "warmup": warmup, "memory_runs": scenario.memory_runs if memory else 0}
    record = make_record(name, scenario, timings, mem, w, config, env)
    if profiles:
        record["profile"] = profiles
    return record
