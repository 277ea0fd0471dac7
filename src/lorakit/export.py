"""Export for deployment: a merged model as an HF folder or a llama.cpp GGUF, an adapter as a
llama.cpp LoRA-adapter GGUF.

The GGUF layout follows llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` for the
llama architecture: tensor names from `gguf.TensorNameMap`, q/k rows permuted from HF's rotary
layout (rotate-half) to llama.cpp's (interleaved pairs), 1-D tensors in f32, the tokenizer as
`tokenizer.ggml.*` metadata. transformers' GGUF loader undoes the permutation, so a merged file
loads back with the same logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.atomic import atomic_dir, current_umask
from lorakit.outputs import GGUF_KIND_KEY, mark_folder
from lorakit.quant.linear4bit import dequantize_model

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
ARCHITECTURES = ("llama",)  # model_type values whose tensor layout this writer knows


# ----------------------------------------------------------------------------- merged HF folder


def write_merged_folder(model: nn.Module, tokenizer, out: str | Path, dtype: str = "f32", writer=None) -> Path:
    """A plain transformers folder (safetensors, config, generation config, tokenizer) in `dtype`,
    written atomically; `writer(model, folder)` replaces save_pretrained (e.g. a 4-bit writer). Without a
    writer, 4-bit layers that no adapter touched (a QLoRA adapter on some layers) are dequantized first:
    a plain folder holds no 4-bit tensors."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    if writer is None:
        dequantize_model(model)
    model = model.to(TORCH_DTYPES[dtype])

    def fill(tmp: Path) -> None:
        (writer or type(model).save_pretrained)(model, tmp)
        tokenizer.save_pretrained(tmp)
        mark_folder(tmp, "merged")  # a later merge/export may replace it (lorakit.outputs)

    atomic_dir(out, fill)
    return Path(out)


# ----------------------------------------------------------------------------- shared GGUF pieces


def check_architecture(config) -> None:
    """Refuse what the llama writer cannot express faithfully."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports model types {list(ARCHITECTURES)}, not {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export does not write rope scaling {rope.get('rope_type')!r} yet")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export of llama models with attention or MLP biases is not supported")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary row order -> llama.cpp's, per head (llama.cpp's `LlamaModel.permute`).

    Works on any tensor whose first dimension is the projection's output (a weight [out, in], or
    a LoRA B [out, r]).
    """
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]) \
        .swapaxes(1, 2).reshape(weight.shape)


