"""8-bit blockwise AdamW and paged state: agreement with bitsandbytes and torch.optim.AdamW.

bitsandbytes (the reference; never imported by the library) runs its 8-bit AdamW on CPU in the
installed version, so the optimizer-level check uses the real `bnb.optim.AdamW8bit`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from lorakit.quant import optim as O

BNB_KEYS = {"exp_avg_q": "state1", "exp_avg_absmax": "absmax1",
            "exp_avg_sq_q": "state2", "exp_avg_sq_absmax": "absmax2"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_uniform(n: int, signed: bool, seed: int) -> torch.Tensor:
    """Magnitudes spread over 1e-8..1 like Adam moments, every block of 256 with max 1."""
    g = gen(seed)
    x = 10 ** (-8 * torch.rand(n, generator=g))
    if signed:
        x = x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x[::256] = 1.0
    return x


def nearest_codes(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force reference: per-block absmax, then argmin |x/absmax - code| (ties: lower index)."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    return (normed[:, None] - code).abs().argmin(dim=1).to(torch.uint8), normed


def step_all(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.dtype)
    opt.step()


def state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def assert_same_run(a: torch.optim.Optimizer, pa: list, b: torch.optim.Optimizer, pb: list) -> None:
    """Parameters and every state tensor are bit-identical."""
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        sa, sb = state_tensors(a, x), state_tensors(b, y)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------------------------
# The code and the quantizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bitsandbytes(signed: bool) -> None:
    ours, theirs = O.dynamic_map(signed), bnbF.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_nearest_and_agrees_with_bnb_quantize_blockwise(signed: bool) -> None:
    """Our bytes are the exact nearest code (brute-force reference). Against bnb's CPU
    `quantize_blockwise` with the same map: absmax and dequantization are bit-identical; bytes
    differ only where bnb's CPU binary search misses the nearest code -- near-ties for values above
    1e-2 of the block absmax, often below that (its search is coarse there) -- and bnb's choice is
    then never nearer than ours. 5000 values: 19 full blocks and a partial one."""
    code = O.dynamic_map(signed)
    x = log_uniform(5000, signed, seed=1)
    q, absmax = O.quantize_blockwise(x, code, 256)
    ref_q, normed = nearest_codes(x, code)
    assert q.dtype == torch.uint8 and absmax.shape == (20,)
    assert torch.equal(q, ref_q)

    bnb_q, bnb_state = bnbF.quantize_blockwise(x, code=bnbF.create_dynamic_map(signed=signed), blocksize=256)
    assert torch.equal(absmax, bnb_state.absmax)
    bnb_deq = bnbF.dequantize_blockwise(q, absmax=absmax, code=bnbF.create_dynamic_map(signed=signed), blocksize=256)
    assert torch.equal(O.dequantize_blockwise(q, absmax, code, 256), bnb_deq)

    c, v = code.double(), normed.double()
    ours_err, bnb_err = (c[q.long()] - v).abs(), (c[bnb_q.long()] - v).abs()
    assert bool((ours_err <= bnb_err).all())
    differ = q != bnb_q
    gap = (c[q.long()] - c[bnb_q.long()]).abs()
    large = differ & (v.abs() >= 1e-2)
    assert bool(((bnb_err - ours_err)[large] <= 0.05 * gap[large]).all()), "bnb differs beyond a near-tie"


def test_zero_block_and_partial_block_round_trip() -> None:
    """An all-zero block keeps absmax 0 and decodes to exact zeros; a partial block is handled."""
    x = torch.cat([torch.zeros(256), torch.linspace(-1, 1, 300)])
    code = O.dynamic_map(signed=True)
    q, absmax = O.quantize_blockwise(x, code, 256)
    assert absmax.tolist()[0] == 0.0 and absmax.shape == (3,)
    back = O.dequantize_blockwise(q, absmax, code, 256)
    assert torch.equal(back[:256], torch.zeros(256))
    # half the largest gap of the signed map (0.9/64 at the top decade) bounds the relative error
    assert (back[256:] - x[256:]).abs().max() <= 0.9 / 64 / 2 * absmax[1:].max() + 1e-7


def test_chunked_update_equals_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 8-bit update in chunks (here 512 values, last chunk partial) gives the same bits."""
    g = gen(2)
    w0, grads = torch.randn(5000, generator=g), [torch.randn(5000, generator=g) for _ in range(3)]
    runs = []
    for chunk in (O.CHUNK, 512):
        monkeypatch.setattr(O, "CHUNK", chunk)
        p = torch.nn.Parameter(w0.clone())
        opt = O.AdamW8bit([p], lr=1e-2)
        for grad in grads:
            step_all(opt, [p], [grad])
        runs.append((opt, [p]))
    assert_same_run(*runs[0], *runs[1])


