"""Triton kernels (4-bit dequantization, fused 4-bit matmul, SGMV/BGMV LoRA) against their PyTorch references.

Without a GPU they run on the CPU through Triton's interpreter, at small sizes; with CUDA the same
checks run compiled at full sizes. The interpreter must be on (TRITON_INTERPRET=1) before triton
is first imported: tests/conftest.py sets it when there is no CUDA. The check that every kernel
compiles for an H100 with the real compiler runs in a child process with the interpreter off.
`LORAKIT_KERNELS=triton` makes the library take its CUDA branches for CPU tensors, so the wiring
(Linear4bit, mixed-adapter routing) is checked too; the default CPU path must stay as it was.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")  # a test dependency (pyproject's test extra): present in CI

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import lorakit  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from lorakit import kernels  # noqa: E402
from lorakit.quant.linear4bit import Linear4bit, quantize_model  # noqa: E402
from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)  # triton was imported with TRITON_INTERPRET=1
kernel_test = pytest.mark.skipif(not (CUDA or INTERPRETED),  # only in the compile check's child process
                                 reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def tk() -> types.SimpleNamespace:
    """The three kernel modules (on the CPU: interpreted, as triton itself is in this process)."""
    names = ("triton_nf4", "triton_matmul4bit", "triton_lora")
    mods = [importlib.import_module(f"lorakit.kernels.{n}") for n in names]
    return types.SimpleNamespace(**dict(zip(("nf4", "matmul", "lora"), mods, strict=True)))


@pytest.fixture
def forced(monkeypatch):
    """The library's CUDA branches, here (CPU: through the interpreter); on a GPU just the default."""
    if not CUDA:
        monkeypatch.setenv("LORAKIT_KERNELS", "triton")


def size(small: int, full: int) -> int:
    return full if CUDA else small


# ---------------------------------------------------------------------------------------------
# NF4 / FP4 dequantization
# ---------------------------------------------------------------------------------------------

DEQUANT_CASES = [  # shape, quant_type, blocksize, double_quant, storage
    ((37, 29), "nf4", 64, True, torch.uint8),  # odd element count: half a byte of padding, ragged block
    ((64, 128), "fp4", 32, False, torch.uint8),
    ((130, size(130, 4099)), "nf4", 32, True, torch.uint8),  # > 256 blocks: several nested absmax blocks
    ((1000, 7), "fp4", 256, True, torch.uint8),  # ragged last block
    ((3,), "nf4", 64, False, torch.uint8),
    ((48, size(40, 4096)), "nf4", 64, True, torch.bfloat16),  # packed bytes stored as bf16 (FSDP)
]


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "quant_type", "blocksize", "double_quant", "storage"), DEQUANT_CASES)
def test_dequantize_equals_reference(tk, shape, quant_type, blocksize, double_quant, storage, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant, storage)
    got = tk.nf4.dequantize_4bit_triton(packed, state, dtype)
    want = dequantize_4bit(packed, state, dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)  # the reference's fp32 arithmetic, cast once: the same bits
    assert got.abs().max() > 0


@kernel_test
def test_dequantize_rejects_a_wrong_byte_count(tk):
    packed, state = quantize_4bit(torch.randn(8, 8), "nf4", 32, False)
    with pytest.raises(ValueError, match="needs 32"):
        tk.nf4.dequantize_4bit_triton(packed[:-1], state)


# ---------------------------------------------------------------------------------------------
# Fused 4-bit matmul
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # of the output's largest value


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype] * want.float().abs().max().item(), err


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out_in", "rows", "bias", "quant_type", "double_quant"), [
    ((37, 29), 1, True, "nf4", True),  # ragged everything, batch 1 (decode)
    ((70, 96), 3, False, "fp4", False),
    ((size(64, 4096), size(64, 4096)), 1, False, "nf4", True),
    ((33, 130), 7, True, "nf4", True),  # tiled, one 16-row tile
    ((size(40, 2048), size(72, 4096)), size(20, 300), True, "nf4", True),  # tiled, several row tiles
])  # fmt: skip
def test_matmul_4bit_equals_reference(tk, out_in, rows, bias, quant_type, double_quant, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_in, generator=g).to(DEVICE)
    packed, state = quantize_4bit(w, quant_type, 64, double_quant)
    x = torch.randn(rows, out_in[1], generator=g).to(DEVICE, dtype)
    b = torch.randn(out_in[0], generator=g).to(DEVICE, dtype) if bias else None
    want = matmul_4bit_reference(x, packed, state, b)
    for tiled in (False, True):  # both kernels, whatever the row count
        close(tk.matmul.matmul_4bit(x, packed, state, b, tiled=tiled), want, dtype)
    close(tk.matmul.matmul_4bit(x.view(1, rows, -1), packed, state, b), want.view(1, rows, -1), dtype)


