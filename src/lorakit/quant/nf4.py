"""Blockwise 4-bit quantization (NF4 / FP4) with double quantization, byte-compatible with bitsandbytes.

A tensor is flattened and cut into blocks of `blocksize` values. Each block is scaled by its
absolute maximum (kept in fp32) into [-1, 1]; each scaled value is replaced by the index of the
nearest of 16 code values (ties go to the lower code value), and two indices are packed per byte,
the even element in the high nibble. Storage is a flat `[(n + 1) // 2, 1]` uint8 tensor, as in
bitsandbytes, so the bytes, the absmax and the serialized state agree with it.

Double quantization (QLoRA) stores the absmax values themselves in 8 bits: their mean (`offset`)
is subtracted and the result is quantized blockwise (blocks of 256) with bitsandbytes' signed 8-bit
dynamic code, keeping one fp32 absmax per 256 blocks. That 8-bit step rounds as bitsandbytes' native
CPU kernel (`cquantize_blockwise_cpu_fp32`) does: through a 65536-entry lookup table, not to the
exact nearest code, so the nested codes are byte-equal to what bitsandbytes writes on the CPU.

The state-dict layout is bitsandbytes' / transformers': `weight` (packed), `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and
`weight.quant_state.bitsandbytes__nf4` (or `__fp4`), a JSON object stored as a uint8 tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Values quantized at once on the CPU: a multiple of every blocksize (so whole blocks), even, and under torch's
# intra-op grain (32768; at 32768 its reductions already split), so each op runs on the calling thread, in
# cache. torch's threads would fork and join at every op, and on a busy machine each join waits for the slowest
# thread: at a load of 8-11 on 2 cores, 2 threads (torch's, or Python threads taking chunks) took 1.8-8x as long.
QUANTIZE_CHUNK = 7 * 4096
DEVICE_QUANTIZE_CHUNK = 1 << 22  # on an accelerator: few launches, bounded temporaries
LOOKUP_CELLS = 1024  # cells per unit of [-1, 1] in `_nearest_code`'s table: at most one code midpoint each
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)

# NF4: quantiles of N(0, 1), normalized to [-1, 1] (QLoRA; bitsandbytes' `get_4bit_type("nf4")`).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit) magnitudes in bitsandbytes' bit-pattern order 0b000..0b111;
# index 8 + i is the negative of index i. Divided by 12 (the largest) to span [-1, 1].
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


# ---------------------------------------------------------------------------------------------
# Code books
# ---------------------------------------------------------------------------------------------


def code_book(quant_type: str, device: torch.device | str | None = None) -> Tensor:
    """The 16 fp32 code values of `quant_type`, indexed by the 4-bit code (bnb's `quant_map`)."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    magnitudes = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([magnitudes, 0.0 - magnitudes]) / 12.0  # 0 - 0 is +0.0: bnb stores +0.0 at index 8 too


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> Tensor:
    """The 256 sorted values of bitsandbytes' 8-bit dynamic data type (`create_dynamic_map(signed)`).

    Decade i (scale 10^(i-6), i = 0..6) holds the midpoints of an even split of [0.1, 1] into 2^i
    parts (signed, mirrored to negatives) or 2^(i+1) parts (unsigned); 0 and 1 complete the 256.
    Small magnitudes get fine steps: used for the nested absmax of double quantization (signed)
    and for 8-bit Adam moments. Built on the CPU in fp32 with bitsandbytes' ops, so every device
    gets the same bits.
    """
    values = [0.0, 1.0]
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (i - 6) * midpoints).tolist()
        if signed:
            values += (-(10.0 ** (i - 6)) * midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32).to(device)  # [256]


