r"""Natural GaLore: GaLore with an inverse empirical Fisher on the low-rank gradient
(A. Das, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
Fine-tuning", 2024, arXiv:2410.16029).

For a weight W in a projected group, GaLore's low-rank gradient R (k = numel(R) entries,
flattened to g) is preconditioned by the damped empirical Fisher of the last s projected
gradients before it reaches Adam.  With H = [g_{t-s+1}, ..., g_t] (k x s, the current
gradient included) and damping λ:

.. math::
    \hat g = (\lambda I + H H^\top)^{-1} g
           = \frac{g}{\lambda} - \frac{H z}{\lambda^2},\qquad
    S = I + \frac{H^\top H}{\lambda}\ (s \times s),\qquad z = S^{-1} H^\top g

(Woodbury's identity: a k x k inverse becomes an s x s Cholesky solve), and then exactly
GaLore (:mod:`.galore`) with ĝ in place of R: Adam moments of ĝ, projected back, scaled by
α, decoupled weight decay.

Implementation notes:

* The history is a ring buffer ``state["grad_history"]`` of shape (s, \*R.shape) in the
  gradient's dtype plus the int ``state["grad_history_count"]`` (gradients written since the
  last clear; the next slot is ``count % s``, so the oldest entry is the one overwritten).
  Plain tensors and an int: checkpoints load with ``torch.load(weights_only=True)`` and resume
  bit for bit.  Unfilled slots are zero, and zero columns of H are exactly harmless: they add
  an identity block to S and a zero entry to z, so a partly filled history gives the
  Woodbury result of the filled part.
* Since g is itself a column c of H, ``g/λ - Hz/λ²`` is evaluated as ``H (e_c/λ - z/λ²)``:
  the subtraction, which cancels almost completely along the directions the history spans,
  happens on s coefficients in float64 instead of on k entries in the gradient's dtype.  H^T H
  is accumulated in float64 (a transient s x k float64 copy of the history), and S, its
  Cholesky factor and z are float64 (s x s, negligible); the final H c is in fp32 (or the
  gradient's dtype if wider).  Against a float64 direct solve this keeps fp32 histories at
  ~1e-7 relative error, where the literal fp32 formula lost ~1e-2 at λ = 1e-3 in our checks.
  ``torch.linalg.cholesky_ex`` instead of ``cholesky``: it does not read the error code back
  to the host, and S is symmetric positive definite by construction (eigenvalues >= 1).
  So a step between refreshes has no host sync.
* At a subspace refresh the stored gradients are in the old coordinates.
  ``history_on_refresh="project"`` (default) re-expresses each with the projector's
  transition (P_new^T P_old R for a dense basis; coordinate-based projectors carry surviving
  coordinates and zero new ones): the curvature estimate, and with it the scale of ĝ, stays
  continuous, which matters because Adam's moments are carried across the refresh by default
  (``on_refresh="keep"``).  ``"clear"`` empties the history, so the Fisher is rebuilt from
  gradients of the new subspace only (the first step after a refresh then sees
  ĝ = g / (λ + |g|²)); it pairs naturally with ``on_refresh="reset"``.
* Only projected groups are preconditioned; a group without ``rank`` is plain AdamW
  (``torch.optim.AdamW`` to the bit), as in every method of this package.

Reference flaws fixed (docs/methods/natural_galore.md#where-we-differ-from-the-reference):
λ = 1e-3 was hard-coded (now ``damping``,
same default); the history was never cleared or re-expressed when the subspace changed
(now ``history_on_refresh``); the reference projects two-sided (Tucker, an r x r core) while
the paper describes one side: the default here is GaLore's one-sided ``proj_type="std"``,
and ``proj_type="full"`` gives the reference's two-sided projection (R = P^T G Q^T, r x r;
not compared with the reference code itself, which is not among the installable oracles).

Memory: the history costs s * numel(R) numbers per matrix in the gradient's dtype (s/2
times GaLore's two moments) on top of GaLore's state, plus a transient float64 copy of the
history (2 s * numel(R) fp32-equivalents) during each matrix's step.  With a one-sided
projection at r = n/4 that is s/8 of AdamW's whole state: at the paper's s = 20 (or even
s = 10) the optimizer holds *more* than AdamW (``bench/bench_memory.py``: 1.57x AdamW at
s = 10 on LLaMA-60M shapes).  The default here is s = 4 (``history``); for long histories
use ``proj_type="full"`` as the reference does, where the history is s * r^2 numbers.
"""
from __future__ import annotations

import math

import torch

from .. import _validate as V
from ..projectors import Projector, is_projected
from .base import LowRankOptimizer
from .groups import ADAM_CHECKS, ADAM_DEFAULTS


