"""A frozen 4-bit linear layer (QLoRA's base layer), and the walk that swaps it into a model.

The weight is stored packed (NF4/FP4, see `nf4.py`) as a non-trainable parameter named `weight`,
so a LoRA wrapper can re-register it under the same name; its state dict has the exact keys and
bytes bitsandbytes' `Linear4bit` writes. No import of bitsandbytes: plain PyTorch on any device.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.falcon.modeling_falcon import FalconLinear
from transformers.pytorch_utils import Conv1D

from lorakit import kernels
from lorakit.kernels.dequant import dequantize_4bit_bytes, whole_blocks
from lorakit.quant.experts4bit import expert_entries, expert_of, fused_weights, read_stacked, stack_experts
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


class Experts4bit(nn.Module):
    """A transformers experts module (`quantizable_experts`) whose fused expert weights are stored 4-bit.

    Each expert's matrix of a fused weight (`gate_up_proj` [E, 2 * ff, hidden], `down_proj` [E, hidden, ff];
    of an [E, in, out] one, `is_transposed`, its transpose) is quantized as the weight [out, in] of a linear
    layer: its bytes, absmax and nested absmax are bitsandbytes' `quantize_4bit(W_e)`, stacked over the
    experts (packed [E, bytes], absmax [E, blocks], nested_absmax [E, nested blocks], offset [E]). So any
    expert dequantizes alone, and the quality is that of E separate 4-bit linears.

    The forward is transformers' eager experts loop: for each expert some token was routed to, W_e is
    dequantized in `compute_dtype`, multiplied and dropped (`_Linear4bitFn`, which dequantizes it again in the
    backward), so at most one expert matrix is held in full precision at a time. `lora` (from an expert
    adapter) adds x A_e^T B_e^T * scale per expert. The fused weights keep their names; the module's other
    parameters (biases) and sub-modules (activation) are its own, in full precision.
    """

    def __init__(
        self, experts: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
    ) -> None:  # fmt: skip
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.quantized = fused_weights(experts)
        if not self.quantized:
            raise ValueError(f"{type(experts).__name__} is not an experts module lorakit can store 4-bit")
        self.num_experts = experts._parameters[self.quantized[0]].shape[0]
        self.has_gate, self.has_bias, self.is_transposed = experts.has_gate, experts.has_bias, experts.is_transposed
        self.has_post_expert_norm = getattr(experts, "has_post_expert_norm", False)
        self.quant = (quant_type, blocksize, double_quant)
        self.compute_dtype, self.quant_storage = compute_dtype, quant_storage
        self.shapes = {n: experts._parameters[n].shape for n in self.quantized}  # as the model stores them
        self.quant_states: dict[str, QuantState] = {}
        self._pending: dict[str, dict[int, tuple[Tensor, QuantState]]] = {}  # experts quantized, not yet stacked
        self._modules.update(experts._modules)
        for name, param in experts._parameters.items():
            self.register_parameter(name, None if param is None or name in self.quantized else param)
        for name in self.quantized:  # on meta until every expert is in (`set_expert`)
            experts._parameters[name] = nn.Parameter(experts._parameters[name].to("meta"), requires_grad=False)
            self._set_packed(name, torch.empty(0, dtype=quant_storage, device="meta"))
        object.__setattr__(self, "source", experts)  # its class and flags, for the gate and `full_precision`

    @classmethod
    def from_experts(
        cls, experts: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32, quant_storage: torch.dtype = torch.uint8,
    ) -> Experts4bit:  # fmt: skip
        """Quantize `experts`' fused weights expert by expert, on their own device."""
        weights = {n: experts._parameters[n].detach() for n in fused_weights(experts)}
        layer = cls(experts, quant_type, blocksize, double_quant, compute_dtype, quant_storage)
        for name, weight in weights.items():
            for e in range(layer.num_experts):
                layer.set_expert(name, e, weight[e])
        return layer

    def __getattr__(self, name: str):
        """Attributes the model's code or the gate read on the experts module (`act_fn`, `config`, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get("source")
            if source is None:
                raise
            return getattr(source, name)

    def set_expert(self, name: str, expert: int, weight: Tensor) -> None:
        """Quantize expert `expert`'s matrix of fused weight `name` (as stored: [out, in], or [in, out] when
        `is_transposed`); once every expert of `name` is in, the packed weight is stacked and usable."""
        if tuple(weight.shape) != tuple(self.shapes[name][1:]):
            raise ValueError(f"{name}[{expert}]: shape {list(weight.shape)} does not fit {list(self.shapes[name][1:])}")
        quant_type, blocksize, double_quant = self.quant
        matrix = weight.T if self.is_transposed else weight  # [out, in]
        pending = self._pending.setdefault(name, {})
        pending[expert] = quantize_4bit(matrix, quant_type, blocksize, double_quant)
        if len(pending) == self.num_experts:
            self._stack(name, [pending[e] for e in range(self.num_experts)])
            del self._pending[name]

    def _stack(self, name: str, parts: list[tuple[Tensor, QuantState]]) -> None:
        packed, self.quant_states[name] = stack_experts(parts, self.quant_storage)
        self._set_packed(name, packed)

    def _set_packed(self, name: str, packed: Tensor) -> None:
        """Put the packed bytes in, keeping the Parameter object (a wrapper may share it) unless it is on meta."""
        param = self._parameters.get(name)
        if param is None or param.is_meta:
            param = self._parameters[name] = _packed_parameter(packed)
        param.data = packed
        param.lorakit_numel_factor = 2 * packed.element_size()
        param.lorakit_shape = self.shapes[name]  # what the fused weight is, whatever its storage (params.py)

    def expert(self, name: str, expert: int) -> tuple[Tensor, QuantState]:
        """(packed bytes, quant state) of one expert's matrix [out, in]: what a Linear4bit of it holds."""
        return expert_of(self._parameters[name], self.quant_states[name], expert)

    def dequantized(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The whole fused weight as the model stores it, dequantized (a merge's input: every expert at once)."""
        matrices = [dequantize(*self.expert(name, e), dtype) for e in range(self.num_experts)]  # [out, in] each
        return torch.stack([m.T if self.is_transposed else m for m in matrices])

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                lora: dict[str, list[tuple[Tensor, Tensor, float]]] | None = None) -> Tensor:
        """transformers' eager experts forward (hidden_states [tokens, hidden]; top_k_index and top_k_weights
        [tokens, k]), one routed-to expert at a time. lora: fused weight name -> (A [E, r, in], B [E, out, r],
        scale) of each active expert adapter."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # [E + 1, k, tokens]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        up = "gate_up_proj" if self.has_gate else "up_proj"
        for e in hit:
            if e == self.num_experts:  # expert parallelism's sentinel for tokens routed elsewhere
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            h = self._project(hidden_states[token_idx], up, e, lora or {})  # [tokens_e, 2 * ff] or [tokens_e, ff]
            h = self.source._apply_gate(h) if self.has_gate else self.act_fn(h)
            y = self._project(h, "down_proj", e, lora or {})  # [tokens_e, hidden]
            if self.has_post_expert_norm:
                y = self.post_expert_norm(y)
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def _project(self, x: Tensor, name: str, e: int, lora: dict) -> Tensor:
        """x W_e^T (+ b_e) with W_e 4-bit, plus the expert adapters' scale * x A_e^T B_e^T."""
        bias = self._parameters.get(f"{name}_bias") if self.has_bias else None
        bias = None if bias is None else bias[e].to(self.compute_dtype)
        y = _Linear4bitFn.apply(x.to(self.compute_dtype), *self.expert(name, e), bias)
        for a, b, scale in lora.get(name, ()):
            y = y + (x.to(a.dtype) @ a[e].T @ b[e].T * scale).to(y.dtype)  # [tokens_e, r] inside
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        s = self.quant_states.get(self.quantized[0])
        kind = f"quant_type={s.quant_type}, blocksize={s.blocksize}, double_quant={s.nested}, " if s else ""
        return (f"{type(self.source).__name__}, experts={self.num_experts}, 4-bit: {', '.join(self.quantized)}, "
                f"{kind}compute_dtype={self.compute_dtype}")

    @torch.no_grad()
    def full_precision(self, weights: dict[str, Tensor] | None = None) -> nn.Module:
        """The experts module this one was made from (its class), holding `weights` (default: the dequantized
        own, as the model stores them) in `compute_dtype`, and this module's other parameters."""
        weights = weights or {n: self.dequantized(n, torch.float32) for n in self.quantized}
        config = getattr(self.source, "config", None)
        module = copy.deepcopy(self.source, {id(config): config})  # its quantized weights are on meta
        module._modules.update(self._modules)
        for name, param in self._parameters.items():
            if name not in self.quantized and param is not None:
                module._parameters[name] = param
        for name in self.quantized:
            module._parameters[name] = nn.Parameter(weights[name].to(self.compute_dtype), requires_grad=False)
        return module

    def _apply(self, fn, recurse: bool = True):
        """Move the packed bytes and quant states with the module, never casting the bytes (see Linear4bit)."""
        first = self._parameters[self.quantized[0]]
        device = fn(torch.empty(0, device=first.device)).device
        packed = {n: self._parameters[n].data.to(device) for n in self.quantized}
        super()._apply(fn, recurse)
        for name, data in packed.items():
            self._set_packed(name, data)
        self.quant_states = {n: s.to(device) for n, s in self.quant_states.items()}
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Per fused weight `name`: `name` (packed [E, bytes]), `name.absmax`, `name.quant_map`, and with double
        quantization `name.nested_absmax`, `name.nested_quant_map`, `name.nested_offset` [E]; then
        `name.quant_state.bitsandbytes__<type>`: bitsandbytes' JSON of one expert's state, its nested_offset
        left out (one per expert, in `name.nested_offset`). Expert e's slices are bitsandbytes' entries of W_e."""
        for name, param in self._parameters.items():
            if param is None:
                continue
            destination[prefix + name] = param if keep_vars else param.detach()
            if name in self.quantized:
                destination.update(expert_entries(prefix + name, self.quant_states[name]))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Load the entries `_save_to_state_dict` writes, or a float fused weight alone (quantized here); the
        other parameters as nn.Module does."""
        for name in self.quantized:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            try:
                self._load_fused(key, name, state_dict)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{type(e).__name__}: {e.args[0]}")
        own = {n: p for n, p in self._parameters.items() if n not in self.quantized and p is not None}
        for name, param in own.items():
            if prefix + name not in state_dict:
                missing_keys.append(prefix + name)
            elif state_dict[prefix + name].shape != param.shape:
                error_msgs.append(f"{prefix}{name}: shape {tuple(state_dict[prefix + name].shape)} does not fit "
                                  f"{tuple(param.shape)}")
            else:
                with torch.no_grad():
                    param.copy_(state_dict[prefix + name])

    def _load_fused(self, key: str, name: str, state_dict: dict) -> None:
        weight, device = state_dict[key], self._parameters[name].device
        if weight.is_floating_point() and not any(k.startswith(f"{key}.") for k in state_dict):
            for e in range(self.num_experts):
                self.set_expert(name, e, weight[e].to(device))
            return
        shape = tuple(self.shapes[name][1:])
        parts = read_stacked(key, state_dict, self.num_experts, shape[::-1] if self.is_transposed else shape)
        self._stack(name, [(p.to(device), s.to(device)) for p, s in parts])


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
    quant_storage: torch.dtype = torch.uint8,
    experts: bool = True,
) -> nn.Module:
    """Replace every `nn.Linear` and `Conv1D` in `model` by a `Linear4bit`, and every transformers experts
    module (`experts_targets`) by an `Experts4bit`, in place; returns `model`. `experts=False` leaves the
    fused expert weights in full precision (named in the warning).

    `quant_storage`: the dtype the packed bytes are viewed as (a float one lets FSDP2 shard them with
    the other parameters; see `quantize_4bit`).

    Left alone: the output head (`model.get_output_embeddings()`, when the model has one) and any
    module whose dotted name contains an entry of `skip` as whole components (`"lm_head"`,
    `"mlp"`, `"layers.0"`). Replaced are the layers `quantizable` names; other subclasses of nn.Linear
    (routers, the out_proj of `nn.MultiheadAttention` that its owner reads directly) keep their own
    semantics and full precision, with a warning naming them. A linear registered under several names is
    quantized once and shared. Routers (the matrices beside the experts) stay in full precision, as in
    transformers + bitsandbytes.
    """
    for name, module in experts_targets(model, skip) if experts else []:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Experts4bit.from_experts(
            module, quant_type, blocksize, double_quant, compute_dtype, quant_storage))  # fmt: skip
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
    loose = [name for name in loose_weights(model) if not _skipped(name, skip) and not _router_or_4bit(model, name)]
    if loose:
        warnings.warn(f"{len(loose)} weight matrices outside linear layers stay in full precision (fused "
                      f"mixture-of-experts weights of a module that is not a transformers experts module, or "
                      f"that quantize_model was told to leave): {listed(loose)}", stacklevel=3)