# ---------------------------------------------------------------------------------------------
# Quantization state
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantState:
    """What it takes to dequantize a packed 4-bit tensor (bitsandbytes' `QuantState`, flattened).

    absmax: per-block scales, [blocks] fp32; with double quantization, the uint8 codes of
    (absmax - offset) in `nested_code`. offset: scalar fp32 mean of the absmax values.
    nested_absmax: [ceil(blocks / nested_blocksize)] fp32.
    """

    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: Tensor  # [16] fp32
    offset: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None  # [256] fp32
    nested_blocksize: int | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> QuantState:
        """A copy whose tensors live on `device`."""
        move = lambda t: None if t is None else t.to(device)
        return dataclasses.replace(
            self, absmax=move(self.absmax), code=move(self.code), offset=move(self.offset),
            nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Blockwise quantization
# ---------------------------------------------------------------------------------------------


def quantize_4bit(
    t: Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[Tensor, QuantState]:
    """Packed 4-bit codes `[(n + 1) // 2, 1]` (viewed as `quant_storage`) and the state to undo them.

    Same bytes as `bitsandbytes.functional.quantize_4bit(t, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage)`.
    `quant_storage` (bf16/fp16/fp32) only reinterprets the bytes, so FSDP can shard the packed weight
    with the float parameters; the byte count must then be a multiple of its element size.
    """
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32/bfloat16/float16 tensors, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    code = code_book(quant_type, t.device)
    flat = t.detach().reshape(-1)  # [n]
    lookup = _code_lookup(quant_type, flat.device)
    chunk = QUANTIZE_CHUNK if flat.device.type == "cpu" else DEVICE_QUANTIZE_CHUNK
    parts = [_quantize_chunk(flat[start : start + chunk], blocksize, lookup) for start in range(0, flat.numel(), chunk)]
    packed = torch.cat([p for p, _ in parts]).unsqueeze(1)  # [(n + 1) // 2, 1]
    absmax = torch.cat([a for _, a in parts])  # [blocks]
    state = QuantState(absmax, t.shape, t.dtype, blocksize, quant_type, code)
    if double_quant:
        state = _double_quantize(state)
    return _as_storage(packed, quant_storage), state


def dequantize_4bit(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """The tensor of `state.shape` in `dtype` (default: the original dtype); computed in fp32 like bnb."""
    q = packed.reshape(-1).view(torch.uint8)  # [(n + 1) // 2]
    n = state.numel
    if q.numel() != (n + 1) // 2:
        raise ValueError(f"packed weight holds {q.numel()} bytes; shape {tuple(state.shape)} needs {(n + 1) // 2}")
    codes = torch.stack([q >> 4, q & 0xF], dim=1).reshape(-1)[:n]  # [n]
    values = state.code[codes.long()]  # [n] fp32
    out = _scale_back(values, absmax_of(state), state.blocksize)
    return out.reshape(state.shape).to(dtype or state.dtype)


def absmax_of(state: QuantState) -> Tensor:
    """The fp32 per-block absmax, undoing double quantization when present."""
    if not state.nested:
        return state.absmax
    values = state.nested_code[state.absmax.long()]  # [blocks] fp32
    return _scale_back(values, state.nested_absmax, state.nested_blocksize) + state.offset


def bits_per_parameter(state: QuantState) -> float:
    """Storage bits per weight: codes, per-block scales and (with double quantization) nested scales.

    bits = 8 * ceil(n / 2) + 8 * absmax_bytes + (32 * nested_blocks + 32 if nested), divided by n,
    where absmax is uint8 with double quantization and fp32 without. For NF4 + double quantization
    at blocksize 64 that is 4 + 8/64 + 32/(64 * 256) = 4.127 (plus 32/n for the offset); without
    double quantization 4 + 32/64 = 4.5. The two code books (16 and 256 fp32 constants) and the JSON
    entry are left out: they are fixed per tensor, not per weight.
    """
    n = state.numel
    bits = 8 * ((n + 1) // 2) + 8 * state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        bits += 32 * state.nested_absmax.numel() + 32
    return bits / n


def _double_quantize(state: QuantState) -> QuantState:
    """Replace the fp32 absmax by 8-bit dynamic codes of (absmax - mean), blocks of 256."""
    offset = state.absmax.mean()  # scalar fp32
    nested_code = dynamic_map(device=state.absmax.device)
    codes, nested_absmax = _quantize_8bit_lut(state.absmax - offset, _dynamic_lut(state.absmax.device),
                                              NESTED_BLOCKSIZE)
    return dataclasses.replace(
        state, absmax=codes, offset=offset, nested_absmax=nested_absmax,
        nested_code=nested_code, nested_blocksize=NESTED_BLOCKSIZE,
    )  # fmt: skip


LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' native 8-bit quantizer


def _quantize_8bit_lut(flat: Tensor, lut: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """uint8 codes [n] and fp32 absmax [blocks] of flat [n], as bitsandbytes' native CPU kernel computes them.

    Each value is scaled by 1/absmax of its block (multiplied, the ragged last block too), clamped to
    [-1, 1] and rounded to the nearest of 65536 points -1 + 2i/65535: i = trunc((v + 1) * 0.5 * 65535 + 0.5),
    fp32 op by op; the code is the one nearest to point i (the number of code midpoints below it). So a
    value within half a bin of a midpoint can get the farther of its two neighbouring codes, farther by
    at most one bin (2/65535 of the block absmax). An all-zero block keeps absmax 0 and gets code index 0.
    In chunks of whole blocks (the chunk sizes are multiples of 4096), for the reasons `QUANTIZE_CHUNK` gives.
    """
    chunk = QUANTIZE_CHUNK if flat.device.type == "cpu" else DEVICE_QUANTIZE_CHUNK
    parts = [_quantize_8bit_lut_chunk(flat[start : start + chunk], lut, blocksize)
             for start in range(0, flat.numel(), chunk)]  # fmt: skip
    return torch.cat([codes for codes, _ in parts]), torch.cat([absmax for _, absmax in parts])


def _quantize_8bit_lut_chunk(flat: Tensor, lut: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """`_quantize_8bit_lut` of whole blocks but for a ragged last one."""
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # [blocks, blocksize]; padding: zeros
    absmax = blocks.abs().amax(dim=1)  # [blocks]
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # [blocks]
    scaled = (blocks * inverse[:, None]).clamp(-1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).long()  # trunc toward 0; all >= 0
    codes = lut.index_select(0, bins.view(-1)).view_as(bins)  # as lut[bins], which splits over torch's threads
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


@functools.cache
def _dynamic_lut(device: torch.device) -> Tensor:
    """The native kernel's table for the signed dynamic code c: for bin i, how many midpoints
    (c[k] + c[k+1]) / 2 lie below -1 + 2i/65535 (fp32). Built once per device, on the CPU."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])  # [255], sorted like code
    left = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, left, right=False).to(torch.uint8).to(device)  # [65536]


def _quantize_chunk(
    part: Tensor, blocksize: int, lookup: tuple[Tensor, Tensor, Tensor | None]
) -> tuple[Tensor, Tensor]:
    """Packed codes [c / 2] (c rounded up to even) and absmax [c / blocksize, rounded up] of part [c]: whole
    blocks, but for a ragged last one."""
    absmax, scaled = _scale_blocks(part.float(), blocksize)  # [c / blocksize], [c]
    if not math.isfinite(absmax.max()):  # before the codes: a NaN (which max keeps) has no cell in the table
        raise ValueError("cannot quantize a tensor that holds NaN or Inf")
    q = _nearest_code(scaled, lookup)  # [c] uint8
    if q.numel() % 2:  # odd n (the last chunk): one padding 0.0, quantized like the rest
        q = torch.cat([q, _nearest_code(scaled.new_zeros(1), lookup)])
    return torch.add(q[1::2], q[0::2], alpha=16), absmax  # [c / 2]: even element in the high nibble


def _scale_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Per-block absmax [blocks] and flat / absmax clamped to [-1, 1] [n], in bnb's fp32 arithmetic.

    Like bitsandbytes' reference backend: full blocks are multiplied by 1/absmax, a ragged last
    block is divided by its absmax; a zero absmax is clamped to 1e-38 for the division (and stored
    clamped for the ragged block only), so an all-zero block quantizes to the code of 0.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # [full blocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [full blocks]
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (tail / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


def _nearest_code(x: Tensor, lookup: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
    """uint8 index of the code value nearest to each x in [-1, 1]; ties (x exactly on a midpoint) go to the
    lower value: the number of midpoints below x, as `torch.bucketize(x, midpoints)`, mapped to its code.

    Through `_code_lookup`'s tables, a grid over [-1, 1] with at most one midpoint per cell: the cell gives the
    count of the midpoints below it, and one comparison with the cell's own midpoint finishes it. Two table
    reads instead of a binary search per value (bucketize takes about 10x as long on the CPU).
    """
    midpoint, below, order = lookup
    cell = x.mul(LOOKUP_CELLS).add_(LOOKUP_CELLS).to(torch.int32)  # [n] floor((x + 1) * cells), 0..2 * cells
    above = x > midpoint.index_select(0, cell)  # [n] past the cell's midpoint (+inf where it has none)
    rank = below.index_select(0, cell).add_(above.view(torch.uint8))  # [n] midpoints below x
    return rank if order is None else order.index_select(0, rank.int())


@functools.cache
def _code_lookup(quant_type: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """`_nearest_code`'s tables for a code book: midpoint [2 * cells + 1] fp32, below [2 * cells + 1] uint8, and
    order [16] uint8 (the code index of each rank; None where the code book is sorted, as NF4's is).

    Cell k holds the x with floor(fl(x * cells + cells)) = k (x * cells is exact: cells is a power of two), so
    about [k / cells - 1, (k + 1) / cells - 1), give or take the rounding of the addition (under 2^-23). Each
    cell, widened by a margin above that, holds at most one midpoint (checked): its `midpoint`, +inf where
    there is none; `below` counts the midpoints under the widened cell. Midpoints are computed in fp32 as
    bitsandbytes computes them, from the code values sorted stably (equal values, FP4's +0 and -0, keep their
    index order, so small positive values get the higher-index zero, as in bitsandbytes).
    """
    code = code_book(quant_type)
    order = torch.argsort(code, stable=True)  # [16]
    ranked = code[order]
    midpoints = ((ranked[:-1] + ranked[1:]) / 2).double()  # [15], fp32 values
    left = torch.arange(2 * LOOKUP_CELLS + 1, dtype=torch.float64) / LOOKUP_CELLS - 1.0 - 1e-6  # [2 * cells + 1]
    right = left + 1.0 / LOOKUP_CELLS + 2e-6
    inside = (midpoints >= left[:, None]) & (midpoints <= right[:, None])  # [2 * cells + 1, 15]
    if int(inside.sum(dim=1).max()) > 1:
        raise AssertionError(f"{quant_type}: a lookup cell holds two code midpoints; raise LOOKUP_CELLS")
    midpoint = torch.where(inside, midpoints, math.inf).amin(dim=1).float()  # [2 * cells + 1]
    below = (midpoints < left[:, None]).sum(dim=1).to(torch.uint8)  # [2 * cells + 1]
    sorted_code = bool((order == torch.arange(16)).all())
    return midpoint.to(device), below.to(device), None if sorted_code else order.to(torch.uint8).to(device)


def _scale_back(values: Tensor, absmax: Tensor, blocksize: int) -> Tensor:
    """values * absmax of their block, flat [n] fp32 (the last block may be ragged)."""
    n = values.numel()
    padded = F.pad(values, (0, -n % blocksize)).view(-1, blocksize)  # [blocks, blocksize]
    return (padded * absmax[:, None]).reshape(-1)[:n]


def _as_storage(packed: Tensor, quant_storage: torch.dtype) -> Tensor:
    """The uint8 `[bytes, 1]` packed codes reinterpreted as `quant_storage`, `[bytes / itemsize, 1]`."""
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")
    if quant_storage == torch.uint8:
        return packed
    itemsize = torch.empty(0, dtype=quant_storage).element_size()
    if packed.numel() % itemsize:
        raise ValueError(
            f"{packed.numel()} packed bytes cannot be viewed as {quant_storage} ({itemsize} bytes per element); "
            f"use quant_storage=torch.uint8 or a tensor with a multiple of {2 * itemsize} elements"
        )
    return packed.reshape(-1).view(quant_storage).unsqueeze(1)


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


# ---------------------------------------------------------------------------------------------
# State-dict entries (bitsandbytes / transformers layout)
# ---------------------------------------------------------------------------------------------


def state_dict_entries(prefix: str, packed: Tensor, state: QuantState) -> dict[str, Tensor]:
    """The entries bitsandbytes' `Linear4bit` writes for its weight, in its order (bias not included).

    `prefix` is the module's prefix (`"model.layers.0.q_proj."`); keys are `prefix + "weight"`,
    `... "weight.absmax"`, `"weight.quant_map"`, [`"weight.nested_absmax"`, `"weight.nested_quant_map"`],
    `"weight.quant_state.bitsandbytes__<type>"`.
    """
    entries = {
        f"{prefix}weight": packed,
        f"{prefix}weight.absmax": state.absmax,
        f"{prefix}weight.quant_map": state.code,
    }
    if state.nested:
        entries[f"{prefix}weight.nested_absmax"] = state.nested_absmax
        entries[f"{prefix}weight.nested_quant_map"] = state.nested_code.clone()  # unshared, as bnb saves it
    entries[f"{prefix}weight.quant_state.bitsandbytes__{state.quant_type}"] = _pack_json(_json_fields(state))
    return entries


def from_state_dict_entries(prefix: str, sd: Mapping[str, Tensor]) -> tuple[Tensor, QuantState]:
    """(packed, state) from the entries of `state_dict_entries`; KeyError/ValueError name the bad key."""
    packed = _entry(sd, f"{prefix}weight")
    json_key, fields = _read_json(prefix, sd)
    quant_type = _field(fields, "quant_type", str, json_key)
    if not json_key.endswith(f"__{quant_type}"):
        raise ValueError(f"{json_key}: quant_type {quant_type!r} does not match the key")
    blocksize = _field(fields, "blocksize", int, json_key)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{json_key}: invalid blocksize {blocksize!r}")
    shape = _field(fields, "shape", list, json_key)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"{json_key}: invalid shape {shape!r}")
    state = QuantState(
        absmax=_entry(sd, f"{prefix}weight.absmax"),
        shape=torch.Size(shape),
        dtype=_dtype(_field(fields, "dtype", str, json_key), json_key),
        blocksize=blocksize,
        quant_type=quant_type,
        code=_entry(sd, f"{prefix}weight.quant_map", numel=16, dtype=torch.float32),
    )
    if "nested_offset" in fields:
        state = _read_nested(prefix, sd, state, fields, json_key)
    _check_sizes(prefix, packed, state)
    return packed, state


def _json_fields(state: QuantState) -> dict:
    """The non-tensor fields, with bnb's names and order (`QuantState.as_dict`)."""
    fields = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    if state.nested:
        fields["nested_blocksize"] = state.nested_blocksize
        fields["nested_dtype"] = "float32"
        fields["nested_offset"] = state.offset.item()
    return fields


def _pack_json(fields: dict) -> Tensor:
    """JSON text as a uint8 tensor (bnb's `pack_dict_to_tensor`), so safetensors can store it."""
    return torch.tensor(list(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)


def _read_json(prefix: str, sd: Mapping[str, Tensor]) -> tuple[str, dict]:
    keys = [f"{prefix}weight.quant_state.bitsandbytes__{t}" for t in QUANT_TYPES]
    present = [k for k in keys if k in sd]
    if len(present) != 1:
        raise KeyError(f"expected exactly one of {keys} in the state dict, found {present or 'none'}")
    key = present[0]
    try:
        fields = json.loads(bytes(sd[key].detach().cpu().to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{key}: not a uint8 tensor of JSON text ({e})") from e
    if not isinstance(fields, dict):
        raise ValueError(f"{key}: expected a JSON object, got {type(fields).__name__}")
    return key, fields


def _read_nested(prefix: str, sd: Mapping[str, Tensor], state: QuantState, fields: dict, json_key: str) -> QuantState:
    nested_blocksize = _field(fields, "nested_blocksize", int, json_key)
    if nested_blocksize <= 0:
        raise ValueError(f"{json_key}: invalid nested_blocksize {nested_blocksize!r}")
    if fields.get("nested_dtype") != "float32":
        raise ValueError(f"{json_key}: nested_dtype must be 'float32', got {fields.get('nested_dtype')!r}")
    offset = _field(fields, "nested_offset", (int, float), json_key)
    return dataclasses.replace(
        state,
        offset=torch.tensor(float(offset), dtype=torch.float32, device=state.absmax.device),
        nested_absmax=_entry(sd, f"{prefix}weight.nested_absmax", dtype=torch.float32),
        nested_code=_entry(sd, f"{prefix}weight.nested_quant_map", numel=256, dtype=torch.float32),
        nested_blocksize=nested_blocksize,
    )


def _check_sizes(prefix: str, packed: Tensor, state: QuantState) -> None:
    """Every tensor must have the size the shape and block sizes imply."""
    n = state.numel
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise ValueError(f"{prefix}weight: {nbytes} bytes, but shape {tuple(state.shape)} needs {(n + 1) // 2}")
    blocks = -(-n // state.blocksize)
    want = torch.uint8 if state.nested else torch.float32
    if state.absmax.numel() != blocks or state.absmax.dtype != want:
        raise ValueError(
            f"{prefix}weight.absmax: expected {blocks} values of {want}, "
            f"got {state.absmax.numel()} of {state.absmax.dtype}"
        )
    if state.nested and state.nested_absmax.numel() != -(-blocks // state.nested_blocksize):
        raise ValueError(f"{prefix}weight.nested_absmax: expected {-(-blocks // state.nested_blocksize)} values")


def _entry(sd: Mapping[str, Tensor], key: str, numel: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    if key not in sd:
        raise KeyError(f"missing state-dict entry {key}")
    value = sd[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
    if numel is not None and value.numel() != numel:
        raise ValueError(f"{key}: expected {numel} values, got {value.numel()}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{key}: expected {dtype}, got {value.dtype}")
    return value


def _field(fields: dict, name: str, kind: type | tuple[type, ...], key: str):
    if name not in fields:
        raise ValueError(f"{key}: the JSON has no {name!r}")
    value = fields[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{key}: {name!r} has the wrong type ({value!r})")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{key}: dtype must be one of float32/bfloat16/float16, got {name!r}")
    return dtype
