"""8-bit blockwise AdamW and paged (host-resident) optimizer state, in plain PyTorch.

AdamW keeps two moments per parameter, m and v. In fp32 that is 8 bytes per parameter; here each
moment is stored blockwise like bitsandbytes: one byte per value, an index into a 256-entry dynamic
code (signed for m, unsigned for v), plus one fp32 absmax per block of 256 values -- about
2 + 8/256 bytes per parameter. Each step dequantizes a block to fp32, applies the AdamW update with
the fresh fp32 moments, and requantizes them with the block's new absmax (nearest code value).
Tensors smaller than `min_8bit_size` keep fp32 moments, updated with torch.optim.AdamW's exact
op sequence (bit-identical to its single-tensor path).

Paged state (`paged=True`): on CUDA the moments live in pinned host memory and are streamed to the
GPU one parameter at a time for its update, then copied back, so GPU memory holds only weights,
gradients and activations. On other devices paging does nothing (with a one-time warning).
See docs/OPTIMIZERS.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lorakit.quant.nf4 import dynamic_map

BLOCKSIZE = 256
CHUNK = 256 * 4096  # elements updated at once; bounds the fp32 temporaries of the 8-bit path
FP32_KEYS = ("exp_avg", "exp_avg_sq")
QUANT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


# ---------------------------------------------------------------------------------------------
# The dynamic 8-bit code and blockwise (de)quantization
# ---------------------------------------------------------------------------------------------


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """View a flat tensor as rows of `blocksize`, zero-padding the last block."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int = BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Bytes (nearest code value of x / block absmax, shaped like x) and the fp32 absmax per block.

    Ties go to the lower code index. An all-zero block gets absmax 0 and the index of code value 0.
    """
    flat = x.reshape(-1).float()
    blocks = _blocks(flat, blocksize)  # [nblocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [nblocks]
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    midpoints = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(blocks / scale[:, None], midpoints).to(torch.uint8)
    return q.view(-1)[: flat.numel()].view(x.shape), absmax


def dequantize_blockwise(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = BLOCKSIZE) -> Tensor:
    """fp32 values code[q] * absmax of q's block, shaped like q."""
    values = code[q.reshape(-1).int()]
    blocks = _blocks(values, blocksize) * absmax[:, None]  # [nblocks, blocksize]
    return blocks.view(-1)[: q.numel()].view(q.shape)


# ---------------------------------------------------------------------------------------------
# The AdamW update
# ---------------------------------------------------------------------------------------------


