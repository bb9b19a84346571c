"""Randomized SVD projector (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1)."""
from __future__ import annotations

import torch

from .._validate import int_at_least
from .base import Projector, orthonormal_columns, register_projector
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

    Options (``projector_args``): ``oversample`` p (default 8), ``power_iters`` q (default 2).
    """

    name = "rsvd"
    option_defaults = {"oversample": 8, "power_iters": 2}
    option_checks = {"oversample": int_at_least(0), "power_iters": int_at_least(0)}

    def compute_bases(self, matrix: torch.Tensor, pstate: dict) -> dict[str, torch.Tensor]:
        u, vh = randomized_svd(
            matrix,
            pstate["rank"],
            self.oversample,
            self.power_iters,
            self.generator(pstate["seed"], pstate["refreshes"], matrix.device),
        )
        return select_sides(self, pstate, u, vh)


def randomized_svd(
    matrix: torch.Tensor, rank: int, oversample: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, V_r^T) approximating the top-``rank`` singular vectors of ``matrix`` (fp32)."""
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = orthonormal_columns(matrix @ omega)
    for _ in range(power_iters):
        basis = orthonormal_columns(matrix @ orthonormal_columns(matrix.t() @ basis))
    u_small, _, vh = torch.linalg.svd(basis.t() @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], vh[:rank]
