"""Completions and chat completions from one base model and many adapters, batched across requests.

A request names its adapter in `model` (the base by its own name). Adapters given at start are
attached once; any other name is looked up in an `AdapterStore` (read into RAM on its background
thread, attached on demand into LRU slots). Every request becomes a row of one continuously batched
decoding loop (`batch.Batcher`). Requests are checked here, so every HTTP front end answers the same
4xx errors for the same input.

An adapter is served only on the base it was trained for: the same base (the module shapes its file
records), the same 4-bit quantization (or none) and the same positional setup (LongLoRA's interpolated
RoPE), and only with finite weights (`read_adapter` refuses NaN/Inf). Adapters that would change what
every request sees (trained biases, PiSSA's residual base, `modules_to_save`) are refused.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.adapters.inject import adapter_names, remove_adapter
from lorakit.adapters.io import (
    AdapterFile,
    AdapterFileError,
    base_mismatch,
    check_fits,
    load_adapter,
    read_adapter,
)
from lorakit.data.encode import prompt_text
from lorakit.longlora import context_of
from lorakit.multi.store import NAME, AdapterStore, UnknownAdapterError, check_safetensors, confined
from lorakit.quant.linear4bit import quantization_of
from lorakit.serve.batch import Batcher, QueueFull, Sequence

ROLES = ("system", "user", "assistant")
SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
UNSUPPORTED = {  # OpenAI options this server does not honour -> the values that ask for nothing
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "response_format": (None, {"type": "text"}),
}


class RequestError(Exception):
    """A request that cannot be served; `status` is its HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def serving_problem(model: nn.Module, adapter: AdapterFile, force: bool = False) -> str | None:
    """Why `adapter` cannot be served over `model` next to other adapters, or None. The base's identity comes
    first: an adapter of another base differs in every other way too. (`force`: skip the base check.)"""
    name = adapter.folder.name
    mismatch = None if force else base_mismatch(model, adapter)
    if mismatch:
        return f"adapter {name!r} was made for another base: {mismatch}"
    if adapter.quant != quantization_of(model):
        want = f"a 4-bit base ({adapter.quant})" if adapter.quant else "a full-precision base"
        have = f"4-bit ({quantization_of(model)})" if quantization_of(model) else "full precision"
        return f"adapter {name!r} was trained on {want}, but this server's base is {have}"
    context, own = adapter.context, context_of(model)
    if context is not None and context != json.loads(json.dumps(own, sort_keys=True)):
        return (f"adapter {name!r} was trained with positional setup {context} (LongLoRA), but this server's "
                f"base has {own}")
    if adapter.biases:
        return f"adapter {name!r} trains base biases, which every request would share"
    if adapter.spec.init == "pissa":
        return f"adapter {name!r} is a PiSSA adapter saved for its residual base, which every request would share"
    if adapter.copies:
        return f"adapter {name!r} replaces whole modules (modules_to_save), which cannot be routed per request"
    if adapter.spec.target_parameters:
        return (f"adapter {name!r} adapts mixture-of-experts parameters ({adapter.spec.target_parameters}), which "
                "cannot be routed per request yet; serve the merged model (`lorakit merge`) instead")
    return None


