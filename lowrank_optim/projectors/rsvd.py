"""Randomized SVD projector (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1)."""
from __future__ import annotations

from collections import defaultdict

import torch

from .. import ops  # noqa: F401  (defines torch.ops.lowrank_optim.batched_randomized_svd)
from .._validate import int_at_least
from .base import Projector, register_projector
from .options import PRODUCT_DTYPE_CHECK
from .svd import select_sides


@register_projector
class RandomizedSVDProjector(Projector):
    r"""Top-r singular vectors from a randomized range finder.

    .. math::
        Y = G\Omega,\ \Omega \in \mathbb{R}^{n\times(r+p)};\quad
        Q = \mathrm{orth}(Y);\quad
        \text{repeat } q \text{ times: } Q = \mathrm{orth}(G\,\mathrm{orth}(G^\top Q));\quad
        U_B S V^\top = \mathrm{svd}(Q^\top G),\ U = Q U_B.

    Cost O(m n (r+p)(2q+2)) instead of O(m n min(m, n)).  Re-orthonormalising between the
    power iterations keeps the small singular directions from being lost to rounding.
    Omega comes from a generator seeded by the parameter's position and the refresh count,
    so every data-parallel rank computes the same basis from the same reduced gradient.
    The work runs in the ``batched_randomized_svd`` op (CholeskyQR2 with a Householder
    fallback, see :mod:`lowrank_optim.kernels.rsvd`); :meth:`compute_bases_many` refreshes
    many parameters in one call per chunk of ``batch``.

    Options (``projector_args``): ``oversample`` p (default 8), ``power_iters`` q (default 2),
    ``batch`` (default 8): how many same-shaped matrices the optimizer refreshes in one op
    call; each call holds ``batch`` fp32 gradient copies, so this bounds the refresh's
    extra memory (1 refreshes one matrix at a time).
    """

    name = "rsvd"
    state_family = "singular_vectors"
    option_defaults = {"oversample": 8, "power_iters": 2, "batch": 8, "product_dtype": "gradient"}
    option_checks = {"oversample": int_at_least(0), "power_iters": int_at_least(0), "batch": int_at_least(1),
                     "product_dtype": PRODUCT_DTYPE_CHECK}
    interchangeable_options = ("product_dtype",)
    batches_refresh = True

    def compute_bases(self, matrix: torch.Tensor, pstate: dict) -> dict[str, torch.Tensor]:
        return self.compute_bases_many([matrix], [pstate])[0]

    def compute_bases_many(self, grads: list[torch.Tensor], pstates: list[dict]) -> list[dict[str, torch.Tensor]]:
        """:meth:`compute_bases` for many parameters refreshing at the same step.

        Gradients of the same shape, rank and device go through one batched op call per
        chunk of ``batch``, each chunk converted to fp32 only while its call runs.  Each
        matrix's Omega is drawn from its own parameter's generator exactly as a single
        :meth:`compute_bases` would draw it, so the result equals one call per parameter
        (up to the rounding of batched GEMMs).  Returns the bases in the order given.
        """
        if len(grads) != len(pstates):
            raise ValueError(f"{type(self).__name__}: {len(grads)} matrices but {len(pstates)} states")
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for index, (grad, pstate) in enumerate(zip(grads, pstates)):
            by_kind[(tuple(grad.shape), pstate["rank"], grad.device)].append(index)
        bases: list[dict[str, torch.Tensor] | None] = [None] * len(grads)
        for (_, rank, device), members in by_kind.items():
            for start in range(0, len(members), self.batch):
                chunk = members[start : start + self.batch]
                matrices = [grads[i].detach().float() for i in chunk]
                for i, result in zip(chunk, self._refresh_chunk(matrices, [pstates[i] for i in chunk], rank, device)):
                    bases[i] = result
        return bases

    def _refresh_chunk(
        self, matrices: list[torch.Tensor], pstates: list[dict], rank: int, device: torch.device
    ) -> list[dict[str, torch.Tensor]]:
        """One ``batched_randomized_svd`` call on same-shaped fp32 matrices."""
        omegas = [
            sketch_matrix(matrix.shape, rank, self.oversample, self.generator(p["seed"], p["refreshes"], device), device)
            for matrix, p in zip(matrices, pstates)
        ]
        u, vh = torch.ops.lowrank_optim.batched_randomized_svd(stack(matrices), stack(omegas), rank, self.power_iters)
        u, vh = fixed_signs(u, vh)
        return [select_sides(self, p, u[slot], vh[slot]) for slot, p in enumerate(pstates)]


def fixed_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each singular pair (u_i, v_i) with the sign that makes u_i's largest entry positive."""
    pivot = u.abs().argmax(dim=-2, keepdim=True)
    # >= 0 maps to +1 (a zero vector keeps its sign); no boolean indexing, so no host sync.
    signs = torch.where(torch.gather(u, -2, pivot) >= 0, 1.0, -1.0).to(u.dtype)
    return u * signs, vh * signs.transpose(-1, -2)


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, but a single tensor becomes a view (no copy of a whole gradient)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def sketch_matrix(
    shape: torch.Size | tuple[int, int], rank: int, oversample: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The Gaussian test matrix Omega (n x k), k = min(rank + oversample, m, n), fp32."""
    m, n = shape
    width = min(rank + oversample, m, n)
    return torch.randn(n, width, generator=generator, device=device, dtype=torch.float32)


def randomized_svd(
    matrix: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, V_r^T) approximating the top-``rank`` singular vectors of ``matrix`` (fp32)."""
    omega = sketch_matrix(matrix.shape, rank, oversample, generator, matrix.device)
    u, vh = torch.ops.lowrank_optim.batched_randomized_svd(matrix.unsqueeze(0), omega.unsqueeze(0), rank, power_iters)
    u, vh = fixed_signs(u, vh)
    return u[0], vh[0]
