r"""Default pure-PyTorch kernels of the quantization ops (any device; the test oracle),
and of the INT4 projections (:func:`int4_product`: dequantize, then an fp32 matmul).

Layout shared by every op: a tensor is flattened, cut into groups of ``group_size``
contiguous elements, and the last group is padded with zeros to a whole group (every
group's range is widened to contain 0, so the padding never changes a scale).  The true
element count travels as an explicit ``numel`` argument, so a compiled kernel never has
to guess it from a padded buffer.

INT4 (Q-GaLore's projection basis, docs/methods/qgalore.md), per group, 15 levels, with
l = min(min x, 0) and h = max(max x, 0) (the reference's min and max for a mixed-sign group):

.. math::
    s = \max(h - l,\ 10^{-5}) / 15,\quad
    z = \mathrm{clamp}(-\mathrm{round}(l / s), 0, 15),\quad
    q = \mathrm{clamp}(\mathrm{round}(x/s) + z, 0, 15),\quad \hat x = s (q - z).

Codes are packed two per byte, element 2i in the low nibble and 2i+1 in the high one.

INT8 (Q-GaLore's weights), per group, with the range widened to contain 0 and 254
steps so that stochastic rounding never needs a clamp (which would bias the extremes):

.. math::
    l = \min(\min x, 0),\ h = \max(\max x, 0),\ s = \max(h - l, 10^{-5}) / 254,\
    z = -\lfloor l / s \rfloor \in [0, 254],

.. math::
    q = \lfloor x/s \rfloor + z + [u < \mathrm{frac}(x/s)] \in [0, 255],\quad u \sim U[0, 1),

so :math:`E[s(q - z)] = x` exactly; with ``noise`` absent, q = round(x/s) + z.
"""
from __future__ import annotations

import torch

from .int4 import Int4Basis, dense_product, plan

INT4_LEVELS = 15
INT8_STEPS = 254
MIN_RANGE = 1e-5


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` flattened in fp32 and zero-padded to (groups, group_size)."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, group_size)


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] (any shape) -> ceil(n/2) bytes, two codes per byte."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def int4_unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`int4_pack`: the first ``numel`` codes, flat uint8."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=1).reshape(-1)[:numel].contiguous()


def int4_quantize(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, fp32 scales, uint8 zero points) of ``x``, one scale/zero per group."""
    numel = x.numel()
    groups = _groups(x, group_size)
    # The range is widened to contain 0 (a no-op for the usual mixed-sign group): with the
    # reference's plain min/max, a one-signed group (a leading singular vector often is)
    # gets its zero point clamped and all its codes saturate at 15.
    low = groups.amin(dim=1, keepdim=True).clamp(max=0)
    high = groups.amax(dim=1, keepdim=True).clamp(min=0)
    scales = (high - low).clamp(min=MIN_RANGE) / INT4_LEVELS
    zeros = (-torch.round(low / scales)).clamp(0, INT4_LEVELS)
    codes = (torch.round(groups / scales) + zeros).clamp(0, INT4_LEVELS).to(torch.uint8)
    return int4_pack(codes.reshape(-1)[:numel]), scales.reshape(-1), zeros.reshape(-1).to(torch.uint8)


def int4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, numel: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Flat tensor of ``numel`` values s (q - z) in ``dtype`` (computed in fp32)."""
    codes = int4_unpack(packed, numel).float()
    pad = -numel % group_size
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    values = (codes.view(-1, group_size) - zeros.float().unsqueeze(1)) * scales.float().unsqueeze(1)
    return values.reshape(-1)[:numel].to(dtype)


def int4_product(dense: torch.Tensor, basis: Int4Basis, back: bool) -> torch.Tensor:
    r"""The default kernel of the INT4 projection ops: ``dense`` times the INT4-stored
    ``basis`` (rows x cols), computed in fp32 and returned in ``dense``'s dtype.

    Project (``back=False``): :math:`P^\top G` (``basis.left``, P is m x r; r x n result) or
    :math:`G Q^\top` (Q is r x n; m x r result).  Project back: :math:`P N` or :math:`N Q`.
    This kernel dequantizes the whole basis first; the CUDA kernel of the fused ops
    dequantizes tile by tile and never writes the dense basis to memory.
    """
    plan(dense.shape, basis, back)  # a mismatched shape is a ValueError, as in every kernel
    matrix = int4_dequantize(
        basis.packed, basis.scales, basis.zeros, basis.rows * basis.cols, basis.group_size, torch.float32
    ).view(basis.rows, basis.cols)
    return dense_product(dense.float(), matrix, basis.left, back).to(dense.dtype)


def int8_quantize(
    x: torch.Tensor, group_size: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``x``, fp32 scales, uint8 zero points).

    ``noise``: uniform [0, 1) values, one per element of ``x`` (stochastic rounding); None
    rounds to nearest.  Passing the noise in keeps the op deterministic and generator-free.
    """
    numel = x.numel()
    groups = _groups(x, group_size)  # zero padding: every range contains 0 anyway
    low = groups.amin(dim=1, keepdim=True).clamp(max=0)
    high = groups.amax(dim=1, keepdim=True).clamp(min=0)
    scales = (high - low).clamp(min=MIN_RANGE) / INT8_STEPS
    zeros = -torch.floor(low / scales)
    scaled = groups / scales
    if noise is None:
        codes = torch.round(scaled)
    else:
        floor = torch.floor(scaled)
        u = _groups(noise, group_size)
        codes = floor + (u < scaled - floor).float()
    codes = (codes + zeros).clamp(0, 255).to(torch.uint8)
    return codes.reshape(-1)[:numel].view(x.shape), scales.reshape(-1), zeros.reshape(-1).to(torch.uint8)


def int8_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """s (q - z), shaped like ``codes``, in ``dtype`` (computed in fp32)."""
    numel = codes.numel()
    groups = _groups(codes, group_size)
    values = (groups - zeros.float().unsqueeze(1)) * scales.float().unsqueeze(1)
    return values.reshape(-1)[:numel].view(codes.shape).to(dtype)
