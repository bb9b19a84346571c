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

* **V is the parameter itself** (up to a sign per row, next item).  Only V's direction
  matters, so the optimizer applies the update to W (``open_weight`` returns the parameter)
  and renormalizes its rows to |g| in ``close_weight``; the state holds g (m x 1) and its two
  moments, never an m x n copy of V.  The reference keeps a full extra copy of V as state,
  which defeats the memory claim.  Because W's rows have norm |g| at the start of every
  step, g/‖V‖ is ±1 up to rounding; the factor is still computed from the stored g and the
  actual row norms.
* **g may turn negative; its sign is carried.**  Nothing keeps g > 0: its Adam step can
  overshoot through 0 (e.g. a short row whose direction starts far from its target: Adam
  moves g by about η per step, more than g itself).  A row with g < 0 points along −u, so W's row
  is −V there: with s = sign(g) per row (+1 where g = 0), the parameter holds s ⊙ V and

  .. math::
      u = s \odot \frac{W}{\lVert W\rVert},\qquad
      \frac{\partial L}{\partial g} = s \odot \textstyle\sum_{row}\frac{G \odot W}{\lVert W\rVert},\qquad
      \frac{\partial L}{\partial V} = \frac{g}{\lVert W\rVert}
          \Big(G - \big(\textstyle\sum_{row}\frac{G \odot W}{\lVert W\rVert}\big)\frac{W}{\lVert W\rVert}\Big)

  (in ∂L/∂V the two signs of (Σ G⊙u) u cancel); V's step is applied to W multiplied by s
  (:meth:`full_rank_direction`), and ``close_weight`` writes
  W ← g' ⊙ s ⊙ W'/‖W'‖ with s from before g's update, which is g' ⊙ V'/‖V'‖: a row whose g
  crosses 0 keeps its direction u and W's row turns round.  Reading u as W/‖W‖ instead
  (sign ignored) gives ∂L/∂g the wrong sign and flips the row at every write-back: such a
  row diverges.  s = +1 is exact in every product, so rows with g > 0 compute exactly what
  they did before the sign was carried; s is a tensor (``masked_fill``), no host sync.
* **g is learned and kept**: initialised to the row norms of W at the first step (stored
  when that step completes, so a step skipped at its first refresh leaves no state), then
  updated only by its Adam (the reference resets it to ‖V‖ every step, so it never learns).
