"""Fine-tune a model one way on a built-in task and score it: what `bench variants` and `bench learning` share.

A method is a plain dict (see `variants.VARIANTS`, `learning.METHODS`):
  label            how tables name it
  train            "full" (every weight) or "bitfit" (biases and normalization scales); else an adapter:
  lora             LoraSpec fields (r, alpha, kind, rslora, init ...)
  adalora          AdaLoraSpec fields (with kind "adalora")
  lr               peak learning rate
  loraplus_ratio   LoRA+: B's lr = ratio x A's
  quant            a 4-bit base (QLoRA): the quantization record ({} = NF4 + double quantization)

Each run is a pure function of its request (task, method, lr, seed, steps, sizes), run in a fresh Python
process of its own (`run_in_process`: its peak RSS is its own, a crash ends only that run), or in this one
for --quick's tiny random model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


def tiny_model_and_tokenizer(seed: int):
    """A tiny random Llama and a character-level ChatML tokenizer (ids < 128) for --quick."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorakit.data.encode import CHAT_TEMPLATES

    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "<|im_end|>": 1, "<|im_start|>": 2, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = 1
    return model, tok


def load_model(quick: bool, seed: int, quant: dict | None = None):
    """(model, tokenizer): the default model (4-bit as it is read when `quant` is set), or --quick's tiny one
    (quantized in place)."""
    from lorakit.models import load
    from lorakit.quant.linear4bit import quant_record, quantize_model

    if not quick:
        return load("default", quant=quant)
    model, tokenizer = tiny_model_and_tokenizer(seed)
    if quant is not None:
        record = quant_record(quant)
        quantize_model(model, record["type"], record["blocksize"], record["double_quant"])
    return model, tokenizer


def set_trainable(model: nn.Module, method: dict, seed: int):
    """Make the method's parameters trainable (inject its adapter); returns its LoRA spec or None."""
    import torch

    from lorakit.adapters.inject import inject
    from lorakit.config import AdaLoraSpec, LoraSpec

    model.requires_grad_(False)
    if method.get("train") == "full":
        model.requires_grad_(True)
        return None
    if method.get("train") == "bitfit":  # biases and normalization scales only
        norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
        for module in norms:
            module.requires_grad_(True)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)
        return None
    ada = AdaLoraSpec(**method["adalora"]) if "adalora" in method else None
    spec = LoraSpec(**method["lora"], adalora=ada)
    torch.manual_seed(seed)
    inject(model, spec)
    return spec


@dataclass
class Trained:
    """A finished run: the model as trained, its data and figures (`record`)."""

    model: nn.Module
    tokenizer: object
    held_out: list
    max_new_tokens: int
    record: dict


def train_method(method: dict, request: dict, evaluate: Callable[[nn.Module], dict] | None = None,
                 eval_every: int | None = None, before: Callable[[nn.Module, object, list, int], None] | None = None,
                 ) -> Trained:
    """Train `method` on request["task"] (default "demo") for request["steps"] steps of request["batch"] rows
    (default 8) at request["lr"] (default: the method's), seed request["seed"].

    `evaluate(model)` is called every `eval_every` steps and at the last (`fit`'s hook); `before(model,
    tokenizer, held_out, max_new_tokens)` once the trainable parameters are set, before the first step.
    The record: trainable/total parameters, median step seconds (the first step, with its allocations, left
    out; the median also leaves out the few steps an evaluation lengthens), train seconds, peak RSS while
    training, first/last loss and every step's.
    """
    import statistics

    import torch

    from lorakit.adapters.loraplus import loraplus_param_groups
    from lorakit.config import TrainConfig
    from lorakit.data.encode import encode_all
    from lorakit.data.tasks import get_task
    from lorakit.train.fit import fit
    from lorakit_bench.measure import peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(request["threads"])
    seed, steps, lr = request["seed"], request["steps"], request.get("lr") or method["lr"]
    task = get_task(request.get("task", "demo"))
    model, tokenizer = load_model(request["quick"], seed, method.get("quant"))
    train, held_out = task.make(seed, request["n_train"], request["n_eval"])
    cfg = TrainConfig(max_steps=steps, lr=lr, loraplus_ratio=method.get("loraplus_ratio"), seed=seed, eval=False,
                      warmup_steps=min(5, steps // 4), batch_size=request.get("batch", 8), eval_every=eval_every,
                      max_length=request.get("max_length", 256))
    rows = encode_all(tokenizer, train, cfg.max_length, warn=lambda _m: None)
    spec = set_trainable(model, method, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if before is not None:
        before(model, tokenizer, held_out, task.max_new_tokens)
    groups = loraplus_param_groups(model, cfg.lr, cfg.loraplus_ratio, None, cfg.weight_decay) \
        if cfg.loraplus_ratio else None
    setup_rss = peak_rss_bytes()
    reset_peak_rss()
    result = fit(model, rows, cfg, tokenizer.pad_token_id, evaluate=evaluate, param_groups=groups,
                 log=lambda _m: None)
    ends = [r["seconds"] for r in result.history]
    step_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # the first step (allocations) left out
    record = {
        "lr": lr, "trainable_params": trainable, "total_params": total,
        "step_s": statistics.median(step_s) if step_s else result.seconds, "train_s": result.seconds,
        "peak_rss": peak_rss_bytes(), "setup_peak_rss": setup_rss,
        "first_loss": result.first_loss, "last_loss": result.last_loss,
        "losses": [r["loss"] for r in result.history],
    }
    if spec is not None and spec.kind == "adalora":
        from lorakit.adapters.adalora import final_ranks

        ranks = final_ranks(model, "default")
        record["adalora_total_rank"] = sum(ranks.values())
        record["adalora_target_rank"] = spec.adalora.target_r * len(ranks)
    return Trained(model, tokenizer, held_out, task.max_new_tokens, record)


def run_in_process(module: str, request: dict) -> dict:
    """`python -m module REQUEST_JSON` in a fresh process with request["threads"] threads; the JSON record
    it prints last."""
    threads = str(request["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, "-m", module, json.dumps(request)], capture_output=True, text=True,
                          env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {json.dumps(request)} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])
