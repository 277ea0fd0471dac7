"""Timing (repetitions alternating between sides, in one process) and peak memory (one subprocess per side).

Alternating spreads the machine's load changes over all sides alike; the order flips every
repetition so that no side always runs right after another. Memory is measured apart, so one
side's allocations cannot hide inside another's, as the peak resident set (VmHWM) of a process
that builds only that side. Linux lets a process reset its VmHWM (`/proc/self/clear_refs`), which
splits the peak of setup (loading, quantizing, injecting) from the peak of the measured runs.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lorakit_bench.workload import Task, Workload

STATUS = Path("/proc/self/status")


def time_sides(tasks: dict[str, Task], reps: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """Per side: "seconds" of each timed run and each extra metric the runs return.

    The warm-up runs are untimed; the extras of the first one are kept as "first_<name>" (the
    first training loss is the same function for every side: a fresh adapter changes nothing).
    """
    results: dict[str, dict[str, list[float]]] = {side: {"seconds": []} for side in tasks}
    for i in range(warmup + reps):
        order = list(tasks) if i % 2 == 0 else list(reversed(tasks))
        for side in order:
            task = tasks[side]
            if task.reset is not None:
                task.reset()
            start = time.perf_counter()
            extras = task.run() or {}
            seconds = time.perf_counter() - start
            record = results[side]
            if i < warmup:
                if i == 0:
                    record.update({f"first_{k}": [v] for k, v in extras.items()})
                continue
            record["seconds"].append(seconds)
            for k, v in extras.items():
                record.setdefault(k, []).append(v)
    for side, task in tasks.items():
        results[side].update({k: [v] for k, v in task.info.items()})
    return results


def profile_sides(tasks: dict[str, Task], top: int) -> dict[str, list[dict]]:
    """Per side, the `top` operators of one run by self CPU time (torch.profiler): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    found = {}
    for side, task in tasks.items():
        if task.reset is not None:
            task.reset()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            task.run()
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        found[side] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops]
    return found


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each metric, and the fastest run as "seconds_min" (least disturbed by other load)."""
    summary = {k: statistics.median(v) for k, v in samples.items() if v}
    if samples.get("seconds"):
        summary["seconds_min"] = min(samples["seconds"])
    return summary


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since start or the last reset (Linux VmHWM)."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak_rss() -> bool:
    """Restart the VmHWM count from the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory_here(task: Task, runs: int) -> dict[str, int | None]:
    """setup_peak_rss (everything up to now) and peak_rss (during `runs` runs, model resident)."""
    if task.reset is not None:
        task.reset()
    setup = peak_rss_bytes()
    if not reset_peak_rss():
        setup = None  # the peak below then includes setup too
    for i in range(runs):
        if task.reset is not None and i > 0:
            task.reset()
        task.run()
    return {"setup_peak_rss": setup, "peak_rss": peak_rss_bytes()}


def measure_memory(scenario: str, side: str, w: Workload, runs: int) -> dict[str, int | None]:
    """Peak RSS of one side, built and run alone in a fresh Python process."""
    request = json.dumps({"scenario": scenario, "side": side, "workload": w.to_dict(), "runs": runs})
    env = {**os.environ, "OMP_NUM_THREADS": str(w.threads), "MKL_NUM_THREADS": str(w.threads)}
    done = subprocess.run([sys.executable, "-m", "lorakit_bench.memory", request], capture_output=True, text=True,
                          env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {scenario}/{side} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def run_child(module: str, request: dict, threads: int, max_rss_gib: float | None = None) -> dict:
    """`python -m MODULE REQUEST-JSON` in a fresh process whose last stdout line is its JSON result; it is
    stopped (and reported as {"skipped": why}) once its RSS passes `max_rss_gib`. The result gains
    "process_s" (the child's whole wall time, imports included) and "watched_rss" (the largest RSS seen
    by polling; the child's own VmHWM is exact). Children run with a fixed glibc mmap threshold
    (`MALLOC_MMAP_THRESHOLD_=65536` unless set): with glibc's dynamic one, freed tensors of 16-32 MiB
    raise it and later ones land fragmented on the heap, so peak RSS would measure the allocator."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", module, json.dumps(request)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    watched = 0
    while child.poll() is None:
        rss = rss_bytes(child.pid)
        watched = max(watched, rss)
        if max_rss_gib is not None and rss > max_rss_gib * (1 << 30):
            child.kill()
            child.communicate()
            return {"skipped": f"RSS passed max_rss_gib={max_rss_gib:g} ({rss / (1 << 30):.2f} GiB); stopped"}
        time.sleep(0.2)
    out, err = child.communicate()
    lines = out.strip().splitlines()
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {request}: the child failed (exit {child.returncode}):\n{err[-4000:]}")
    return {**json.loads(lines[-1]), "process_s": time.perf_counter() - start, "watched_rss": watched}


def rss_bytes(pid: int) -> int:
    """A process's current resident set size (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