class Engine:
    """The model, its tokenizer and its adapters, behind the OpenAI completions schema."""

    def __init__(self, model: nn.Module, tokenizer, base_id: str = "base",
                 adapters: dict[str, str | Path] | None = None, store: AdapterStore | None = None,
                 max_tokens_limit: int = 512, max_prompt_tokens: int = 2048, max_batch: int = 64,
                 max_queue: int = 256, max_prefill_tokens: int = 4096) -> None:
        self.model, self.tokenizer, self.base_id, self.store = model.eval(), tokenizer, base_id, store
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.lock = threading.Lock()  # held while the model's adapters change or are checked
        self.retired: set[str] = set()  # unloaded, still on the model until no running row uses them
        self.reading: dict[str, Future] = {}  # store adapters being read into RAM for waiting requests
        self.fixed = []
        for name, path in (adapters or {}).items():  # already on the model when `models.load` put them there
            adapter = read_adapter(path)
            problem = serving_problem(model, adapter)
            if problem:
                raise ValueError(problem + " (lorakit.models.load(base, adapters=...) makes the base they need)")
            self.fixed.append(name if name in adapter_names(model) else load_adapter(model, adapter, name=name))
        eos = tokenizer.eos_token_id
        self.batcher = Batcher(model, eos, max_batch, max_queue, self.ready, self.attach, self.idle,
                               max_prefill_tokens).start()

    def close(self) -> None:
        self.batcher.stop()
        if self.store is not None:
            self.store.close()

    # ------------------------------------------------------------------------- adapters

    def model_ids(self) -> list[str]:
        """The base, then the adapters attached at start, then those in the store."""
        stored = self.store.names() if self.store is not None else []
        return [self.base_id, *self.fixed, *(n for n in stored if n not in self.fixed)]

    def models(self) -> dict:
        """The `/v1/models` answer."""
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lorakit"}
                                           for n in self.model_ids()]}

    def check_model(self, name: str) -> None:
        """A 404 for a name that is neither the base nor an adapter here or in the store."""
        if name == self.base_id or name in self.fixed:
            return
        try:
            if self.store is None:
                raise UnknownAdapterError(name)
            self.store.folder(name)
        except (UnknownAdapterError, ValueError, OSError):
            raise RequestError(404, f"model {name!r} does not exist") from None

    def ready(self, name: str) -> bool:
        """(Engine loop) Whether adapter `name` can be attached without waiting for the disk; starts its read
        on the store's thread, and raises what that read raised (a broken file)."""
        if name in self.fixed:
            return True
        self.check_model(name)
        if self.store.cached(name):
            self.reading.pop(name, None)
            return True
        future = self.reading.get(name)
        if future is not None and future.done():
            del self.reading[name]
            if future.exception() is not None:  # a file that cannot be served is refused as at a runtime load
                e = future.exception()
                status = 400 if isinstance(e, AdapterFileError) else 500
                raise RequestError(status, f"adapter {name!r} cannot be read: {type(e).__name__}: {e}")
            return self.store.cached(name)
        if future is None:
            self.reading.update(zip([name], self.store.prefetch([name]), strict=False))
            if name not in self.reading:  # a read started elsewhere: wait for it through `get` on the next call
                self.reading[name] = self.store.pool.submit(self.store.get, name)
        return False

    def attach(self, names: list[str]) -> bool:
        """(Engine loop) Put the store adapters among `names` on the model; False while no slot is free."""
        stored = list(dict.fromkeys(n for n in names if n not in self.fixed))
        if not stored:
            return True
        if len(stored) > self.store.max_device:
            return False
        with self.lock:
            on_model = set(self.store.on_model(self.model))
            for name in stored:
                if name not in on_model:
                    problem = serving_problem(self.model, self.store.get(name), self.store.force)
                    if problem:
                        raise RequestError(400, problem)
            self.store.attach(self.model, stored)
        return True

    def idle(self, running: list[str]) -> None:
        """(Engine loop) Take unloaded adapters off the model once no running row uses them."""
        if not self.retired:
            return
        with self.lock:
            for name in sorted(self.retired - set(running)):
                if self.store is not None and name in self.store.on_model(self.model):
                    self.store.detach(self.model, name)
                elif name in adapter_names(self.model):
                    remove_adapter(self.model, name)
                self.retired.discard(name)

    def load(self, name: str, path: str) -> None:
        """Serve the adapter folder `path` (relative to the store root) as `name` (a runtime load)."""
        if self.store is None:
            raise RequestError(400, "runtime adapters need a store: start the server with --store ROOT")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RequestError(400, "'lora_name' must be a string of letters, digits, '_' or '-' (at most 255)")
        if not isinstance(path, str):
            raise RequestError(400, "'lora_path' must be a string: a folder relative to the store root")
        if name == self.base_id or name in self.fixed:
            raise RequestError(400, f"adapter {name!r} is already loaded")
        with self.lock:
            if name in self.retired:
                raise RequestError(409, f"adapter {name!r} is still being unloaded; try again shortly")
            try:
                folder = confined(self.store.root, path)
                found = folder.is_dir()
            except (ValueError, OSError) as e:
                raise RequestError(400, f"'lora_path': {getattr(e, 'strerror', None) or e}") from None
            if not found:
                raise RequestError(404, f"no adapter folder {path!r} under the store root")
            try:
                check_safetensors(folder)
                adapter = read_adapter(folder)
                problem = serving_problem(self.model, adapter, self.store.force)
                if problem:
                    raise RequestError(400, problem)
                check_fits(self.model, adapter, force=self.store.force)
                self.store.add(name, path)
            except UnknownAdapterError as e:
                raise RequestError(404, str(e)) from None
            except ValueError as e:  # a file that does not fit the base, a name taken
                raise RequestError(400, str(e)) from None
            except OSError as e:
                raise RequestError(400, f"adapter folder {path!r} cannot be read: {e.strerror or e}") from None

    def unload(self, name: str) -> None:
        """Stop serving adapter `name`: new requests get 404; running ones finish first."""
        if not isinstance(name, str):
            raise RequestError(400, "'lora_name' must be a string")
        with self.lock:
            if name in self.fixed:
                self.fixed.remove(name)
            else:
                try:
                    if self.store is None:
                        raise UnknownAdapterError(name)
                    self.store.remove(name)
                except (UnknownAdapterError, ValueError):
                    raise RequestError(404, f"adapter {name!r} is not loaded") from None
            self.retired.add(name)

    # ------------------------------------------------------------------------- requests

    def prepare(self, request: dict, chat: bool) -> Job:
        """A checked request of either endpoint, its prompt tokenized; every 4xx is raised here."""
        name, params = self.check(request, chat)
        if chat:
            prompt = prompt_text(self.tokenizer, chat_messages(request, self.tokenizer))
        else:
            prompt = request.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError(400, "'prompt' must be a string (or a list of one string)")
        # a chat template writes its own special tokens
        ids = self.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if not ids:
            raise RequestError(400, "the prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(400, f"prompt has {len(ids)} tokens, more than the limit {self.max_prompt_tokens}")
        if self.context is not None and len(ids) + params["max_tokens"] > self.context:
            raise RequestError(400, f"prompt ({len(ids)} tokens) + 'max_tokens' ({params['max_tokens']}) is more than "
                                    f"the model's context of {self.context} tokens")
        self.check_model(name)
        return Job(name, ids, params, chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()))

    def submit(self, job: Job, emit: Callable[[object], None]) -> Sequence:
        """Queue `job`; `emit` gets (on the engine's thread) each token id, then None, or an exception."""
        p = job.params
        adapter = None if job.name == self.base_id else job.name
        seq = Sequence(adapter, job.ids, p["max_tokens"], emit, p["temperature"], p["top_p"], p["seed"],
                       stop_at_eos=not p["ignore_eos"])
        try:
            return self.batcher.submit(seq)
        except QueueFull as e:
            raise RequestError(429, f"the server is busy: {e}; try again later") from None

    def cancel(self, seq: Sequence) -> None:
        self.batcher.cancel(seq)

    def check(self, request: dict, chat: bool = False) -> tuple[str, dict]:
        """(adapter name, generation parameters) of a request, or a 400 naming the bad field."""
        if not isinstance(request, dict):
            raise RequestError(400, "the request body must be a JSON object")
        name = request.get("model")
        if not isinstance(name, str):
            raise RequestError(400, "'model' must be a string: the adapter name (or the base model's)")
        stream = request.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false")
        n = request.get("n")
        if n is not None and (not is_int(n) or n != 1):
            raise RequestError(400, "'n' must be 1")
        for key, neutral in UNSUPPORTED.items():
            if not any(same(request.get(key), v) for v in neutral):
                raise RequestError(400, f"{key!r} is not supported by this server; leave it out")
        max_tokens = request.get("max_tokens")
        if max_tokens is None and chat:
            max_tokens = request.get("max_completion_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if not is_int(max_tokens) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(400, f"'max_tokens' must be an integer from 1 to {self.max_tokens_limit}")
        temperature, top_p = request.get("temperature", 1.0), request.get("top_p", 1.0)
        temperature = 1.0 if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        if not is_number(temperature) or not 0 <= temperature <= 2:
            raise RequestError(400, "'temperature' must be a number from 0 to 2")
        if not is_number(top_p) or not 0 < top_p <= 1:
            raise RequestError(400, "'top_p' must be a number in (0, 1]")
        seed = request.get("seed")
        if seed is not None and (not is_int(seed) or not SEEDS[0] <= seed <= SEEDS[1]):
            raise RequestError(400, f"'seed' must be an integer from {SEEDS[0]} to {SEEDS[1]} (64 bits)")
        ignore_eos = request.get("ignore_eos", False)  # vLLM's extension: always max_tokens (benchmarks)
        if not isinstance(ignore_eos, bool):
            raise RequestError(400, "'ignore_eos' must be true or false")
        options = request.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError(400, "'stream_options' must be an object")
        if not isinstance(options.get("include_usage", False), bool):
            raise RequestError(400, "'stream_options.include_usage' must be true or false")
        return name, {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                      "stop": request_stops(request), "stream": stream, "ignore_eos": ignore_eos,
                      "usage": bool(options.get("include_usage", False))}

    def text(self, tokens: list[int], ignore_eos: bool = False) -> tuple[str, bool]:
        """(text of the new tokens up to the end token, whether the end token came)."""
        eos = self.tokenizer.eos_token_id
        ended = eos is not None and eos in tokens and not ignore_eos
        return self.tokenizer.decode(tokens[: tokens.index(eos)] if ended else tokens, skip_special_tokens=True), ended


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether there was one."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass
class Job:
    """A checked request: which adapter, the prompt's token ids, the generation parameters."""

    name: str
    ids: list[int]
    params: dict
    chat: bool
    id: str
    created: int

    def head(self, chunk: bool) -> dict:
        """The fields every answer or streamed chunk starts with (OpenAI's object names: only chat's differ)."""
        kind = "text_completion" if not self.chat else "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name}

    def choice(self, text: str, finish: str | None, delta: bool, first: bool = False) -> dict:
        """One choice of an answer, or of a streamed chunk (`delta`; the first one says the role)."""
        if not self.chat:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        if delta:
            return {"index": 0, "delta": {"role": "assistant", "content": text} if first else {"content": text},
                    "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


class Answer:
    """A job's tokens as they come, turned into text: cut at a stop string; what could still become a
    stop string, or an incomplete character, is held back, so the pieces add up to the whole answer."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self.engine, self.job = engine, job
        self.tokens: list[int] = []
        self.sent = 0  # characters handed out so far
        self.hold = max((len(s) - 1 for s in job.params["stop"]), default=0)
        self.done = False  # a stop string or the end token came
        self.chunks = 0

    def add(self, token: int) -> str:
        """Take one token; the new text that is safe to send ('' if none)."""
        self.tokens.append(token)
        text, ended = self.engine.text(self.tokens, self.job.params["ignore_eos"])
        text, hit = cut_at_stop(text, self.job.params["stop"])
        if hit or ended:
            self.done = True
            return ""
        safe = len(text) - self.hold - (1 if text.endswith("\ufffd") else 0)  # "\ufffd": a partial character
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece

    def finish(self) -> tuple[str, str]:
        """(the text not yet sent, OpenAI's finish_reason), once no more tokens come."""
        text, ended = self.engine.text(self.tokens, self.job.params["ignore_eos"])
        text, hit = cut_at_stop(text, self.job.params["stop"])
        reason = "stop" if hit or ended or len(self.tokens) < self.job.params["max_tokens"] else "length"
        rest, self.sent = text[self.sent :], len(text)
        return rest, reason

    def usage(self) -> dict:
        n = len(self.job.ids)
        return {"prompt_tokens": n, "completion_tokens": len(self.tokens), "total_tokens": n + len(self.tokens)}

    def chunk(self, text: str, finish: str | None) -> dict:
        """A streamed chunk."""
        self.chunks += 1
        choice = self.job.choice(text, finish, delta=True, first=self.chunks == 1)
        return {**self.job.head(chunk=True), "choices": [choice]}

    def whole(self) -> dict:
        """The whole answer (not streamed)."""
        self.sent = 0
        text, finish = self.finish()
        return {**self.job.head(chunk=False), "choices": [self.job.choice(text, finish, delta=False)],
                "usage": self.usage()}


def chat_messages(request: dict, tokenizer) -> list[dict]:
    """The request's messages as {role, content}, for a tokenizer that has a chat template."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        raise RequestError(400, f"'messages' must be a non-empty list of {{role: one of {list(ROLES)}, "
                                "content: string}")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError(400, "this model's tokenizer has no chat template; use /v1/completions")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def request_stops(request: dict) -> list[str]:
    """The request's `stop` as a list of non-empty strings (at most 4, as OpenAI allows)."""
    stop = request.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(400, "'stop' must be a non-empty string or a list of at most 4 of them")
    return stops


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def same(value, neutral) -> bool:
    """`value == neutral` of the same JSON type (true is not 1, 0.0 is 0)."""
    return value is neutral or (is_number(value) and is_number(neutral) and value == neutral) or (
        type(value) is type(neutral) and value == neutral)