# ---------------------------------------------------------------------------------------------
# The optimizer against bitsandbytes and torch
# ---------------------------------------------------------------------------------------------


def test_8bit_state_agrees_with_bnb_adamw8bit_on_cpu() -> None:
    """Compared with the real `bnb.optim.AdamW8bit`, which runs on CPU in this version.

    Step 1 (from zero state): parameters and both absmax vectors are bit-identical. Later steps are
    teacher-forced -- bnb's parameter, bytes and absmax are copied into ours before each step --
    because bnb's CPU quantizer is not exact-nearest (test above), so free runs drift apart. From
    the same state: parameters agree to 2 ulp (rtol 2.4e-7, atol 1e-6 * lr: m is updated with
    torch's lerp here and with mul+add in bnb, which can move p by one ulp), absmax of v is
    bit-identical, absmax of m within rtol 1e-6, and our bytes decode no farther from the fp32
    moment than bnb's.
    """
    lr, (b1, b2) = 1e-2, (0.9, 0.999)
    g = gen(3)
    w0 = torch.randn(64, 80, generator=g) * 0.1  # 5120 values: 8-bit state, 20 blocks
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref = O.AdamW8bit([ours], lr=lr), bnb.optim.AdamW8bit([theirs], lr=lr)
    codes = {"exp_avg": bnbF.create_dynamic_map(signed=True), "exp_avg_sq": bnbF.create_dynamic_map(signed=False)}

    grad = torch.randn(64, 80, generator=g)
    step_all(opt, [ours], [grad])
    step_all(ref, [theirs], [grad])
    assert torch.equal(ours, theirs)
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(opt.state[ours][key], ref.state[theirs][BNB_KEYS[key]])

    for _ in range(3):
        with torch.no_grad():
            ours.copy_(theirs)
        for key, bnb_key in BNB_KEYS.items():
            opt.state[ours][key].copy_(ref.state[theirs][bnb_key])
        prev = {m: bnbF.dequantize_blockwise(opt.state[ours][f"{m}_q"], absmax=opt.state[ours][f"{m}_absmax"],
                                             code=codes[m], blocksize=256) for m in codes}
        grad = torch.randn(64, 80, generator=g)
        step_all(opt, [ours], [grad])
        step_all(ref, [theirs], [grad])

        torch.testing.assert_close(ours, theirs, rtol=2.4e-7, atol=1e-6 * lr)
        s, r = opt.state[ours], ref.state[theirs]
        assert torch.equal(s["exp_avg_sq_absmax"], r["absmax2"])
        torch.testing.assert_close(s["exp_avg_absmax"], r["absmax1"], rtol=1e-6, atol=0)
        fp32 = {"exp_avg": prev["exp_avg"] * b1 + (1 - b1) * grad,
                "exp_avg_sq": prev["exp_avg_sq"] * b2 + (1 - b2) * grad**2}
        for m, bnb_q, bnb_absmax in (("exp_avg", "state1", "absmax1"), ("exp_avg_sq", "state2", "absmax2")):
            ours_err = (O.dequantize_blockwise(s[f"{m}_q"], s[f"{m}_absmax"], codes[m]) - fp32[m]).abs()
            bnb_err = (O.dequantize_blockwise(r[bnb_q], r[bnb_absmax], codes[m]) - fp32[m]).abs()
            slack = 1e-6 * s[f"{m}_absmax"].max()
            assert bool((ours_err <= bnb_err + slack).all()), m


