"""The OpenAI-compatible server (FastAPI + uvicorn on 127.0.0.1, continuous batching): answers equal
single-request generation (transformers' `generate` on a fresh model with only that adapter); the
`openai` client reads them; malformed requests, limits, auth and path escapes get clear 4xx errors."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.adapters.io import WEIGHTS_FILE
from lorakit.longlora import interpolate_positions
from lorakit.models import load
from lorakit.multi import AdapterStore
from lorakit.quant.linear4bit import quantize_model
from lorakit.serve import Engine, Server, make_app

PROMPT = "say cat"
KEY = "s3cret-key"
WORDS = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain"]


def llama() -> torch.nn.Module:
    model = tiny_llama()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = 1
    return model


def make_adapter(folder: Path, seed: int, kind: str = "lora", prepare=None) -> Path:
    """A saved adapter with factors big enough to change greedy tokens (`prepare` edits the base first)."""
    model = llama()
    if prepare is not None:
        prepare(model)
    model = lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, kind=kind))
    randomize_adapters(model, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim == 2:
                p.mul_(5)
    return lorakit.save_adapter(model, folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """"alpha" attached at start; in the store root: "beta" (DoRA), s0..s7, "nested/gamma", a 4-bit one,
    a LongLoRA one, a pickle-only one, a broken one; outside the root, "outside" (reached by a symlink)."""
    top = tmp_path_factory.mktemp("serve")
    root = top / "store"
    out = {"alpha": make_adapter(top / "alpha", 1), "beta": make_adapter(root / "beta", 2, kind="dora")}
    for i in range(8):
        out[f"s{i}"] = make_adapter(root / f"s{i}", 10 + i)
    out["gamma"] = make_adapter(root / "nested" / "gamma", 30)
    out["q4"] = make_adapter(root / "q4", 31, prepare=lambda m: quantize_model(m, "nf4", 64, True))
    out["long"] = make_adapter(root / "long", 32, prepare=lambda m: interpolate_positions(m, 128))
    pickled = root / "pickled"
    shutil.copytree(out["s0"], pickled)
    (pickled / WEIGHTS_FILE).rename(pickled / "adapter_model.bin")
    broken = root / "broken"
    shutil.copytree(out["s0"], broken)
    (broken / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    out["outside"] = make_adapter(top / "outside", 33)
    (root / "escape").symlink_to(out["outside"])
    return out


def tiny_engine(alpha: Path, root: Path, max_device: int) -> Engine:
    """The tiny base as "tiny", `alpha` attached at start, a store over `root`; small limits."""
    store = AdapterStore(root, max_device=max_device)
    return Engine(llama(), tiny_tokenizer(), base_id="tiny", adapters={"alpha": alpha}, store=store,
                  max_tokens_limit=32, max_prompt_tokens=50)


@pytest.fixture(scope="module")
def engine(adapters):
    engine = tiny_engine(adapters["alpha"], adapters["beta"].parent, max_device=9)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine):
    """http://host:port of a running server (API key required, runtime adapters allowed)."""
    app = make_app(engine, api_key=KEY, allow_runtime_adapters=True, max_body_bytes=4096)
    with Server(app) as server:
        yield server.url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def call(url: str, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY,
         ) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    is_json = response.getheader("Content-Type", "").startswith("application/json")
    return response.status, json.loads(raw) if is_json else raw.decode()


MODELS: dict = {}


def reference_model(adapter: Path | None, prepare=None) -> torch.nn.Module:
    """A fresh model with only that adapter (its base prepared by `prepare`), made once."""
    if (adapter, prepare) not in MODELS:
        model = llama()
        if prepare is not None:
            prepare(model)
        if adapter is not None:
            lorakit.load_adapter(model, adapter)
        MODELS[adapter, prepare] = model
    return MODELS[adapter, prepare]


def direct(adapter: Path | None, max_tokens: int, prompt: str = PROMPT, messages: list[dict] | None = None,
           prepare=None) -> str:
    """Greedy text from transformers' `generate` on a fresh model with only that adapter, no server."""
    model, tok = reference_model(adapter, prepare), tiny_tokenizer()
    if messages is None:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=1, eos_token_id=1)
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new[: new.index(1)] if 1 in new else new, skip_special_tokens=True)


def test_models_lists_base_and_adapters(url):
    ids = [m.id for m in client(url).models.list().data]
    assert ids == ["tiny", "alpha", "beta", "broken", "long", "q4", *(f"s{i}" for i in range(8))]