def _router_or_4bit(model: nn.Module, name: str) -> bool:
    """Whether loose weight `name` is held by 4-bit experts, or is a router: a matrix [experts, hidden] held
    by a module beside an experts module (4-bit or not)."""
    owner = model.get_submodule(name.rpartition(".")[0])
    if isinstance(owner, Experts4bit):
        return True
    parent = model.get_submodule(name.rpartition(".")[0].rpartition(".")[0])
    experts = [m for m in parent.children() if m is not owner and (isinstance(m, Experts4bit) or any(
        p is not None and p.dim() == 3 for p in m._parameters.values()))]  # fmt: skip
    return model.get_parameter(name).dim() == 2 and bool(experts)


def loose_weights(model: nn.Module) -> list[str]:
    """Names of weight matrices (2-d or more) held directly by modules other than linear, Conv1D and
    embedding layers: fused mixture-of-experts parameters (`mlp.experts.gate_up_proj` [experts, 2 * ff,
    hidden], full precision or the packed bytes of an `Experts4bit`) and routers (`mlp.gate.weight`), which
    LoRA wrappers do not replace (`adapters/params.py` adapts them in place)."""
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


def experts_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Module]]:
    """(name, module) of every experts module `quantize_model` makes an `Experts4bit` (see `fused_weights`)."""
    return [(name, module) for name, module in model.named_modules() if fused_weights(module)
            and not _skipped(name, skip)]  # fmt: skip


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
    """Replace every `Linear4bit` and `Experts4bit` in `model` by the full-precision module it stands for
    (`full_precision`), in place; returns `model`. A layer registered under several names stays shared."""
    replaced: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, Linear4bit | Experts4bit):
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
    layer = next((m for m in bases if isinstance(m, Linear4bit | Experts4bit)), None)
    if layer is None:
        return None
    s = layer.quant_state if isinstance(layer, Linear4bit) else next(iter(layer.quant_states.values()))
    return {"type": s.quant_type, "double_quant": s.nested, "blocksize": s.blocksize,
            "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(f".{s}." in f".{name}." for s in skip)
