"""A frozen 4-bit linear layer (QLoRA's base layer), and the walk that swaps it into a model.

The weight is stored packed (NF4/FP4, see `nf4.py`) as a non-trainable parameter named `weight`,
so a LoRA wrapper can re-register it under the same name; its state dict has the exact keys and
bytes bitsandbytes' `Linear4bit` writes. No import of bitsandbytes: plain PyTorch on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.quant.nf4 import QuantState, dequantize_4bit, from_state_dict_entries, quantize_4bit, state_dict_entries

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Linear4bit(nn.Module):
    """y = x W^T + b, where W = dequantize_4bit(weight, quant_state) is rebuilt on every call.

    W is dequantized in `compute_dtype` (fp32 or bf16 on CPU; bf16/fp16 on CUDA), x is cast to it
    and y is cast back to x's dtype. The packed weight and the bias are frozen: gradients reach the
    input only. The backward pass dequantizes W again rather than keeping it from the forward, so a
    QLoRA step holds no full-precision copy of the base weights.
    """

    def __init__(
        self, packed: Tensor, quant_state: QuantState, bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__()
        if len(quant_state.shape) != 2:
            raise ValueError(f"a linear weight is 2-d, got shape {tuple(quant_state.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.out_features, self.in_features = quant_state.shape
        self.compute_dtype = compute_dtype
        self.quant_state = quant_state
        self.weight = _packed_parameter(packed)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(), False))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
    ) -> Linear4bit:  # fmt: skip
        """Quantize `linear`'s weight on its own device; its bias is copied and frozen."""
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant, quant_storage)
        return cls(packed, state, linear.bias, compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _Linear4bitFn.apply(x.to(self.compute_dtype), self.weight, self.quant_state, bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    def _apply(self, fn, recurse: bool = True):
        """Move the packed bytes and the quant state with the module, but never cast the bytes.

        `model.to(torch.bfloat16)` casts the bias; a cast of a bf16/fp32-stored packed weight would
        destroy the codes, so the weight only follows the device `fn` sends tensors to.
        """
        device = fn(torch.empty(0, device=self.weight.device)).device
        packed = self.weight.data.to(device)
        super()._apply(fn, recurse)
        self._set_packed(packed)
        self.quant_state = self.quant_state.to(device)
        return self

    def _set_packed(self, packed: Tensor) -> None:
        """Swap the packed bytes in, keeping the Parameter object (a wrapper may share it)."""
        self.weight.data = packed
        self.weight.lorakit_numel_factor = 2 * packed.element_size()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """bitsandbytes' layout and order: weight, bias, then the quant-state entries."""
        entries = state_dict_entries(prefix, self.weight, self.quant_state)
        weight = entries.pop(f"{prefix}weight")
        destination[f"{prefix}weight"] = weight if keep_vars else weight.detach()
        if self.bias is not None:
            destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update({k: v if keep_vars else v.detach() for k, v in entries.items()})

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Load bitsandbytes-layout entries; a float weight of shape [out, in] alone is quantized here."""
        weight_key = f"{prefix}weight"
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
        else:
            try:
                self._load_weight(prefix, state_dict)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{type(e).__name__}: {e.args[0]}")
        if self.bias is not None:
            self._load_bias(f"{prefix}bias", state_dict, missing_keys, error_msgs)

    def _load_weight(self, prefix: str, state_dict: dict) -> None:
        weight = state_dict[f"{prefix}weight"]
        is_float = weight.is_floating_point() and not any(k.startswith(f"{prefix}weight.") for k in state_dict)
        if is_float and weight.shape == (self.out_features, self.in_features):
            s = self.quant_state
            storage = self.weight.dtype
            packed, state = quantize_4bit(weight.to(self.weight.device), s.quant_type, s.blocksize, s.nested, storage)
        else:
            packed, state = from_state_dict_entries(prefix, state_dict)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{prefix}weight: shape {tuple(state.shape)} does not fit [{self.out_features}, {self.in_features}]"
            )
        self._set_packed(packed.detach().to(self.weight.device, copy=True))
        self.quant_state = state.to(self.weight.device)

    def _load_bias(self, key: str, state_dict: dict, missing_keys: list, error_msgs: list) -> None:
        if key not in state_dict:
            missing_keys.append(key)
        elif state_dict[key].shape != self.bias.shape:
            error_msgs.append(f"{key}: shape {tuple(state_dict[key].shape)} does not fit {tuple(self.bias.shape)}")
        else:
            with torch.no_grad():
                self.bias.copy_(state_dict[key])


class _Linear4bitFn(torch.autograd.Function):
    """F.linear with a 4-bit weight; saves the packed bytes, not W, and re-dequantizes in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, state: QuantState, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(packed)
        ctx.state, ctx.has_bias = state, bias is not None
        from lorakit import kernels  # late: lorakit.kernels' modules import lorakit.quant

        if kernels.use_triton(x):  # CUDA: W dequantized inside the matmul (decode) or by one kernel
            from lorakit.kernels.triton_matmul4bit import linear_4bit

            return linear_4bit(x, packed, state, bias)
        y = F.linear(x, dequantize(packed, state, x.dtype))  # [..., out]
        # bias added in place: F.linear's fused bias returns a view of its 2-d result, and a view made inside
        # a Function may not be changed in place later (the LoRA wrapper adds its delta into y in place)
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            (packed,) = ctx.saved_tensors
            grad_x = grad_out @ dequantize(packed, ctx.state, grad_out.dtype)  # [..., in]
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # [out]
        return grad_x, None, None, grad_bias


def _packed_parameter(packed: Tensor) -> nn.Parameter:
    """The packed bytes as a frozen parameter; `lorakit_numel_factor` = weights per stored element.

    Parameter counts then match PEFT's accounting of bitsandbytes' Params4bit (numel * 2 * itemsize).
    """
    param = nn.Parameter(packed, requires_grad=False)
    param.lorakit_numel_factor = 2 * packed.element_size()
    return param


def dequantize(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """`dequantize_4bit`, through the byte-table kernel (same bits, about 2x faster on the CPU) unless
    LORAKIT_KERNELS=0; on CUDA through one Triton kernel (same bits)."""
    from lorakit import kernels  # late: lorakit.kernels.dequant imports lorakit.quant
    from lorakit.kernels.dequant import dequantize_4bit_bytes

    if kernels.use_triton(packed):
        from lorakit.kernels.triton_nf4 import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state, dtype)

    return (dequantize_4bit_bytes if kernels.enabled() else dequantize_4bit)(packed, state, dtype)


def dequantize_weight(layer: Linear4bit, dtype: torch.dtype | None = None) -> Tensor:
    """The layer's weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
    return dequantize(layer.weight, layer.quant_state, dtype)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Replace every `nn.Linear` in `model` by a `Linear4bit`, in place; returns `model`.

    `quant_storage`: the dtype the packed bytes are viewed as (a float one lets FSDP2 shard them with
    the other parameters; see `quantize_4bit`).

    Left alone: the output head (`model.get_output_embeddings()`, when the model has one) and any
    module whose dotted name contains an entry of `skip` as whole components (`"lm_head"`,
    `"mlp"`, `"layers.0"`). Only exact `nn.Linear` is replaced: subclasses (e.g. the out_proj of
    `nn.MultiheadAttention`, read directly by its owner) keep their own semantics. A linear
    registered under several names is quantized once and shared.
    """
    replaced: dict[int, Linear4bit] = {}
    for name, module in quantization_targets(model, skip):
        if id(module) not in replaced:
            try:
                replaced[id(module)] = quantize_layer(module, quant_type, blocksize, double_quant, compute_dtype,
                                                      quant_storage)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from e
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replaced[id(module)])
    return model


def quantize_layer(
    module: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
) -> Linear4bit:  # fmt: skip
    """The 4-bit layer that replaces one of `quantization_targets`, quantized on its weight's device: the
    one step `quantize_model` and the loader (`lorakit.stream`, which fills the weight first) share."""
    return Linear4bit.from_linear(module, quant_type, blocksize, double_quant, compute_dtype, quant_storage)


def quantization_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer `quantize_model` replaces, under each of its names (see there)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module) for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.Linear and module is not head and not _skipped(name, skip)
    ]  # fmt: skip


