"""The CUDA kernel of ``batched_randomized_svd`` (csrc/rsvd_ops.cpp) against the default kernel.

Skipped without a GPU; run on a GPU machine with the extension built
(``LOWRANK_OPTIM_BUILD_EXT=1 pip install -e .`` or ``lowrank_optim.kernels.extension.build_jit()``).
Singular vectors are compared as subspaces (U U^T, V V^T) and by captured energy, since two
correct orthonormalisations may differ in the signs of their columns.
"""
from __future__ import annotations

import pytest
import torch

import lowrank_optim  # noqa: F401  (registers the ops, loads the extension)
from lowrank_optim.kernels import extension
from lowrank_optim.kernels import rsvd as default
from lowrank_optim.projectors import RandomizedSVDProjector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OP_NAME = "lowrank_optim::batched_randomized_svd"
op = torch.ops.lowrank_optim.batched_randomized_svd


def cuda_kernel_registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")


needs_extension = pytest.mark.skipif(
    not (torch.cuda.is_available() and extension.extension_loaded() and cuda_kernel_registered()),
    reason="the CUDA extension is not built or not loaded",
)


def gradient_like(batch, m, n, decay, seed):
    """A batch of matrices with singular values decay**i plus a little noise (CUDA, fp32)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(batch, m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(batch, n, k, generator=gen)).Q
    sigma = decay ** torch.arange(k, dtype=torch.float32)
    a = (u * sigma) @ v.mT + 1e-5 * torch.randn(batch, m, n, generator=gen)
    return a.cuda()


def sketch(batch, n, k, seed=1):
    return torch.randn(batch, n, k, generator=torch.Generator().manual_seed(seed)).cuda()


def assert_same_factorisation(cuda_result, reference_result, a):
    (u, vh), (u_ref, vh_ref) = cuda_result, reference_result
    eye = torch.eye(u.shape[-1], device=u.device).expand(u.shape[0], -1, -1)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-4, rtol=0)
    energy = (u.mT @ a).square().sum((-2, -1)) / a.square().sum((-2, -1))
    energy_ref = (u_ref.mT @ a).square().sum((-2, -1)) / a.square().sum((-2, -1))
    torch.testing.assert_close(energy, energy_ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(u @ u.mT, u_ref @ u_ref.mT, atol=2e-3, rtol=0)
    torch.testing.assert_close(vh.mT @ vh, vh_ref.mT @ vh_ref, atol=2e-3, rtol=0)


@needs_extension
@pytest.mark.parametrize(
    "batch,m,n,rank,k,power_iters",
    [
        (4, 64, 96, 8, 16, 2),
        (3, 96, 64, 8, 16, 2),
        (2, 17, 33, 5, 13, 1),  # odd sizes
        (1, 33, 17, 17, 17, 0),  # rank = k = min(m, n)
        (8, 256, 688, 32, 40, 2),  # a small LLaMA-like MLP shape
    ],
)
def test_cuda_kernel_matches_the_default_kernel(batch, m, n, rank, k, power_iters):
    a, omega = gradient_like(batch, m, n, 0.9, seed=m + n), sketch(batch, n, k)
    assert_same_factorisation(
        op(a, omega, rank, power_iters), default.batched_randomized_svd(a, omega, rank, power_iters), a
    )


@needs_extension
def test_cuda_kernel_falls_back_per_matrix_on_rank_deficient_sketches():
    a = gradient_like(3, 48, 40, 0.9, seed=3)
    a[1] = a[1, :, :2] @ torch.randn(2, 40, device="cuda")  # rank 2 < k: Cholesky breaks down
    a[2] = 0  # a zero gradient
    omega = sketch(3, 40, 10)
    u, vh = op(a, omega, 4, 2)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    eye = torch.eye(4, device="cuda").expand(3, -1, -1)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(u[1] @ (u[1].mT @ a[1]), a[1], atol=1e-3, rtol=0)  # rank 2 kept whole
    assert_same_factorisation(
        (u[:1], vh[:1]), default.batched_randomized_svd(a[:1], omega[:1], 4, 2), a[:1]
    )


@needs_extension
def test_cuda_kernel_checks_inputs_like_the_default_kernel():
    a, omega = gradient_like(2, 8, 6, 0.9, seed=0), sketch(2, 6, 3)
    with pytest.raises(ValueError, match=r"matrices must be float32"):
        op(a.double(), omega, 2, 1)
    with pytest.raises(ValueError, match=r"rank=4 must be in \[1, k=3\]"):
        op(a, omega, 4, 1)
    with pytest.raises(ValueError, match=r"omega must have shape"):
        op(a, sketch(2, 7, 3), 2, 1)


@needs_extension
def test_opcheck_with_the_cuda_kernel():
    torch.library.opcheck(op, (gradient_like(2, 24, 40, 0.9, seed=1), sketch(2, 40, 9), 4, 1))


def test_projector_batch_on_cuda_equals_one_call_per_parameter():
    """Whichever kernel runs on CUDA, the projector's batch entry point equals single calls."""
    projector = RandomizedSVDProjector(4, "std", 10)
    matrices = [gradient_like(1, 40, 24, 0.85, seed=s)[0] for s in range(3)]
    states = [projector.init_state(torch.Size((40, 24)), seed=s) for s in range(3)]
    for matrix, state, bases in zip(matrices, states, projector.compute_bases_many(matrices, states)):
        single = projector.compute_bases(matrix, state)
        torch.testing.assert_close(bases["right"].mT @ bases["right"], single["right"].mT @ single["right"], atol=1e-4, rtol=0)