def least_squares_run(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], steps: int = 100):
    """Fit W [64, 128] (8192 values: 8-bit state in 32 blocks) to noisy linear data."""
    g = gen(0)
    x, w_true = torch.randn(256, 128, generator=g), torch.randn(64, 128, generator=g) / 128**0.5
    y = x @ w_true.T + 0.01 * torch.randn(256, 64, generator=g)
    w = torch.nn.Parameter(torch.zeros(64, 128))
    opt = make([w])
    for _ in range(steps):
        loss = ((x @ w.T - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), ((x @ w.T - y) ** 2).mean().item()


def test_8bit_adamw_tracks_torch_adamw_over_100_steps() -> None:
    """Each step quantizes m and v to within half a code step of their block absmax (at most
    0.9/64/2 ~ 0.7% at the top decade, far less below), and every update is computed from the fresh
    fp32 moments, so errors do not compound: measured deviation ~0.2% of the weights. Tolerance:
    1% relative (5x headroom) and final loss within 5% of fp32 AdamW's; a wrong code (e.g. a linear
    map) is off by orders of magnitude."""
    w32, loss32 = least_squares_run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2))
    w8, loss8 = least_squares_run(lambda p: O.AdamW8bit(p, lr=1e-2, weight_decay=1e-2))
    assert loss32 < 1e-3  # the problem was actually solved
    assert (w8 - w32).norm() / w32.norm() < 0.01
    assert abs(loss8 - loss32) < 0.05 * loss32


def test_small_tensors_use_fp32_state_equal_to_torch_adamw() -> None:
    """Below min_8bit_size the state is fp32 and the update runs torch.optim.AdamW's op sequence,
    so 100 steps give the same bits as torch's single-tensor (CPU default) AdamW."""
    g = gen(4)
    shapes = [(32, 64), (64,), (7, 3)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(100)]
    ours, theirs = [torch.nn.Parameter(w.clone()) for w in init], [torch.nn.Parameter(w.clone()) for w in init]
    opt = O.AdamW8bit(ours, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    for step_grads in grads:
        step_all(opt, ours, step_grads)
        step_all(ref, theirs, step_grads)
    for p, t in zip(ours, theirs, strict=True):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p, t)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[t]["exp_avg_sq"])


@pytest.mark.parametrize("shape", [(64, 80), (16, 8)], ids=["8bit-state", "fp32-state"])
def test_bf16_params_get_fp32_math_rounded_once(shape: tuple[int, int]) -> None:
    """A bf16 parameter is updated in fp32 and rounded once: same state as an fp32 run fed the same
    gradients, and the new bf16 weight is the fp32 result rounded."""
    g = gen(5)
    p16 = torch.nn.Parameter(torch.randn(shape, generator=g).to(torch.bfloat16))
    p32 = torch.nn.Parameter(p16.detach().float())
    opt16, opt32 = O.AdamW8bit([p16], lr=1e-2), O.AdamW8bit([p32], lr=1e-2)
    for _ in range(3):
        grad = torch.randn(shape, generator=g).to(torch.bfloat16).float()
        with torch.no_grad():
            p32.copy_(p16)
        step_all(opt16, [p16], [grad])
        step_all(opt32, [p32], [grad])
        assert p16.dtype == torch.bfloat16
        assert torch.equal(p16, p32.detach().to(torch.bfloat16))
        for key, value in state_tensors(opt32, p32).items():
            assert torch.equal(opt16.state[p16][key], value), key


# ---------------------------------------------------------------------------------------------
# Checkpoints, paging, factory
# ---------------------------------------------------------------------------------------------


def mixed_params(seed: int) -> list[torch.Tensor]:
    """An 8-bit-state fp32 matrix, an 8-bit-state bf16 matrix, and a small fp32-state vector."""
    g = gen(seed)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=g)),
            torch.nn.Parameter(torch.randn(80, 64, generator=g).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(64, generator=g))]


