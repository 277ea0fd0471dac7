"""4-bit quantization (NF4 / FP4, double quantization) in bitsandbytes' byte layout, the 4-bit linear layer and
4-bit mixture-of-experts weights."""

from lorakit.quant.linear4bit import Experts4bit, Linear4bit, dequantize_weight, quantize_model
from lorakit.quant.nf4 import (
    QuantState,
    bits_per_parameter,
    code_book,
    dequantize_4bit,
    dynamic_map,
    from_state_dict_entries,
    quantize_4bit,
    state_dict_entries,
)

__all__ = [
    "Experts4bit",
    "Linear4bit",
    "QuantState",
    "bits_per_parameter",
    "code_book",
    "dequantize_4bit",
    "dequantize_weight",
    "dynamic_map",
    "from_state_dict_entries",
    "quantize_4bit",
    "quantize_model",
    "state_dict_entries",
]
