"""A frozen 4-bit linear layer (QLoRA's base layer), and the walk that swaps it into a model.

The weight is stored packed (NF4/FP4, see `nf4.py`) as a non-trainable parameter named `weight`,
so a LoRA wrapper can re-register it under the same name; its state dict has the exact keys and
bytes bitsandbytes' `Linear4bit` writes. No import of bitsandbytes: plain PyTorch on any device.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.pytorch_utils import Conv1D

from lorakit import kernels
from lorakit.kernels.dequant import dequantize_4bit_bytes, whole_blocks
from lorakit.quant.nf4 import (
    QuantState,
    absmax_of,
    dequantize_4bit,
    from_state_dict_entries,
    quantize_4bit,
    state_dict_entries,
)

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PLAIN_LINEARS = (FalconLinear,)  # subclasses of nn.Linear computing x W^T + b (tests/test_qlora_layers.py checks)


class Linear4bit(nn.Module):
    """y = x W^T + b, where W = dequantize_4bit(weight, quant_state) is rebuilt on every call.

    W is dequantized in `compute_dtype` (fp32 or bf16 on CPU; bf16/fp16 on CUDA), x is cast to it
    and y is cast back to x's dtype. The packed weight and the bias are frozen: gradients reach the
    input only. The backward pass dequantizes W again rather than keeping it from the forward, so a
    QLoRA step holds no full-precision copy of the base weights.

    `conv1d`: made from a transformers `Conv1D` (GPT-2), whose weight is stored [in, out]. W is quantized
    transposed, [out, in], as transformers + bitsandbytes lay it out; a merge gives back a Conv1D.
    """

    def __init__(
        self, packed: Tensor, quant_state: QuantState, bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32, conv1d: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if len(quant_state.shape) != 2:
            raise ValueError(f"a linear weight is 2-d, got shape {tuple(quant_state.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.out_features, self.in_features = quant_state.shape
        self.compute_dtype = compute_dtype
        self.conv1d = conv1d
        self.quant_state = quant_state
        self.weight = _packed_parameter(packed)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(), False))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear | Conv1D, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
    ) -> Linear4bit:  # fmt: skip
        """Quantize `linear`'s weight (a Conv1D's transposed to [out, in]) on its own device; its bias is
        copied and frozen."""
        conv1d = isinstance(linear, Conv1D)
        weight = linear.weight.detach()
        weight = weight.T.contiguous() if conv1d else weight  # [out, in]
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant, quant_storage)
        return cls(packed, state, linear.bias, compute_dtype, conv1d)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = _Linear4bitFn.apply(x.to(self.compute_dtype), self.weight, self.quant_state, bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, "
            f"compute_dtype={self.compute_dtype}" + (", conv1d=True" if self.conv1d else "")
        )

    @torch.no_grad()
    def full_precision(self, weight: Tensor | None = None) -> nn.Module:
        """The kind of layer this one was made from, holding `weight` [out, in] (default: the dequantized own)
        and this bias, in `compute_dtype`: an nn.Linear, or a Conv1D (weight stored [in, out]) for GPT-2's, so
        the model's code and checkpoint layout stay what they were."""
        weight = dequantize_weight(self, torch.float32) if weight is None else weight  # [out, in]
        if self.conv1d:
            layer = Conv1D(self.out_features, self.in_features).to(weight.device, self.compute_dtype)
            layer.weight.copy_(weight.T)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=weight.device, dtype=self.compute_dtype)
            layer.weight.copy_(weight)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer.requires_grad_(False)

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
        """Load bitsandbytes-layout entries; a float weight alone (of shape [out, in], a Conv1D's [in, out])
        is quantized here."""
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
        weight = weight.T if is_float and self.conv1d else weight  # [out, in]
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
    """F.linear with a 4-bit weight; saves the packed bytes, not W, and re-dequantizes in backward. Its
    output is never a view (see `kernels.linear`): a LoRA node may then add into it in place."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, state: QuantState, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(packed)
        ctx.state, ctx.has_bias = state, bias is not None
        if kernels.use_triton(x):  # CUDA: W dequantized inside the matmul (decode) or by one kernel
            from lorakit.kernels.triton_matmul4bit import linear_4bit  # late: imports triton (optional, heavy)

            return linear_4bit(x, packed, state, bias)
        return kernels.linear(x, dequantize(packed, state, x.dtype), bias)

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
    LORAKIT_KERNELS=0 (or a ragged last block); on CUDA through one Triton kernel (same bits)."""
    if kernels.use_triton(packed):
        from lorakit.kernels.triton_nf4 import dequantize_4bit_triton  # late: imports triton (optional, heavy)

        return dequantize_4bit_triton(packed, state, dtype)
    if kernels.enabled() and whole_blocks(state.numel, state.blocksize):
        return dequantize_4bit_bytes(packed, state.code, absmax_of(state), state.blocksize, state.shape,
                                     dtype or state.dtype)
    return dequantize_4bit(packed, state, dtype)


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
    """Replace every `nn.Linear` and `Conv1D` in `model` by a `Linear4bit`, in place; returns `model`.

    `quant_storage`: the dtype the packed bytes are viewed as (a float one lets FSDP2 shard them with
    the other parameters; see `quantize_4bit`).

    Left alone: the output head (`model.get_output_embeddings()`, when the model has one) and any
    module whose dotted name contains an entry of `skip` as whole components (`"lm_head"`,
    `"mlp"`, `"layers.0"`). Replaced are the layers `quantizable` names; other subclasses of nn.Linear
    (routers, the out_proj of `nn.MultiheadAttention` that its owner reads directly) keep their own
    semantics and full precision, with a warning naming them. A linear registered under several names is
    quantized once and shared.
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
    warn_full_precision(model, skip)
    return model


def warn_full_precision(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Name, in a warning, what a quantized model keeps in full precision besides its head and `skip`: never
    silently. Other subclasses of nn.Linear, and weight matrices outside linear layers (`loose_weights`)."""
    head = output_head(model)
    left = [f"{name} ({type(module).__name__})" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head and not _skipped(name, skip)]
    if left:
        warnings.warn(f"{len(left)} linear layers stay in full precision: their class is a subclass of nn.Linear "
                      f"that 4-bit layers do not replace (as in transformers + bitsandbytes): {listed(left)}",
                      stacklevel=3)
    loose = [name for name in loose_weights(model) if not _skipped(name, skip)]
    if loose:
        warnings.warn(f"{len(loose)} weight matrices outside linear layers stay in full precision (fused "
                      f"mixture-of-experts parameters, routers): {listed(loose)}", stacklevel=3)


