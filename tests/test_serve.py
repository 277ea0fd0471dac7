"""The stdlib OpenAI-compatible server on 127.0.0.1: answers equal direct generation; clear 4xx errors."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.multi import AdapterStore
from lorakit.serve import Engine, make_server

PROMPT = "say cat"


def llama() -> torch.nn.Module:
    model = tiny_llama()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = 1
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two saved adapters: "alpha" attached at start, "beta" in a store root."""
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for seed, name in ((1, "alpha"), (2, "beta")):
        model = lorakit.inject(llama(), lorakit.LoraSpec(r=4, alpha=8))
        randomize_adapters(model, seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(5)  # big enough to change greedy tokens
        out[name] = lorakit.save_adapter(model, root / ("store" if name == "beta" else "") / name)
    return out


@pytest.fixture(scope="module")
def url(adapters):
    """host:port of a running server over a tiny llama with both adapters."""
    store = AdapterStore(adapters["beta"].parent, max_device=1)
    engine = Engine(llama(), tiny_tokenizer(), base_id="tiny", adapters={"alpha": adapters["alpha"]}, store=store,
                    max_tokens_limit=32)
    server = make_server(engine, "127.0.0.1", 0, max_body_bytes=4096)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    store.close()


def call(url: str, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(url, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def complete(url: str, **request) -> dict:
    status, body = call(url, "POST", "/v1/completions", request)
    assert status == 200, body
    return body


def direct(adapter: Path | None, max_tokens: int, messages: list[dict] | None = None) -> str:
    """Greedy text after PROMPT (or `messages` through the chat template) from a fresh model with only
    that adapter, without the server."""
    model, tok = llama(), tiny_tokenizer()
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    if messages is None:
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=1, eos_token_id=1)
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new[: new.index(1)] if 1 in new else new, skip_special_tokens=True)


def test_models_lists_base_and_adapters(url):
    status, body = call(url, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["tiny", "alpha", "beta"]


def test_greedy_completions_equal_direct_generation(url, adapters):
    texts = {}
    for name, adapter in (("tiny", None), ("alpha", adapters["alpha"]), ("beta", adapters["beta"]), ("tiny", None)):
        body = complete(url, model=name, prompt=PROMPT, max_tokens=12, temperature=0)
        assert body["object"] == "text_completion" and body["model"] == name
        assert body["choices"][0]["text"] == direct(adapter, 12), name
        assert body["usage"]["prompt_tokens"] == len(PROMPT)
        texts[name] = body["choices"][0]["text"]
    assert len(set(texts.values())) == 3  # each adapter really changes the answer


def test_chat_completions_apply_the_template(url, adapters):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say dog"}]
    status, body = call(url, "POST", "/v1/chat/completions",
                        {"model": "alpha", "messages": messages, "max_tokens": 10, "temperature": 0})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": direct(adapters["alpha"], 10, messages)}
    template = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsay dog<|im_end|>\n<|im_start|>assistant\n"
    assert body["usage"]["prompt_tokens"] == len(tiny_tokenizer()(template, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": "robot", "content": "x"}]])
def test_chat_refuses_bad_messages(url, messages):
    status, body = call(url, "POST", "/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert status == 400 and "'messages' must be a non-empty list" in body["error"]["message"]


def test_concurrent_clients_over_adapters_get_their_own_answers(url, adapters):
    """16 clients at once over the base, a start-time adapter and a store adapter (one store slot)."""
    names = ["tiny", "alpha", "beta", "beta"] * 4
    expected = {"tiny": direct(None, 6), "alpha": direct(adapters["alpha"], 6), "beta": direct(adapters["beta"], 6)}
    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = list(pool.map(lambda n: complete(url, model=n, prompt=PROMPT, max_tokens=6, temperature=0), names))
    assert [b["choices"][0]["text"] for b in bodies] == [expected[n] for n in names]


def events(url: str, path: str, body: dict, keep: int | None = None) -> list:
    """The JSON of each server-sent event of a streamed answer (or of its first `keep`, then hang up)."""
    conn = http.client.HTTPConnection(url, timeout=60)
    conn.request("POST", path, body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    out = []
    for line in response:
        if line.startswith(b"data: "):
            data = line[6:].strip()
            out.append(data.decode() if data == b"[DONE]" else json.loads(data))
            if keep is not None and len(out) == keep:
                break
    conn.close()
    return out


def test_streamed_completion_adds_up_to_the_whole_answer(url):
    request = {"model": "beta", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = complete(url, **request)["choices"][0]
    got = events(url, "/v1/completions", request)
    assert got[-1] == "[DONE]" and len(got) > 3  # streamed in pieces
    chunks = got[:-1]
    assert all(c["object"] == "text_completion" and c["model"] == "beta" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [whole["finish_reason"]]


def test_streamed_chat_holds_back_what_may_become_a_stop_string(url):
    request = {"model": "alpha", "messages": [{"role": "user", "content": "say sun"}], "max_tokens": 12,
               "temperature": 0}
    full = call(url, "POST", "/v1/chat/completions", request)[1]["choices"][0]["message"]["content"]
    stop = full[4:7]
    whole = call(url, "POST", "/v1/chat/completions", {**request, "stop": stop})[1]["choices"][0]
    assert whole["message"]["content"] == full[: full.find(stop)] and whole["finish_reason"] == "stop"
    chunks = events(url, "/v1/chat/completions", {**request, "stop": stop})[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_client_leaving_mid_stream_frees_the_model(url):
    first = events(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 32, "temperature": 0},
                   keep=1)
    assert len(first) == 1
    assert complete(url, model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"] \
        == direct(None, 4)


def test_stop_strings_and_finish_reasons(url):
    body = complete(url, model="alpha", prompt=PROMPT, max_tokens=12, temperature=0)
    full = body["choices"][0]
    assert body["usage"]["completion_tokens"] == 12 and full["finish_reason"] == "length"  # no end token here
    assert len(full["text"]) >= 5
    stop = full["text"][3:5]
    cut = complete(url, model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])["choices"][0]
    assert cut["text"] == full["text"][: full["text"].find(stop)]
    assert cut["finish_reason"] == "stop"


def test_sampling_with_a_seed_repeats(url):
    first = complete(url, model="beta", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    again = complete(url, model="beta", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert first["choices"][0]["text"] == again["choices"][0]["text"]


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"model": "nope", "prompt": "x"}, 404, "model 'nope' does not exist"),
    ({"model": "../alpha", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": 3}, 400, "'prompt' must be a string"),
    ({"prompt": "x"}, 400, "'model' must be a string"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 33}, 400, "'max_tokens' must be an integer from 1 to 32"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "'temperature'"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"model": "nope", "prompt": "x", "stream": True}, 404, "model 'nope' does not exist"),
    ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "'stop'"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"x" * 5000, 413, "over the limit of 4096"),
])
def test_bad_requests_get_clear_errors(url, body, status, message):
    got, payload = call(url, "POST", "/v1/completions", body)
    assert got == status
    assert message in payload["error"]["message"]


def test_unknown_routes_are_404(url):
    assert call(url, "GET", "/v1/nothing")[0] == 404
    assert call(url, "POST", "/v1/embeddings", {"model": "tiny"})[0] == 404


def test_cli_serve_starts_and_answers(tiny_model_dir, adapters):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", "--base", str(tiny_model_dir), "--base-name", "tiny",
         "--adapter", f"alpha={adapters['alpha']}", "--store", str(adapters["beta"].parent), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line or proc.stderr.read()
        host = line.split("http://")[1].split("/")[0]
        status, body = call(host, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] == ["tiny", "alpha", "beta"]
        assert complete(host, model="beta", prompt=PROMPT, max_tokens=5, temperature=0)["choices"][0]["text"] \
            == direct(adapters["beta"], 5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