def matmul_4bit_reference(x, packed, state, bias):
    """The plain-PyTorch product the fused matmul must equal (what `Linear4bit.forward` computes)."""
    return torch.nn.functional.linear(x, dequantize_4bit(packed, state, x.dtype), bias)


@kernel_test
def test_matmul_4bit_rejects_a_wrong_width(tk):
    packed, state = quantize_4bit(torch.randn(8, 16), "nf4", 32, False)
    with pytest.raises(ValueError, match="takes 16"):
        tk.matmul.matmul_4bit(torch.randn(2, 15), packed, state)


@kernel_test
@pytest.mark.parametrize("rows", [2, 24])  # fused matmul; one dequantization kernel + matmul
def test_linear4bit_takes_the_triton_path_and_matches(tk, forced, monkeypatch, rows):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(48, 40).to(DEVICE), "nf4", 32, True)
    x = torch.randn(rows, 48, device=DEVICE, requires_grad=True)
    calls = {"linear_4bit": 0, "dequantize_4bit_triton": 0}
    for mod, name in ((tk.matmul, "linear_4bit"), (tk.nf4, "dequantize_4bit_triton")):
        monkeypatch.setattr(mod, name, counted(getattr(mod, name), calls, name))
    y = layer(x)
    y.square().sum().backward()
    assert calls["linear_4bit"] == 1 and calls["dequantize_4bit_triton"] >= 1  # backward dequantizes by Triton
    w = dequantize_4bit(layer.weight, layer.quant_state, torch.float32)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, w, layer.bias)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def counted(fn, calls: dict, name: str):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------
# SGMV / BGMV
# ---------------------------------------------------------------------------------------------


def adapters(dtype: torch.dtype, k_in: int, n_out: int, ranks: list[int], seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    lora_A = [torch.randn(r, k_in, generator=g).to(DEVICE, dtype) for r in ranks]
    lora_B = [torch.randn(n_out, r, generator=g).to(DEVICE, dtype) for r in ranks]
    scales = [0.5 * (i + 1) for i in range(len(ranks))]
    return lora_A, lora_B, scales


LORA_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
               (torch.float16, torch.float16)]  # (adapters, activations)


@kernel_test
@pytest.mark.parametrize(("lora_dtype", "dtype"), LORA_DTYPES)
def test_bgmv_equals_reference(tk, lora_dtype, dtype):
    k_in, n_out, tokens = size(40, 4096), size(70, 4096), size(11, 64)
    lora_A, lora_B, scales = adapters(lora_dtype, k_in, n_out, [3, 8, 16, 5])  # a rank per adapter
    a_stack, b_stack, ranks = tk.lora.stack_adapters(lora_A, lora_B)
    g = torch.Generator().manual_seed(3)
    adapter = torch.randint(-1, 4, (tokens,), generator=g).to(DEVICE)  # -1: the base only
    adapter[:5] = torch.tensor([0, -1, 3, 1, 2])  # every adapter and the base present
    x = torch.randn(tokens, k_in, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, n_out, generator=g).to(DEVICE, dtype)
    want = tk.lora.lora_rows_reference(y, x, lora_A, lora_B, scales, adapter)
    got = tk.lora.lora_bgmv(y.clone(), x, a_stack, b_stack, ranks, torch.tensor(scales, device=DEVICE), adapter)
    close(got, want, dtype)
    assert torch.equal(got[adapter == -1], y[adapter == -1])  # base rows untouched