def loose_weights(model: nn.Module) -> list[str]:
    """Names of weight matrices (2-d or more) held directly by modules other than linear, Conv1D and
    embedding layers: fused mixture-of-experts parameters (`mlp.experts.gate_up_proj` [experts, 2 * ff,
    hidden]) and routers (`mlp.gate.weight`), which neither 4-bit layers nor LoRA wrappers replace."""
    layers = (nn.Linear, nn.Embedding, Conv1D, Linear4bit)
    wrapped = {id(m) for w in model.modules() if hasattr(w, "base_module") for m in w.modules()}  # LoRA wrappers
    return [f"{name}.{pname}" if name else pname for name, module in model.named_modules()
            if not isinstance(module, layers) and id(module) not in wrapped
            for pname, p in module.named_parameters(recurse=False) if p.dim() >= 2]


def listed(names: list[str], first: int = 3) -> str:
    return ", ".join(names[:first]) + (", ..." if len(names) > first else "")


def quantize_layer(
    module: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
) -> Linear4bit:  # fmt: skip
    """The 4-bit layer that replaces one of `quantization_targets`, quantized on its weight's device: the
    one step `quantize_model` and the loader (`lorakit.stream`, which fills the weight first) share."""
    return Linear4bit.from_linear(module, quant_type, blocksize, double_quant, compute_dtype, quant_storage)


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (kept in full precision), if it names one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def quantization_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer `quantize_model` replaces, under each of its names (see there)."""
    head = output_head(model)
    return [
        (name, module) for name, module in model.named_modules(remove_duplicate=False)
        if quantizable(module) and module is not head and not _skipped(name, skip)
    ]  # fmt: skip


def quant_record(quant, device: torch.device | None = None) -> dict | None:
    """`quant` as a quantization record (the shape `quantization_of` returns and adapters record):
    None, a dict with the keys type, blocksize, double_quant, compute_dtype (missing ones take
    QLoRA's defaults), or an object with those fields (`config.QuantConfig`). compute_dtype `auto` is
    bfloat16 on a CUDA `device` that supports it, else float32."""
    if quant is None:
        return None
    get = quant.get if isinstance(quant, dict) else (lambda key, default: getattr(quant, key, default))
    record = {"type": get("type", "nf4"), "double_quant": bool(get("double_quant", True)),
              "blocksize": int(get("blocksize", 64)),
              "compute_dtype": str(get("compute_dtype", "float32")).removeprefix("torch.")}
    if record["compute_dtype"] == "auto":
        bf16 = device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported()
        record["compute_dtype"] = "bfloat16" if bf16 else "float32"
    if getattr(torch, record["compute_dtype"], None) not in COMPUTE_DTYPES:
        raise ValueError(f"quant compute_dtype must be float32, bfloat16 or float16, got {record['compute_dtype']!r}")
    return record


def quantizable(module: nn.Module) -> bool:
    """An exact nn.Linear or a transformers Conv1D (what transformers + bitsandbytes make 4-bit), or an
    nn.Linear subclass whose forward is F.linear's formula (`PLAIN_LINEARS`; transformers 5 leaves those in
    full precision, so a Falcon would get no 4-bit layer at all)."""
    return type(module) in (nn.Linear, *PLAIN_LINEARS) or isinstance(module, Conv1D)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every `Linear4bit` in `model` by the full-precision layer it stands for (`full_precision`), in
    place; returns `model`. A layer registered under several names stays shared."""
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, Linear4bit):
            if id(module) not in replaced:
                replaced[id(module)] = module.full_precision()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replaced[id(module)])
    return model


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