def quant_record(quant) -> dict | None:
    """`quant` as a quantization record (the shape `quantization_of` returns and adapters record):
    None, a dict with the keys type, blocksize, double_quant, compute_dtype (missing ones take
    QLoRA's defaults), or an object with those fields (`config.QuantConfig`)."""
    if quant is None:
        return None
    get = quant.get if isinstance(quant, dict) else (lambda key, default: getattr(quant, key, default))
    record = {"type": get("type", "nf4"), "double_quant": bool(get("double_quant", True)),
              "blocksize": int(get("blocksize", 64)),
              "compute_dtype": str(get("compute_dtype", "float32")).removeprefix("torch.")}
    if getattr(torch, record["compute_dtype"], None) not in COMPUTE_DTYPES:
        raise ValueError(f"quant compute_dtype must be float32, bfloat16 or float16, got {record['compute_dtype']!r}")
    return record


def quantization_of(model: nn.Module) -> dict | None:
    """How the model's 4-bit layers were made (`QuantConfig` fields), or None if it has none.

    A layer wrapped by an adapter keeps its base outside the module tree, as `base_module`.
    """
    bases = (getattr(m, "base_module", m) for m in model.modules())
    layer = next((m for m in bases if isinstance(m, Linear4bit)), None)
    if layer is None:
        return None
    s = layer.quant_state
    return {"type": s.quant_type, "double_quant": s.nested, "blocksize": s.blocksize,
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(f".{s}." in f".{name}." for s in skip)
