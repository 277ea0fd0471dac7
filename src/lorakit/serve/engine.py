"""Completions and chat completions from one base model and many adapters, one request at a time.

A request names its adapter in `model` (the base by its own name). Adapters given at start are
attached once; any other name is looked up in an `AdapterStore` and attached on demand (LRU slots).
Requests are checked here, so every HTTP front end answers the same 4xx errors for the same input.
No batching across requests: one lock serialises generation on the model (a streamed answer holds
it while its tokens come, from a generation thread).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lorakit.adapters.inject import set_active
from lorakit.adapters.io import load_adapter
from lorakit.data.encode import prompt_text
from lorakit.multi.store import AdapterStore, UnknownAdapterError

ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request that cannot be served; `status` is its HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Engine:
    """The model, its tokenizer and its adapters, behind the OpenAI completions schema."""

    def __init__(self, model: nn.Module, tokenizer, base_id: str = "base",
                 adapters: dict[str, str | Path] | None = None, store: AdapterStore | None = None,
                 max_tokens_limit: int = 512, max_prompt_tokens: int = 2048) -> None:
        self.model, self.tokenizer, self.base_id, self.store = model.eval(), tokenizer, base_id, store
        self.max_tokens_limit, self.max_prompt_tokens = max_tokens_limit, max_prompt_tokens
        self.fixed = [load_adapter(model, path, name=name) for name, path in (adapters or {}).items()]
        self.lock = threading.Lock()

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
        except (UnknownAdapterError, ValueError):
            raise RequestError(404, f"model {name!r} does not exist") from None

    def select(self, name: str) -> None:
        """Make the request's adapter the only active one (attaching it from the store if needed). Holds the lock."""
        if name == self.base_id:
            set_active(self.model, [])
        elif name in self.fixed:
            set_active(self.model, [name])
        else:
            self.store.activate(self.model, name)

    def prepare(self, request: dict, chat: bool) -> Job:
        """A checked request of either endpoint, its prompt tokenized; every 4xx is raised here."""
        name, params = self.check(request)
        if chat:
            prompt = prompt_text(self.tokenizer, chat_messages(request, self.tokenizer))
        else:
            prompt = request.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise RequestError(400, "'prompt' must be a string (or a list of one string)")
        # a chat template writes its own special tokens
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)["input_ids"]  # [1, T]
        if ids.shape[1] > self.max_prompt_tokens:
            raise RequestError(400, f"prompt has {ids.shape[1]} tokens, more than the limit {self.max_prompt_tokens}")
        self.check_model(name)
        return Job(name, ids, params, chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()))

    def complete(self, request: dict) -> dict:
        """The `/v1/completions` answer to a parsed JSON request body: the prompt as given."""
        return self.answer(self.prepare(request, chat=False))

    def chat(self, request: dict) -> dict:
        """The `/v1/chat/completions` answer: the messages through the tokenizer's chat template."""
        return self.answer(self.prepare(request, chat=True))

    def answer(self, job: Job) -> dict:
        """The whole answer to a prepared request."""
        with self.lock:
            self.select(job.name)
            new = self.generate(job.ids, job.params)  # [n]
        text, finish = self.finish(new, job.params["max_tokens"], job.params["stop"])
        n = job.ids.shape[1]
        usage = {"prompt_tokens": n, "completion_tokens": len(new), "total_tokens": n + len(new)}
        return {**job.head(chunk=False), "choices": [job.choice(text, finish, delta=False)], "usage": usage}

    def stream(self, job: Job) -> Generator[dict, None, None]:
        """The answer as chunks while it is generated (`stream: true`), the last one with the finish_reason.
        Text that could still become a stop string, or an incomplete character, is held back; the chunks
        add up to the whole answer where decoding more tokens only appends text."""
        params, eos = job.params, self.tokenizer.eos_token_id
        hold = max((len(s) - 1 for s in params["stop"]), default=0)
        with self.lock:
            self.select(job.name)
            tokens, sent = [], 0
            with TokenStream(self, job) as stream:
                for token in stream:
                    tokens.append(token)
                    if token == eos:
                        break
                    text, hit = cut_at_stop(self.decode(tokens)[0], params["stop"])
                    if hit:
                        break
                    safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)  # "\ufffd": a partial character
                    if safe > sent:
                        yield {**job.head(chunk=True), "choices": [job.choice(text[sent:safe], None, delta=True)]}
                        sent = safe
        text, finish = self.finish(tokens, params["max_tokens"], params["stop"])
        yield {**job.head(chunk=True), "choices": [job.choice(text[sent:], finish, delta=True)]}

    def check(self, request: dict) -> tuple[str, dict]:
        """(adapter name, generation parameters) of a request, or a 400 naming the bad field."""
        if not isinstance(request, dict):
            raise RequestError(400, "the request body must be a JSON object")
        name = request.get("model")
        if not isinstance(name, str):
            raise RequestError(400, "'model' must be a string: the adapter name (or the base model's)")
        stream = request.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false")
        if request.get("n", 1) != 1:
            raise RequestError(400, "'n' must be 1")
        max_tokens = request.get("max_tokens", 16)
        if not is_int(max_tokens) or not 1 <= max_tokens <= self.max_tokens_limit:
            raise RequestError(400, f"'max_tokens' must be an integer from 1 to {self.max_tokens_limit}")
        temperature, top_p = request.get("temperature", 1.0), request.get("top_p", 1.0)
        if not is_number(temperature) or not 0 <= temperature <= 2:
            raise RequestError(400, "'temperature' must be a number from 0 to 2")
        if not is_number(top_p) or not 0 < top_p <= 1:
            raise RequestError(400, "'top_p' must be a number in (0, 1]")
        seed = request.get("seed")
        if seed is not None and not is_int(seed):
            raise RequestError(400, "'seed' must be an integer")
        return name, {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                      "stop": request_stops(request), "stream": stream}

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, params: dict, streamer=None, stopping_criteria=None) -> list[int]:
        """New token ids after prompt `ids` [1, T]: greedy at temperature 0, else sampled."""
        if params["seed"] is not None:
            torch.manual_seed(params["seed"])
        temperature, top_p = params["temperature"], params["top_p"]
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None} if temperature > 0 \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params["max_tokens"],
                                  pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id, streamer=streamer,
                                  stopping_criteria=stopping_criteria, **sample)
        return out[0, ids.shape[1] :].tolist()

    def decode(self, new: list[int]) -> tuple[str, bool]:
        """(text of the new tokens up to the end token, whether the end token came)."""
        eos = self.tokenizer.eos_token_id
        ended = eos is not None and eos in new
        return self.tokenizer.decode(new[: new.index(eos)] if ended else new, skip_special_tokens=True), ended

    def finish(self, new: list[int], max_tokens: int, stops: list[str]) -> tuple[str, str]:
        """The text (cut before the first stop string) and OpenAI's finish_reason."""
        text, ended = self.decode(new)
        text, hit = cut_at_stop(text, stops)
        return text, "stop" if hit or ended or len(new) < max_tokens else "length"


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether there was one."""
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@dataclass
class Job:
    """A checked request: which adapter, the prompt's token ids [1, T], the generation parameters."""

    name: str
    ids: torch.Tensor
    params: dict
    chat: bool
    id: str
    created: int

    def head(self, chunk: bool) -> dict:
        """The fields every answer or streamed chunk starts with (OpenAI's object names: only chat's differ)."""
        kind = "text_completion" if not self.chat else "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name}

    def choice(self, text: str, finish: str | None, delta: bool) -> dict:
        """One choice of an answer, or of a streamed chunk (`delta`)."""
        if not self.chat:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        key, message = ("delta", {"content": text}) if delta else ("message", {"role": "assistant", "content": text})
        return {"index": 0, key: message, "logprobs": None, "finish_reason": finish}


class Cancel(StoppingCriteria):
    """Stops `generate` at its next step once set (a stop string was met, or the client left)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TokenStream(BaseStreamer):
    """New token ids of a `generate` running on another thread, as they come; leaving the `with` block
    cancels the generation and waits for it."""

    def __init__(self, engine: Engine, job: Job) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()
        self.prompt_seen = False
        self.cancel = Cancel()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.run, args=(engine, job), daemon=True)

    def run(self, engine: Engine, job: Job) -> None:
        try:
            engine.generate(job.ids, job.params, streamer=self, stopping_criteria=StoppingCriteriaList([self.cancel]))
        except BaseException as e:  # handed to the reading thread
            self.error = e
        finally:
            self.queue.put(None)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.queue.put(token)

    def end(self) -> None:
        pass  # `run` marks the end, also when generate fails

    def __enter__(self) -> TokenStream:
        self.thread.start()
        return self

    def __iter__(self) -> Iterator[int]:
        while (token := self.queue.get()) is not None:
            yield token
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc) -> None:
        self.cancel.event.set()
        self.thread.join()


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