def adamw_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
) -> None:
    """One AdamW step in place, in the op order of torch.optim.AdamW's single-tensor path.

    p <- p * (1 - lr*wd) - lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps), with decoupled weight
    decay applied first; m and v are updated in place before use. Same ops as torch, so fp32 state
    gives the same bits as torch's single-tensor AdamW (its CPU default).
    """
    beta1, beta2 = betas
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _update_8bit(
    param: Tensor, grad: Tensor, state: dict[str, Tensor], codes: tuple[Tensor, Tensor],
    step: int, group: dict[str, Any],
) -> None:
    """AdamW on a flat fp32 param with 8-bit moments, chunk by chunk (chunks are whole blocks)."""
    signed, unsigned = codes
    blocksize = group["blocksize"]
    chunk = max(1, CHUNK // blocksize) * blocksize
    m_q, m_absmax = state["exp_avg_q"].view(-1), state["exp_avg_absmax"]
    v_q, v_absmax = state["exp_avg_sq_q"].view(-1), state["exp_avg_sq_absmax"]
    for start in range(0, param.numel(), chunk):
        elems = slice(start, start + chunk)
        blocks = slice(start // blocksize, (start + chunk) // blocksize)
        m = dequantize_blockwise(m_q[elems], m_absmax[blocks], signed, blocksize)
        v = dequantize_blockwise(v_q[elems], v_absmax[blocks], unsigned, blocksize)
        adamw_update_(
            param[elems], grad[elems], m, v, step,
            group["lr"], group["betas"], group["eps"], group["weight_decay"],
        )
        for values, code, q, absmax in ((m, signed, m_q, m_absmax), (v, unsigned, v_q, v_absmax)):
            new_q, new_absmax = quantize_blockwise(values, code, blocksize)
            q[elems] = new_q
            absmax[blocks] = new_absmax


# ---------------------------------------------------------------------------------------------
# The optimizers
# ---------------------------------------------------------------------------------------------


def pinned_zeros(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Zeros in page-locked host memory: the GPU copies from and to it asynchronously."""
    return torch.zeros(shape, dtype=dtype, device="cpu", pin_memory=True)


def _check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                           min_8bit_size: float, blocksize: int) -> None:
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {min_8bit_size}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be > 0, got {blocksize}")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments (bitsandbytes' scheme); small tensors keep fp32 moments.

    Tensors with at least `min_8bit_size` elements store m and v as bytes plus one fp32 absmax per
    `blocksize` values; smaller ones (biases, norms, small adapters) keep fp32 moments as bitsandbytes
    does, since quantizing them saves little and costs accuracy. fp32 and bf16 parameters are
    supported; the math is fp32. `paged=True` keeps the state in pinned host memory on CUDA (see
    the module docstring). `min_8bit_size=math.inf` gives a plain fp32-state AdamW.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: float = 4096,
        blocksize: int = BLOCKSIZE,
        *,
        paged: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, min_8bit_size, blocksize)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        min_8bit_size=min_8bit_size, blocksize=blocksize)
        super().__init__(params, defaults)
        self.paged = paged
        self._codes: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._copy_streams: dict[torch.device, Any] = {}
        self._writebacks: dict[torch.device, Any] = {}  # device -> event after the last copy back
        self._warned_unpaged = False

    # -- state ------------------------------------------------------------------------------

    def _pages(self, p: Tensor) -> bool:
        return self.paged and p.device.type == "cuda"

    def _new_state_tensor(self, p: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """A zero tensor on p's device, or in pinned host memory when p's state is paged."""
        if self._pages(p):
            return pinned_zeros(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        if self.paged and not self._pages(p) and not self._warned_unpaged:
            warnings.warn(
                f"{type(self).__name__}: paging does nothing for parameters on {p.device.type}; "
                "their optimizer state stays where they are (same results as unpaged).",
                stacklevel=3,
            )
            self._warned_unpaged = True
        state = self.state[p]
        state["step"] = 0
        if p.numel() >= group["min_8bit_size"]:
            nblocks = math.ceil(p.numel() / group["blocksize"])
            # absmax 0 decodes every byte to 0, so zero bytes are zero moments
            state["exp_avg_q"] = self._new_state_tensor(p, p.shape, torch.uint8)
            state["exp_avg_absmax"] = self._new_state_tensor(p, torch.Size([nblocks]), torch.float32)
            state["exp_avg_sq_q"] = self._new_state_tensor(p, p.shape, torch.uint8)
            state["exp_avg_sq_absmax"] = self._new_state_tensor(p, torch.Size([nblocks]), torch.float32)
        else:
            state["exp_avg"] = self._new_state_tensor(p, p.shape, torch.float32)
            state["exp_avg_sq"] = self._new_state_tensor(p, p.shape, torch.float32)

    def _state_tensors(self, p: Tensor) -> dict[str, Tensor]:
        return {k: v for k, v in self.state[p].items() if isinstance(v, Tensor)}

    def _codes_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._codes:
            self._codes[device] = (dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device))
        return self._codes[device]

    # -- the update ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if not self.state[p]:
                    self._init_state(p, group)
                self.state[p]["step"] += 1
            for p in params:
                if not self._pages(p):
                    self._update(p, group, self._state_tensors(p))
            paged = [p for p in params if self._pages(p)]
            if paged:
                self._update_paged(group, paged)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any], state: dict[str, Tensor]) -> None:
        """Update p with its moments `state`, which sit on p's device."""
        step = self.state[p]["step"]
        fp32 = p.dtype == torch.float32 and p.is_contiguous()
        work = p if fp32 else p.to(torch.float32).contiguous()  # fp32 copy for bf16 params
        grad = p.grad.to(torch.float32)
        if "exp_avg_q" in state:
            _update_8bit(work.view(-1), grad.reshape(-1), state, self._codes_on(p.device), step, group)
        else:
            adamw_update_(work, grad, state["exp_avg"], state["exp_avg_sq"], step,
                          group["lr"], group["betas"], group["eps"], group["weight_decay"])
        if work is not p:
            p.copy_(work)

    # -- paging (CUDA) ------------------------------------------------------------------------

    def _update_paged(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Stream each parameter's host state to its GPU, update there, copy it back.

        Copies run on a side stream: the next parameter's state is fetched while this one is
        updated, and its write-back waits only for its own update. GPU memory holds the state of
        about two parameters at a time.
        """
        incoming = self._fetch(params[0])
        for index, p in enumerate(params):
            on_device, ready = incoming
            if index + 1 < len(params):
                incoming = self._fetch(params[index + 1])
            compute = torch.cuda.current_stream(p.device)
            compute.wait_event(ready)
            self._update(p, group, on_device)
            self._write_back(p, on_device, compute.record_event())

    def _copy_stream(self, device: torch.device) -> Any:
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]

    def _fetch(self, p: Tensor) -> tuple[dict[str, Tensor], Any]:
        """Start copying p's host state to its GPU; returns the device tensors and their ready event."""
        copy = self._copy_stream(p.device)
        with torch.cuda.stream(copy):
            # allocated on the copy stream, so freed blocks are reused only after their write-back
            on_device = {k: v.to(p.device, non_blocking=True, copy=True) for k, v in self._state_tensors(p).items()}
            ready = copy.record_event()
        return on_device, ready

    def _write_back(self, p: Tensor, on_device: dict[str, Tensor], updated: Any) -> None:
        copy = self._copy_stream(p.device)
        copy.wait_event(updated)
        host = self.state[p]
        with torch.cuda.stream(copy):
            for key, tensor in on_device.items():
                host[key].copy_(tensor, non_blocking=True)
            self._writebacks[p.device] = copy.record_event()

    def _wait_for_writebacks(self) -> None:
        """Block until the host state is current (before it is read or replaced on the CPU)."""
        for event in self._writebacks.values():
            event.synchronize()
        self._writebacks.clear()

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self._wait_for_writebacks()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load hyperparameters and moments, keeping their dtypes (torch would cast them to the
        parameter's dtype) and placing them where this optimizer keeps state."""
        self._wait_for_writebacks()
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for index, (saved_id, (p, group)) in enumerate(zip(saved_ids, self._params_with_groups(), strict=True)):
            if saved_id in state_dict["state"]:
                self._load_param_state(index, p, group, state_dict["state"][saved_id])

    def _params_with_groups(self) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def _load_param_state(self, index: int, p: Tensor, group: dict[str, Any], saved: dict[str, Any]) -> None:
        keys = set(saved) - {"step"}
        if keys not in (set(FP32_KEYS), set(QUANT_KEYS)):
            raise ValueError(f"optimizer state of parameter {index} has keys {sorted(keys)}; "
                             f"expected {list(FP32_KEYS)} or {list(QUANT_KEYS)}")
        nblocks = math.ceil(p.numel() / group["blocksize"])
        state: dict[str, Any] = {"step": int(saved["step"])}
        for key in sorted(keys):
            value = saved[key]
            shape = torch.Size([nblocks]) if key.endswith("absmax") else p.shape
            if value.shape != shape:
                raise ValueError(f"optimizer state {key!r} of parameter {index} has shape "
                                 f"{tuple(value.shape)}; parameter needs {tuple(shape)}")
            dtype = torch.uint8 if key.endswith("_q") else torch.float32  # whatever the file holds
            state[key] = self._new_state_tensor(p, shape, dtype).copy_(value)
        self.state[p] = state


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose state lives in pinned host memory on CUDA (no effect on CPU)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: float = 4096,
        blocksize: int = BLOCKSIZE,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, blocksize, paged=True)


class PagedAdamW(AdamW8bit):
    """AdamW with fp32 state (same bits as torch.optim.AdamW) kept in pinned host memory on CUDA."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size=math.inf, paged=True)


def make_optimizer(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer called `name`: adamw (torch.optim.AdamW), adamw8bit, paged_adamw, paged_adamw8bit."""
    classes: dict[str, type[torch.optim.Optimizer]] = {
        "adamw": torch.optim.AdamW,
        "adamw8bit": AdamW8bit,
        "paged_adamw": PagedAdamW,
        "paged_adamw8bit": PagedAdamW8bit,
    }
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    return classes[name](params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
