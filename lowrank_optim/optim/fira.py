r"""Fira: full-rank training under a low-rank constraint (Chen et al., 2024, arXiv:2410.01623).

Fira keeps GaLore's low-rank Adam (:mod:`.galore`) and adds back the part of the gradient
that GaLore drops, scaled by how much Adam scaled the part it kept.  For a weight W (m x n)
with a left basis P (m x r; a right basis Q is the mirror image: R = G Q^T, per row), step t:

.. math::
    R = P^\top G,\quad M, V \leftarrow \text{Adam moments of } R,\quad
    N = M / (\sqrt{\hat V} + \epsilon),\quad \eta_t = \eta / (1-\beta_1^t)

.. math::
    \phi_j = \frac{\lVert N_{:,j}\rVert}{\lVert R_{:,j}\rVert + 10^{-8}}
    \ (\texttt{scaling="column"}),\qquad
    \phi = \frac{\lVert N\rVert_F}{\lVert R\rVert_F + 10^{-8}}\ (\texttt{scaling="matrix"})

.. math::
    S = (G - P R) \odot \phi,\qquad
    S \leftarrow S\,\frac{\gamma \lVert S_{prev}\rVert}{\lVert S\rVert}
    \ \text{ if } \lVert S\rVert > \gamma \lVert S_{prev}\rVert,\qquad
    W \leftarrow W (1-\eta\lambda) - \eta_t\,\alpha\,(P N + S).

The column norms run over the rank dimension, one factor per channel of the side the basis
keeps at full length (the columns of a left-projected R, the rows of a right-projected one);
this is the reference's shape rule whenever r is smaller than that side, and it is read from
the stored side, so it also holds at r equal to it.  ``G - P R`` is the exact complement
(I - P P^T) G of the paper.  The norm-growth limiter γ (``norm_growth_limit``; None turns it
off) stores the post-limit norm as the 0-dim tensor ``state["residual_norm"]``; the first
step only stores.  It is all tensor ops: no host sync per step.

``reference_compat=True`` follows the ``fira`` package instead:

.. math::
    S = (G - \alpha P R) \odot \phi,\qquad W \leftarrow W - \eta_t\,(\alpha P N + S),

with its limiter arithmetic, :math:`S \leftarrow S / \ell`,
:math:`\ell = \max(\lVert S\rVert / (\lVert S_{prev}\rVert + 10^{-8}), \gamma)/\gamma`.  Its
residual is :math:`(I - PP^\top)G + (1-\alpha)PP^\top G`: at α = 0.25 it keeps 75% of the
in-subspace gradient (which Adam already stepped on), and the residual is not multiplied by
α, so relative to the low-rank step it weighs 1/α = 4 times as much as in the paper's form.
With ``eps_style="hf", decay_after_update=True, eps=1e-6, weight_decay=0`` this reproduces
``fira.FiraAdamW`` bit for bit.

N is the moment rule's direction before the step size: with ``eps_style="torch"`` V is
bias-corrected and the β1 correction lives in η_t (``"hf"``: both in η_t, as the reference),
so η_t φ is the ratio for the bias-corrected Adam step.  The limiter compares S before η_t,
as the reference does, so while 1-β1^t grows (the first ~1/(1-β1) steps) that growth counts
as norm growth and is limited.

Defaults follow ``torch.optim.AdamW`` (lr 1e-3, eps 1e-8, weight decay 1e-2) with α = 0.25,
γ = 1.01; the paper trains LLaMA with lr 0.01, α 0.25 (0.0625 at 1B), T = 200, γ = 1.01.
State per matrix: GaLore's (basis and two r-sized moments) plus one scalar.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from . import scaling
from .base import LowRankOptimizer
from .groups import ADAM_CHECKS, ADAM_DEFAULTS
from .hooks import ParamStep


class FiraAdamW(LowRankOptimizer):
    """Fira: GaLore's low-rank Adam plus a scaled full-rank residual (Chen et al., 2024).

    Update rule, for a weight W in a group with ``rank`` (left basis P shown; a right basis is
    the mirror image, per row):

        R = Pᵀ G,   M, V ← Adam moments of R,   N = M / (√V̂ + ε),   η_t = η / (1 − β1ᵗ),
        φ_j = ‖N_{:,j}‖ / (‖R_{:,j}‖ + 10⁻⁸)  (``scaling="column"``),
        φ = ‖N‖_F / (‖R‖_F + 10⁻⁸)  (``scaling="matrix"``),
        S = (G − P R) ⊙ φ,
        S ← S · γ‖S_prev‖ / ‖S‖  when ‖S‖ > γ‖S_prev‖   (γ = ``norm_growth_limit``),
        W ← W (1 − ηλ) − η_t α (P N + S).

    G − P R is the part of the gradient GaLore drops, scaled by how much Adam scaled the part it
    kept.  The state per matrix is GaLore's plus one number (the residual's last norm).
    ``reference_compat=True`` takes the ``fira`` package's arithmetic, S = (G − α P R) ⊙ φ and
    W ← W − η_t (α P N + S) with its limiter.
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/fira.md#update-rule.

    Args:
        scaling: ``"column"`` (one factor per channel of the kept side; needs a one-sided
            ``proj_type``, default) or ``"matrix"`` (one Frobenius ratio).
        norm_growth_limit: γ ≥ 1, the largest growth of the residual's norm from one step to the
            next (default 1.01); None disables the limiter.
        reference_compat: the ``fira`` package's residual and limiter arithmetic instead of the
            paper's (default False).
    """

    method_defaults = {
        **ADAM_DEFAULTS,
        "scaling": "column",
        "norm_growth_limit": 1.01,
        "reference_compat": False,
    }
    # The column norms run over the rank dimension, which a sharded parameter keeps whole
    # (its R is this rank's rows); the matrix norms and the limiter's sum over all ranks.
    shard_safe_hooks = ("full_rank_direction", "factored_update", "materializes_direction")
    method_checks = {
        **ADAM_CHECKS,
        "scaling": V.choice("column", "matrix"),
        "norm_growth_limit": scaling.NORM_GROWTH_LIMIT,
        "reference_compat": V.boolean(),
    }

    def _validate_group(self, group: dict, index: int) -> None:
        super()._validate_group(group, index)
        scaling.refuse_per_channel_on_two_sides(type(self).__name__, group, index, 'column', 'matrix')

    def materializes_direction(self, group: dict, projector) -> bool:
        # The factored form needs ‖S‖ without S, from ‖G‖² - ‖R‖² (an orthogonal split in
        # exact products); the reference's residual G - αPR is not one, and its arithmetic is
        # pinned to fira's.
        return group["reference_compat"] or not projector.residual_norm_from_low

    def factored_update(self, step: ParamStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""The paper's update without forming S (or P R) at full size.

        With S = (G - P R) φ and the limiter's factor c (S ← c S),
        :math:`D = α(P N + c S) = α\big(P(N - cφR) + cφ G\big)`: the template multiplies
        N' = N - cφR back straight into the weight and adds cφ ⊙ G in one fused pass.  The
        limiter needs ‖S‖: along each kept channel (P orthonormal)
        :math:`\lVert S\rVert^2 = \sum φ^2 (\lVert G\rVert^2 - \lVert R\rVert^2)`.
        """
        dim, ratio = scaling.norm_ratio(step, per_channel=step.group["scaling"] == "column")
        norm = scaling.scaled_norm(step.grad, dim, ratio, step.layout, minus=step.low)
        factor = scaling.limit_factor(norm, step.state, step.group["norm_growth_limit"])
        coefficient = (ratio * factor).to(step.grad.dtype)  # cφ
        return step.low_direction - coefficient * step.low, coefficient

    def full_rank_direction(self, direction: torch.Tensor, step: ParamStep) -> torch.Tensor:
        group, alpha = step.group, step.group["scale"]
        inside = step.projector.project_back(step.low, step.state["projector"])
        if group["reference_compat"]:
            inside = inside * alpha  # the reference subtracts alpha * P R, not P R
        _, ratio = scaling.norm_ratio(step, per_channel=group["scaling"] == "column", reference=True)
        residual = (step.grad - inside).mul_(ratio.to(step.grad.dtype))
        residual = scaling.limit_growth(
            residual, step.state, group["norm_growth_limit"], group["reference_compat"], step.layout
        )
        return direction.add_(residual, alpha=1.0 if group["reference_compat"] else alpha)

    @classmethod
    def method_state_bytes(cls, shape, low_shape, width: int, group: dict) -> int:
        return scaling.limiter_state_bytes(group, width)  # GaLore's state plus the limiter's norm


__all__ = ["FiraAdamW"]
