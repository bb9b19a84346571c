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
from .base import ADAM_CHECKS, ADAM_DEFAULTS, LowRankOptimizer
from .rules import Adafactor, Adam8bit, bitsandbytes_functional


class GaLoreAdamW(LowRankOptimizer):
    """GaLore with Adam moments on the low-rank gradient (module docstring has the math).

    Args:
        params: parameters or param groups; a group with ``rank`` is projected.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        rank: default rank for groups that do not set one (None: groups are dense).
        update_proj_gap: T, steps between subspace refreshes.
        scale: α, multiplies the projected-back update.
        proj_type: ``std`` | ``reverse_std`` | ``left`` | ``right`` | ``full``.
        projector: ``svd`` (exact) | ``rsvd`` (randomized) | ``random`` | any registered name.
        projector_args: the projector's own options, e.g. ``{"oversample": 8}`` for rsvd.
        on_refresh: what the moments do when the basis changes: ``keep`` (reference),
            ``reset`` (zero them and restart bias correction) or ``project`` (re-express
            them in the new basis).
        eps_style: ``torch`` (ε after bias correction) or ``hf`` (ε on the raw √v).
        decay_after_update: apply weight decay after the update, as ``galore_torch``.
        seed: base seed of the randomized projectors (same on every data-parallel rank).
        layerwise, accumulation_steps, max_grad_norm: layer-wise mode, see
            :class:`~lowrank_optim.optim.base.LowRankOptimizer`.
    """

    method_defaults = ADAM_DEFAULTS


class GaLoreAdamW8bit(LowRankOptimizer):
    """GaLore with bitsandbytes' blockwise 8-bit Adam moments (blocks of 256).

    The low-rank gradient R goes through the :class:`~lowrank_optim.optim.rules.Adam8bit`
    rule (bitsandbytes' ``optimizer_update_8bit_blockwise``, called by keyword), which yields
    the bias-corrected Adam direction; projection back, scale, weight decay and lr are then
    applied by the shared step.  Dense groups get 8-bit AdamW.  Moments of tensors with
    fewer than ``min_8bit_size`` elements stay fp32, as in bitsandbytes.  ε is placed as in
    ``torch.optim.AdamW`` (bitsandbytes' only choice).
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
    r"""GaLore with Adafactor (Shazeer & Stern 2018) on the low-rank gradient.

    With :math:`\rho_t` = ``lr`` or, when ``relative_step``, ``lr`` times
    :math:`\min(10^{-2}, 1/\sqrt t)` (:math:`\min(10^{-6}t, 1/\sqrt t)` with
    ``warmup_init``), times
    :math:`\max(\epsilon_2, \mathrm{RMS}(W))` when ``scale_parameter``:

    .. math::
        \hat\beta_{2t} = 1 - t^{c},\quad
        r_t = \hat\beta_{2t} r_{t-1} + (1-\hat\beta_{2t})\,\mathrm{mean}_{cols}(R^2+\epsilon_1),\quad
        c_t = \ldots\,\mathrm{mean}_{rows}(R^2+\epsilon_1),

    :math:`U = R / \sqrt{r c^\top / \mathrm{mean}(r)}`, clipped to RMS ≤ d
    (``clip_threshold``), times :math:`\rho_t`; with ``beta1`` an EMA of U; then
    :math:`W \leftarrow W(1-\rho_t\lambda) - \alpha\,P U`.  The second moment is factored
    (a row and a column vector) for matrices, so the state of an r x n low-rank gradient is
    r + n numbers.  The RMS clip and ``max(eps2, RMS(W))`` are tensor ops: no host sync.

    With ``relative_step=True`` the constructor takes ``lr=None`` (as transformers'
    Adafactor: an absolute lr there is a mistake) and each group stores ``lr=1.0``, the
    multiplier of the relative step, so that LR schedulers (which multiply ``lr``) work
    and scale it; a param group may set another multiplier explicitly.
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