def mixed_groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]


def grads_for(params: list[torch.Tensor], seed: int, steps: int) -> list[list[torch.Tensor]]:
    g = gen(seed)
    return [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]


def copy_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


@pytest.mark.filterwarnings("ignore:.*paging does nothing")
@pytest.mark.parametrize("make", [O.AdamW8bit, O.PagedAdamW8bit], ids=["AdamW8bit", "PagedAdamW8bit"])
def test_state_dict_round_trip_resumes_bit_exactly(make: Callable) -> None:
    """Save after 3 steps (through torch.save / weights_only load), resume in a fresh optimizer:
    the next 3 steps give the same bits as never stopping; uint8 and fp32 state keep their dtypes
    (torch's default load would cast them to the parameter's dtype, e.g. bf16)."""
    params = mixed_params(6)
    opt = make(mixed_groups(params), lr=1e-2)
    grads = grads_for(params, seed=7, steps=6)
    for step_grads in grads[:3]:
        step_all(opt, params, step_grads)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = copy_params(params)
    resumed = make(mixed_groups(resumed_params), lr=5.0)  # hyperparameters come from the checkpoint
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state[resumed_params[1]]["exp_avg_q"].dtype == torch.uint8
    assert resumed.state[resumed_params[2]]["exp_avg"].dtype == torch.float32

    for step_grads in grads[3:]:
        step_all(opt, params, step_grads)
        step_all(resumed, resumed_params, step_grads)
    assert_same_run(opt, params, resumed, resumed_params)


def test_load_state_dict_refuses_a_mismatched_parameter() -> None:
    params = mixed_params(8)
    opt = O.AdamW8bit(mixed_groups(params))
    step_all(opt, params, grads_for(params, seed=9, steps=1)[0])
    other = [torch.nn.Parameter(torch.zeros(64, 81)), *copy_params(params[1:])]
    with pytest.raises(ValueError, match="parameter 0 has shape"):
        O.AdamW8bit(mixed_groups(other)).load_state_dict(opt.state_dict())