def test_greedy_completions_equal_direct_generation(url, adapters):
    texts = set()
    for name, adapter in (("tiny", None), ("alpha", adapters["alpha"]), ("beta", adapters["beta"]),
                          ("s3", adapters["s3"])):
        answer = client(url).completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
        assert answer.object == "text_completion" and answer.model == name
        assert answer.choices[0].text == direct(adapter, 12), name
        assert answer.usage.prompt_tokens == len(PROMPT) and answer.usage.completion_tokens == 12
        texts.add(answer.choices[0].text)
    assert len(texts) == 4  # each adapter really changes the answer


def test_chat_completions_apply_the_template(url, adapters):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say dog"}]
    answer = client(url).chat.completions.create(model="alpha", messages=messages, max_tokens=10, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == direct(adapters["alpha"], 10, messages=messages)
    template = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsay dog<|im_end|>\n<|im_start|>assistant\n"
    assert answer.usage.prompt_tokens == len(tiny_tokenizer()(template, add_special_tokens=False)["input_ids"])


def test_streamed_answers_add_up_to_the_whole_answer(url, adapters):
    pieces = list(client(url).completions.create(model="beta", prompt=PROMPT, max_tokens=12, temperature=0,
                                                 stream=True))
    assert len(pieces) > 3 and all(p.object == "text_completion" and p.model == "beta" for p in pieces)
    assert "".join(p.choices[0].text for p in pieces) == direct(adapters["beta"], 12)
    assert [p.choices[0].finish_reason for p in pieces] == [None] * (len(pieces) - 1) + ["length"]
    messages = [{"role": "user", "content": "say sun"}]
    chunks = list(client(url).chat.completions.create(model="alpha", messages=messages, max_tokens=10,
                                                      temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content for c in chunks) == direct(adapters["alpha"], 10, messages=messages)


def events(url: str, path: str, body: dict, keep: int | None = None) -> list:
    """Each server-sent event of a streamed answer, raw (or its first `keep`, then hang up)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    out = []
    for line in response:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            out.append(data.decode() if data == b"[DONE]" else json.loads(data))
            if keep is not None and len(out) == keep:
                break
    conn.close()
    return out


def test_event_stream_ends_with_done_and_holds_back_stop_strings(url, adapters):
    full = direct(adapters["alpha"], 12, messages=[{"role": "user", "content": "say sun"}])
    stop = full[4:7]
    got = events(url, "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "say sun"}],
                                               "max_tokens": 12, "temperature": 0, "stop": stop,
                                               "stream_options": {"include_usage": True}})
    assert got[-1] == "[DONE]"
    chunks, usage = got[:-2], got[-2]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] > 0
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == full[: full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_and_finish_reasons(url, adapters):
    full = direct(adapters["alpha"], 12)
    cut = client(url).completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, stop=[full[3:5]])
    assert cut.choices[0].text == full[: full.find(full[3:5])] and cut.choices[0].finish_reason == "stop"
    whole = client(url).completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason == "length"


def test_ignore_eos_makes_max_tokens(engine):
    """vLLM's `ignore_eos`: generation runs past the end token; the text skips it."""
    out = {}
    for ignore in (False, True):
        done, tokens = threading.Event(), []
        job = engine.prepare({"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0,
                              "ignore_eos": ignore}, chat=False)
        seq = engine.submit(job, lambda item, d=done, t=tokens: d.set() if item is None else t.append(item))
        assert done.wait(30)
        out[ignore] = seq.tokens
    eos = tiny_tokenizer().eos_token_id
    model = reference_model(None)
    ids = torch.tensor([tiny_tokenizer()(PROMPT)["input_ids"]])
    with torch.no_grad():  # plain greedy decoding without any end token, as the reference
        full = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    assert out[True] == full and len(full) == 30
    cut = full[: full.index(eos) + 1] if eos in full else full
    assert out[False] == cut


def test_sampling_seed_repeats_and_top_p_keeps_the_head(url, adapters):
    c = client(url)
    first = c.completions.create(model="s1", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=3)
    with ThreadPoolExecutor(4) as pool:  # the same seed gives the same text whatever else is in the batch
        again = list(pool.map(lambda _: c.completions.create(model="s1", prompt=PROMPT, max_tokens=10,
                                                             temperature=1.0, seed=3), range(4)))
    assert {a.choices[0].text for a in again} == {first.choices[0].text}
    # top_p this small keeps only the most likely token: sampling becomes greedy
    head = c.completions.create(model="s1", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=1e-6, seed=5)
    assert head.choices[0].text == direct(adapters["s1"], 10)


def test_64_concurrent_streaming_clients_over_8_adapters(url, adapters, engine):
    """The load test: every client streams; each output equals single-request greedy generation."""
    jobs = [(f"s{i % 8}", f"say {WORDS[(i // 8) % 8]}{'!' * (i % 5)}", 6 + i % 7) for i in range(64)]
    expected = [direct(adapters[name], n, prompt) for name, prompt, n in jobs]

    shared = client(url)  # one client (one connection pool) for all 64 threads, as an app would

    def run(job):
        name, prompt, n = job
        stream = shared.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join(p.choices[0].text for p in stream)

    engine.batcher.peak = 0
    with ThreadPoolExecutor(max_workers=64) as pool:
        got = list(pool.map(run, jobs))
    assert got == expected
    assert engine.batcher.peak >= 8  # requests for different adapters really shared decoding steps


def test_rows_join_a_running_batch_and_slots_limit_the_adapters(adapters):
    """Engine level: sequences over 4 store adapters with 2 slots all finish correctly, in fewer decoding
    steps than one at a time would take (they shared steps)."""
    store = AdapterStore(adapters["beta"].parent, max_device=2)
    engine = Engine(llama(), tiny_tokenizer(), base_id="tiny", store=store, max_tokens_limit=32)
    try:
        jobs = [(f"s{i % 4}", f"say {WORDS[i % 8]}", 5 + i) for i in range(8)]
        out = {i: [] for i in range(len(jobs))}
        done = [threading.Event() for _ in jobs]

        def emit(i):
            return lambda item: done[i].set() if item is None or isinstance(item, BaseException) \
                else out[i].append(item)

        for i, (name, prompt, n) in enumerate(jobs):
            job = engine.prepare({"model": name, "prompt": prompt, "max_tokens": n, "temperature": 0}, chat=False)
            engine.submit(job, emit(i))
        assert all(d.wait(60) for d in done)
        texts = [engine.text(out[i])[0] for i in range(len(jobs))]
        assert texts == [direct(adapters[name], n, prompt) for name, prompt, n in jobs]
        assert engine.batcher.steps < sum(n - 1 for _, _, n in jobs)
        assert len(store.on_model(engine.model)) <= 2 and store.stats()["device_evictions"] >= 2
    finally:
        engine.close()


def test_waiting_prompts_are_prefilled_together_and_a_bad_one_fails_alone(adapters):
    """Batcher level: prompts of different lengths over different adapters (and the base) admitted at once
    run in one left-padded forward, then decode to exactly single-request greedy generation; a prompt the
    model cannot take fails alone; `max_prefill_tokens` caps one prefill's padded tokens."""
    from lorakit.serve.batch import Batcher, Sequence

    model = llama()
    for name in ("alpha", "s1", "beta"):
        lorakit.load_adapter(model, adapters[name], name=name)
    tok = tiny_tokenizer()
    jobs = [("alpha", "say cat", 6), (None, "say a longer thing", 5), ("s1", "dog", 7), ("beta", "say moon!", 4)]
    out = {i: [] for i in range(len(jobs) + 1)}
    seqs = [Sequence(name, tok(prompt)["input_ids"], n, out[i].append) for i, (name, prompt, n) in enumerate(jobs)]
    seqs.append(Sequence("s1", [10**6], 3, out[len(jobs)].append))  # no such token: the forward fails
    forwards = []
    model.register_forward_pre_hook(lambda m, args, kw: forwards.append(kw["input_ids"].shape), with_kwargs=True)
    batcher = Batcher(model.eval(), eos=1)  # not started: this thread drives it
    for seq in seqs:
        batcher.submit(seq)
    batcher.admit()
    lengths = [len(s.prompt) for s in seqs]
    assert forwards[0] == (5, max(lengths))  # all five in one prefill, then each alone to find the bad one
    assert forwards[1:] == [(1, n) for n in lengths]
    assert isinstance(out[len(jobs)][-1], IndexError) and len(batcher.running) == len(jobs)
    while batcher.running:
        batcher.step()
    for i, (name, prompt, n) in enumerate(jobs):
        assert out[i][-1] is None
        assert tok.decode([t for t in out[i][:-1] if t != 1], skip_special_tokens=True) == direct(
            None if name is None else adapters[name], n, prompt)
    small = Batcher(model, eos=1, max_prefill_tokens=2 * max(lengths[:4]))
    for name, prompt, n in jobs:
        small.submit(Sequence(name, tok(prompt)["input_ids"], n, lambda item: None))
    small.admit()
    assert len(small.running) == 2 and len(small.waiting) == 2


def test_a_client_leaving_mid_stream_frees_its_row(url, engine, monkeypatch):
    """The client hangs up after the first event: its row is cancelled long before its 32 tokens."""
    seqs, submit, step = [], engine.submit, engine.batcher.step
    monkeypatch.setattr(engine, "submit", lambda job, emit: seqs.append(submit(job, emit)) or seqs[-1])
    monkeypatch.setattr(engine.batcher, "step", lambda: threading.Event().wait(0.05) or step())  # 32 steps: >1.6 s
    first = events(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 32, "temperature": 0},
                   keep=1)
    assert len(first) == 1
    for _ in range(100):
        if seqs[0].cancelled:
            break
        threading.Event().wait(0.05)
    assert seqs[0].cancelled and len(seqs[0].tokens) < 32
    monkeypatch.undo()
    answer = client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert answer.choices[0].text == direct(None, 4)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": "nope", "prompt": "x"}, 404, "model 'nope' does not exist"),
    ({"model": "../alpha", "prompt": "x"}, 404, "does not exist"),
    ({"model": "escape", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": 3}, 400, "'prompt' must be a string"),
    ({"prompt": "x"}, 400, "'model' must be a string"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 33}, 400, "'max_tokens' must be an integer from 1 to 32"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "'max_tokens' must be an integer"),
    ({"model": "tiny", "prompt": "x" * 51}, 400, "prompt has 51 tokens, more than the limit 50"),
    ({"model": "tiny", "prompt": "x" * 40, "max_tokens": 30}, 400, "more than the model's context of 64"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "'temperature'"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "'top_p'"),
    ({"model": "tiny", "prompt": "x", "seed": 1.5}, 400, "'seed' must be an integer"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "nope", "prompt": "x", "stream": True}, 404, "model 'nope' does not exist"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "'stop'"),
    ({"model": "q4", "prompt": "x"}, 400, "trained on a 4-bit base"),
    ({"model": "long", "prompt": "x"}, 400, "positional setup"),
    ({"model": "broken", "prompt": "x"}, 400, "adapter 'broken' cannot be read"),
    ({"model": "pickled", "prompt": "x"}, 404, "does not exist"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"x" * 5000, 413, "over the limit of 4096"),
])
def test_bad_requests_get_clear_errors(url, body, status, message):
    got, payload = call(url, "POST", "/v1/completions", body)
    assert got == status, payload
    assert message in payload["error"]["message"]
    assert payload["error"]["code"] == status and payload["error"]["type"]


