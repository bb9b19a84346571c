r"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024, arXiv:2403.03507).

For a weight W (m x n) in a group with ``rank`` r, every ``update_proj_gap`` = T steps the
top-r singular vectors of the gradient give a basis P (the shorter side by default);
between refreshes

.. math::
    R_t = P^\top G_t,\quad
    M_t = \beta_1 M_{t-1} + (1-\beta_1) R_t,\quad
    V_t = \beta_2 V_{t-1} + (1-\beta_2) R_t^2,

.. math::
    W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, P\,
          \frac{\hat M_t}{\sqrt{\hat V_t} + \epsilon},

with :math:`\hat M = M/(1-\beta_1^t)`, :math:`\hat V = V/(1-\beta_2^t)` (``torch.optim.AdamW``'s
ε placement; ``eps_style="hf"`` gives the reference's), scale α = ``scale`` and decoupled
decay λ applied before the update (``decay_after_update=True`` gives the reference's order).
The optimizer state per matrix is the basis (m r) and two r x n moments instead of AdamW's
2 m n.  Groups without ``rank`` get plain AdamW.

Defaults follow ``torch.optim.AdamW`` (lr 1e-3, eps 1e-8, weight decay 1e-2) so that the
swap from AdamW changes nothing but the projected groups; the paper's settings are
``lr=0.01, scale=0.25, update_proj_gap=200`` with ranks 128/256/256/512 for LLaMA
60M/130M/350M/1B, and ``galore_torch``'s arithmetic is ``eps=1e-6, eps_style="hf",
decay_after_update=True``.
"""
from __future__ import annotations

from typing import Iterable

from .. import _validate as V
from .base import LowRankOptimizer
from .groups import ADAM_CHECKS, ADAM_DEFAULTS
from .rules import Adafactor, Adam8bit, bitsandbytes_functional


class GaLoreAdamW(LowRankOptimizer):
    """GaLore: Adam on the gradient projected onto a low-rank subspace (Zhao et al., ICML 2024).

    Update rule, for a weight W (m x n) in a group with ``rank`` r: every T steps the basis P
    (m x r, orthonormal) becomes the top-r left singular vectors of the gradient G (the right
    side, R = G Qᵀ, mirrors it; ``proj_type="std"`` takes the shorter side), and at each step

        R = Pᵀ G,   M ← β1 M + (1 − β1) R,   V ← β2 V + (1 − β2) R²,
        W ← W (1 − ηλ) − η α P M̂ / (√V̂ + ε),   M̂ = M / (1 − β1ᵗ),   V̂ = V / (1 − β2ᵗ).

    The state per matrix is the basis (m r) and two r x n moments, against AdamW's 2 m n.
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    The paper's settings: ``lr=0.01, scale=0.25, update_proj_gap=200``, rank about a quarter
    of the hidden size.  Page: docs/methods/galore.md#update-rule (math, where we differ from
    ``galore_torch`` and the flags that restore it, paper settings).

    Args:
    """

    method_defaults = ADAM_DEFAULTS


class GaLoreAdamW8bit(LowRankOptimizer):
    """GaLore with bitsandbytes' blockwise 8-bit Adam moments (needs ``bitsandbytes``).

    Update rule: :class:`GaLoreAdamW`'s,

        R = Pᵀ G,   M, V ← Adam moments of R,   W ← W (1 − ηλ) − η α P M̂ / (√V̂ + ε),

    with M and V stored as 8-bit codes with one fp32 scale per block of 256 (bitsandbytes'
    ``optimizer_update_8bit_blockwise``, called by keyword); the moments of tensors smaller than
    ``min_8bit_size`` stay fp32.  The state per matrix is the basis and about 2 r n bytes.
    A group without ``rank`` (or ``density``) is 8-bit AdamW.
    Page: docs/methods/galore.md#update-rule.

    Args:
        eps: ε, added to √V̂ as in ``torch.optim.AdamW`` (bitsandbytes' only placement;
            default 1e-8).
    """

    moment_rule = Adam8bit()
    method_checks = {
        "betas": ADAM_CHECKS["betas"],
        "eps": ADAM_CHECKS["eps"],
        "min_8bit_size": V.int_at_least(1),
    }

    # No eps_style: bitsandbytes places eps as torch does, with no choice.
    method_defaults = {**{k: v for k, v in ADAM_DEFAULTS.items() if k != "eps_style"}, "min_8bit_size": 4096}

    def __init__(self, params: Iterable, **hyperparameters):
        bitsandbytes_functional()  # fail at construction, not at the first step
        super().__init__(params, **hyperparameters)


class GaLoreAdafactor(LowRankOptimizer):
    """GaLore with Adafactor (Shazeer & Stern, 2018) on the low-rank gradient.

    Update rule, for a weight W in a group with ``rank``: R = Pᵀ G as in ``GaLoreAdamW``
    (basis P refreshed every T steps), then, at step t,

        ρ = lr, or with ``relative_step`` lr · min(10⁻², 1/√t) (``warmup_init``: min(10⁻⁶ t, 1/√t)),
            times max(ε2, RMS(W)) with ``scale_parameter``,
        β̂2 = 1 − t^c   (c = ``decay_rate``),
        row ← β̂2 row + (1 − β̂2) mean over columns of (R² + ε1),
        col ← β̂2 col + (1 − β̂2) mean over rows of (R² + ε1),
        U = R / √(row colᵀ / mean(row)),   U ← ρ U / max(1, RMS(U) / d)   (d = ``clip_threshold``),
        with ``beta1``: U ← β1 U_prev + (1 − β1) U,
        W ← W (1 − ρλ) − α P U.

    The second moment is factored (a row and a column vector), so the state of an r x n
    low-rank gradient is r + n numbers (plus r n with ``beta1``); no host sync per step.  With
    ``relative_step=True`` the constructor takes ``lr=None`` (an absolute lr there is refused,
    as in transformers' Adafactor) and each group stores ``lr=1.0``, the multiplier of the
    relative step, so LR schedulers scale it.  Groups without ``rank`` get Adafactor itself.
    Page: docs/methods/galore.md#update-rule.

    Args:
        lr: ρ's multiplier; must be None when ``relative_step`` (the default), else the step size.
        eps: (ε1, ε2): added to R² and the floor of RMS(W) (default (1e-30, 1e-3)).
        clip_threshold: d, the largest RMS of the update before ρ (default 1.0).
        decay_rate: c < 0 in β̂2 = 1 − t^c (default -0.8).
        beta1: β1 of an optional first moment (default None: none is kept).
        weight_decay: λ, decoupled (default 0.0).
        scale_parameter: multiply ρ by max(ε2, RMS(W)) (default True).
        relative_step: ρ from the step count (default True; ``lr`` must then be None).
        warmup_init: with ``relative_step``, warm up as min(10⁻⁶ t, 1/√t) (default False).
    """

    method_checks = {
        "lr": V.nonneg_float(optional=True),
        "eps": V.pair_of(V.nonneg_float()),
        "clip_threshold": V.pos_float(),
        # beta2_t = 1 - t^decay_rate lies in [0, 1) only for a negative exponent.
        "decay_rate": V.negative_float(),
        "beta1": V.unit_interval(optional=True),
        "scale_parameter": V.boolean(),
        "relative_step": V.boolean(),
        "warmup_init": V.boolean(),
    }
    moment_rule = Adafactor()

    method_defaults = {
        "lr": None,
        "eps": (1e-30, 1e-3),
        "clip_threshold": 1.0,
        "decay_rate": -0.8,
        "beta1": None,
        "weight_decay": 0.0,
        "scale_parameter": True,
        "relative_step": True,
        "warmup_init": False,
    }

    def __init__(self, params: Iterable, **hyperparameters):
        values = {**self.hyperparameter_defaults(), **hyperparameters}
        if values["relative_step"] is True and values["lr"] is not None:
            raise ValueError(
                f"{type(self).__name__}: lr={values['lr']!r} cannot be combined with relative_step=True in the "
                "constructor: the step size comes from the step count; pass lr=None (or relative_step=False)"
            )
        super().__init__(params, **hyperparameters)

    def _validate_group(self, group: dict, index: int) -> None:
        if group.get("relative_step") is True and group.get("lr") is None:
            group["lr"] = 1.0  # the relative step's multiplier, which LR schedulers scale
        super()._validate_group(group, index)
        where = f"{type(self).__name__}: param group {index}"
        if not group["relative_step"] and group["lr"] is None:
            raise ValueError(f"{where}: lr=None needs relative_step=True (or give an lr)")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError(f"{where}: warmup_init=True requires relative_step=True")