def inverse_fisher_product(history: torch.Tensor, current: int, damping: float) -> torch.Tensor:
    r"""ĝ = (λI + H H^T)^{-1} g by Woodbury, where H = ``history`` (s x k, one gradient per
    row, zero rows for unfilled slots) and g = ``history[current]``.

    Returns ĝ flattened (k entries) in the history's dtype.  No host sync.
    """
    work = torch.promote_types(history.dtype, torch.float32)
    h = history.reshape(history.shape[0], -1).to(work)  # s x k (H^T in the math)
    # H^T H in float64: S has condition number up to 1 + |H|^2/λ, and an fp32 Gram matrix
    # gives ĝ with ~1e-3 relative error at λ = 1e-3 (float64: ~1e-7, fp32's own rounding).
    h64 = h.double()
    gram = h64 @ h64.t()
    del h64  # a transient s x k float64 copy, freed before the solve
    s = gram.shape[0]
    system = torch.eye(s, dtype=torch.float64, device=h.device).add_(gram, alpha=1.0 / damping)  # S
    factor, _ = torch.linalg.cholesky_ex(system)
    z = torch.cholesky_solve(gram[:, current : current + 1], factor).squeeze(1)  # S^{-1} H^T g
    # g / λ - H z / λ² = H (e_c / λ - z / λ²): the cancellation happens on s float64 numbers.
    coefficients = z.mul_(-1.0 / damping**2)
    coefficients[current] += 1.0 / damping
    return (coefficients.to(work) @ h).to(history.dtype)


class NaturalGaLoreAdamW(LowRankOptimizer):
    """Natural GaLore: GaLore with an inverse empirical Fisher on the low-rank gradient (Das, 2024).

    Update rule, for a weight W in a group with ``rank``: R = Pᵀ G as in GaLore, g = R
    flattened, H = [g_{t−s+1}, ..., g_t] the last s = ``history`` of them (the current one
    included) and δ = ``damping``:

        ĝ = (δ I + H Hᵀ)⁻¹ g   (Woodbury's identity: an s x s Cholesky solve),

    then GaLore's rule with ĝ in place of R:

        M ← β1 M + (1 − β1) ĝ,   V ← β2 V + (1 − β2) ĝ²,
        W ← W (1 − ηλ) − η α P M̂ / (√V̂ + ε).

    The history costs s · numel(R) numbers per matrix on top of GaLore's state.
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/natural_galore.md#update-rule.

    Args:
        history: s, how many recent projected gradients form the empirical Fisher (default 4; the
            paper uses 20, which at a one-sided projection costs more than AdamW).
        damping: δ > 0, the Tikhonov damping of the Fisher (default 1e-3, the reference's value).
        history_on_refresh: the stored gradients when the subspace changes: ``"project"``
            (re-expressed in the new basis, default) or ``"clear"``.
    """

    method_defaults = {**ADAM_DEFAULTS, "history": 4, "damping": 1e-3, "history_on_refresh": "project"}
    param_dtype_state_keys = (*LowRankOptimizer.param_dtype_state_keys, "grad_history")
    method_checks = {
        **ADAM_CHECKS,
        "history": V.int_at_least(1),
        "damping": V.pos_float(),
        "history_on_refresh": V.choice("project", "clear"),
    }

    def transform_low_rank_grad(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if not is_projected(group):
            return low
        history = state.get("grad_history")
        if history is None or history.shape[1:] != low.shape:
            history = state["grad_history"] = low.new_zeros((group["history"], *low.shape))
            state["grad_history_count"] = 0
        count = state["grad_history_count"]
        current = count % history.shape[0]  # FIFO: the oldest entry is overwritten
        history[current].copy_(low)
        state["grad_history_count"] = count + 1
        return inverse_fisher_product(history, current, group["damping"]).view_as(low)

    def after_refresh(self, state: dict, group: dict, projector: Projector, old: dict, like: torch.Tensor) -> None:
        history = state.get("grad_history")
        if history is None:
            return
        if group["history_on_refresh"] == "clear":
            history.zero_()
            state["grad_history_count"] = 0
            return
        transition = projector.transition(old, state["projector"], like)
        # One entry at a time: an index map applies along a fixed dim of a single R.
        state["grad_history"] = torch.stack([transition.apply(entry) for entry in history])

    @classmethod
    def method_state_bytes(cls, shape, low_shape, width: int, group: dict) -> int:
        return group["history"] * math.prod(low_shape) * width  # s projected gradients, R's dtype


__all__ = ["NaturalGaLoreAdamW", "inverse_fisher_product"]
