"""What every side of a benchmark shares: the model files, the batch, the adapter shape, the seed.

Both libraries load the same model folder and train on the same batch: `batch` rows of `seq`
random token ids, the first `prompt_fraction` of each row being prompt (no loss).
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.data.encode import IGNORE


@dataclass
class Workload:
    """The shared configuration of one benchmark run (recorded in every JSON record)."""

    model: str = "default"  # "default", an HF model folder, or "tiny" (a random model built in code)
    batch: int = 8
    seq: int = 128
    prompt_fraction: float = 0.5
    r: int = 16
    alpha: float = 32.0
    targets: str = "all-linear"
    lr: float = 1e-4
    dtype: str = "float32"
    seed: int = 0
    threads: int = 2
    kernels: bool = True  # lorakit's fast paths (lorakit.kernels); False = LORAKIT_KERNELS=0
    checkpointing: bool = False  # gradient checkpointing on both sides' training steps (not the references)
    compile: bool = False  # lorakit's training side with compiled blocks (and the floor both ways)
    plain: bool = False  # also measure lorakit with LORAKIT_KERNELS=0 (side "plain") in the same run
    model_dir: str = ""  # the resolved folder both sides load (filled in by `resolve_model`)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MIB = 1 << 20
QUICK = {"model": "tiny", "batch": 2, "seq": 16, "r": 4, "alpha": 8.0}


@dataclass
class Task:
    """One side of a scenario: `run` is the timed work (it may return extra metrics, e.g. the loss);
    `reset`, when given, is untimed preparation before each run (a fresh model to merge)."""

    run: Callable[[], dict[str, float] | None]
    reset: Callable[[], None] | None = None
    keep: list = field(default_factory=list)  # objects the closures need alive (models, optimizers)
    info: dict[str, float] = field(default_factory=dict)  # fixed figures of this side (weight sizes)


def weight_mib(model: nn.Module) -> dict[str, float]:
    """MiB of the frozen base's state (every tensor counted once; LoRA keys left out) and of its
    linear layers but the head: what a 4-bit base shrinks. Key names are read Llama-style: a
    linear is a key without "embed", "norm" or "lm_head" in it; the quantization state that a
    4-bit layer writes beside its weight (absmax, quant map, ...) counts with it."""
    seen: set[int] = set()
    total = linear = 0
    for key, t in model.state_dict().items():
        if "lora_" in key or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        size = t.numel() * t.element_size()
        total += size
        if not any(part in key for part in ("embed", "norm", "lm_head")):
            linear += size
    return {"base_weight_mib": total / MIB, "linear_weight_mib": linear / MIB}


def resolve_model(w: Workload) -> Workload:
    """`w` with `model_dir` set: the cached default model's folder, a given folder, or a fresh tiny one
    (removed when this process exits)."""
    if w.model_dir:
        return w
    if w.model == "tiny":
        folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-")) / "tiny-llama"
        atexit.register(shutil.rmtree, folder.parent, ignore_errors=True)
        tiny_model(w.seed).save_pretrained(folder)
    else:
        from lorakit.models import resolve

        folder = resolve(w.model)
    return dataclasses.replace(w, model_dir=str(folder))


# real models' shapes, for random-weight models on a GPU machine that has no model files: Llama-3.2-1B, Llama-2-7B
SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}


def char_tokenizer():
    """A character-level tokenizer (ids < 128, `<|im_end|>` = 1) for the quick run's tiny random model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "<|im_end|>": 1, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>")


def write_shaped_model(shape: str, folder: str | Path, layers: int | None = None, device: str = "cpu",
                       seed: int = 0) -> Path:
    """A Llama folder with `SHAPES[shape]`'s dimensions (`layers` of them, default all), random bf16 weights
    (built on `device`, written as safetensors) and a character tokenizer (ids < 128): a stand-in with the
    real layer shapes for speed and memory figures where no model can be downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    dims = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(**dims, max_position_embeddings=4096, bos_token_id=2, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return Path(folder)


def tiny_model(seed: int) -> nn.Module:
    """A small random Llama with a tied head, like SmolLM2's layout, for quick runs and tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def load_base(w: Workload) -> nn.Module:
    """A fresh, frozen copy of the base model in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(w.model_dir, dtype=w.torch_dtype)
    return model.requires_grad_(False).eval()


def make_batch(w: Workload, vocab: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [batch, seq]; labels are IGNORE on each row's prompt."""
    g = torch.Generator().manual_seed(w.seed)
    ids = torch.randint(0, vocab, (w.batch, w.seq), generator=g)
    labels = ids.clone()
    labels[:, : int(w.seq * w.prompt_fraction)] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that carry loss (position i predicts token i + 1)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
