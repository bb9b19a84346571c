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

import logging
import math
from typing import Iterable

import torch

from .. import _validate as V
from ..projectors.base import Transition
from .base import ADAM_CHECKS, ADAM_DEFAULTS, LowRankOptimizer, Update


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


def _bitsandbytes():
    # bitsandbytes logs a warning about optional 4-bit CPU kernels on import; we use none
    # of them, so keep the user's console clean.
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # optional dependency: only the 8-bit classes need it
        raise ImportError(
            "GaLoreAdamW8bit needs the 'bitsandbytes' package for its 8-bit moments: pip install bitsandbytes"
        ) from err
    finally:
        quiet.setLevel(level)
    return bnb_functional


_QMAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _quantization_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' dynamic maps: signed for the first moment, unsigned for the second.

    Constants shared by every parameter, so they are cached here and never stored in state.
    """
    if device not in _QMAPS:
        F = _bitsandbytes()
        _QMAPS[device] = (F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device))
    return _QMAPS[device]


class GaLoreAdamW8bit(LowRankOptimizer):
    """GaLore with bitsandbytes' blockwise 8-bit Adam moments (blocks of 256).

    The low-rank gradient R goes through ``bitsandbytes``' ``optimizer_update_8bit_blockwise``
    (called by keyword: bitsandbytes 0.50 reordered ``Optimizer2State``'s positional
    arguments, which turns the upstream class into a silent no-op) on a zero scratch tensor
    with lr 1, which yields the bias-corrected Adam direction; projection back, scale,
    weight decay and lr are then applied by the shared step.  Dense groups get 8-bit AdamW.
    Moments of tensors with fewer than ``min_8bit_size`` elements stay fp32, as in
    bitsandbytes.  ε is placed as in ``torch.optim.AdamW`` (bitsandbytes' only choice).
    """

    method_checks = {
        "betas": ADAM_CHECKS["betas"],
        "eps": ADAM_CHECKS["eps"],
        "min_8bit_size": V.int_at_least(1),
    }
    moment_keys = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
    param_dtype_state_keys = ()  # uint8 codes with fp32 scales, or fp32 below min_8bit_size

    # No eps_style: bitsandbytes places eps as torch does, with no choice.
    method_defaults = {**{k: v for k, v in ADAM_DEFAULTS.items() if k != "eps_style"}, "min_8bit_size": 4096}

    def __init__(self, params: Iterable, **hyperparameters):
        _bitsandbytes()  # fail at construction, not at the first step
        super().__init__(params, **hyperparameters)

    def init_moments(self, low: torch.Tensor, state: dict, group: dict) -> None:
        if low.numel() < group["min_8bit_size"]:
            state["exp_avg"] = torch.zeros_like(low, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(low, dtype=torch.float32)
            return
        blocks = math.ceil(low.numel() / 256)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(low, dtype=torch.uint8)
            state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=low.device)

    def moment_update(self, p: torch.Tensor, low: torch.Tensor, state: dict, group: dict) -> Update:
        if state["exp_avg"].dtype != torch.uint8:
            return super().moment_update(p, low.float(), state, group)  # eps_style defaults to torch
        signed_map, unsigned_map = _quantization_maps(low.device)
        beta1, beta2 = group["betas"]
        direction = torch.zeros_like(low, dtype=torch.float32)
        _bitsandbytes().optimizer_update_8bit_blockwise(
            optimizer_name="adam",
            g=low.float().contiguous(),
            p=direction,
            state1=state["exp_avg"],
            state2=state["exp_avg_sq"],
            beta1=beta1,
            beta2=beta2,
            beta3=0.0,
            alpha=0.0,
            eps=group["eps"],
            step=state["step"],
            lr=1.0,  # the scratch tensor receives -m_hat / (sqrt(v_hat) + eps)
            qmap1=signed_map,
            qmap2=unsigned_map,
            absmax1=state["exp_avg_absmax"],
            absmax2=state["exp_avg_sq_absmax"],
            weight_decay=0.0,
            gnorm_scale=1.0,
            skip_zeros=False,
        )
        return Update(direction.neg_(), None, group["lr"])

    def remap_moments(self, state: dict, transition: Transition) -> None:
        if state["exp_avg"].dtype != torch.uint8:
            return super().remap_moments(state, transition)
        F = _bitsandbytes()
        for key, qmap, squared in zip(("exp_avg", "exp_avg_sq"), _quantization_maps(state["exp_avg"].device), (False, True)):
            absmax = state[key + "_absmax"]
            dense = F.dequantize_blockwise(state[key], absmax=absmax, code=qmap, blocksize=256)
            codes, qstate = F.quantize_blockwise(transition.apply(dense, squared).contiguous(), code=qmap, blocksize=256)
            state[key].copy_(codes)
            absmax.copy_(qstate.absmax)


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
    moment_keys = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
    param_dtype_state_keys = ()  # fp32 whatever the weight's dtype
    method_layout_keys = ("beta1",)  # with or without a first moment

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

    def init_moments(self, low: torch.Tensor, state: dict, group: dict) -> None:
        shape = low.shape
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=low.device)
        if low.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=low.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=low.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=low.device)

    def moment_update(self, p: torch.Tensor, low: torch.Tensor, state: dict, group: dict) -> Update:
        t = state["step"]
        low = low.float()
        rate = group["lr"]
        if group["relative_step"]:
            rate = rate * min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        if group["scale_parameter"]:
            rate = rate * _rms(p.float()).clamp(min=group["eps"][1])
        beta2t = 1.0 - t ** group["decay_rate"]
        squared = low.square().add_(group["eps"][0])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = (row_factor * col.unsqueeze(-2).rsqrt()).mul_(low)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(low)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(rate)
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        return Update(update, None, 1.0, decay_lr=rate)

    def remap_moments(self, state: dict, transition: Transition) -> None:
        # The factored second moment keeps one statistic per row and one per column of R:
        # each side's statistics mix only under that side's map (with squared weights).
        if "exp_avg" in state:
            state["exp_avg"] = transition.apply(state["exp_avg"])
        if "exp_avg_sq" in state:
            state["exp_avg_sq"] = transition.apply(state["exp_avg_sq"], squared=True)
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            state["exp_avg_sq_row"] = transition.apply(row.unsqueeze(-1), squared=True, right=False).squeeze(-1)
            state["exp_avg_sq_col"] = transition.apply(col.unsqueeze(-2), squared=True, left=False).squeeze(-2)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)
