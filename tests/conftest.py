"""Tiny random-config models (built in code, seconds) shared by the unit tests."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels are tested on the CPU through Triton's interpreter, which
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be on before triton is imported (transformers does)

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: they run wherever it is, and are skipped, reported as not run, elsewhere
    (CI has no GPU; scripts/gpu_check.sh runs them on a lent one)."""
    if torch.cuda.is_available():
        return
    not_run = pytest.mark.skip(reason="needs CUDA (gpu marker): NOT RUN on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(not_run)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)
    return GPT2LMHeadModel(config).eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer (ids < 128) with a ChatML template, built offline in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "<|im_end|>": 1, "<|im_start|>": 2, "\n": 10}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


BPE_TEXT = "Convert the date 1987-03-09 to the format 'Month D, YYYY'. March 9, 1987. say cat, say dog.\n"


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer of 128 tokens trained in code on BPE_TEXT (the tiny char-level
    WordLevel tokenizer has no GGUF tokenizer model to be written as)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    backend.train_from_iterator([BPE_TEXT] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture
def adapter_dir(tmp_path):
    """A tiny llama with a BPE tokenizer saved as a base folder (tmp_path/base), and a random LoRA
    adapter on it (tmp_path/adapter)."""
    import lorakit
    from lorakit.models import load

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    tiny_bpe_tokenizer().save_pretrained(base)
    model, _ = load(str(base))
    lorakit.inject(model, lorakit.LoraSpec(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama + tokenizer saved as an HF folder, as `lorakit.models.load` reads it."""
    folder = tmp_path / "tiny-llama"
    model = tiny_llama()
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def jsonl(tmp_path):
    """Copy-the-word task in a few rows: the tiny model learns it within a few dozen steps."""
    words = ["cat", "dog", "sun", "sky", "red", "map", "cup", "pen"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {w}", "completion": w}) + "\n" for w in words))
    return path


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter factor non-zero values so that a delta actually shows."""
    from lorakit.adapters.layer import lora_layers
    from lorakit.adapters.params import param_layers

    g = torch.Generator().manual_seed(seed)
    adapters = [a for _, layer in lora_layers(model) for a in layer.adapters.values()]
    adapters += [a for _, layer in param_layers(model) for named in layer.adapters.values() for a in named.values()]
    with torch.no_grad():
        for adapter in adapters:
            for p in (adapter.lora_A, adapter.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)



def add_expert_updates(base: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """The plain-torch reference of LoRA on fused expert weights: `base` with W_e += (alpha / r) B_e A_e, expert
    by expert, for every expert adapter active in `model` (a 2-D weight is one expert). Returns `base`."""
    from lorakit.adapters.params import param_layers

    with torch.no_grad():
        for path, layer in param_layers(model):
            for name in layer.active:
                for param, adapter in layer.adapters[name].items():
                    weight = base.get_submodule(path)._parameters[param]
                    stacked = weight if weight.dim() == 3 else weight[None]  # [E, out, in]
                    for e in range(stacked.shape[0]):
                        stacked[e] += adapter.lora_B[e] @ adapter.lora_A[e] * (adapter.alpha / adapter.r)
    return base

@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