@pytest.mark.filterwarnings("ignore:.*paging does nothing")
def test_paged_variants_equal_unpaged_on_cpu_and_warn_once() -> None:
    """On CPU paging does nothing: same bits as the unpaged optimizers (PagedAdamW = torch AdamW),
    with one warning per optimizer; checkpoints load across paged and unpaged."""
    params = mixed_params(10)
    grads = grads_for(params, seed=11, steps=4)
    cases = [(O.PagedAdamW8bit, O.AdamW8bit),
             (lambda ps, **kw: O.AdamW8bit(ps, paged=True, **kw), O.AdamW8bit),
             (O.PagedAdamW, lambda ps, **kw: torch.optim.AdamW(ps, foreach=False, **kw))]
    for make_paged, make_plain in cases:
        pp, up = copy_params(params[::2]), copy_params(params[::2])  # fp32 params (torch AdamW: fp32 state)
        paged, plain = make_paged(pp, lr=1e-2, weight_decay=0.05), make_plain(up, lr=1e-2, weight_decay=0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step_grads in grads:
                step_all(paged, pp, step_grads[::2])
                step_all(plain, up, step_grads[::2])
        assert sum("paging does nothing" in str(w.message) for w in caught) == 1
        for p, u in zip(pp, up, strict=True):
            assert torch.equal(p, u)

    unpaged = O.AdamW8bit(mixed_groups(params))
    step_all(unpaged, params, grads[0])
    moved = copy_params(params)
    paged = O.PagedAdamW8bit(mixed_groups(moved))
    paged.load_state_dict(unpaged.state_dict())
    step_all(unpaged, params, grads[1])
    step_all(paged, moved, grads[1])
    assert_same_run(unpaged, params, paged, moved)


class FakeStream:
    """Stands in for torch.cuda.Stream / Event on CPU: work runs in program order anyway."""

    def __init__(self, device: object = None) -> None:
        pass

    def record_event(self, event: object = None) -> FakeStream:
        return self

    def wait_event(self, event: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


def test_paged_schedule_fetches_updates_and_writes_back_each_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paged loop (prefetch the next state, update, copy back) run on CPU with the CUDA stream
    calls faked: every parameter gets its own state back, so results equal the unpaged optimizer.
    Stream ordering itself needs a GPU (test below)."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(O, "pinned_zeros", lambda shape, dtype: torch.zeros(shape, dtype=dtype))
    monkeypatch.setattr(O.AdamW8bit, "_pages", lambda self, p: self.paged)
    params = mixed_params(14)
    paged_params, plain_params = copy_params(params), copy_params(params)
    paged, plain = O.PagedAdamW8bit(mixed_groups(paged_params)), O.AdamW8bit(mixed_groups(plain_params))
    for step_grads in grads_for(params, seed=15, steps=4):
        step_all(paged, paged_params, step_grads)
        step_all(plain, plain_params, step_grads)
    assert_same_run(paged, paged_params, plain, plain_params)


def test_unpaged_state_is_made_on_the_parameters_device() -> None:
    """8-bit codes, block absmax and the small tensors' fp32 moments are made where the parameter is (on
    a GPU: GPU memory, no host round trip per step); `meta` stands in for the GPU here."""
    big, small = (torch.nn.Parameter(torch.zeros(shape, device="meta")) for shape in ((64, 128), (7,)))
    optimizer = O.AdamW8bit([big, small])
    for p in (big, small):
        optimizer._init_state(p, optimizer.param_groups[0])
    assert {k: (v.device.type, v.dtype) for k, v in state_tensors(optimizer, big).items()} == {
        "exp_avg_q": ("meta", torch.uint8), "exp_avg_absmax": ("meta", torch.float32),
        "exp_avg_sq_q": ("meta", torch.uint8), "exp_avg_sq_absmax": ("meta", torch.float32)}
    assert {v.device.type for v in state_tensors(optimizer, small).values()} == {"meta"}


@pytest.mark.gpu
def test_paged_state_lives_in_pinned_host_memory_and_matches_unpaged_on_cuda() -> None:
    params = [p.cuda() for p in mixed_params(12)]
    paged_params, plain_params = copy_params(params), copy_params(params)
    paged, plain = O.PagedAdamW8bit(mixed_groups(paged_params)), O.AdamW8bit(mixed_groups(plain_params))
    for step_grads in grads_for(params, seed=13, steps=5):
        step_grads = [g.cuda() for g in step_grads]
        step_all(paged, paged_params, step_grads)
        step_all(plain, plain_params, step_grads)
    paged.state_dict()  # waits for the copies back to the host
    for p, q in zip(paged_params, plain_params, strict=True):
        assert torch.equal(p, q)
        for key, value in state_tensors(paged, p).items():
            assert value.device.type == "cpu" and value.is_pinned(), key
            assert torch.equal(value, plain.state[q][key].cpu()), key


def test_make_optimizer_names() -> None:
    p = [torch.nn.Parameter(torch.zeros(4))]
    expected = {"adamw": torch.optim.AdamW, "adamw8bit": O.AdamW8bit,
                "paged_adamw": O.PagedAdamW, "paged_adamw8bit": O.PagedAdamW8bit}
    for name, cls in expected.items():
        opt = O.make_optimizer(name, p, lr=1e-3, weight_decay=0.0, betas=(0.8, 0.9), eps=1e-7)
        assert type(opt) is cls
        assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["eps"] == 1e-7
    with pytest.raises(ValueError, match="adamw, adamw8bit, paged_adamw, paged_adamw8bit"):
        O.make_optimizer("adam8", p, lr=1e-3, weight_decay=0.0)


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8),
                                 dict(weight_decay=-0.1), dict(blocksize=0)])
def test_bad_hyperparameters_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        O.AdamW8bit([torch.nn.Parameter(torch.zeros(4))], **bad)
