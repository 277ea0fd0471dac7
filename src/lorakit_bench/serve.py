"""`lorakit bench serve`: server throughput under the load test, by number of adapters.

A real server (FastAPI + uvicorn on 127.0.0.1, one process with the engine) serves `clients`
concurrent streaming `/v1/completions` requests, spread round-robin over 1, 8 and 64 adapters (random
LoRA factors, rank `r`, every linear, in a store folder), greedy, exactly `max_tokens` each (vLLM's
`ignore_eos`, as its serving benchmark does). Throughput is completion tokens (from each stream's
usage chunk) / wall time from the first request sent to the last stream ended; also reported: mean
time to first token, median request latency, the most rows decoded together, failures. A round of
one short request per adapter runs untimed first (it reads the adapters into RAM and attaches
them). The clients are threads of the same process (stdlib http.client), so they share the CPU with
the server: figures are for this one machine.

Settings (--set KEY=VALUE): adapters=1,8,64; clients=64; max_tokens=16; r=16; model=default (or an
HF folder); serial=0 (1: also the 1-adapter load with --max-batch 1, i.e. one request at a time); device=cpu
(or cuda[:N]: the engine on the GPU, the store's RAM tier pinned).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorakit_bench.settings import parse_settings
from lorakit_bench.workload import char_tokenizer, tiny_model

DEFAULTS = {"adapters": [1, 8, 64], "clients": 64, "max_tokens": 16, "r": 16, "model": "default", "serial": 0,
            "device": "cpu"}
QUICK = {"adapters": [1, 4], "clients": 8, "max_tokens": 4, "r": 4, "model": "tiny"}
TOPICS = ["a cat", "the sea", "a city", "winter", "a robot", "the moon", "a garden", "music"]


def settings(items: list[str], quick: bool) -> dict:
    """DEFAULTS, then QUICK's under --quick, then each --set KEY=VALUE (adapters comma-separated)."""
    found = parse_settings("serve", items, DEFAULTS, QUICK if quick else None)
    if not found["adapters"] or min(found["adapters"]) < 1 or found["clients"] < 1 or found["max_tokens"] < 1:
        raise ValueError("bench serve: adapters, clients and max_tokens must be at least 1")
    return found


def load_model(name: str, device: str = "cpu"):
    """(model, tokenizer) on `device`: the tiny random model with a character tokenizer, or `lorakit.models.load`."""
    if name == "tiny":
        return tiny_model(0).to(device), char_tokenizer()
    from lorakit.models import load

    return load(name, device=device)


def write_adapters(model, root: Path, n: int, r: int) -> list[str]:
    """`n` adapters of rank r on every linear with random factors, saved under `root`; the model is left
    with empty wrappers only."""
    import torch

    import lorakit
    from lorakit.adapters.inject import remove_adapter
    from lorakit.adapters.layer import lora_layers

    lorakit.inject(model, lorakit.LoraSpec(r=r, alpha=2 * r))
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        with torch.no_grad():
            for _, layer in lora_layers(model):
                adapter = layer.adapters["default"]
                adapter.lora_A.copy_(torch.randn(adapter.lora_A.shape, generator=g) / adapter.lora_A.shape[1] ** 0.5)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.01)
        names.append(f"a{i:03d}")
        lorakit.save_adapter(model, root / names[-1])
    remove_adapter(model, "default")
    return names