def test_chat_refuses_bad_messages(url):
    for messages in ([], "hi", [{"role": "user"}], [{"role": "robot", "content": "x"}]):
        status, body = call(url, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages})
        assert status == 400 and "'messages' must be a non-empty list" in body["error"]["message"]


def test_openai_client_sees_errors(url):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(url).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).completions.create(model="tiny", prompt="x", max_tokens=1000)


def test_a_full_queue_is_429(url, engine):
    engine.batcher.max_queue = 0
    try:
        status, body = call(url, "POST", "/v1/completions", {"model": "tiny", "prompt": "x"})
    finally:
        engine.batcher.max_queue = 256
    assert status == 429 and "busy" in body["error"]["message"]


def test_unknown_routes_are_404(url):
    assert call(url, "GET", "/v1/nothing")[0] == 404
    status, body = call(url, "POST", "/v1/embeddings", {"model": "tiny"})
    assert status == 404 and "no route" in body["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/load_lora_adapter"])
def test_api_key_is_required(url, path):
    method = "GET" if path == "/v1/models" else "POST"
    body = None if method == "GET" else {"lora_name": "x", "lora_path": "s0"}
    status, payload = call(url, method, path, body, key=None)
    assert status == 401 and "missing API key" in payload["error"]["message"]
    status, payload = call(url, method, path, body, key="wrong")
    assert status == 403 and "wrong API key" in payload["error"]["message"]