* **Zero rows are refused.**  A row of W that is exactly zero has no direction: u is
  undefined, its g starts at 0 and nothing would ever move it, so the row (a whole zero
  weight, e.g. a zero-initialised output projection) would silently never train.  The
  constructor raises a ``ValueError`` naming the parameter (its ``param_names`` entry or
  ``#i``), its shape and how many of its rows are zero; so does the first step, where g is
  initialised, for a weight zeroed after construction.  Initialise it with nonzero rows, or
  put it in a group without ``rank``.  Each check is one host sync, and later steps have none.
* **The tangent term** :math:`-(\sum G\odot u)u` is kept (the reference omits it): without it
  ∂L/∂V is not the gradient of the reparametrised loss.
* **Weight decay** (decoupled, λ = ``weight_decay``) applies to the magnitude:
  g ← g(1 − ηλ) is exactly W ← W(1 − ηλ) for W = g ⊙ u, i.e. AdamW's decay of W.  Decay of
  V alone would be erased by the renormalization; the shared step does scale V by
  (1 − ηλ) before the update, so :meth:`full_rank_direction` scales the direction by the
  same factor and the direction step is exactly V − η_t α back(N_V) up to that common scale
  (with ``decay_after_update`` the scale comes after the update and needs no correction).
  g's decay follows ``decay_after_update`` too (before its Adam step by default).
* **The magnitude's moments use the class's moment rule**: Adam in g's dtype in
  :class:`GradNormLoRPAdamW` (``eps_style`` honoured), bitsandbytes' blockwise 8-bit Adam in
  :class:`GradNormLoRPAdamW8bit` when m ≥ ``min_8bit_size`` (fp32 below, as bitsandbytes
  does for small tensors).  They live in a nested state dict ``magnitude_moments`` with its
  own ``step``: g is not projected, so a subspace refresh (``on_refresh="reset"`` or
  ``"project"``) leaves them alone.
* **Precision**: the chain rule, g, ∂L/∂g and the write-back's row norms are computed in
  ``torch.promote_types(dtype, float32)`` of the weight's dtype: fp32 for fp32, bf16 and
  fp16 weights (m numbers: a bf16 g would round away updates smaller than 1/256 of it), fp64
  for fp64 weights (an fp32 g would throw the weights' precision away).
* **The 8-bit class updates the weights** (the reference's 8-bit class never does): it is
  :class:`~lowrank_optim.optim.galore.GaLoreAdamW8bit`'s moment rule, inherited, not copied.
* **Dense groups** (no ``rank``) are plain AdamW (8-bit AdamW in the 8-bit class) with no
  weight normalization: biases, norms and embeddings keep their usual parametrisation, as in
  the paper, which normalizes the projected weight matrices.

State per projected matrix: GaLore's (basis and two r-sized moments) plus ``magnitude``,
``magnitude_moments`` = {``exp_avg``, ``exp_avg_sq`` (each m x 1; 8-bit moments add their
block ``_absmax``), ``step``}; ``magnitude`` may hold negative entries
(see the sign above).  ``prepare_gradient`` needs one transient m x n buffer in the compute
dtype (two more for half-precision weights), freed before the projection.
"""
from __future__ import annotations

import torch

from .. import distributed
from ..projectors import is_projected
from .base import LowRankOptimizer
from .galore import GaLoreAdamW8bit
from .groups import ADAM_DEFAULTS, param_names
from .hooks import ParamStep
from .rules import Update


class _WeightNormalizedRows:
    """The GradNormLoRP hooks, mixed in front of a :class:`LowRankOptimizer` whose
    ``moment_rule`` serves both V's projected gradient and the magnitude's gradient."""

    def _init_runtime(self) -> None:
        super()._init_runtime()
        # (∂L/∂g, s, g) from prepare_gradient to close_weight of the same _step_param call;
        # never in the state (a skipped step must leave no stale gradient, and at the first
        # step no magnitude, in a checkpoint), rebuilt empty in a copy of the optimizer.  s
        # is the sign of g before this step's update: full_rank_direction and close_weight
        # need that one, not the sign the magnitude's Adam step may have flipped.
        self._magnitude_grads: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _validate_group(self, group: dict, index: int) -> None:
        super()._validate_group(group, index)
        if not is_projected(group):
            return
        for name, p in zip(param_names(group), group["params"]):
            # A meta tensor has no values yet and a sharded one is refused at its first step:
            # the guard at the first step covers whatever is not checked here.
            if p.is_meta or distributed.is_dtensor(p):
                continue
            norms = torch.linalg.vector_norm(p.detach(), dim=1, dtype=_compute_dtype(p))
            _refuse_zero_rows(type(self).__name__, name, f"param group {index}", p, norms)

    def prepare_gradient(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if not is_projected(group):
            return grad
        dtype = _compute_dtype(p)
        weight = p.to(dtype)  # s ⊙ V; p itself when already in the compute dtype, only read here
        norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
        magnitude = state.get("magnitude")
        if magnitude is None:  # first step: g = the row norms, stored by close_weight
            # The weight may have been zeroed after construction: a zero row has no direction
            # and would stay zero forever, so refuse it before it silently never trains.
            _refuse_zero_rows(type(self).__name__, *self._locate(p, group), p, norms.squeeze(1))
            magnitude = norms.clone()
        # The parameter holds W = g ⊙ u, which points along -u where g < 0; with s = sign(g)
        # (+1 at g = 0) the direction is V = s ⊙ W.  s = +1 is exact in every product below,
        # so rows with g > 0 compute exactly what the unsigned formulas did.
        sign = torch.ones_like(magnitude).masked_fill_(magnitude < 0, -1.0)
        # Only a row that reached g = 0 exactly (after the first step) can have ‖V‖ = 0; the
        # clamp keeps its factors finite, and its gradients are 0 (its V is 0).
        inv_norms = norms.clamp_min(torch.finfo(dtype).tiny).reciprocal_()
        gradient = grad.to(dtype)
        radial = torch.linalg.vecdot(gradient, weight, dim=1).unsqueeze(1).mul_(inv_norms)  # Σ G⊙W/‖W‖
        # ∂L/∂g = Σ G⊙u = s Σ G⊙W/‖W‖
        self._magnitude_grads[id(p)] = (radial * sign, sign, magnitude)
        # (g/‖V‖)(G − (Σ G⊙u) u) without materialising u; the two signs in (Σ G⊙u) u =
        # (s Σ G⊙W/‖W‖)(s W/‖W‖) cancel: G·(g/‖W‖) − W·((Σ G⊙W/‖W‖) g/‖W‖²).
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
        # D is V's step and the parameter holds s ⊙ V: W' = s ⊙ (V - step_size D).
        sign = self._magnitude_grads[id(step.param)][1]
        direction.mul_(sign.to(direction.dtype))
        return direction

    def close_weight(self, p: torch.Tensor, weight: torch.Tensor, state: dict, group: dict) -> None:
        super().close_weight(p, weight, state, group)
        if not is_projected(group):  # dense group: plain AdamW, nothing to write back
            return
        radial, sign, magnitude = self._magnitude_grads.pop(id(p))
        if "magnitude" not in state:
            state["magnitude"] = magnitude
            state["magnitude_moments"] = {"step": 0}
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
        # W = g' ⊙ V'/‖V'‖ with V' = s ⊙ weight (s from before g's update: a row whose g
        # has just crossed zero keeps its direction and now points along -u).  In fp32 for
        # half-precision weights: a bf16 factor would put the row norms off by up to 0.4%.
        dtype = _compute_dtype(p)
        norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True, dtype=dtype)
        factor = magnitude * sign / norms.clamp_min(torch.finfo(dtype).tiny)
        if weight.dtype == dtype:
            weight.mul_(factor)
        else:
            weight.copy_(weight.to(dtype).mul_(factor))
        if weight is not p:
            p.copy_(weight)

    def _locate(self, p: torch.Tensor, group: dict) -> tuple[str, str]:
        """(name, "param group i") of ``p``, as the construction-time check names them."""
        return param_names(group)[self._group_slot(p, group)[0]], f"param group {self._position(p)[0]}"

    def _magnitude_step(self, p: torch.Tensor, radial: torch.Tensor, state: dict, group: dict) -> Update:
        """The class's moment rule on ∂L/∂g, on the magnitude's own moments: a nested state
        dict with its own step count (a refresh of V's subspace leaves it alone)."""
        moments = state["magnitude_moments"]
        if moments["step"] == 0:
            self.moment_rule.init(radial, moments, group)
        moments["step"] += 1
        return self.moment_rule.update(radial, moments, group, p)

    @classmethod
    def method_state_bytes(cls, shape, low_shape, width: int, group: dict) -> int:
        # The magnitude g (m x 1) and its own moments, both in the fp32-or-wider compute
        # dtype (see _compute_dtype); no copy of V.
        rows, compute_width = shape[0], max(width, 4)
        return rows * compute_width + cls.moment_rule.state_bytes((rows, 1), compute_width, group)

    def upgrade_state(self, pstate: dict) -> dict:
        # Releases before the rule objects kept the magnitude's moments flat, under a prefix.
        pstate = super().upgrade_state(pstate)
        if "magnitude_step" in pstate:
            moments = {"step": pstate.pop("magnitude_step")}
            for key in [k for k in pstate if k.startswith("magnitude_")]:
                moments[key[len("magnitude_") :]] = pstate.pop(key)
            pstate["magnitude_moments"] = moments
        return pstate


class GradNormLoRPAdamW(_WeightNormalizedRows, LowRankOptimizer):
    """GradNormLoRP: weight-normalised low-rank training (Huang et al., AAAI 2025).

    Update rule, for a weight W (m x n) in a group with ``rank``, trained as W = g ⊙ V/‖V‖
    (one norm per row; u = V/‖V‖; g the learned m x 1 magnitude, kept in the state):

        ∂L/∂g = Σ_row G ⊙ u,   ∂L/∂V = g/‖V‖ · (G − (Σ_row G ⊙ u) u),
        R = Pᵀ ∂L/∂V (GaLore's basis),   N_V, N_g = Adam directions of R and of ∂L/∂g,
        V' = V − η_t α back(N_V),   g' = g (1 − ηλ) − η_t N_g,   W ← g' ⊙ V'/‖V'‖.

    V is the parameter itself (up to a sign per row where g < 0), so the state holds g and its
    moments, never a copy of V.  Projected weights with an all-zero row are refused
    (``ValueError``): such a row has no direction.
    Moments of R are in the gradient's dtype, those of g in fp32 (fp64 for fp64 weights).
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/gradnorm_lorp.md#update-rule.

    Args:
    """

    method_defaults = ADAM_DEFAULTS


class GradNormLoRPAdamW8bit(_WeightNormalizedRows, GaLoreAdamW8bit):
    """GradNormLoRP with bitsandbytes' blockwise 8-bit Adam moments (needs ``bitsandbytes``).

    Update rule, for a weight W (m x n) in a group with ``rank``, trained as W = g ⊙ V/‖V‖
    (one norm per row; u = V/‖V‖; g the learned m x 1 magnitude, kept in the state):

        ∂L/∂g = Σ_row G ⊙ u,   ∂L/∂V = g/‖V‖ · (G − (Σ_row G ⊙ u) u),
        R = Pᵀ ∂L/∂V (GaLore's basis),   N_V, N_g = 8-bit Adam directions of R and of ∂L/∂g,
        V' = V − η_t α back(N_V),   g' = g (1 − ηλ) − η_t N_g,   W ← g' ⊙ V'/‖V'‖.

    V is the parameter itself (up to a sign per row where g < 0), so the state holds g and its
    moments, never a copy of V.  Projected weights with an all-zero row are refused
    (``ValueError``): such a row has no direction.
    The magnitude's moments are 8-bit too when m ≥ ``min_8bit_size``.  A group without ``rank``
    is 8-bit AdamW without weight normalisation.
    Page: docs/methods/gradnorm_lorp.md#update-rule.

    Args:
        eps: ε, added to √V̂ as in ``torch.optim.AdamW`` (bitsandbytes' only placement;
            default 1e-8).
    """


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for half, bf16 and fp32 weights (a half-precision g would round away updates
    smaller than 1/256 of it), the weight's own dtype when it is wider (fp64)."""
    return torch.promote_types(p.dtype, torch.float32)


def _refuse_zero_rows(owner: str, name: str, where: str, p: torch.Tensor, row_norms: torch.Tensor) -> None:
    zero = int((row_norms == 0).sum())  # one host sync, at construction or the first step only
    if zero:
        raise ValueError(
            f"{owner}: parameter {name} (shape {tuple(p.shape)}) in {where} has {zero} of its "
            f"{p.shape[0]} rows exactly zero: a zero row has no direction to normalize, so it "
            "would never train; initialise it with nonzero rows, or put it in a group without rank"
        )


__all__ = ["GradNormLoRPAdamW", "GradNormLoRPAdamW8bit"]
