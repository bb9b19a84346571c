r"""Triton kernel of the fused INT4 dequantize-and-project (optional; needs ``triton``).

Same contract as the INT4 product ops (:func:`lowrank_optim.kernels.reference.int4_product`):
with the basis (:class:`~lowrank_optim.kernels.int4.Int4Basis`) stored as INT4 codes in the
flat group layout, compute

.. math::
    P^\top G,\quad G Q^\top \quad\text{(project)},\qquad P N,\quad N Q \quad\text{(back)}

as one tiled product :math:`C = A B` in which the basis operand is dequantized tile by tile
in registers (never written out) and the product runs on ``tl.dot`` (tensor cores on a GPU)
with fp32 accumulation.  On a GPU the basis tile is rounded to a bf16/fp16 dense operand's
dtype before the dot (as dequantize-then-matmul in that dtype does); fp32 runs an IEEE fp32
dot, not TF32.  The tile is written in fp32 and converted by torch.

Under the interpreter (Triton 3.9) a bf16 ``tl.dot`` returns garbage and fp32 -> bf16
conversions truncate, so on CPU tensors the kernel dots in fp32 and the output is converted
by torch: the CPU tests cover the dequantization, the indexing and the masking, not the
bf16 tensor-core dot, which only the CUDA tests see.

Where it runs: any CUDA tensor with ``triton`` installed, and CPU tensors under
``TRITON_INTERPRET=1`` (set before ``triton`` is imported), which is how the tests check it
against the default kernel.  It is not registered by default: the compiled extension owns
the CUDA dispatch key of the fused ops (docs/kernels.md); :func:`register_cuda_kernels`
makes these their CUDA kernels instead, e.g. for a GPU machine without a toolkit to build ``_C``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int4 import Int4Basis, plan

BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32


@triton.jit
def _basis_tile(packed, scales, zeros, i, j, cols, group_size, mask):
    """Dequantized basis entries (i, j) (broadcast index tensors) in fp32; 0 where masked."""
    e = i * cols + j
    byte = tl.load(packed + e // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((e % 2) * 4)) & 0x0F
    g = e // group_size
    scale = tl.load(scales + g, mask=mask, other=0.0)
    zero = tl.load(zeros + g, mask=mask, other=0).to(tl.float32)
    return (code.to(tl.float32) - zero) * scale


@triton.jit
def _operand_tile(
    dense, dense_stride0, dense_stride1, packed, scales, zeros, cols, group_size, i, j, mask,
    IS_BASIS: tl.constexpr, TRANSPOSE_BASIS: tl.constexpr,
):  # fmt: skip
    """Entries (i, j) of one operand of C = A B: the dense matrix's, or the basis's (its
    (j, i) entries when the product uses its transpose), 0 where masked."""
    if IS_BASIS:
        if TRANSPOSE_BASIS:
            tile = _basis_tile(packed, scales, zeros, j, i, cols, group_size, mask)
        else:
            tile = _basis_tile(packed, scales, zeros, i, j, cols, group_size, mask)
    else:
        tile = tl.load(dense + i * dense_stride0 + j * dense_stride1, mask=mask, other=0.0)
    return tile


@triton.jit
def _int4_gemm_kernel(
    dense, packed, scales, zeros, out,
    M, N, K, cols, group_size,
    dense_stride0, dense_stride1,
    BASIS_IS_A: tl.constexpr, BASIS_IS_B: tl.constexpr, TRANSPOSE_BASIS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_a = (rm[:, None] < M) & (rk[None, :] < K)
        mask_b = (rk[:, None] < K) & (rn[None, :] < N)
        # One operand is the dense matrix, the other the basis, dequantized tile by tile.
        a = _operand_tile(dense, dense_stride0, dense_stride1, packed, scales, zeros, cols, group_size,
                          rm[:, None], rk[None, :], mask_a, BASIS_IS_A, TRANSPOSE_BASIS)
        b = _operand_tile(dense, dense_stride0, dense_stride1, packed, scales, zeros, cols, group_size,
                          rk[:, None], rn[None, :], mask_b, BASIS_IS_B, TRANSPOSE_BASIS)
        if not DOT_IN_FP32:  # the fp32 basis tile in the dense operand's dtype (tensor cores)
            if BASIS_IS_A:
                a = a.to(b.dtype)
            else:
                b = b.to(a.dtype)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    mask_c = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out + rm[:, None] * N + rn[None, :], acc, mask=mask_c)


def product(dense: torch.Tensor, basis: Int4Basis, back: bool) -> torch.Tensor:
    """The four products of the module docstring (``back``: P N or N Q) as one C = A B."""
    native = dense.dtype in (torch.float32, torch.bfloat16, torch.float16)
    work = dense if native else dense.float()
    p = plan(work.shape, basis, back)  # as csrc/int4.cu; ValueError on a mismatched shape
    out = torch.empty((p.M, p.N), dtype=torch.float32, device=work.device)
    grid = (triton.cdiv(p.M, BLOCK_M), triton.cdiv(p.N, BLOCK_N))
    _int4_gemm_kernel[grid](
        work, basis.packed.contiguous(), basis.scales.float().contiguous(), basis.zeros.contiguous(), out,
        p.M, p.N, p.K, basis.cols, basis.group_size,
        work.stride(0), work.stride(1),
        BASIS_IS_A=p.basis_is_a, BASIS_IS_B=not p.basis_is_a, TRANSPOSE_BASIS=p.transpose,
        DOT_IN_FP32=work.dtype == torch.float32 or not work.is_cuda,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out.to(dense.dtype)


def register_cuda_kernels() -> None:
    """Make these the CUDA kernels of the fused ops ``int4_project_fused`` /
    ``int4_project_back_fused`` (opt-in, through ``torch.library.register_kernel``); the
    public ``int4_project`` / ``int4_project_back`` then weigh them against dequantize +
    matmul like the extension's (:mod:`lowrank_optim.kernels.int4`)."""
    from .. import ops

    for op, back in ((ops.int4_project_fused, False), (ops.int4_project_back_fused, True)):
        # Flat arguments at the op boundary; the record inside.
        op.register_kernel("cuda")(lambda dense, *stored, back=back: product(dense, Int4Basis(*stored), back))