def test_runtime_load_and_unload(url, adapters):
    status, text = call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "nested/gamma"})
    assert status == 200 and "gamma" in text
    assert "gamma" in [m.id for m in client(url).models.list().data]
    answer = client(url).completions.create(model="gamma", prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.choices[0].text == direct(adapters["gamma"], 8)
    status, body = call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "nested/gamma"})
    assert status == 400 and "already loaded" in body["error"]["message"]
    assert call(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"})[0] == 200
    status, body = call(url, "POST", "/v1/completions", {"model": "gamma", "prompt": "x"})
    assert status == 404
    status, body = call(url, "POST", "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert status == 404 and "not loaded" in body["error"]["message"]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "must be relative to the store root"),
    ({"lora_name": "x", "lora_path": "../outside"}, 400, "without '..'"),
    ({"lora_name": "x", "lora_path": "nested/../../outside"}, 400, "without '..'"),
    ({"lora_name": "x", "lora_path": "escape"}, 400, "resolves outside the store root"),
    ({"lora_name": "x", "lora_path": "pickled"}, 400, "only safetensors is loaded"),
    ({"lora_name": "x", "lora_path": "missing"}, 404, "no adapter folder"),
    ({"lora_name": "x", "lora_path": "q4"}, 400, "trained on a 4-bit base"),
    ({"lora_name": "../x", "lora_path": "s0"}, 400, "letters, digits"),
    ({"lora_name": "x"}, 400, "'lora_path' must be a string"),
    ({"lora_name": "s0", "lora_path": "s0"}, 400, "already loaded"),
])
def test_runtime_load_refuses_escapes_and_bad_files(url, body, status, message):
    got, payload = call(url, "POST", "/v1/load_lora_adapter", body)
    assert got == status, payload
    assert message in payload["error"]["message"]


