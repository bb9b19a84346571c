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
- ``int4_project(Tensor grad, Tensor packed, Tensor scales, Tensor zeros, int rows, int cols,
  int group_size, bool left) -> Tensor``: P^T G (``left``, basis P is rows x cols = m x r) or
  G Q^T (basis Q is r x n) against an INT4-stored basis (:class:`~lowrank_optim.kernels.int4.Int4Basis`
  flattened); fp32 accumulation, ``grad``'s dtype.
- ``int4_project_back(Tensor low, <the same basis>) -> Tensor``: P N (``left``) or N Q.
- ``int4_project_fused``, ``int4_project_back_fused``: the same products, always by the fused
  kernel where a device has one (CUDA); ``int4_project``/``int4_project_back`` on CUDA run the
  fused op or dequantize + matmul, whichever measured faster (:mod:`lowrank_optim.kernels.int4`).

The compiled extension (``lowrank_optim._C``, see :mod:`lowrank_optim.kernels.extension`
and docs/kernels.md) is loaded at the end of this module.
"""
from __future__ import annotations

import torch

from .kernels import int4, reference
from .kernels.int4 import Int4Basis

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


# ---------------------------------------------------------------------------- INT4 products
# Four ops with one schema: the public products, whose CUDA kernel picks the faster of the
# fused product and dequantize + matmul (kernels/int4.py), and the fused products, whose
# CUDA kernel is the extension's (or Triton's, when registered).  Everywhere else all four
# run the default kernel.  The record kernels pass around (Int4Basis) is flattened here,
# at the op boundary, since a custom op takes flat tensors and ints.
def _int4_product_op(name: str, dense: str, back: bool):
    def default(x, packed, scales, zeros, rows, cols, group_size, left):
        return reference.int4_product(x, Int4Basis(packed, scales, zeros, rows, cols, group_size, left), back)

    def fake(x, packed, scales, zeros, rows, cols, group_size, left):
        return x.new_empty(int4.output_shape(x.shape, Int4Basis(packed, scales, zeros, rows, cols, group_size, left), back))

    schema = (
        f"(Tensor {dense}, Tensor packed, Tensor scales, Tensor zeros, SymInt rows, SymInt cols, "
        "SymInt group_size, bool left) -> Tensor"
    )
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", default, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


int4_project = _int4_product_op("int4_project", "grad", back=False)
int4_project_back = _int4_product_op("int4_project_back", "low", back=True)
int4_project_fused = _int4_product_op("int4_project_fused", "grad", back=False)
int4_project_back_fused = _int4_product_op("int4_project_back_fused", "low", back=True)


@int4_project.register_kernel("cuda")
def _(grad, packed, scales, zeros, rows, cols, group_size, left):
    return int4.product(grad, Int4Basis(packed, scales, zeros, rows, cols, group_size, left), back=False)


@int4_project_back.register_kernel("cuda")
def _(low, packed, scales, zeros, rows, cols, group_size, left):
    return int4.product(low, Int4Basis(packed, scales, zeros, rows, cols, group_size, left), back=True)


# ---------------------------------------------------------------------------- randomized SVD
# ``batched_randomized_svd(Tensor matrices, Tensor omega, int rank, int power_iters)
# -> (Tensor U, Tensor Vh)``: matrices (b, m, n) fp32, omega (b, n, k) the Gaussian test
# matrices (k = rank + oversampling, at most min(m, n)); U (b, m, rank), Vh (b, rank, n).
# The caller draws omega, so each parameter keeps its own seeded generator and a batched
# call equals b single calls.  Math and citations: kernels/rsvd.py.
from .kernels import rsvd as rsvd_kernels  # noqa: E402  (kept with the op it serves)


@torch.library.custom_op(f"{NAMESPACE}::batched_randomized_svd", mutates_args=())
def batched_randomized_svd(
    matrices: torch.Tensor, omega: torch.Tensor, rank: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return rsvd_kernels.batched_randomized_svd(matrices, omega, rank, power_iters)


@batched_randomized_svd.register_fake
def _(matrices, omega, rank, power_iters):
    rsvd_kernels.check_inputs(matrices, omega, rank, power_iters)
    batch, m, n = matrices.shape
    return matrices.new_empty((batch, m, rank)), matrices.new_empty((batch, rank, n))


# The compiled CUDA kernels, last: they override the defaults above for CUDA tensors (the
# dispatcher prefers a backend kernel over CompositeExplicitAutograd whatever the order, but
# loading after every schema keeps a schema mismatch an error at load, not at first call).
from .kernels import extension as _extension  # noqa: E402

_extension.load_extension()
