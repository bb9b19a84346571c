r"""Default pure-PyTorch kernel of ``batched_randomized_svd`` (any device; the test oracle).

For each matrix :math:`A_i \in \mathbb{R}^{m\times n}` of a batch and its Gaussian test
matrix :math:`\Omega_i \in \mathbb{R}^{n\times k}` (k = rank + oversampling, at most
min(m, n)), the randomized range finder with power iterations (Halko, Martinsson & Tropp
2011, "Finding structure with randomness", algorithms 4.4 and 5.1):

.. math::
    Q = \mathrm{orth}(A\Omega);\quad
    \text{repeat } q \text{ times: } Q = \mathrm{orth}(A\,\mathrm{orth}(A^\top Q));\quad
    B = Q^\top A = U_B \Sigma V^\top;\quad U = (Q U_B)_{:, :r},\ V^\top_{:r}.

Every step is one batched operation over the whole batch (``bmm``, batched Cholesky,
batched triangular solve, batched SVD of small k x k factors), never a Python loop
over the matrices.  A model has dozens of same-shaped matrices refreshing at the same step,
and one batched call runs them at the speed of a few large GEMMs.

``orth`` is CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014, "CholeskyQR2: a
simple and communication-avoiding algorithm for computing a tall-skinny QR factorization"):

.. math::
    Y^\top Y = L L^\top,\ Q_1 = Y L^{-\top};\qquad Q_1^\top Q_1 = L_2 L_2^\top,\ Q = Q_1 L_2^{-\top}.

Two GEMM-shaped Gram products and two triangular solves: far faster than Householder QR on a
GPU (no panel factorisation; LAPACK's geqrf on a tall m x k block is latency-bound), and
orthonormal to working precision after the second pass as long as
:math:`\kappa(Y) \lesssim u^{-1/2}` (about 4e3 in fp32).  A gradient can be numerically
rank-deficient (a small batch, a dead layer, an exactly low-rank test matrix), so per matrix
the result is checked: the Cholesky factorisations must succeed (``cholesky_ex``'s ``info``)
and the second Gram must be close to the identity,
:math:`\|Q_1^\top Q_1 - I\|_F < 1/2` (then the second pass is well conditioned and
its result orthonormal).  The matrices that fail are redone with Householder QR
(``torch.linalg.qr``), which is orthonormal whatever the rank.  Deciding that costs one host
sync per factorisation, i.e. 2q + 2 per call, at refresh time only.

The small SVD: :math:`B^\top = Q_B R_B` by the same QR, then ``torch.linalg.svd`` of the
k x k :math:`R_B^\top = U_R \Sigma W^\top`, so :math:`U = Q U_R`, :math:`V^\top = W^\top Q_B^\top`.
Not ``eigh`` of :math:`B B^\top`: the Gram squares the condition number (singular values
below :math:`\sqrt{u}\,\sigma_1` are lost) and :math:`V^\top = \Sigma^{-1} U_B^\top B`
divides by them: on a B whose singular values span 1e-4 the rows of V^T it gives are not
even orthonormal (``python bench/bench_kernels.py --quick`` prints both errors).
"""
from __future__ import annotations

import torch

OP = "lowrank_optim::batched_randomized_svd"

#: CholeskyQR2 is accepted for a matrix when its second Gram is within this Frobenius
#: distance of the identity: the first pass then has condition number at most
#: sqrt(1.5 / 0.5) < 2, so the second pass is orthonormal to working precision.
GRAM_TOLERANCE = 0.5


