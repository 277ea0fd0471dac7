"""Export for deployment: a merged model as an HF folder or a llama.cpp GGUF, an adapter as a
llama.cpp LoRA-adapter GGUF.

The GGUF layout follows llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` for the
llama architecture: tensor names from `gguf.TensorNameMap`, q/k rows permuted from HF's rotary
layout (rotate-half) to llama.cpp's (interleaved pairs), 1-D tensors in f32, the tokenizer as
`tokenizer.ggml.*` metadata. transformers' GGUF loader undoes the permutation, so a merged file
loads back with the same logits.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lorakit.adapters.inject import pattern_value
from lorakit.adapters.io import WEIGHTS_FILE, AdapterFile, check_fits, read_adapter
from lorakit.adapters.lora import lora_scale
from lorakit.adapters.merge import merge_module
from lorakit.atomic import atomic_dir, current_umask
from lorakit.models import load_tokenizer, resolve
from lorakit.outputs import GGUF_KIND_KEY, mark_folder
from lorakit.quant.checkpoint import is_4bit_folder
from lorakit.quant.linear4bit import Linear4bit, dequantize_model, dequantize_weight, experts_targets
from lorakit.shards import write_index, write_streamed
from lorakit.stream import checkpoint_files, iter_tensors, read_header, read_tensor

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
        writer = gguf.GGUFWriter(tmp, arch, use_temp_file=True)  # tensors spool to disk as they are added
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
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp re-uses token_embd when `output` is absent
    return write_gguf_tensors(model.config, tokenizer, path, dtype, state.items())


def write_gguf_tensors(config, tokenizer, path: str | Path, dtype: str,
                       tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """A llama GGUF from (HF name, tensor) pairs taken one at a time: each is converted and spooled to a
    temp file before the next is asked for (the GGUF header, which comes first, needs them all)."""
    check_dtype(dtype)
    check_architecture(config)

    def fill(writer) -> None:
        add_model_metadata(writer, config, dtype)
        writer.add_string(GGUF_KIND_KEY, "gguf-model")  # a later export may replace it (lorakit.outputs)
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
        for hf_name, tensor in tensors:
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
    check_dtype(dtype)
    if dtype == "q8_0":
        raise ValueError("a LoRA adapter GGUF is written in f32, f16 or bf16 (llama.cpp keeps adapters unquantized)")
    spec = adapter.spec
    if spec.target_parameters:
        raise ValueError(f"this adapter adapts weights held as parameters ({spec.target_parameters}: mixture-of-"
                         "experts weights, routers), which lorakit does not write to a llama.cpp adapter yet; merge "
                         "it and export the model instead")
    check_architecture(config)
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


# ----------------------------------------------------------------------------- streamed merge


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass
class MergePlan:
    """What a streamed merge changes, by checkpoint key; every key is checked to exist before anything is written."""

    adapter: AdapterFile
    modules: dict[str, nn.Module]  # module path -> its module in a meta-device skeleton (type, shapes)
    merges: dict[str, list[str]]  # weight key -> adapted module paths merged into it, in model order
    quantized: dict[str, str]  # weight key -> module path of a linear that was 4-bit in training
    replaced: dict[str, torch.Tensor]  # key -> trained bias or modules_to_save tensor
    dtype: torch.dtype | None  # write float tensors in it, once merged (None: keep the checkpoint's)


def skeleton(config) -> nn.Module:
    """The model of `config` on the meta device: module types and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def merge_plan(folder: Path, config, adapter: AdapterFile, keys: set[str], dtype: torch.dtype | None,
               dequantized: bool = True) -> MergePlan:
    """Which checkpoint keys the adapter changes and how; errors name the adapter file and the key.

    `dequantized`: an adapter trained over a 4-bit base (it records how) is merged into that base
    dequantized (the model it was trained as), else into the checkpoint's full-precision weights."""
    where = adapter.folder / WEIGHTS_FILE
    model = skeleton(config)
    check_fits(model, dataclasses.replace(adapter, base_weights={}))
    modules = dict(model.named_modules())
    tied = tied_keys(model, config, keys)
    merges: dict[str, list[str]] = {}
    for path in modules:  # model order, as merge_and_unload goes
        if path in adapter.lora:
            key = tied.get(f"{path}.weight", f"{path}.weight")
            if key not in keys:
                raise ValueError(f"{where}: module {path!r} has no weight {key!r} in the checkpoint {folder}")
            merges.setdefault(key, []).append(path)
    quantized = {}
    if adapter.quant and dequantized:
        quantized = {f"{p}.weight": p for p, m in modules.items() if p in quantized_linears(model)}
    replaced = {f"{p}.bias": t for p, t in adapter.biases.items()}
    replaced |= {f"{p}.{k}": t for p, state in adapter.copies.items() for k, t in state.items()}
    replaced |= {f"{p}.weight": t for p, t in adapter.base_weights.items() if f"{p}.weight" in keys}
    for key in replaced:
        if key not in keys:
            raise ValueError(f"{where}: tensor {key!r} has no counterpart in the checkpoint {folder}")
    return MergePlan(adapter, modules, merges, quantized, replaced, dtype)


def tied_keys(model: nn.Module, config, keys: set[str]) -> dict[str, str]:
    """{output head weight key: input embedding weight key} when the head is tied and not stored."""
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or f"{names[id(head)]}.weight" in keys:
        return {}
    return {f"{names[id(head)]}.weight": f"{names[id(embed)]}.weight"}