def permuted(hf_name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """`tensor` as llama.cpp stores it: q and k projections permuted, everything else as is."""
    if hf_name.endswith("q_proj.weight"):
        return permute_rows(tensor, config.num_attention_heads)
    if hf_name.endswith("k_proj.weight"):
        return permute_rows(tensor, config.num_key_value_heads)
    return tensor


def gguf_name(hf_name: str, config) -> str:
    """llama.cpp's name of an HF llama tensor, e.g. model.layers.0.self_attn.q_proj.weight ->
    blk.0.attn_q.weight."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return name


def add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> None:
    """Add one tensor in `dtype`; 1-D tensors stay f32 and q8_0 falls back to f16 on rows that are
    not a multiple of its block, as llama.cpp's converter does."""
    import gguf

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim <= 1 or dtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif dtype == "bf16":
        writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                          raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def file_type(dtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]


def write_atomically(writer_fill, path: str | Path, arch: str) -> Path:
    """Build a GGUF with `writer_fill(writer)` in a temp file beside `path`, then rename it over."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer_fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # as a plain open() would: readable by a serving user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_dtype(dtype: str) -> None:
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not one of {list(GGUF_DTYPES)}")


# ----------------------------------------------------------------------------- merged model GGUF


def write_model_gguf(model: nn.Module, tokenizer, path: str | Path, dtype: str = "f16") -> Path:
    """A plain (merged) llama model + its tokenizer as one GGUF file that llama.cpp and
    transformers' GGUF loader read."""
    check_dtype(dtype)
    config = model.config
    check_architecture(config)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp re-uses token_embd when `output` is absent

    def fill(writer) -> None:
        add_model_metadata(writer, config, dtype)
        writer.add_string(GGUF_KIND_KEY, "gguf-model")  # a later export may replace it (lorakit.outputs)
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
        for hf_name, tensor in state.items():
            if "rotary_emb" in hf_name:
                continue
            add_tensor(writer, gguf_name(hf_name, config), permuted(hf_name, tensor, config), dtype)

    return write_atomically(fill, path, "llama")


def add_model_metadata(writer, config, dtype: str) -> None:
    """The `general.*` and `llama.*` keys llama.cpp's converter writes for a llama model."""
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type("model")
    writer.add_name(Path(str(config._name_or_path or "model")).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_file_type(file_type(dtype))


def add_tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 / SmolLM / Llama-3 style) as `tokenizer.ggml.*` metadata,
    padded to the model's vocabulary with unused tokens as llama.cpp's converter does."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers only; this one is a {model['type']} "
                         f"tokenizer, which llama.cpp's tokenizer models cannot express")
    pre = llama_cpp_pre(tokenizer, backend)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) > vocab_size:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens, more than the model's vocab_size {vocab_size}")
    added = {t["id"]: t for t in backend.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            add(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's converter (convert_hf_to_gguf.py, `get_vocab_base_pre`) names a tokenizer's pre-tokenizer by
# the sha256 of its ids for this text; these are its entries for the byte-level BPE tokenizers of llama models.
CHKTXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multi'
    'ple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333'
    ' 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在app'
    "le工作1314151天～ ------======= нещо на Български ''''''````"
    '```""""......!!!!!!?????? I\'ve been \'told he\'s there, \'R'
    "E you sure? 'M not sure I'll make it, 'D you like some t"
    "ea? We'Ve a'lL"
)
KNOWN_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM(2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
}


def llama_cpp_pre(tokenizer, backend: dict) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how this byte-level BPE tokenizer splits text before
    BPE: the name llama.cpp's converter gives a tokenizer it knows, else the name of the llama.cpp split
    that this tokenizer's own configuration spells out. Anything else is refused, as the converter
    refuses it: llama.cpp would split the text differently."""
    fingerprint = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    return KNOWN_TOKENIZERS.get(fingerprint) or pre_from_config(backend)


def pre_from_config(backend: dict) -> str:
    """The llama.cpp pre-tokenizer equal to an HF tokenizer.json's normalizer + pre_tokenizer + BPE
    flags: GPT-2's regex ("gpt-2"), digits one by one then GPT-2's ("smollm"), Llama 3's
    ("llama-bpe", which also takes whole words from the vocabulary: `ignore_merges`)."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    plain = backend.get("normalizer") is None and not byte_level.get("add_prefix_space", True)
    ignore_merges = bool(backend["model"].get("ignore_merges", False))
    if plain and not ignore_merges and kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if plain and not ignore_merges and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and byte_level.get("use_regex", True):
        return "smollm"
    if plain and ignore_merges and kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) \
            and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ValueError("GGUF export: no llama.cpp pre-tokenizer splits text as this tokenizer does (normalizer "
                     f"{json.dumps(backend.get('normalizer'))}, pre-tokenizer {json.dumps(pre)}, ignore_merges "
                     f"{ignore_merges}); llama.cpp's converter refuses it too")


# ----------------------------------------------------------------------------- LoRA adapter GGUF


def write_adapter_gguf(adapter, config, path: str | Path, dtype: str = "f32") -> Path:
    """A PEFT-format adapter (`lorakit.adapters.io.AdapterFile`) as llama.cpp's LoRA adapter GGUF
    (`llama-cli -m base.gguf --lora this.gguf`), for the llama base described by `config`.

    llama.cpp scales every pair by alpha / r with one file-wide alpha; a module whose own scale
    differs (rank/alpha patterns, rsLoRA) has the difference folded into its B.
    """
    from lorakit.adapters.inject import pattern_value
    from lorakit.adapters.lora import lora_scale

    check_dtype(dtype)
    if dtype == "q8_0":
        raise ValueError("a LoRA adapter GGUF is written in f32, f16 or bf16 (llama.cpp keeps adapters unquantized)")
    check_architecture(config)
    spec = adapter.spec
    if spec.kind != "lora":
        raise ValueError(f"llama.cpp adapters hold plain LoRA only, not {spec.kind!r}; merge it and export the model")
    if adapter.embedding or adapter.copies or adapter.biases:
        raise ValueError("llama.cpp adapters hold Linear LoRA pairs only: this adapter also has embedding LoRA, "
                         "modules_to_save or biases; merge it and export the model instead")
    alpha = float(spec.alpha)

    def fill(writer) -> None:
        writer.add_type(gguf_type_adapter())
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_name(f"{Path(adapter.folder).name} (LoRA adapter)")
        writer.add_file_type(file_type(dtype))
        writer.add_string(GGUF_KIND_KEY, "gguf-adapter")
        for module in sorted(adapter.lora):
            a, b = adapter.lora[module]["lora_A"], adapter.lora[module]["lora_B"]  # [r, in], [out, r]
            r = a.shape[0]
            scale = lora_scale(r, pattern_value(module, spec.alpha_pattern, spec.alpha), spec.rslora)
            b = b.float() * (scale / (alpha / r))  # llama.cpp applies alpha / r
            name = gguf_name(f"{module}.weight", config)
            add_tensor(writer, f"{name}.lora_a", a, dtype)
            add_tensor(writer, f"{name}.lora_b", permuted(f"{module}.weight", b, config), dtype)

    return write_atomically(fill, path, "llama")


def gguf_type_adapter() -> str:
    import gguf

    return gguf.GGUFType.ADAPTER
