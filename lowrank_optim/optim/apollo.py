r"""APOLLO: approximated gradient scaling for memory-efficient LLM optimization (Zhu, Zhang,
Cong, Liu, Park, Chandra, Long, Pan, Wang and Lee, MLSys 2025, arXiv:2412.05270).

APOLLO keeps Adam's moments only of a random low-rank sketch of the gradient and uses them
to estimate how Adam would scale each channel of the *full* gradient.  For a weight W
(m x n) in a projected group, with a seeded Gaussian basis P (entries N(0, 1/r), redrawn
every T = ``update_proj_gap`` steps, never stored) and R = Pᵀ G (r x n; the right side
R = G Qᵀ when m ≥ n, as GaLore's ``std`` rule):

.. math::
    M, V \leftarrow \text{Adam moments of } R,\qquad
    \tilde R = \frac{\hat M}{\sqrt{\hat V} + \epsilon},\qquad
    s_j = \frac{\lVert \tilde R_{:,j}\rVert}{\lVert R_{:,j}\rVert + 10^{-8}}
    \ (\texttt{scaling="channel"}),\qquad
    s = \frac{\lVert \tilde R\rVert}{\lVert R\rVert + 10^{-8}}\ (\texttt{"tensor"}),

.. math::
    S = G\,\mathrm{diag}(s),\qquad S \leftarrow c\,S\ \text{(norm-growth limiter, γ = 1.01)},\qquad
    W \leftarrow W(1 - \eta\lambda) - \eta_t\,\alpha\,S,

with α = ``scale`` and η_t the Adam step size (β1's correction; β2's is inside Ṽ).  The
channels are those of the side the sketch keeps at full length (the norms run over the
rank dimension), the rule of the reference.  The state per matrix is the two moments (2 r n
numbers), the limiter's norm and a few integers: the basis is redrawn from its seed when
used, once per step.  The update is the raw gradient scaled per channel, so the step needs
one product (the sketch) and one fused pass ``W += coef ⊙ G``: no back-projection, no m x n
temporary, and ‖S‖ comes from the per-channel norms of G (:mod:`.scaling`, shared with Fira).

APOLLO-Mini (:class:`ApolloMiniAdamW`) is the rank-1, tensor-wise preset with α = √128.

``reference_compat=True`` follows ``apollo_torch`` 1.0.3's arithmetic instead: S formed,
its limiter ``S / max(‖S‖ / (‖S_prev‖ + 1e-8), γ) / γ``, then α.  With
``eps=1e-6, eps_style="hf", decay_after_update=True`` and ``projector_args={"stream":
"apollo"}`` (its seeds and draws) this reproduces
``apollo_torch.APOLLOAdamW`` bit for bit (its ``scale`` is our α², it multiplies by √scale).
Differences between the paper and the package, and the defaults chosen, are in
docs/methods/apollo.md.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from .. import _validate as V
from . import scaling
from .base import LowRankOptimizer
from .groups import ADAM_CHECKS, ADAM_DEFAULTS
from .hooks import ParamStep


class ApolloAdamW(LowRankOptimizer):
    """APOLLO: Adam statistics of a random sketch scale the raw gradient (Zhu et al., MLSys 2025).

    Update rule, for a weight W (m x n) in a group with ``rank`` r: P a seeded Gaussian sketch
    (entries N(0, 1/r), redrawn every T steps from its seed, never stored) and

        R = Pᵀ G,   M, V ← Adam moments of R,   R̃ = M̂ / (√V̂ + ε),
        s_j = ‖R̃_{:,j}‖ / (‖R_{:,j}‖ + 10⁻⁸)  (``scaling="channel"``),
        s = ‖R̃‖ / (‖R‖ + 10⁻⁸)  (``scaling="tensor"``),
        S = G diag(s),
        S ← S · γ‖S_prev‖ / ‖S‖  when ‖S‖ > γ‖S_prev‖   (γ = ``norm_growth_limit``),
        W ← W (1 − ηλ) − η_t α S   (η_t: η with β1's bias correction).

    The update is the raw gradient scaled per channel: the state per matrix is the two moments
    (2 r n numbers) and the limiter's norm.
    ``reference_compat=True`` with ``eps=1e-6, eps_style="hf", decay_after_update=True`` and
    ``projector_args={"stream": "apollo"}`` equals ``apollo_torch.APOLLOAdamW`` (whose ``scale``
    is our α²).
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/apollo.md#update-rule.

    Args:
        scaling: ``"channel"`` (one factor per channel of the side the sketch keeps at full
            length; needs a one-sided ``proj_type``) or ``"tensor"`` (one factor for the matrix);
            default {default}.
        norm_growth_limit: γ ≥ 1, the largest growth of ‖S‖ from one step to the next (default
            {default}); None disables the limiter.
        reference_compat: ``apollo_torch``'s arithmetic (its limiter, α after it; default {default}).
    """

    #: Used by ``create_optimizer`` when given a model and no rank (the presets).
    preset_rank: ClassVar[int | None] = None
    projects_back = False  # the update scales G itself
    method_defaults = {
        **ADAM_DEFAULTS,
        "projector": "gaussian",
        "scale": 1.0,
        "scaling": "channel",
        "norm_growth_limit": 1.01,
        "reference_compat": False,
    }
    method_checks = {
        **ADAM_CHECKS,
        "scaling": V.choice("channel", "tensor"),
        "norm_growth_limit": scaling.NORM_GROWTH_LIMIT,
        "reference_compat": V.boolean(),
    }
    # Channel norms run over the rank dimension, which a sharded parameter keeps whole; the
    # tensor norms and the limiter's sums are reduced over the ranks (scaling module).
    shard_safe_hooks = ("factored_update", "materializes_direction", "full_rank_direction")

    def _validate_group(self, group: dict, index: int) -> None:
        super()._validate_group(group, index)
        scaling.refuse_per_channel_on_two_sides(type(self).__name__, group, index, 'channel', 'tensor')

    def materializes_direction(self, group: dict, projector) -> bool:
        return group["reference_compat"]  # the package's order of rounding

    def factored_update(self, step: ParamStep) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        dim, ratio = scaling.norm_ratio(step, per_channel=step.group["scaling"] == "channel")
        norm = scaling.scaled_norm(step.grad, dim, ratio, step.layout)
        factor = scaling.limit_factor(norm, step.state, step.group["norm_growth_limit"])
        return None, ratio * factor  # D = α (c s) ⊙ G

    def full_rank_direction(self, direction: None, step: ParamStep) -> torch.Tensor:
        group = step.group
        _, ratio = scaling.norm_ratio(step, per_channel=group["scaling"] == "channel", reference=True)
        scaled = step.grad * ratio.to(step.grad.dtype)
        scaled = scaling.limit_growth(scaled, step.state, group["norm_growth_limit"], reference=True, layout=step.layout)
        return scaled * group["scale"]

    @classmethod
    def method_state_bytes(cls, shape, low_shape, width: int, group: dict) -> int:
        return scaling.limiter_state_bytes(group, width)  # the moments of R plus the limiter's norm


class ApolloMiniAdamW(ApolloAdamW):
    """APOLLO-Mini: ``ApolloAdamW`` at rank 1, one factor per tensor, α = √128.

    Update rule: :class:`ApolloAdamW`'s with a rank-1 Gaussian sketch p and one factor for
    the whole tensor,

        R = pᵀ G,   R̃ = M̂ / (√V̂ + ε) of its Adam moments,   s = ‖R̃‖ / (‖R‖ + 10⁻⁸),
        W ← W (1 − ηλ) − η_t √128 s G   (after the norm-growth limiter).

    The Mini preset: ``scaling="tensor"``, α = √128 (the reference's ``scale=128``, which it
    applies as √128) and rank 1, the SGD-like memory point (two 1 x n or m x 1 moments per
    matrix); ``create_optimizer("apollo_mini_adamw", model)`` and the Trainer project the
    target modules at rank 1 when given no rank.
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/apollo.md#update-rule.

    Args:
    """

    preset_rank = 1
    method_defaults = {**ApolloAdamW.method_defaults, "scaling": "tensor", "scale": math.sqrt(128)}


__all__ = ["ApolloAdamW", "ApolloMiniAdamW"]
