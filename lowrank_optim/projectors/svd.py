"""Exact truncated SVD projector: GaLore's original subspace (docs/methods/galore.md#update-rule)."""
from __future__ import annotations

import torch

from .base import Projector, register_projector
from .options import PRODUCT_DTYPE_CHECK


@register_projector
class SVDProjector(Projector):
    """Top-r singular vectors of the fp32 gradient from ``torch.linalg.svd``.

    Exact but O(m n min(m, n)): at LLaMA-1B shapes this dominates a refresh step on CPU;
    ``rsvd`` captures the same energy for a fraction of the cost.
    """

    name = "svd"
    state_family = "singular_vectors"
    # The products' dtype (the gradient's by default: galore_torch's bits); a bf16 basis is
    # cast where it is used, so a checkpoint resumes under another value.
    option_defaults = {"product_dtype": "gradient"}
    option_checks = {"product_dtype": PRODUCT_DTYPE_CHECK}
    interchangeable_options = ("product_dtype",)

    def compute_bases(self, matrix: torch.Tensor, pstate: dict) -> dict[str, torch.Tensor]:
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        rank = pstate["rank"]
        return select_sides(self, pstate, u[:, :rank], vh[:rank])


def select_sides(projector: Projector, pstate: dict, u: torch.Tensor, vh: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep only the singular vectors of the side(s) this parameter projects on."""
    want_left, want_right = projector.sides(pstate)
    bases = {}
    if want_left:
        bases["left"] = u
    if want_right:
        bases["right"] = vh
    return bases
