"""Hostile and careless clients: every bad request of the corpus (tests/corpus/http.jsonl, plus a few
generated here) gets a 4xx naming what is wrong and leaves the server answering correctly; and no request,
however hostile, changes another request's answer when they are batched together (server isolation).

Good answers are compared with transformers' `generate` on a fresh model holding only that adapter
(`test_serve.direct`): the same request sent alone."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import randomize_adapters, tiny_tokenizer
from lorakit.adapters.io import WEIGHTS_FILE
from lorakit.quant.linear4bit import quantize_model
from lorakit.serve import Engine, Server, make_app
from lorakit.serve.batch import Batcher, Sequence
from test_serve import KEY, call, direct, llama, make_adapter, tiny_engine

CORPUS = [json.loads(line) for line in (Path(__file__).parent / "corpus" / "http.jsonl").read_text().splitlines()]
LIMIT = 8192  # the test server's body limit
GENERATED = [  # cases too big or too repetitive for the corpus file
    {"case": "JSON nested past the parser's recursion limit", "raw": "[" * 4000 + "]" * 4000, "status": 400,
     "says": "nested too deeply"},
    {"case": "a prompt nested 500 deep", "raw": '{"model": "tiny", "prompt": ' + "[" * 500 + "]" * 500 + "}",
     "status": 400, "says": "'prompt'"},
    {"case": "a body over the limit", "raw": '{"model": "tiny", "prompt": "' + "x" * LIMIT + '"}', "status": 413,
     "says": f"over the limit of {LIMIT}"},
    {"case": "a model name longer than a file name", "body": {"model": "a" * 300, "prompt": "x"}, "status": 404,
     "says": "does not exist"},
    {"case": "a model name longer than a path", "body": {"model": "a" * 5000, "prompt": "x"}, "status": 404,
     "says": "does not exist"},
    {"case": "load: a name longer than a file name", "path": "/v1/load_lora_adapter",
     "body": {"lora_name": "a" * 300, "lora_path": "s1"}, "status": 400, "says": "'lora_name'"},
    {"case": "load: a path longer than a file name", "path": "/v1/load_lora_adapter",
     "body": {"lora_name": "x", "lora_path": "a" * 300}, "status": 400, "says": "'lora_path'"},
    {"case": "load: a path longer than the file system allows", "path": "/v1/load_lora_adapter",
     "body": {"lora_name": "x", "lora_path": "a/" * 3000}, "status": 400, "says": "'lora_path'"},
]
CASES = CORPUS + GENERATED
# good greedy requests of different lengths over the base and two adapters (one attached at start, one stored)
GOOD = [("tiny", "say cat", 8), ("alpha", "say a longer thing", 6), ("s1", "dog", 7), ("alpha", "moon", 5),
        ("tiny", "say the fish and the bird", 6), ("s1", "say sun!", 8)]


def poison(folder: Path, value: float) -> Path:
    """Put `value` (NaN, Inf) into one lora_B tensor of a saved adapter, keeping its metadata."""
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = value
    save_file(tensors, folder / WEIGHTS_FILE, metadata=metadata)
    return folder


def other_base_adapter(folder: Path) -> Path:
    """An adapter saved on another base (wider, longer context) than the server's."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = lorakit.inject(LlamaForCausalLM(config), lorakit.LoraSpec(r=4, alpha=8))
    randomize_adapters(model)
    return lorakit.save_adapter(model, folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """"alpha" attached at start; in the store root "s1", "s2", and the hostile ones: NaN and Inf weights,
    an unreadable file, pickled weights only, a 4-bit one, one from another base, a symlink out."""
    top = tmp_path_factory.mktemp("hostile")
    root = top / "store"
    out = {"alpha": make_adapter(top / "alpha", 1), "s1": make_adapter(root / "s1", 11),
           "s2": make_adapter(root / "s2", 12)}
    out["nan"] = poison(make_adapter(root / "nan", 13), float("nan"))
    out["inf"] = poison(make_adapter(root / "inf", 14), float("inf"))
    out["q4"] = make_adapter(root / "q4", 15, prepare=lambda m: quantize_model(m, "nf4", 64, True))
    out["other"] = other_base_adapter(root / "other")
    shutil.copytree(out["s1"], root / "broken")
    (root / "broken" / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    shutil.copytree(out["s1"], root / "pickled")
    (root / "pickled" / WEIGHTS_FILE).rename(root / "pickled" / "adapter_model.bin")
    (root / "escape").symlink_to(make_adapter(top / "outside", 16))
    return out


@pytest.fixture(scope="module")
def engine(adapters):
    engine = tiny_engine(adapters["alpha"], adapters["s1"].parent, max_device=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine):
    with Server(make_app(engine, api_key=KEY, allow_runtime_adapters=True, max_body_bytes=LIMIT)) as server:
        yield server.url


def send(url: str, case: dict) -> tuple[int, dict | str]:
    """POST a corpus case: its JSON `body`, or its `raw` text (lone surrogates become the raw bytes); with
    `hangup`, read the first server-sent event and close the connection."""
    body = json.dumps(case["body"]).encode() if "body" in case else case["raw"].encode("utf-8", "surrogateescape")
    if not case.get("hangup"):
        return call(url, "POST", case.get("path", "/v1/completions"), body)
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", case.get("path", "/v1/completions"), body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    first = response.readline()
    conn.close()
    return response.status, first.decode()


def good(url: str, name: str, prompt: str, n: int) -> str:
    status, body = call(url, "POST", "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": n,
                                                         "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["text"]


@pytest.fixture(scope="module")
def alone(adapters) -> list[str]:
    """Each good request's answer alone: greedy `generate` on a fresh model with only its adapter."""
    return [direct(None if name == "tiny" else adapters[name], n, prompt) for name, prompt, n in GOOD]


class Traces(logging.Handler):
    """Records of uvicorn's error log that carry a traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_bad_requests_get_a_4xx_naming_the_field(url, case, alone):
    """The table test: each case's status and message, no traceback in the log; then the server still answers a
    good request exactly."""
    traces = Traces()
    logging.getLogger("uvicorn.error").addHandler(traces)
    try:
        status, body = send(url, case)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(traces)
    assert status == case["status"], body
    if status != 200:
        assert case["says"] in body["error"]["message"], body
        assert body["error"]["code"] == status
    assert not traces.records, [r.getMessage() for r in traces.records]
    assert good(url, *GOOD[1]) == alone[1]


ISOLATION = [c for c in CASES if c.get("isolation")]


@pytest.mark.parametrize("case", ISOLATION, ids=[c["case"] for c in ISOLATION])
def test_a_hostile_request_never_changes_other_answers(url, engine, case, alone, monkeypatch):
    """Server isolation: the hostile request and six good greedy ones (the base and two adapters, prompts of
    different lengths) wait together and are admitted in one batch; each good answer equals the request sent
    alone, and the hostile one gets its own status."""
    send(url, case)  # alone first: its adapter is read into RAM, as under load
    for job in GOOD:
        good(url, *job)  # their adapters are on the model: nothing keeps a good request out of the batch
    gate, queued, submit = threading.Event(), [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda job, emit: queued.append(job) or submit(job, emit))
    admit, prefill, prefills = engine.batcher.admit, engine.batcher.prefill, []
    monkeypatch.setattr(engine.batcher, "admit", lambda: admit() if gate.is_set() else None)
    monkeypatch.setattr(engine.batcher, "prefill", lambda seqs: prefills.append(len(seqs)) or prefill(seqs))
    with ThreadPoolExecutor(len(GOOD) + 1) as pool:
        hostile = pool.submit(send, url, case)
        wait_for(lambda: hostile.done() or queued)
        waiting = len(queued)
        goods = [pool.submit(good, url, *job) for job in GOOD]
        wait_for(lambda: len(engine.batcher.waiting) == waiting + len(GOOD))
        gate.set()
        assert [g.result() for g in goods] == alone
        status, body = hostile.result()
    assert status == case["status"], body
    assert prefills[0] == len(GOOD) + (status == 200)  # one batch: the good ones, and the hostile one if valid
    wait_for(lambda: not engine.batcher.running and engine.batcher.rows.cache is None)  # nothing left behind


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_issue_repro_over_http(url, adapters):
    """Issue 18's repro: four greedy requests with a seed beyond 64 bits at temperature 1, sent at once (no gate)."""
    bad = {"model": "tiny", "prompt": "hi", "max_tokens": 10, "temperature": 1, "seed": 1208925819614629174706176}
    with ThreadPoolExecutor(5) as pool:
        goods = [pool.submit(good, url, "alpha", "say a longer thing", 6) for _ in range(4)]
        hostile = pool.submit(call, url, "POST", "/v1/completions", bad)
        assert [g.result() for g in goods] == [direct(adapters["alpha"], 6, "say a longer thing")] * 4
        status, body = hostile.result()
    assert status == 400 and "'seed'" in body["error"]["message"]


def nan_adapter_model(adapters) -> torch.nn.Module:
    """The server's model with alpha, s1 and a copy of s2 whose weights turned NaN after loading (as a bug in
    a kernel or a bad file that passed every check would make them): the batcher's own defence."""
    model = llama()
    for name in ("alpha", "s1", "s2"):
        lorakit.load_adapter(model, adapters[name], name=name)
    with torch.no_grad():
        for layer in (m for m in model.modules() if hasattr(m, "adapters") and "s2" in m.adapters):
            layer.adapters["s2"].lora_B.fill_(float("nan"))
    return model.eval()


def test_a_failing_row_fails_alone_in_the_batcher(adapters):
    """Batcher level, whatever the engine let through: a seed torch refuses, NaN scores (greedy and sampled),
    a prompt the model cannot embed, and a client whose callback breaks at its third token, admitted with good
    rows: each bad row gets one error and leaves the running set and the KV rows before the next forward;
    the good rows decode exactly as alone, each token once."""
    model, tok = nan_adapter_model(adapters), tiny_tokenizer()
    goods = [(None if name == "tiny" else name, prompt, n) for name, prompt, n in GOOD]
    out: dict[int, list] = {i: [] for i in range(len(goods) + 5)}
    seqs = [Sequence(name, tok(prompt)["input_ids"], n, out[i].append) for i, (name, prompt, n) in enumerate(goods)]
    k = len(goods)
    seqs += [Sequence(None, tok("hi")["input_ids"], 10, out[k].append, temperature=1.0, seed=2**80),
             Sequence("s2", tok("hi")["input_ids"], 10, out[k + 1].append, temperature=1.0),
             Sequence("s2", tok("hi")["input_ids"], 10, out[k + 2].append),
             Sequence("s1", [10**6], 5, out[k + 3].append)]

    def breaks(item):
        if len(out[k + 4]) == 2:
            raise RuntimeError("the client's event loop is closed")
        out[k + 4].append(item)

    seqs.append(Sequence("alpha", tok("say a longer thing")["input_ids"], 10, breaks))
    seqs.insert(2, seqs.pop(k))  # the hostile ones among the good ones, not only after them
    batcher = Batcher(model, eos=1)  # not started: this thread drives it
    forwards = []
    model.register_forward_pre_hook(lambda m, args, kw: forwards.append(kw["input_ids"].shape[0]), with_kwargs=True)
    for seq in seqs:
        batcher.submit(seq)
    batcher.admit()
    admitted = len(forwards)
    assert not batcher.waiting
    assert len(batcher.running) == batcher.rows.mask.shape[0] == len(goods) + 1  # the goods and the breaking one
    for layer in batcher.rows.cache.layers:
        assert layer.keys.shape[0] == len(batcher.running)
    while batcher.running:
        batcher.step()
        assert len(batcher.running) == batcher.rows.mask.shape[0] if batcher.running else batcher.rows.cache is None
    assert max(forwards[admitted:]) <= len(goods) + 1  # no decoding step ever ran a failed row
    for i, (name, prompt, n) in enumerate(goods):
        assert out[i][-1] is None and None not in out[i][:-1], out[i]
        assert not any(isinstance(t, BaseException) for t in out[i])
        text = tok.decode([t for t in out[i][:-1] if t != 1], skip_special_tokens=True)
        assert text == direct(None if name is None else adapters[name], n, prompt)
    for j in range(k, k + 4):
        assert len(out[j]) == 1 and isinstance(out[j][0], BaseException), out[j]
    assert "not finite" in str(out[k + 1][0]) and "not finite" in str(out[k + 2][0])
    assert len(out[k + 4]) == 2 and seqs[-1].cancelled  # two tokens, then its row was dropped


def test_adapters_given_at_start_are_checked(adapters):
    """A server refuses to start with an adapter whose weights are not finite, or made for another base."""
    for name, says in (("nan", "NaN/Inf"), ("inf", "NaN/Inf"), ("other", "another base")):
        with pytest.raises(ValueError, match=says):
            Engine(llama(), tiny_tokenizer(), base_id="tiny", adapters={name: adapters[name]})


def test_cli_serve_refuses_a_bad_adapter_at_start(tiny_model_dir, adapters):
    """`lorakit serve --adapters` with NaN weights, or an adapter of another base: exit 2, a one-line error (a
    server that starts anyway runs until the timeout fails the test)."""
    for name, says in (("nan", "NaN/Inf"), ("other", "differs from this model")):
        done = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--base", str(tiny_model_dir), "--adapters",
                               f"bad={adapters[name]}", "--port", "0"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "lorakit: error: " in done.stderr and says in done.stderr and "Traceback" not in done.stderr


def test_an_unexpected_fault_is_a_500_in_openai_shape():
    """A fault of ours (here: the engine raising what it never should) still answers JSON in OpenAI's shape."""
    class Broken:
        def prepare(self, request, chat):
            raise OSError(5, "Input/output error")

    with Server(make_app(Broken())) as server:
        status, body = call(server.url, "POST", "/v1/completions", {"model": "x"}, key=None)
    assert status == 500 and body["error"]["message"] == "OSError: [Errno 5] Input/output error"


def test_a_failed_decoding_step_leaves_no_rows_behind():
    """A shared decoding step that fails (a fault of ours, not of one request: here the model raises once) fails
    the rows in it, drops their half-written KV cache, and the loop serves the next requests exactly."""
    model, raised = llama(), []

    def fault(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1 and not raised:  # the first decoding step
            raised.append(1)
            raise RuntimeError("device fault")
    model.register_forward_pre_hook(fault, with_kwargs=True)
    engine = Engine(model, tiny_tokenizer(), base_id="tiny", max_tokens_limit=32)
    try:
        def run(prompts: list[str]) -> list[list]:
            outs = [[] for _ in prompts]
            done = [threading.Event() for _ in prompts]
            with engine.batcher.wake:  # the loop sees both at once: one batch
                for i, prompt in enumerate(prompts):
                    job = engine.prepare({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0},
                                         chat=False)
                    engine.submit(job, lambda item, i=i: (outs[i].append(item), (item is None or isinstance(
                        item, BaseException)) and done[i].set()))
            assert all(d.wait(30) for d in done)
            return outs

        failed = run(["say cat", "say a longer thing"])
        assert raised and all(isinstance(o[-1], RuntimeError) for o in failed)
        wait_for(lambda: not engine.batcher.running and engine.batcher.rows.cache is None)
        again = run(["say cat", "say a longer thing"])
        assert [tiny_tokenizer().decode(o[:-1], skip_special_tokens=True) for o in again] == [
            direct(None, 6, "say cat"), direct(None, 6, "say a longer thing")]
    finally:
        engine.close()
