"""Continuous batching: one loop on one thread decodes every running sequence a token per step.

    waiting --admit (prefill together, KV rows joined)--> running --step (one forward, rows routed)--> done

Sequences join between two decoding steps: the prompts admitted together run in one forward (left-padded
to the longest, at most `max_prefill_tokens` padded tokens; each row through its own adapter), and their
KV caches become new rows of the batch's cache. Rows are left-padded to one length (the attention mask
hides the padding; positions are each row's own), so a decoding step is one forward over all rows, each
row through its own adapter (`lorakit.route`). A finished or cancelled row leaves the cache before the
next step; columns that only padding uses are dropped.

A request fails alone: a shared prefill that fails changes nothing (its prompts are retried one by one),
and a row whose token cannot be chosen or sent (a seed torch refuses, scores that are not finite, a client
whose callback breaks) gets its error and leaves the running set and the KV rows before the next forward.

Only this loop's thread runs the model or changes its adapters (`attach`/`detach` callbacks).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lorakit.multi.routing import route


class QueueFull(Exception):
    """More sequences waiting than the queue holds."""


@dataclass
class Sequence:
    """One request's generation: prompt, settings, and the tokens made so far."""

    adapter: str | None  # None = the base model
    prompt: list[int]
    max_tokens: int
    emit: Callable[[object], None]  # called on the loop's thread: a token id, then None at the end (or an exception)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    generator: torch.Generator | None = None

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from logits [vocab]: argmax at temperature 0, else a top-p sample from own generator."""
        if self.temperature == 0:
            return int(logits.argmax())
        if self.generator is None:
            self.generator = torch.Generator()
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()
        scaled = logits.float().cpu() / self.temperature  # [V], sampled on the CPU
        if not torch.isfinite(scaled).all():  # finite scores overflowed: a temperature this low is greedy
            return int(logits.argmax())
        probs = torch.softmax(scaled, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= self.top_p  # keep the smallest head reaching top_p
            drop[0] = False  # the most likely token, even where top_p rounds to 0 in float32
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class RowCache:
    """The running rows' KV cache: a DynamicCache with rows left-padded to one length, and mask [B, L]."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] long, 1 = a real token

    def layers(self, cache: DynamicCache) -> list[DynamicLayer]:
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(f"continuous batching needs a plain DynamicCache; this model uses {kinds}")
        return list(cache.layers)

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append the rows of a prefill's cache (left-padded prompts, `mask` [k, T]) as the last rows."""
        new = self.layers(cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, layer in zip(self.layers(self.cache), new, strict=True):
            old.keys = torch.cat([left_pad(old.keys, width), left_pad(layer.keys, width)])
            old.values = torch.cat([left_pad(old.values, width), left_pad(layer.values, width)])
        self.mask = torch.cat([left_pad(self.mask, width, dim=1), left_pad(mask, width, dim=1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop the columns every kept row pads."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first column some row uses
        self.mask = mask[:, start:]
        for layer in self.layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """`t` with zeros before its entries along `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batcher:
    """The engine loop: admits waiting sequences between steps, decodes all running ones together.

    `ready(name)` says whether an adapter can be attached now without waiting for the disk (it may start
    a read); `attach(names)` makes the adapters of the running rows plus the new ones present on the model
    (False: no slot free now); `idle()` runs between steps (detaching unloaded adapters). One prefill takes
    at most `max_prefill_tokens` prompt tokens, padding included (a longer prompt alone is always taken)."""

    def __init__(self, model: nn.Module, eos: int | None, max_batch: int = 64, max_queue: int = 256,
                 ready: Callable[[str], bool] = lambda name: True,
                 attach: Callable[[list[str]], bool] = lambda names: True,
                 idle: Callable[[list[str]], None] = lambda running: None, max_prefill_tokens: int = 4096) -> None:
        self.model, self.eos, self.max_batch, self.max_queue = model, eos, max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.device = next(model.parameters()).device
        self.ready, self.attach, self.idle = ready, attach, idle
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.rows = RowCache()
        self.wake = threading.Condition()
        self.stopped = False
        self.steps = 0  # decoding steps run
        self.peak = 0  # most rows decoded together
        self.thread = threading.Thread(target=self.loop, name="lorakit-engine", daemon=True)

    def start(self) -> Batcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=60)

    def submit(self, seq: Sequence) -> Sequence:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the queue's limit")
            self.waiting.append(seq)
            self.wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client left or a stop string came): its row leaves before the next step."""
        seq.cancelled = True
        with self.wake:
            self.wake.notify()

    def running_adapters(self) -> list[str]:
        return [s.adapter for s in self.running if s.adapter is not None]

    # ------------------------------------------------------------------------- the loop

    def loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopped and not self.running and not self.waiting:
                    self.wake.wait(timeout=1.0)
                    self.idle([])
                if self.stopped:
                    break
            try:
                self.drop_finished()
                self.idle(self.running_adapters())
                self.admit()
                if self.running:
                    self.step()
                elif self.waiting:
                    time.sleep(0.002)  # waiting only for adapters being read
            except Exception as e:  # a fault of ours in a shared forward: fail the running rows, keep serving
                running, self.running, self.rows = self.running, [], RowCache()
                for seq in running:
                    fail(seq, e)
        for seq in [*self.running, *self.waiting]:
            if not seq.cancelled:
                fail(seq, RuntimeError("the server is shutting down"))

    def drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not s.cancelled]
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.rows.keep(keep)

    def admit(self) -> None:
        """Move waiting sequences whose adapter is ready into the batch (FIFO, skipping the not-ready), their
        prompts prefilled together."""
        with self.wake:
            candidates = list(self.waiting)
        joining: list[Sequence] = []
        for seq in candidates:
            if len(self.running) + len(joining) >= self.max_batch:
                break
            if seq.cancelled:
                self.take(seq)
                continue
            width = max([len(seq.prompt), *(len(s.prompt) for s in joining)])
            if joining and width * (len(joining) + 1) > self.max_prefill_tokens:
                break
            try:
                wanted = [*self.running_adapters(), *(s.adapter for s in joining if s.adapter is not None)]
                if seq.adapter is not None and (not self.ready(seq.adapter) or not self.attach([*wanted, seq.adapter])):
                    continue
            except Exception as e:  # this request's adapter: fail it alone
                self.take(seq)
                fail(seq, e)
                continue
            self.take(seq)
            joining.append(seq)
        if not joining:
            return
        try:
            out = self.prefill(joining)
        except Exception as e:  # nothing changed: find the prompt at fault, each alone
            if len(joining) == 1:
                fail(joining[0], e)
                return
            for seq in joining:
                try:
                    out = self.prefill([seq])
                except Exception as e:
                    fail(seq, e)
                    continue
                self.join([seq], *out)
            return
        self.join(joining, *out)

    def take(self, seq: Sequence) -> None:
        with self.wake:
            if seq in self.waiting:
                self.waiting.remove(seq)

    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Run the prompts in one forward (left-padded): (their KV cache, mask [k, T], last logits [k, V]).
        Changes nothing else, so that a failure leaves no trace."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)  # [k, T], left-padded (0: a masked pad)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq.prompt):] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[i, width - len(seq.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # each row's own positions from 0
        with route(self.model, [s.adapter for s in seqs]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        self.rows.layers(out.past_key_values)
        return out.past_key_values, mask, out.logits[:, -1]

    def join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Emit each prefilled sequence's first token; those still going become running rows (a sequence that
        failed or already ended never does)."""
        self.push(seqs, logits)
        alive = [i for i, seq in enumerate(seqs) if not seq.cancelled]
        if not alive:
            return
        new = RowCache()
        new.add(cache, mask)
        if len(alive) < len(seqs):
            new.keep(alive)
        self.running += [seqs[i] for i in alive]
        self.rows.add(new.cache, new.mask)

    def push(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose and emit each sequence's next token from its logits (row i of [k, V]); end a sequence at the
        end token or at max_tokens. A row that fails is failed alone (cancelled: it leaves before the next
        forward)."""
        greedy, finite = torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()]).tolist()  # 1 transfer
        for i, seq in enumerate(seqs):
            if seq.cancelled:
                continue
            try:
                if not finite[i]:
                    through = "the base model" if seq.adapter is None else f"adapter {seq.adapter!r}"
                    raise FloatingPointError(f"the scores of {through} for this request are not finite (NaN or Inf)")
                token = greedy[i] if seq.temperature == 0 else seq.sample(logits[i])
                seq.tokens.append(token)
                seq.emit(token)
            except Exception as e:
                fail(seq, e)
                continue
            if (token == self.eos and seq.stop_at_eos) or len(seq.tokens) >= seq.max_tokens:
                seq.cancelled = True
                send(seq, None)

    @torch.no_grad()
    def step(self) -> None:
        """One decoding step for every running row."""
        self.drop_finished()
        if not self.running:
            return
        rows = self.running
        device = self.device
        ids = torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long, device=device)  # [B, 1]
        positions = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in rows], device=device)  # [B, 1]
        mask = torch.cat([self.rows.mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], 1)  # [B, L+1]
        with route(self.model, [s.adapter for s in rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self.rows.cache, use_cache=True)
        self.rows.mask = mask
        self.steps += 1
        self.peak = max(self.peak, len(rows))
        self.push(rows, out.logits[:, -1])  # [B, V]
        self.drop_finished()


def send(seq: Sequence, item: object) -> None:
    """Hand `item` to the sequence's client; a client whose callback fails is gone: nothing more to tell it."""
    try:
        seq.emit(item)
    except Exception:  # the client left
        seq.cancelled = True


def fail(seq: Sequence, error: Exception) -> None:
    """End a sequence with `error` (its row, if any, leaves before the next forward)."""
    seq.cancelled = True
    send(seq, error)
