r"""Triton kernel of the fused INT4 dequantize-and-project (optional; needs ``triton``).

Same contract as the ``int4_project`` / ``int4_project_back`` ops
(:mod:`lowrank_optim.kernels.reference`): with the basis stored as INT4 codes in the flat
group layout, compute

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
the CUDA dispatch key (docs/kernels.md); :func:`register_cuda_kernels` makes these the CUDA
kernels of the two ops instead, e.g. for a GPU machine without a toolkit to build ``_C``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _int4_gemm_kernel(
    dense, packed, scales, zeros, out,
    M, N, K, cols, group_size,
    dense_stride0, dense_stride1,
    BASIS_IS_A: tl.constexpr, TRANSPOSE_BASIS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_a = (rm[:, None] < M) & (rk[None, :] < K)
        mask_b = (rk[:, None] < K) & (rn[None, :] < N)
        if BASIS_IS_A:
            b = tl.load(dense + rk[:, None] * dense_stride0 + rn[None, :] * dense_stride1, mask=mask_b, other=0.0)
            if TRANSPOSE_BASIS:  # A[m, k] = basis[k, m]
                a = _basis_tile(packed, scales, zeros, rk[None, :], rm[:, None], cols, group_size, mask_a)
            else:
                a = _basis_tile(packed, scales, zeros, rm[:, None], rk[None, :], cols, group_size, mask_a)
            if not DOT_IN_FP32:
                a = a.to(b.dtype)
        else:
            a = tl.load(dense + rm[:, None] * dense_stride0 + rk[None, :] * dense_stride1, mask=mask_a, other=0.0)
            if TRANSPOSE_BASIS:  # B[k, n] = basis[n, k]
                b = _basis_tile(packed, scales, zeros, rn[None, :], rk[:, None], cols, group_size, mask_b)
            else:
                b = _basis_tile(packed, scales, zeros, rk[:, None], rn[None, :], cols, group_size, mask_b)
            if not DOT_IN_FP32:
                b = b.to(a.dtype)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    mask_c = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out + rm[:, None] * N + rn[None, :], acc, mask=mask_c)


def _product(dense, packed, scales, zeros, rows, cols, group_size, left, back) -> torch.Tensor:
    """The four products of the module docstring as C = A B with (M, N, K)."""
    native = dense.dtype in (torch.float32, torch.bfloat16, torch.float16)
    work = dense if native else dense.float()
    m, n = work.shape
    # (basis is A, basis transposed, M, N, K), as in csrc/int4.cu.
    if not back and left:
        plan = (True, True, cols, n, rows)  # P^T G
    elif not back:
        plan = (False, True, m, rows, cols)  # G Q^T
    elif left:
        plan = (True, False, rows, n, cols)  # P N
    else:
        plan = (False, False, m, cols, rows)  # N Q
    basis_is_a, transpose, M, N, K = plan
    inner = m if basis_is_a else n
    if inner != K:
        raise ValueError(f"int4 projection: a {m}x{n} input does not match the {rows}x{cols} basis (left={left})")
    out = torch.empty((M, N), dtype=torch.float32, device=work.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int4_gemm_kernel[grid](
        work, packed.contiguous(), scales.float().contiguous(), zeros.contiguous(), out,
        M, N, K, cols, group_size,
        work.stride(0), work.stride(1),
        BASIS_IS_A=basis_is_a, TRANSPOSE_BASIS=transpose,
        DOT_IN_FP32=work.dtype == torch.float32 or not work.is_cuda,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out.to(dense.dtype)


def int4_project(grad, packed, scales, zeros, rows: int, cols: int, group_size: int, left: bool) -> torch.Tensor:
    """:math:`P^\\top G` (``left``) or :math:`G Q^\\top` from the INT4 codes (fp32 accumulation)."""
    return _product(grad, packed, scales, zeros, rows, cols, group_size, left, back=False)


def int4_project_back(low, packed, scales, zeros, rows: int, cols: int, group_size: int, left: bool) -> torch.Tensor:
    """:math:`P N` (``left``) or :math:`N Q` from the INT4 codes (fp32 accumulation)."""
    return _product(low, packed, scales, zeros, rows, cols, group_size, left, back=True)


def register_cuda_kernels() -> None:
    """Make these the CUDA kernels of ``int4_project`` / ``int4_project_back`` (opt-in;
    overrides the default kernel for CUDA tensors through ``torch.library.register_kernel``)."""
    from .. import ops

    ops.int4_project.register_kernel("cuda")(int4_project)
    ops.int4_project_back.register_kernel("cuda")(int4_project_back)