def stream_one(host: str, port: int, body: dict) -> dict:
    """One streamed completion: its token count, time to first chunk and latency (s), or an error."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"error": f"HTTP {response.status}: {response.read()[:200]!r}"}
        first, tokens, done = None, None, False
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if first is None:
                first = time.perf_counter() - start
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        if not done or tokens is None:
            return {"error": "the stream ended without usage and [DONE]"}
        return {"tokens": tokens, "ttft": first, "latency": time.perf_counter() - start}
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def load_round(host: str, port: int, names: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` concurrent streams over `names` (round-robin); totals and per-request figures."""
    bodies = [{"model": names[i % len(names)], "prompt": f"Write a few words about {TOPICS[i % len(TOPICS)]}"
               f"{'.' * (i // len(TOPICS) % 4)}", "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}} for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda b: stream_one(host, port, b), bodies))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    return {"seconds": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests": clients,
            "failures": len(results) - len(ok), "errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "ttft_mean_s": statistics.fmean(r["ttft"] for r in ok) if ok else None,
            "latency_p50_s": statistics.median(r["latency"] for r in ok) if ok else None}


def measure(model, tokenizer, root: Path, names: list[str], cfg: dict, reps: int, max_batch: int) -> dict:
    """A fresh engine and server over the store; one untimed round attaching every adapter, then `reps`
    timed load rounds (the median round by throughput is kept)."""
    from lorakit.multi.store import AdapterStore
    from lorakit.serve import Engine, Server, make_app

    store = AdapterStore(root, max_device=max(64, len(names)), pin_memory=cfg["device"].startswith("cuda"))
    engine = Engine(model, tokenizer, base_id="base", store=store, max_tokens_limit=cfg["max_tokens"],
                    max_batch=max_batch, max_queue=max(256, cfg["clients"]))
    try:
        with Server(make_app(engine)) as server:
            host, port = server.url.removeprefix("http://").split(":")
            warm = load_round(host, int(port), names, len(names), 2)
            if warm["failures"]:
                raise RuntimeError(f"bench serve: the warm-up round failed: {warm['errors']}")
            engine.batcher.peak = 0
            rounds = [load_round(host, int(port), names, cfg["clients"], cfg["max_tokens"]) for _ in range(reps)]
            result = sorted(rounds, key=lambda r: r["tokens_per_s"])[len(rounds) // 2]
            result.update(peak_rows=engine.batcher.peak, failures=sum(r["failures"] for r in rounds),
                          device_misses=store.stats()["device_misses"])
            return result
    finally:
        engine.close()
        for name in names:  # take the store's adapters off the shared model for the next point
            if name in store.on_model(model):
                store.detach(model, name)


def run(args: argparse.Namespace) -> list[dict]:
    """Every adapter count under the same load; prints the table, returns one record per point."""
    import torch

    from lorakit_bench.report import measured_environment, write_records

    cfg = settings(args.set, args.quick)
    threads = args.threads or 2
    torch.set_num_threads(threads)
    model, tokenizer = load_model(cfg["model"], cfg["device"])
    records = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        root = Path(tmp)
        all_names = write_adapters(model, root, max(cfg["adapters"]), cfg["r"])
        points = [(n, cfg["clients"]) for n in cfg["adapters"]]
        if cfg["serial"]:
            points.append((1, 1))
        for n, max_batch in points:
            load_before = os.getloadavg()[0]
            result = measure(model, tokenizer, root, all_names[:n], cfg, max(1, args.reps), max_batch)
            env = measured_environment(threads, load_before)
            records.append({"scenario": "serve", "adapters": n, "max_batch": max_batch, **result,
                            "config": {**cfg, "reps": args.reps}, "env": env})
            print(f"adapters={n} max_batch={max_batch}: {result['tokens_per_s']:.1f} tokens/s "
                  f"({result['completion_tokens']} tokens in {result['seconds']:.1f} s)", flush=True)
    base = next((r["tokens_per_s"] for r in records if r["adapters"] == min(cfg["adapters"])
                 and r["max_batch"] > 1), None)
    print(table(records, base))
    if any(r["failures"] for r in records):
        print(f"failures: {[(r['adapters'], r['errors']) for r in records if r['failures']]}")
    if args.json:
        write_records(args.json, records)
    return records


def table(records: list[dict], base: float | None) -> str:
    lines = ["| adapters | max batch | requests | tokens | wall s | tokens/s | x first | TTFT mean s | "
             "latency p50 s | peak rows | failures | load 1m |", "|" + "---|" * 12]
    for r in records:
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['adapters']} | {r['max_batch']} | {r['requests']} | {r['completion_tokens']} | "
                     f"{r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {ratio} | {fmt(r['ttft_mean_s'])} | "
                     f"{fmt(r['latency_p50_s'])} | {r['peak_rows']} | {r['failures']} | "
                     f"{r['env']['loadavg_1m_before']:.1f} |")
    return "\n".join(lines)
