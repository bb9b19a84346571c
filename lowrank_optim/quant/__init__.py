"""Quantized storage: INT4 packed codes (Q-GaLore's basis) and INT8 weights with
stochastic rounding (Q-GaLore's ``Int8Linear``).  The arithmetic is in the
``torch.ops.lowrank_optim`` ops (:mod:`lowrank_optim.ops`).

With ``Int8Linear`` weights, clip with :func:`clip_grad_norm_` from here:
``torch.nn.utils.clip_grad_norm_`` does not see their ``float_grad``."""
from .int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from .int8_linear import (
    Int8Linear,
    clip_grad_norm_,
    convert_linear_to_int8,
    dequantize_int8,
    is_int8_weight,
    quantize_int8,
    stochastic_round_generator,
    sync_int8_grads,
)

__all__ = [
    "Int8Linear",
    "clip_grad_norm_",
    "convert_linear_to_int8",
    "dequantize_int4",
    "dequantize_int8",
    "is_int8_weight",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "stochastic_round_generator",
    "sync_int8_grads",
    "unpack_int4",
]
