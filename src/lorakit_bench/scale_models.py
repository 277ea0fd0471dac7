"""Random-weight Llama models of real shapes for `lorakit bench scale`, built once and cached.

Each model is a transformers folder: bf16 safetensors shards written tensor by tensor (each tensor
drawn from its own seeded generator, written, freed: a 7B model never exists in memory), config.json,
and the default model's tokenizer and generation config (its vocabulary is 49,152 tokens, the size
used here). A random adapter (LoRA r=8 on every linear but the head, PEFT format) goes beside it for
the merge measurement.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from lorakit.atomic import atomic_dir
from lorakit.shards import plan_shards, shard_name, write_index, write_streamed

GB = 10**9
SHAPES = {  # Llama-architecture shapes: 1B and 3B as Llama 3.2 (tied head), 7B as Llama 2 (untied)
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "tie_word_embeddings": True},
    "3b": {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192, "num_attention_heads": 24,
           "num_key_value_heads": 8, "tie_word_embeddings": True},
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": True},
}  # fmt: skip
VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json")


def llama_config(size: str, vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                       bos_token_id=1, eos_token_id=2, dtype="bfloat16", **SHAPES[size])


def tensor_infos(config) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, bf16, shape) of every tensor save_pretrained would write (a tied head left out), from a
    model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return [(k, torch.bfloat16, tuple(t.shape)) for k, t in model.state_dict().items() if k not in tied]


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02) in bf16, from a generator seeded by (seed, name)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(key)
    return torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(0.02)


def write_random_model(folder: Path, config, tokenizer_dir: Path | None, seed: int = 0,
                       max_shard_bytes: int = 5 * GB) -> None:
    """A random-weight model folder (not atomic itself: `build_model` wraps it)."""
    infos = tensor_infos(config)
    shards = plan_shards(infos, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = shard_name(i, len(shards))
        total += write_streamed(folder / name, shard, lambda n, s=dict((x[0], x[2]) for x in shard):
                                random_tensor(n, s[n], seed), metadata={"format": "pt"})
        weight_map.update({info[0]: name for info in shard})
    if len(shards) > 1:
        write_index(folder, weight_map, total)
    config.to_json_file(folder / "config.json")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, folder / name)


def write_random_adapter(folder: Path, config, base: str, r: int = 8, seed: int = 0) -> None:
    """A PEFT-format LoRA adapter (r, alpha 2r) on every linear of the decoder layers, random factors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, targets = {}, set()
    for name, _, shape in tensor_infos(config):
        if not name.startswith("model.layers.") or not name.endswith("proj.weight"):
            continue
        module = name.removesuffix(".weight")
        targets.add(module.rsplit(".", 1)[-1])
        out_features, in_features = shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_features, generator=g) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, r, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                      "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
                      "base_model_name_or_path": base}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


def build_model(root: Path, size: str, seed: int = 0, max_shard_bytes: int = 5 * GB,
                tokenizer_dir: Path | None = None, log=print) -> Path:
    """`root/<size>-<key>/` holding `model/` and `adapter/`, built once (atomically) and reused."""
    config = llama_config(size)
    key = hashlib.sha256(json.dumps([config.to_dict(), seed, max_shard_bytes], sort_keys=True,
                                    default=str).encode()).hexdigest()[:10]
    folder = Path(root) / f"llama-{size}-{key}"
    if (folder / "model" / "config.json").is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        return folder

    def fill(tmp: Path) -> None:
        log(f"building random {size} model in {folder} ...")
        write_random_model(tmp / "model", config, tokenizer_dir, seed, max_shard_bytes)
        write_random_adapter(tmp / "adapter", config, str(folder / "model"), seed=seed)

    atomic_dir(folder, fill)
    return folder


def main(argv: list[str]) -> int:
    """`python -m lorakit_bench.scale_models ROOT SIZE...`: build (or find) the models, print their folders."""
    from lorakit.models import resolve

    root, sizes = Path(argv[0]), argv[1:]
    for size in sizes:
        print(build_model(root, size, tokenizer_dir=resolve("default")), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
