"""INT4 per-group quantization with two codes per byte (Q-GaLore's projection basis).

The formulas and the layout are in :mod:`lowrank_optim.kernels.reference`; these helpers
only call the ops and carry the shape.  Storage per element: half a byte, plus a 4-byte
scale and a 1-byte zero point per group (0.52 bytes at group 256, against 1.03 in the
reference, which keeps one code per byte and fp32 zero points).
"""
from __future__ import annotations

import torch

from .. import ops  # noqa: F401  (registers torch.ops.lowrank_optim)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] -> ceil(n/2) bytes (element 2i in the low nibble)."""
    return torch.ops.lowrank_optim.int4_pack(codes.reshape(-1).to(torch.uint8).contiguous())


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` codes of ``packed``, flat uint8."""
    return torch.ops.lowrank_optim.int4_unpack(packed, numel)


def quantize_int4(x: torch.Tensor, group_size: int = 256) -> dict[str, torch.Tensor]:
    """``{"codes", "scales", "zeros"}`` of ``x`` (flattened; keep its shape yourself)."""
    codes, scales, zeros = torch.ops.lowrank_optim.int4_quantize(x.contiguous(), group_size)
    return {"codes": codes, "scales": scales, "zeros": zeros}


def dequantize_int4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    group_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The tensor of ``shape`` that :func:`quantize_int4` encoded, in ``dtype``."""
    numel = 1
    for size in shape:
        numel *= size
    flat = torch.ops.lowrank_optim.int4_dequantize(codes, scales, zeros, numel, group_size, dtype)
    return flat.view(tuple(shape))
