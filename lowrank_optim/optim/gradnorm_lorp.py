r"""GradNormLoRP: gradient weight-normalized low-rank projection (Huang, Shen, Zhu, Rudinac
and Kanoulas, AAAI 2025, "GradNormLoRP: Gradient Weight-normalized Low-rank Projection for
Efficient LLM Training", arXiv:2412.19616; title, authors and the 30 Dec 2024 preprint date
checked, the arXiv number and the venue not).

Each projected weight W (m x n, PyTorch out x in) is trained as a weight-normalized pair,
one norm per output row (``dim=1``, what ``torch.nn.utils.weight_norm`` calls ``dim=0``):

.. math::
    W = g \odot \frac{V}{\lVert V\rVert},\qquad u = \frac{V}{\lVert V\rVert},\qquad
    g \in \mathbb{R}^{m\times 1}\ \text{(learned magnitude)}.

With G = ∂L/∂W, step t (the chain rule of the reparametrisation, exact):

.. math::
    \frac{\partial L}{\partial g} = \textstyle\sum_{row}(G \odot u),\qquad
    \frac{\partial L}{\partial V} = \frac{g}{\lVert V\rVert}
        \Big(G - \big(\textstyle\sum_{row} G \odot u\big)\, u\Big).

∂L/∂V goes through GaLore (:mod:`.galore`: basis every T steps, ``std`` side by default,
R = project(∂L/∂V), Adam moments of R); the magnitude gets its own Adam on ∂L/∂g:

.. math::
    V' = V - \eta_t\,\alpha\,\mathrm{back}(N_V),\qquad
    g' = g\,(1 - \eta\lambda) - \eta_t\, N_g,\qquad
    W \leftarrow g' \odot \frac{V'}{\lVert V'\rVert}.

Design (where this differs from the reference code, and why):

* **V is the parameter itself.**  Only V's direction matters, so the optimizer applies the
  update to W (``open_weight`` returns the parameter) and renormalizes its rows to g in
  ``close_weight``; the state holds g (m x 1) and its two moments, never an m x n copy of V.
  The reference keeps a full extra copy of V as state, which defeats the memory claim.
  Because W's rows have norm g at the start of every step, g/‖V‖ is 1 up to rounding; the
  factor is still computed from the stored g and the actual row norms.
* **g is learned and kept**: initialised to the row norms of W at the first step, then
  updated only by its Adam (the reference resets it to ‖V‖ every step, so it never learns).
* **The tangent term** :math:`-(\sum G\odot u)u` is kept (the reference omits it): without it
  ∂L/∂V is not the gradient of the reparametrised loss.
* **Weight decay** (decoupled, λ = ``weight_decay``) applies to the magnitude:
  g ← g(1 − ηλ) is exactly W ← W(1 − ηλ) for W = g ⊙ u, i.e. AdamW's decay of W.  Decay of
  V alone would be erased by the renormalization; the shared step does scale V by
  (1 − ηλ) before the update, so :meth:`full_rank_direction` scales the direction by the
  same factor and the direction step is exactly V − η_t α back(N_V) up to that common scale
  (with ``decay_after_update`` the scale comes after the update and needs no correction).
  g's decay follows ``decay_after_update`` too (before its Adam step by default).
* **The magnitude's moments use the class's moment rule**: fp32 Adam in
  :class:`GradNormLoRPAdamW` (``eps_style`` honoured), bitsandbytes' blockwise 8-bit Adam in
  :class:`GradNormLoRPAdamW8bit` when m ≥ ``min_8bit_size`` (fp32 below, as bitsandbytes
  does for small tensors).  g and ∂L/∂g are fp32 whatever the weight's dtype (m numbers:
  a bf16 g would round away updates smaller than 1/256 of it).  Its moments have their own
  step counter (``magnitude_step``): g is not projected, so a subspace refresh
  (``on_refresh="reset"`` or ``"project"``) leaves them alone.
* **The 8-bit class updates the weights** (the reference's 8-bit class never does): it is
  :class:`~lowrank_optim.optim.galore.GaLoreAdamW8bit`'s moment rule, inherited, not copied.
* **Dense groups** (no ``rank``) are plain AdamW (8-bit AdamW in the 8-bit class) with no
  weight normalization: biases, norms and embeddings keep their usual parametrisation, as in
  the paper, which normalizes the projected weight matrices.

State per projected matrix: GaLore's (basis and two r-sized moments) plus ``magnitude``,
``magnitude_exp_avg``, ``magnitude_exp_avg_sq`` (each m x 1; 8-bit moments add their
block ``_absmax``) and the int ``magnitude_step``.  A row of W that is exactly zero has no
direction: its magnitude starts at 0 and it stays zero (as under ``weight_norm``).
``prepare_gradient`` needs one transient m x n fp32 buffer (two more for half-precision
weights), freed before the projection.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..projectors import is_projected
from .base import ADAM_DEFAULTS, LowRankOptimizer, ParamStep, Update
from .galore import GaLoreAdamW8bit

_MAGNITUDE = "magnitude_"  # prefix of the magnitude's moment keys in the parameter state


class _WeightNormalizedRows:
    """The GradNormLoRP hooks, mixed in front of a :class:`LowRankOptimizer` whose moment
    rule (:meth:`init_moments` / :meth:`moment_update`) serves both V's projected gradient
    and the magnitude's gradient."""

    def __init__(self, params: Iterable, **hyperparameters):
        # ∂L/∂g from prepare_gradient to close_weight of the same _step_param call; never
        # in the state (a skipped step must leave no stale gradient in a checkpoint).
        self._magnitude_grads: dict[int, torch.Tensor] = {}
        super().__init__(params, **hyperparameters)

    def prepare_gradient(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if not is_projected(group):
            return grad
        weight = p.float()  # V (= W); p itself when fp32, only read here
        norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        if "magnitude" not in state:
            state["magnitude"] = norms.clone()
            state["magnitude_step"] = 0
        magnitude = state["magnitude"]
        # 1/‖V‖ with a zero row giving 0, not inf: its magnitude is 0 too, so its gradients vanish.
        inv_norms = norms.clamp_min(torch.finfo(torch.float32).tiny).reciprocal_()
        gradient = grad.float()
        radial = torch.linalg.vecdot(gradient, weight, dim=1).unsqueeze(1).mul_(inv_norms)  # Σ G⊙u = ∂L/∂g
        self._magnitude_grads[id(p)] = radial
        # (g/‖V‖)(G − (Σ G⊙u) u) without materialising u: G·(g/‖V‖) − V·((Σ G⊙u) g/‖V‖²).
        ratio = magnitude * inv_norms
        direction_grad = gradient * ratio
        direction_grad.addcmul_(weight, radial * ratio * inv_norms, value=-1.0)
        return direction_grad.to(grad.dtype)

    def full_rank_direction(self, direction: torch.Tensor, step: ParamStep) -> torch.Tensor:
        direction = super().full_rank_direction(direction, step)
        group = step.group
        if group["weight_decay"] != 0 and not group["decay_after_update"]:
            # The shared step has just scaled V by (1 - lr wd), which the renormalization
            # erases; scaling the direction alike keeps V's step exactly -step_size * D
            # relative to V (the decay belongs to g, see close_weight).
            direction.mul_(1 - group["lr"] * group["weight_decay"])
        return direction

    def close_weight(self, p: torch.Tensor, weight: torch.Tensor, state: dict, group: dict) -> None:
        super().close_weight(p, weight, state, group)
        if not is_projected(group):  # dense group: plain AdamW, nothing to write back
            return
        radial = self._magnitude_grads.pop(id(p))
        magnitude = state["magnitude"]
        update = self._magnitude_step(p, radial, state, group)
        decay_lr = group["lr"] if update.decay_lr is None else update.decay_lr
        decay = 1 - decay_lr * group["weight_decay"]
        if group["weight_decay"] != 0 and not group["decay_after_update"]:
            magnitude.mul_(decay)
        if update.denom is not None:
            magnitude.addcdiv_(update.numer, update.denom, value=-update.step_size)
        else:
            magnitude.add_(update.numer, alpha=-update.step_size)
        if group["weight_decay"] != 0 and group["decay_after_update"]:
            magnitude.mul_(decay)
        # W = g ⊙ V'/‖V'‖, in fp32 for half-precision weights (a bf16 factor would put the
        # row norms off by up to 0.4%).
        norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True, dtype=torch.float32)
        factor = magnitude / norms.clamp_min(torch.finfo(torch.float32).tiny)
        if weight.dtype == torch.float32:
            weight.mul_(factor)
        else:
            weight.copy_(weight.float().mul_(factor))
        if weight is not p:
            p.copy_(weight)

    def _magnitude_step(self, p: torch.Tensor, radial: torch.Tensor, state: dict, group: dict) -> Update:
        """The class's moment rule on ∂L/∂g, on the ``magnitude_*`` entries of the state.

        The rule reads and updates its moments in place under the keys it always uses, so
        it runs on a small dict of the magnitude's entries under those names.
        """
        moments = {
            k[len(_MAGNITUDE) :]: v for k, v in state.items() if k.startswith(_MAGNITUDE) and k != "magnitude_step"
        }
        if not moments:
            self.init_moments(radial, moments, group)
        state["magnitude_step"] += 1
        moments["step"] = state["magnitude_step"]
        update = self.moment_update(p, radial, moments, group)
        for key, value in moments.items():
            if key != "step":
                state[_MAGNITUDE + key] = value
        return update


class GradNormLoRPAdamW(_WeightNormalizedRows, LowRankOptimizer):
    """GradNormLoRP with Adam moments in the gradient's dtype for the projected direction
    gradient (as :class:`~lowrank_optim.optim.galore.GaLoreAdamW`) and fp32 ones for the
    magnitude; the module docstring has the math and the design.

    Args: those of :class:`~lowrank_optim.optim.galore.GaLoreAdamW`.  ``weight_decay``
    decays the magnitude g (equivalently W); groups without ``rank`` are plain AdamW.
    """

    method_defaults = ADAM_DEFAULTS


class GradNormLoRPAdamW8bit(_WeightNormalizedRows, GaLoreAdamW8bit):
    """GradNormLoRP with bitsandbytes' blockwise 8-bit Adam moments for the projected
    direction gradient, and for the magnitude when m ≥ ``min_8bit_size`` (the module
    docstring has the math and the design).

    Args: those of :class:`~lowrank_optim.optim.galore.GaLoreAdamW8bit`.  Groups without
    ``rank`` are 8-bit AdamW without weight normalization.
    """


__all__ = ["GradNormLoRPAdamW", "GradNormLoRPAdamW8bit"]
