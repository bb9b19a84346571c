"""The ``torch.ops.lowrank_optim`` ops: schemas, fake (meta) kernels and the default kernels.

Callers use ``torch.ops.lowrank_optim.<name>`` only.  The default kernels
(:mod:`lowrank_optim.kernels.reference`) are registered for every device through
``torch.library.custom_op`` (CompositeExplicitAutograd); a compiled extension overrides an
op for one device (``TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m)`` or
``torch.library.register_kernel``) without touching the callers.  Fake kernels give the
output shapes, so the ops trace under ``torch.compile`` and pass ``torch.library.opcheck``.

Schemas (flat layouts; ``numel`` is the true element count, groups are padded):

- ``int4_pack(Tensor codes) -> Tensor``: uint8 codes in [0, 15] -> ceil(n/2) bytes.
- ``int4_unpack(Tensor packed, int numel) -> Tensor``.
- ``int4_quantize(Tensor x, int group_size) -> (Tensor packed, Tensor scales, Tensor zeros)``.
- ``int4_dequantize(Tensor packed, Tensor scales, Tensor zeros, int numel, int group_size,
  ScalarType dtype) -> Tensor`` (flat).
- ``int8_quantize(Tensor x, int group_size, Tensor? noise) -> (Tensor codes, Tensor scales,
  Tensor zeros)``: ``noise`` uniform [0, 1) for stochastic rounding, None for nearest.
- ``int8_dequantize(Tensor codes, Tensor scales, Tensor zeros, int group_size, ScalarType
  dtype) -> Tensor``.
"""
from __future__ import annotations

import torch

from .kernels import reference

NAMESPACE = "lowrank_optim"


def _groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


@torch.library.custom_op(f"{NAMESPACE}::int4_pack", mutates_args=())
def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    return reference.int4_pack(codes)


@int4_pack.register_fake
def _(codes):
    return codes.new_empty((codes.numel() + 1) // 2, dtype=torch.uint8)


@torch.library.custom_op(f"{NAMESPACE}::int4_unpack", mutates_args=())
def int4_unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return reference.int4_unpack(packed, numel)


@int4_unpack.register_fake
def _(packed, numel):
    return packed.new_empty(numel, dtype=torch.uint8)


@torch.library.custom_op(f"{NAMESPACE}::int4_quantize", mutates_args=())
def int4_quantize(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.int4_quantize(x, group_size)


@int4_quantize.register_fake
def _(x, group_size):
    groups = _groups(x.numel(), group_size)
    return (
        x.new_empty((x.numel() + 1) // 2, dtype=torch.uint8),
        x.new_empty(groups, dtype=torch.float32),
        x.new_empty(groups, dtype=torch.uint8),
    )


@torch.library.custom_op(f"{NAMESPACE}::int4_dequantize", mutates_args=())
def int4_dequantize(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, numel: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    return reference.int4_dequantize(packed, scales, zeros, numel, group_size, dtype)


@int4_dequantize.register_fake
def _(packed, scales, zeros, numel, group_size, dtype):
    return packed.new_empty(numel, dtype=dtype)


@torch.library.custom_op(f"{NAMESPACE}::int8_quantize", mutates_args=())
def int8_quantize(
    x: torch.Tensor, group_size: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference.int8_quantize(x, group_size, noise)


@int8_quantize.register_fake
def _(x, group_size, noise=None):
    groups = _groups(x.numel(), group_size)
    return (
        x.new_empty(x.shape, dtype=torch.uint8),
        x.new_empty(groups, dtype=torch.float32),
        x.new_empty(groups, dtype=torch.uint8),
    )


@torch.library.custom_op(f"{NAMESPACE}::int8_dequantize", mutates_args=())
def int8_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    return reference.int8_dequantize(codes, scales, zeros, group_size, dtype)


@int8_dequantize.register_fake
def _(codes, scales, zeros, group_size, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)