def quantized_linears(model: nn.Module) -> set[str]:
    """The module paths a 4-bit base quantizes (every exact nn.Linear but the output head)."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head}


@torch.no_grad()
def merged_tensor(plan: MergePlan, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """One checkpoint tensor as the merged model holds it."""
    if key in plan.replaced:
        tensor = plan.replaced[key]
    stored = plan.dtype if plan.dtype is not None and tensor.is_floating_point() else tensor.dtype
    layer = None
    if key in plan.quantized:  # the 4-bit base it was trained on, rebuilt as the loader makes it
        q = plan.adapter.quant
        layer = Linear4bit.from_linear(standalone(plan.modules[plan.quantized[key]], tensor), q["type"],
                                       q["blocksize"], q["double_quant"], getattr(torch, q["compute_dtype"]))
        tensor = dequantize_weight(layer, torch.float32)  # [out, in]
    for i, path in enumerate(plan.merges.get(key, [])):
        base = layer if i == 0 and layer is not None else standalone(plan.modules[path], tensor)
        tensor = merge_module(base, plan.adapter, path).weight.detach()
    return tensor.to(stored)


def standalone(meta_module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of a meta-device layer holding the real `weight` (its bias stays on meta: merges never read it)."""
    module = copy.deepcopy(meta_module)
    module.weight = nn.Parameter(weight, requires_grad=False)
    if "bias" in module._parameters:
        module._parameters["bias"] = None
    return module


def merge_inputs(base: str | None, adapter: str | Path) -> tuple[str, AdapterFile]:
    """The base to merge into (given, else the adapter's own, else the default) and the adapter file."""
    found = read_adapter(adapter)
    return base or found.base or "default", found


def streamable(base: str, adapter: AdapterFile, dequantized: bool = True) -> bool:
    """Whether a streamed merge reads `base`: a full-precision safetensors checkpoint (a 4-bit folder is
    merged in memory), for an adapter of layers only (expert-parameter adapters merge in memory), and not
    into the dequantized 4-bit base of a mixture-of-experts model (its experts, stored one by one, are
    quantized together: the merge rebuilds that base in memory)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(base))
    if adapter.spec.target_parameters or is_4bit_folder(config):
        return False
    return not (dequantized and adapter.quant and experts_targets(skeleton(config)))


def streamed_merge(base: str | Path, adapter: AdapterFile, dtype: str | None = None, dequantized: bool = True):
    """(base folder, its config, the merge plan, its checkpoint's tensors by shard) for a streamed merge."""
    from transformers import AutoConfig

    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    folder = resolve(str(base))
    config = AutoConfig.from_pretrained(folder)
    context = adapter.context
    if context is not None:  # trained with another RoPE setup (LongLoRA): the merged model has it
        config.rope_parameters = dict(context["rope_parameters"])
        config.max_position_embeddings = context["max_position_embeddings"]
    shards = {file: read_header(file) for file in checkpoint_files(folder)}  # file -> {key: where, dtype, shape}
    keys = {key for entries in shards.values() for key in entries}
    return folder, config, merge_plan(folder, config, adapter, keys, TORCH_DTYPES.get(dtype), dequantized), shards


def merged_stream(plan: MergePlan, shards: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, merged tensor) for every checkpoint tensor, one at a time."""
    for file in shards:
        for key, tensor in iter_tensors(file):
            yield key, merged_tensor(plan, key, tensor)


def write_merged_streamed(base: str | Path, adapter: AdapterFile, out: str | Path, dtype: str | None = None,
                          dequantized: bool = True, log=None) -> Path:
    """base + adapter as a transformers folder, shard by shard: each output shard is written tensor by
    tensor (read, merged, written, freed), so memory holds one tensor and the adapter, never the model.
    Keeps the checkpoint's shard layout and key names; `dtype` (f32, bf16, f16; None: each tensor's own)
    casts the float tensors. Then the index, config.json and every other non-weight file of the base
    folder (generation config, tokenizer). Atomic as a whole. See `merge_plan` for `dequantized`."""
    folder, config, plan, shards = streamed_merge(base, adapter, dtype, dequantized)
    out_dtype = lambda e: plan.dtype if plan.dtype is not None and e.dtype.is_floating_point else e.dtype

    def fill(tmp: Path) -> None:
        weight_map, total = {}, 0
        for file, entries in shards.items():
            if log:
                log(f"merging {file.name} ({len(entries)} tensors)")
            layout = sorted(entries, key=lambda key: entries[key].start)  # the file's order: reads go forward
            with open(file, "rb") as f:
                read = lambda key, f=f, entries=entries: merged_tensor(plan, key, read_tensor(f, entries[key]))
                total += write_streamed(tmp / file.name, [(k, out_dtype(entries[k]), entries[k].shape) for k in layout],
                                        read, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(entries, file.name))
        if len(shards) > 1:
            write_index(tmp, weight_map, total)
        if plan.dtype is not None:
            config.dtype = plan.dtype
        config.save_pretrained(tmp)
        for f in folder.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name != "config.json" \
                    and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
                shutil.copy(f, tmp / f.name)
        mark_folder(tmp, "merged")  # a later merge/export may replace it (lorakit.outputs)

    atomic_dir(out, fill)
    return Path(out)


def write_merged_gguf_streamed(base: str | Path, adapter: AdapterFile, path: str | Path, dtype: str = "f16",
                               dequantized: bool = True) -> Path:
    """base + adapter as one llama GGUF, merged and converted tensor by tensor (see `write_merged_streamed`)."""
    folder, config, plan, shards = streamed_merge(base, adapter, None, dequantized)
    return write_gguf_tensors(config, load_tokenizer(folder), path, dtype, merged_stream(plan, shards))
