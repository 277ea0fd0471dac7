"""The peers' side of each scenario: Hugging Face PEFT (+ bitsandbytes), and plain transformers.

The peers are imported here only, lazily, by name (library code never imports them); a missing
one is an ImportError saying what to install. Each task mirrors its lorakit twin in `ours.py`:
same model folder, batch, adapter shape, optimizer and loss definition (the mean cross entropy
over the supervised tokens, here computed by transformers from `labels`, as a PEFT user runs it).
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import time
from types import ModuleType

import torch
from torch import nn

from lorakit_bench.ours import forward_task, linear_weights, randomize_lora_B, train_step_task
from lorakit_bench.workload import Task, Workload, load_base, make_batch

INSTALL = {"peft": "pip install peft", "bitsandbytes": "pip install bitsandbytes"}


def need(module: str) -> ModuleType:
    """Import a peer by name, or fail saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this benchmark compares against {module}, which is not installed "
                          f"({e}); install it with: {INSTALL.get(module, 'pip install ' + module)}") from None


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def peft_name() -> str:
    return f"peft {version('peft')}"


def peft_bnb_name() -> str:
    return f"peft {version('peft')} + bitsandbytes {version('bitsandbytes')}"


def bnb_name() -> str:
    return f"bitsandbytes {version('bitsandbytes')}"


def transformers_name() -> str:
    return f"transformers {version('transformers')} (full logits)"


def peft_config(w: Workload):
    peft = need("peft")
    return peft.LoraConfig(r=w.r, lora_alpha=w.alpha, lora_dropout=0.0, target_modules=w.targets, bias="none",
                           task_type="CAUSAL_LM")


def floor_full_logits(w: Workload) -> Task:
    """The floor as transformers computes a loss: logits at every position, then the masked mean."""
    model = load_base(w)
    batch = make_batch(w, model.config.vocab_size)

    def run() -> dict[str, float]:
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"],
                     use_cache=False).loss
        loss.backward()
        return {"loss": loss.item()}

    return Task(run, keep=[model])


def peft_forward(w: Workload) -> Task:
    peft = need("peft")
    model = peft.get_peft_model(load_base(w), peft_config(w))
    return forward_task(model.eval(), make_batch(w, model.config.vocab_size))


def peft_train(w: Workload, quantized: bool = False) -> Task:
    """PEFT's LoRA step; `quantized`: on transformers' bitsandbytes NF4 + double-quant base (CPU)."""
    peft = need("peft")
    model = load_bnb_4bit(w) if quantized else load_base(w)
    if quantized:  # what PEFT's QLoRA recipe does: norms in fp32, input grads, checkpointing if asked
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=w.checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    elif w.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft_config(w))
    model.train()
    batch = make_batch(w, model.config.vocab_size)
    return train_step_task(model, batch, w.lr, lambda: model(**batch, use_cache=False).loss)


def peft_qlora_train(w: Workload) -> Task:
    return peft_train(w, quantized=True)


def load_bnb_4bit(w: Workload) -> nn.Module:
    """The base with every linear but the head as bitsandbytes' Linear4bit (NF4, blocksize 64, double quant).

    transformers' BitsAndBytesConfig works on the CPU with `device_map="cpu"` (bitsandbytes >= 0.45).
    """
    need("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=w.torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=w.torch_dtype, quantization_config=config,
                                                 device_map="cpu")
    return model.requires_grad_(False).eval()


def peft_merge(w: Workload) -> Task:
    peft = need("peft")
    base = load_base(w)
    state: dict[str, nn.Module] = {}

    def reset() -> None:
        state.clear()
        model = peft.get_peft_model(copy.deepcopy(base), peft_config(w))
        randomize_lora_B([p for n, p in model.named_parameters() if ".lora_B." in n], w.seed)
        state["model"] = model

    def run() -> None:
        state.pop("model").merge_and_unload()

    return Task(run, reset, keep=[base])


def bnb_quant(w: Workload) -> Task:
    """bitsandbytes.functional NF4 quantize (blocksize 64, double quant), then dequantize."""
    functional = need("bitsandbytes.functional")
    weights = linear_weights(w)

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        packed = [functional.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
                  for t in weights]
        t1 = time.perf_counter()
        for p, state in packed:
            functional.dequantize_4bit(p, quant_state=state)
        return {"quantize_s": t1 - t0, "dequantize_s": time.perf_counter() - t1}

    return Task(run, keep=[weights])


def torch_version() -> str:
    return torch.__version__