def check_inputs(matrices: torch.Tensor, omega: torch.Tensor, rank: int, power_iters: int) -> int:
    """Raise ``ValueError`` naming the argument and its value; return k (omega's width)."""
    if matrices.dim() != 3:
        raise ValueError(f"{OP}: matrices must be 3-D (batch, m, n), got shape {tuple(matrices.shape)}")
    if omega.dim() != 3:
        raise ValueError(f"{OP}: omega must be 3-D (batch, n, k), got shape {tuple(omega.shape)}")
    for name, tensor in (("matrices", matrices), ("omega", omega)):
        if tensor.dtype != torch.float32:
            raise ValueError(f"{OP}: {name} must be float32 (refresh in fp32), got dtype={tensor.dtype}")
    batch, m, n = matrices.shape
    if omega.shape[0] != batch or omega.shape[1] != n:
        raise ValueError(
            f"{OP}: omega must have shape ({batch}, {n}, k) for matrices of shape {tuple(matrices.shape)}, "
            f"got {tuple(omega.shape)}"
        )
    k = omega.shape[2]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"{OP}: omega's width k={k} must be in [1, min(m, n)={min(m, n)}]")
    if not 1 <= rank <= k:
        raise ValueError(f"{OP}: rank={rank} must be in [1, k={k}] (omega's width)")
    if power_iters < 0:
        raise ValueError(f"{OP}: power_iters={power_iters} must be >= 0")
    if matrices.device != omega.device:
        raise ValueError(f"{OP}: matrices on {matrices.device} and omega on {omega.device}")
    return k


def cholesky_qr(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CholeskyQR pass on a batch (b, m, k): (Q, R = L^T, the Gram Y^T Y, Cholesky succeeded)."""
    gram = y.mT @ y
    chol, info = torch.linalg.cholesky_ex(gram)
    # Q L^T = Y solved from the right: one batched triangular solve, no explicit inverse.
    q = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)
    return q, chol.mT, gram, info == 0


def cholesky_qr2(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, R, accepted): CholeskyQR2 on a batch, and per matrix whether Q can be trusted."""
    first, r_first, _, ok_first = cholesky_qr(y)
    q, r_second, gram, ok_second = cholesky_qr(first)
    # A failed first pass leaves inf/NaN in the second Gram; NaN < tol is False: rejected.
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    close = torch.linalg.matrix_norm(gram - eye) < GRAM_TOLERANCE
    return q, r_second @ r_first, ok_first & ok_second & close


def qr(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR of each matrix of the batch (b, m, k), k <= m: CholeskyQR2, and Householder
    QR for the matrices it rejects."""
    q, r, accepted = cholesky_qr2(y)
    if not bool(accepted.all()):  # the one host sync of this factorisation
        rejected = (~accepted).nonzero().squeeze(1)
        fallback = torch.linalg.qr(y.index_select(0, rejected))
        q, r = q.index_copy(0, rejected, fallback.Q), r.index_copy(0, rejected, fallback.R)
    return q, r


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning each matrix of the batch (b, m, k), k <= m."""
    return qr(y)[0]


def batched_randomized_svd(
    matrices: torch.Tensor, omega: torch.Tensor, rank: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (b, m, rank), V^T (b, rank, n)): approximate top singular vectors of each matrix."""
    check_inputs(matrices, omega, rank, power_iters)
    q = orthonormalize(matrices @ omega)
    for _ in range(power_iters):
        # Re-orthonormalising both half-steps keeps the directions below sigma_1 * u^(1/(2q+1))
        # from being rounded away, which plain (A A^T)^q A Omega would do.
        q = orthonormalize(matrices @ orthonormalize(matrices.mT @ q))
    # B = Q^T A (k x n, wide) through B^T = Q_B R_B: B = R_B^T Q_B^T, and the SVD of the
    # k x k R_B^T = U_R S W^T gives B = U_R S (Q_B W)^T.  LAPACK reduces a wide matrix this
    # way inside gesdd too, but the batched tall QR plus small SVD is faster than a batched
    # wide SVD (section 3 of bench/bench_kernels.py times both).
    q_b, r_b = qr(matrices.mT @ q)
    u_r, _, w_h = torch.linalg.svd(r_b.mT)
    return q @ u_r[..., :rank], w_h[:, :rank] @ q_b.mT