@kernel_test
@pytest.mark.parametrize(("lora_dtype", "dtype"), LORA_DTYPES)
def test_sgmv_equals_reference(tk, lora_dtype, dtype):
    k_in, n_out = size(40, 4096), size(70, 4096)
    lora_A, lora_B, scales = adapters(lora_dtype, k_in, n_out, [4, 2, 16])
    a_stack, b_stack, ranks = tk.lora.stack_adapters(lora_A, lora_B)
    lengths = [2, 1, size(40, 700), 0, 5, 3]  # one segment longer than a row tile, one empty
    seg_start = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    seg_adapter = torch.tensor([2, -1, 0, 1, 1, 2], device=DEVICE)
    tokens = sum(lengths)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(tokens, k_in, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, n_out, generator=g).to(DEVICE, dtype)
    per_token = tk.lora.segment_adapters(seg_start, seg_adapter)
    want = tk.lora.lora_rows_reference(y, x, lora_A, lora_B, scales, per_token)
    scales_t = torch.tensor(scales, device=DEVICE)
    got = tk.lora.lora_sgmv(y.clone(), x, a_stack, b_stack, ranks, scales_t, seg_start, seg_adapter)
    close(got, want, dtype)
    assert torch.equal(got[per_token == -1], y[per_token == -1])


@kernel_test
def test_stacks_pad_to_the_largest_rank(tk):
    lora_A, lora_B, _ = adapters(torch.float32, 6, 5, [1, 3])
    a_stack, b_stack, ranks = tk.lora.stack_adapters(lora_A, lora_B)
    assert a_stack.shape == (2, 3, 6) and b_stack.shape == (2, 5, 3) and ranks.tolist() == [1, 3]
    assert torch.equal(a_stack[0, :1], lora_A[0]) and not a_stack[0, 1:].any() and not b_stack[0, :, 1:].any()


# ---------------------------------------------------------------------------------------------
# The library's wiring
# ---------------------------------------------------------------------------------------------