def test_runtime_routes_need_the_flag_and_a_key(engine):
    with pytest.raises(ValueError, match="needs an API key"):
        make_app(engine, allow_runtime_adapters=True)
    with Server(make_app(engine)) as server:
        status, body = call(server.url, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "s0"},
                            key=None)
        assert status == 404
        assert call(server.url, "GET", "/v1/models", key=None)[0] == 200  # no key configured: open


def test_loader_rebuilds_4bit_and_longlora_bases_for_served_adapters(adapters, tiny_model_dir):
    """Adapters given at start (`models.load(base, adapters=...)`, as `lorakit serve` loads) make the base
    4-bit / RoPE-interpolated as they were trained; the engine serves them as they are on the model."""
    def q4(m):
        quantize_model(m, "nf4", 64, True)

    def long(m):
        interpolate_positions(m, 128)

    for name, prepare in (("q4", q4), ("long", long)):
        model, tokenizer = load(str(tiny_model_dir), adapters={name: adapters[name]})
        engine = Engine(model, tokenizer, base_id="tiny", adapters={name: adapters[name]})
        try:
            assert engine.fixed == [name]
            done, out = threading.Event(), []
            job = engine.prepare({"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, chat=False)
            engine.submit(job, lambda item, done=done, out=out: done.set() if item is None else out.append(item))
            assert done.wait(30)
            assert engine.text(out)[0] == direct(adapters[name], 8, prepare=prepare)
            assert engine.text(out)[0] != direct(adapters[name], 8)  # the base setup matters
        finally:
            engine.close()
    with pytest.raises(ValueError, match="need different bases"):
        load(str(tiny_model_dir), adapters=[adapters["q4"], adapters["long"]])


def test_cli_serve_starts_and_answers(tiny_model_dir, adapters):
    env = {**os.environ, "LORAKIT_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", "--base", str(tiny_model_dir), "--base-name", "tiny",
         "--adapters", f"alpha={adapters['alpha']}", "--store", str(adapters["beta"].parent), "--port", "0",
         "--allow-runtime-adapters"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line or proc.stderr.read()
        url = line.split()[-1].removesuffix("/v1")
        assert [m.id for m in client(url).models.list().data][:3] == ["tiny", "alpha", "beta"]
        answer = client(url).completions.create(model="beta", prompt=PROMPT, max_tokens=5, temperature=0)
        assert answer.choices[0].text == direct(adapters["beta"], 5)
        assert call(url, "POST", "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "nested/gamma"})[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bench_serve_quick_run(tmp_path):
    """`lorakit bench serve --quick`: every point completes without failures, and batches really formed."""
    from lorakit.cli import main

    out = tmp_path / "serve.jsonl"
    assert main(["bench", "serve", "--quick", "--reps", "1", "--json", str(out), "--set", "adapters=4",
                 "--set", "serial=1"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["adapters"], r["max_batch"]) for r in records] == [(4, 8), (1, 1)]
    for r in records:  # ignore_eos: every request makes exactly max_tokens=4
        assert r["failures"] == 0 and r["completion_tokens"] == 8 * 4 and r["tokens_per_s"] > 0
    assert records[0]["peak_rows"] > 1 and records[1]["peak_rows"] == 1
