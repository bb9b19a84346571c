r"""FRUGAL: gradient splitting (Zmushko et al., ICML 2025, arXiv:2411.07837).

A state-full optimizer (AdamW) runs on a subspace of the gradient and a state-free rule on
the rest.  For a weight W with gradient G in a projected group, step t:

.. math::
    g_s = \mathrm{down}(G),\quad u_s = \mathrm{AdamW}(g_s),\quad
    E = G - \mathrm{up}(g_s),

.. math::
    W \leftarrow W (1 - \eta\lambda) - \eta_t\,\alpha\,\mathrm{up}(u_s) - \eta_f\,F(E),
    \qquad \eta_f = \eta \cdot \texttt{inactive\_lr\_scale},

with F = sign (``state_free="signsgd"``, the paper's default), F = identity (``"sgd"``) or
no state-free part (``"none"``).  AdamW uses ``torch.optim.AdamW``'s ε placement; weight
decay is decoupled and, as in the reference, applied to all of W before both parts
(``decay_after_update=True``: after both).  FRUGAL has no α: ``scale`` defaults to 1 and
multiplies only the Adam part.  The subspace is refreshed every T = ``update_proj_gap``
steps and the Adam moments are reset then (``on_refresh="reset"``, the reference's
``reset_statistics=True``).

Subspaces (``projector``): ``svd``, ``rsvd``, ``random`` (orthonormal), ``dct`` give a
semi-orthogonal basis, rank = ``rank`` or round(``density`` * projected side); ``columns``,
``rows``, ``entries`` select int(``density`` * length) coordinates; ``blocks`` makes a
fraction ``density`` of the group's matrices active (full Adam) and leaves the rest to the
state-free rule (:mod:`lowrank_optim.projectors.coords`).  The paper uses ρ = 0.25:
``FrugalAdamW([{"params": matrices, "density": 0.25, "projector": "blocks"}, {"params":
others}])``.  ``density`` has no constructor default (None, like ``rank``): a group is
projected when it sets one of them, so embeddings, norms and the LM head stay state-full
by being in a group without either.

Exact split.  Coordinate and block projectors split G exactly.  For a basis, the reference
applies sign(E) itself, whose projection onto the subspace is not zero, so the subspace also
receives a signSGD step on top of Adam's.  Here the state-free direction is projected onto
the orthogonal complement once more, :math:`F \leftarrow F - \mathrm{up}(\mathrm{down}(F))`,
so it lies in the complement up to rounding (for ``sgd`` this only removes rounding
error).  That needs an orthogonal projection, so ``random`` with
``distribution="gaussian"`` (P Pᵀ not idempotent) is rejected.

``on_refresh``: ``reset`` (default); ``project`` re-expresses the moments in the new
subspace; ``keep`` carries them unchanged for a basis (the reference's
``reset_statistics=False``), while for the index-based projectors (``dct`` included) it keeps the moments of
the coordinates (or active matrices) that stay selected, new ones starting at zero
(carrying them by position would attach them to other coordinates): there keep is the
same as project.  New coordinates continue the running bias correction, so their first
steps are up to (1-β1)/√(1-β2) ≈ 3.2 times a fresh Adam step; ``reset`` avoids that.

Block rounds follow the group's clock (the optimizer steps it has taken, saved with the
param groups), so a matrix without a gradient at a refresh still agrees with the rest of
its group when it next steps.
"""
from __future__ import annotations

from .. import _validate as V
from ..projectors import make_projector
from .base import LowRankOptimizer
from .groups import ADAM_CHECKS, ADAM_DEFAULTS
from .hooks import ParamStep


class FrugalAdamW(LowRankOptimizer):
    """FRUGAL: AdamW on a subspace, a state-free rule on the rest (Zmushko et al., ICML 2025).

    Update rule, for a weight W in a group with ``rank`` or ``density``, with down/up the
    projection onto the subspace and back (a basis, a coordinate subset or whole matrices,
    chosen by ``projector``):

        g_s = down(G),   u_s = AdamW's direction for g_s,   E = G − up(g_s),
        W ← W (1 − ηλ) − η_t α up(u_s) − η_f F(E),   η_f = η · ``inactive_lr_scale``,

    with F = sign (``state_free="signsgd"``, default), the identity (``"sgd"``) or nothing
    (``"none"``); for a basis F(E) is projected once more onto the complement, so it stays out
    of the subspace.  The subspace is redrawn every T steps and the moments reset then
    (``on_refresh="reset"``).  FRUGAL has no α: ``scale`` defaults to 1 and multiplies the Adam
    part only.  The paper: ``density=0.25`` with ``projector="blocks"``.
    A group without ``rank`` (or ``density``) is plain AdamW, ``torch.optim.AdamW``
    to the bit.
    Page: docs/methods/frugal.md#update-rule.

    Args:
        state_free: the rule outside the subspace: ``"signsgd"`` (default), ``"sgd"`` or ``"none"``.
        inactive_lr_scale: η_f / η, the state-free learning rate relative to ``lr`` (default 1.0).
        density: instead of ``rank``: FRUGAL's ρ, the fraction of each matrix's projected side
            (a basis), of its coordinates (``columns``, ``rows``, ``entries``) or of the
            group's matrices (``blocks``).
    """

    method_defaults = {
        **ADAM_DEFAULTS,
        "scale": 1.0,
        "on_refresh": "reset",
        "state_free": "signsgd",
        "inactive_lr_scale": 1.0,
    }
    # Sign, complement and the basis's projections act row by row: nothing to reduce.
    shard_safe_hooks = ("state_free_update",)
    method_checks = {
        **ADAM_CHECKS,
        "state_free": V.choice("signsgd", "sgd", "none"),
        "inactive_lr_scale": V.nonneg_float(),
    }

    def _validate_group(self, group: dict, index: int) -> None:
        super()._validate_group(group, index)
        projector = make_projector(group)
        if projector is not None and not projector.orthonormal:
            raise ValueError(
                f"{type(self).__name__}: projector={group['projector']!r} with projector_args="
                f"{group.get('projector_args')!r} in param group {index} is not an orthogonal projection (e.g. "
                "distribution='gaussian'), so G would not split into subspace + complement; use an orthonormal one"
            )

    def state_free_update(self, step: ParamStep):
        rule, projector, pstate = step.group["state_free"], step.projector, step.state["projector"]
        if rule == "none":
            return None
        residual = projector.residual(step.grad, step.low, pstate)  # E = G - up(down(G))
        if residual is None:
            return None
        free = residual.sign() if rule == "signsgd" else residual  # residual may be G itself
        if not projector.exact_split:
            # sign(E) leaks into the subspace of a basis: project it back out.
            free = free - projector.project_back(projector.project(free, pstate), pstate)
        return free * (step.group["lr"] * step.group["inactive_lr_scale"])
