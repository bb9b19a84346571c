"""Quantized storage: INT4 packed codes (Q-GaLore's basis) and INT8 weights with
stochastic rounding (Q-GaLore's ``Int8Linear``).  The arithmetic is in the
``torch.ops.lowrank_optim`` ops (:mod:`lowrank_optim.ops`)."""
from .int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from .int8_linear import (
    Int8Linear,
    convert_linear_to_int8,
    dequantize_int8,
    quantize_int8,
    stochastic_round_generator,
)

__all__ = [
    "Int8Linear",
    "convert_linear_to_int8",
    "dequantize_int4",
    "dequantize_int8",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "stochastic_round_generator",
    "unpack_int4",
]