def three_adapters(base: torch.nn.Module) -> torch.nn.Module:
    """a (r=2, every linear), b (r=4, MLP + embedding: the embedding goes the plain way), c (r=3, DoRA on
    attention: those layers fall back to the plain path)."""
    specs = {"a": lorakit.LoraSpec(r=2, alpha=4),
             "b": lorakit.LoraSpec(r=4, alpha=4, targets=["embed_tokens", "down_proj", "up_proj"]),
             "c": lorakit.LoraSpec(r=3, alpha=6, targets=["q_proj", "v_proj"], kind="dora")}  # fmt: skip
    for name, spec in specs.items():
        lorakit.inject(base, spec, name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base.to(DEVICE)


@kernel_test
def test_routed_batch_through_kernels_equals_plain_routing(tk, forced, monkeypatch):
    """A 4-bit base (fused matmul / Triton dequantization) under mixed adapters (SGMV, BGMV)."""
    model = three_adapters(quantize_model(tiny_llama(), "nf4", blocksize=32, double_quant=True))
    rows = ["a", "b", None, "c", "b"]
    ids = torch.randint(3, 128, (len(rows), 4), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls = {"lora_sgmv": 0, "lora_bgmv": 0}
    for name in calls:
        monkeypatch.setattr(tk.lora, name, counted(getattr(tk.lora, name), calls, name))
    with torch.no_grad(), lorakit.route(model, rows):
        prefill = model(ids).logits  # SGMV: each row a segment
        decode = model(ids[:, :1]).logits  # BGMV: one token per row
    assert calls["lora_sgmv"] > 0 and calls["lora_bgmv"] == calls["lora_sgmv"]
    monkeypatch.setenv("LORAKIT_KERNELS", "0")  # the plain gather / scatter-add routing
    with torch.no_grad(), lorakit.route(model, rows):
        torch.testing.assert_close(prefill, model(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode, model(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
    lorakit.set_active(model, [])
    with torch.no_grad():
        base = model(ids).logits
    assert all((prefill[i] - base[i]).abs().max() > 1e-2 for i in (0, 1, 3, 4))  # the adapters change their rows


@kernel_test
def test_routed_stacked_adapter_through_kernels_equals_plain_routing(tk, forced, monkeypatch):
    """A row routed to an adapter stacked on a parent takes two adapters, which BGMV/SGMV (one adapter a
    row) cannot: such a batch takes the plain routing."""
    model = three_adapters(tiny_llama())
    lorakit.set_parent(model, "b", "a")  # both plain LoRA on the MLP: the kernels' layers
    rows = ["b", "c", None, "a"]
    ids = torch.randint(3, 128, (len(rows), 4), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad(), lorakit.route(model, rows):
        prefill = model(ids).logits
        decode = model(ids[:, :1]).logits
    monkeypatch.setenv("LORAKIT_KERNELS", "0")
    with torch.no_grad(), lorakit.route(model, rows):
        torch.testing.assert_close(prefill, model(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decode, model(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        lorakit.set_active(model, ["b"])  # with its parent a
        torch.testing.assert_close(prefill[0], model(ids[:1]).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(CUDA, reason="the CPU path (this machine has CUDA)")
def test_cpu_path_is_unchanged(tk, monkeypatch):
    """By default CPU tensors never reach a Triton kernel, and give what they gave before (bit for bit)."""
    monkeypatch.delenv("LORAKIT_KERNELS", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel ran on the CPU path")

    for mod, name in ((tk.matmul, "linear_4bit"), (tk.nf4, "dequantize_4bit_triton"), (tk.lora, "routed_lora")):
        monkeypatch.setattr(mod, name, refuse)
    assert not kernels.use_triton(torch.zeros(1))
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 24), "nf4", 32, True)
    x = torch.randn(3, 64)
    want = torch.nn.functional.linear(x, dequantize_4bit(layer.weight, layer.quant_state, torch.float32), layer.bias)
    assert torch.equal(layer(x), want)
    model = three_adapters(tiny_llama())
    with torch.no_grad(), lorakit.route(model, ["a", "b"]):
        model(torch.tensor([[5, 6], [7, 8]]))


def test_selection(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("LORAKIT_KERNELS", raising=False)
    assert kernels.use_triton(cuda_like) and not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("LORAKIT_KERNELS", "0")
    assert not kernels.use_triton(cuda_like)
    monkeypatch.setenv("LORAKIT_KERNELS", "triton")
    assert kernels.use_triton(torch.zeros(1))
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert not kernels.use_triton(cuda_like)


def test_lorakit_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now fails, as if not installed
        "import torch, lorakit\n"
        "from lorakit import kernels\n"
        "from lorakit.quant.linear4bit import Linear4bit\n"
        "assert not kernels.triton_available()\n"
        "layer = Linear4bit.from_linear(torch.nn.Linear(64, 8))\n"
        "print(tuple(layer(torch.randn(2, 64)).shape))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_KERNELS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(2, 8)", done.stderr


@kernel_test
def test_bench_gpu_kernel_parts(monkeypatch):
    """The bench's kernel parts run (on the CPU through the interpreter: their arithmetic, not speed)."""
    from lorakit_bench import gpu

    monkeypatch.setattr(gpu, "bnb_or_none", lambda: None)
    s = {**gpu.DEFAULTS, "size": size(64, 1024), "rows": 4, "adapters": 2, "prefill": 4, "inner": 1}
    records = gpu.bench_kernels(s, reps=1, warmup=0, device=DEVICE)
    by_name = {r["name"]: r for r in records}
    copy, dequant = by_name["bf16 copy 64x64" if not CUDA else "bf16 copy 1024x1024"], by_name["lorakit triton"]
    assert dequant["of_copy"] == pytest.approx(dequant["gb_per_s"] / copy["gb_per_s"])
    fused, bf16 = by_name["lorakit fused 4-bit, 1 row(s)"], by_name["bf16 torch.matmul, 1 row(s)"]
    assert fused["over_bf16"] == pytest.approx(fused["ms"] / bf16["ms"]) and bf16["over_bf16"] == 1
    mixed, single = by_name["BGMV decode, 4 rows, 2 adapters"], by_name["BGMV decode, 4 rows, 1 adapter"]
    assert mixed["over_single"] == pytest.approx(mixed["ms"] / single["ms"])
    assert {r["part"] for r in records} == {"copy", "dequant", "decode", "multi"}


QUANT_SIG = {"packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8", "nested_code_ptr": "*fp32",
             "nested_absmax_ptr": "*fp32", "offset_ptr": "*fp32", "blocksize": "i32", "nested_blocksize": "i32"}
MATMUL_SIG = {**QUANT_SIG, "x_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32",
              "stride_xm": "i32", "stride_om": "i32"}
LORA_SIG = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16",
            "ranks_ptr": "*i32", "adapter_ptr": "*i32", "seg_start_ptr": "*i32", "seg_adapter_ptr": "*i32",
            "scales_ptr": "*fp32", "K": "i32", "N": "i32", "R": "i32", "stride_xt": "i32", "stride_an": "i32",
            "stride_bn": "i32", "stride_ht": "i32", "stride_yt": "i32"}
SGMV = {"PRECISION": "tf32", "INTERPRET": False, "BLOCK_R": 16}
COMPILED = [  # module, kernel, constexprs, options: bf16, as the launchers launch them
    ("nf4", "_dequant_kernel", {"NESTED": True, "BLOCK": 1024}, {"enable_fp_fusion": False}),
    ("matmul", "_gemv_kernel", {"NESTED": True, "HAS_BIAS": True, "BLOCK_N": 32, "BLOCK_K": 128}, {"num_warps": 8}),
    ("matmul", "_tiled_kernel", {"NESTED": True, "HAS_BIAS": True, "PRECISION": "tf32", "INTERPRET": False,
                                 "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, {}),
    ("lora", "_bgmv_shrink_kernel", {"BLOCK_R": 16, "BLOCK_K": 64}, {}),
    ("lora", "_bgmv_expand_kernel", {"BLOCK_N": 64, "BLOCK_R": 16}, {}),
    ("lora", "_sgmv_shrink_kernel", {**SGMV, "BLOCK_M": 32, "BLOCK_K": 32}, {}),
    ("lora", "_sgmv_expand_kernel", {**SGMV, "BLOCK_M": 32, "BLOCK_N": 64}, {}),
]  # fmt: skip


if INTERPRETED:

    def test_kernels_compile_for_h100_in_a_process_without_the_interpreter():
        """The compile check below needs triton imported without the interpreter: a fresh process."""
        env = {**os.environ, "TRITON_INTERPRET": "0"}  # conftest leaves a set value alone
        args = ["-q", "-p", "no:cacheprovider", "-k", "compiles_for_h100_without_spills", __file__]
        done = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=Path(__file__).resolve().parents[1],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        assert f"{len(COMPILED)} passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]


if not INTERPRETED:  # with the interpreter on, the test above runs this one in a child process

    @pytest.mark.parametrize(("module", "kernel", "constexprs", "options"), COMPILED, ids=[c[1] for c in COMPILED])
    def test_kernel_compiles_for_h100_without_spills(tk, tmp_path, module, kernel, constexprs, options):
        """Without a GPU: Triton + ptxas (bundled with triton) build the sm_90 binary; no register spills."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(getattr(tk, module), kernel)
        types_ = {**MATMUL_SIG, **LORA_SIG, "n": "i64", "M": "i32", **{k: "constexpr" for k in constexprs}}
        if kernel == "_dequant_kernel":
            types_["out_ptr"] = "*bf16"
        source = ASTSource(fn, {name: types_[name] for name in fn.arg_names}, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        (tmp_path / "k.cubin").write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(tmp_path / "k.cubin")],
                               capture_output=True, text=True, check=True).stdout
        assert "STACK:0 " in usage, usage  # no local-memory spills


def test_bench_gpu_training_sides_agree_on_the_first_loss():
    """The bench's lorakit and PEFT (+ bitsandbytes) training steps train the same thing: a fresh adapter
    changes nothing, so the first losses match (here on the tiny model; the bench runs them on CUDA)."""
    from lorakit_bench import gpu
    from lorakit_bench.workload import QUICK, Workload, resolve_model

    w = resolve_model(Workload(**{**QUICK, "dtype": "float32"}))
    for quantized in (False, True):
        ours, peer = gpu.lorakit_task(w, quantized, DEVICE)(), gpu.peft_task(w, quantized, DEVICE)()
        assert ours == pytest.approx(peer, rel=2e-3 if quantized else 1e-5), quantized


@pytest.mark.skipif(CUDA, reason="checks the error without a GPU")
def test_bench_gpu_needs_cuda(capsys):
    from lorakit.cli import main

    assert main(["bench", "gpu", "--quick"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
