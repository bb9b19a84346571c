"""The extension points of the template step: what a method overrides, and what it declares.

:class:`~lowrank_optim.optim.base.LowRankOptimizer` runs the step
(docs/guide.md#the-step-engine-for-contributors); a method subclasses it and overrides the
hooks below (all identity by default, which is GaLore), sets the class declarations, and
says how many bytes its own state costs.  The hooks are for projected groups: a dense group
is the moment rule alone.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from .. import distributed
from ..projectors import Projector


class ParamStep(NamedTuple):
    """What the projection hooks see of the projected parameter being stepped."""

    param: torch.Tensor
    grad: torch.Tensor  # G, the full-size gradient (after prepare_gradient)
    low: torch.Tensor  # R, the projected (and transformed) gradient
    low_direction: torch.Tensor  # N, the moment rule's direction in the low-rank space
    state: dict
    group: dict
    projector: Projector
    #: How the parameter is sharded (None: whole); the tensors above are this rank's
    #: blocks, so a hook reducing over the whole matrix uses ``lowrank_optim.distributed``.
    layout: distributed.ShardLayout | None = None


def low_rank_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of R and of its statistics for a projected parameter of ``param_dtype``: its
    own, except fp16, whose squares underflow and whose eps=1e-8 rounds to 0, so an fp16 R
    runs its rule in fp32 (bf16 has fp32's range and stays).  One rule for the step, the
    checkpoint loader and the memory estimator."""
    return torch.float32 if param_dtype == torch.float16 else param_dtype


#: The hooks of a projected step; a class that keeps them all at the template's default
#: steps its projected groups in bulk (:meth:`~lowrank_optim.optim.bulk.BulkStepMixin._step_many`).
PROJECTION_HOOKS = (
    "gradient", "prepare_gradient", "transform_low_rank_grad", "full_rank_direction", "factored_update",
    "materializes_direction", "state_free_update", "open_weight", "close_weight",
)


class MethodHooks:
    """The hooks of a projected step and the class-level declarations of a method."""

    #: Hooks *defined in this class* that are correct on one rank's rows of a sharded
    #: (FSDP2) parameter; reductions over the whole matrix go through
    #: ``lowrank_optim.distributed``.  Read from each class's own namespace: a method that
    #: overrides a hook without listing it refuses sharded parameters.  The defaults here
    #: (identity hooks) are element-wise.
    shard_safe_hooks: ClassVar[tuple[str, ...]] = distributed.HOOKS

    #: Whether the update uses back(N) at all: APOLLO's scales the raw gradient instead, so
    #: its :meth:`factored_update` returns no N' and :meth:`full_rank_direction` gets None.
    projects_back: ClassVar[bool] = True

    #: Whether the class updates :class:`~lowrank_optim.quant.Int8Linear` weights (uint8
    #: codes with a float gradient beside them); the others refuse them at construction.
    steps_int8_weights: ClassVar[bool] = False

    def gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """Hook: where the gradient of ``p`` is (``p.grad``; an INT8-weight Linear keeps a
        float gradient beside its integer weight)."""
        return p.grad

    def prepare_gradient(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Hook: map the full gradient before projection (e.g. to a reparametrisation's)."""
        return grad

    def open_weight(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Hook: the float tensor the update is applied to (default: ``p`` itself)."""
        return p

    def close_weight(self, p: torch.Tensor, weight: torch.Tensor, state: dict, group: dict) -> None:
        """Hook: write an updated ``open_weight`` tensor back into ``p`` (default: nothing
        to do, the update was in place)."""

    def after_refresh(self, state: dict, group: dict, projector: Projector, old: dict, like: torch.Tensor) -> None:
        """Hook: the basis of a parameter has just changed from ``old`` (its previous
        projector state) to ``state["projector"]``; the moments were already handled per
        ``on_refresh``.  For state a method keeps besides its moments (e.g. a history of
        projected gradients)."""

    def transform_low_rank_grad(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Hook: precondition the (low-rank) gradient before the moment rule."""
        return low

    def full_rank_direction(self, direction: torch.Tensor, step: ParamStep) -> torch.Tensor:
        """Hook: adjust the full-size direction (``scale * project_back(N)``) of a projected
        parameter; the template then subtracts ``step_size * direction``."""
        return direction

    def factored_update(self, step: ParamStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hook: the projected parameter's update D in factored form (N', c), with
        D = scale (back(N') + c ⊙ G) and c broadcastable to G (None: no G term; N' None: no
        back-projection, for a class whose ``projects_back`` is False); the template
        then applies it without forming D: one product into the weight (``add_back``) and
        one fused ``addcmul_``.  Default: (N, None), GaLore's D = scale back(N)."""
        return step.low_direction, None

    def materializes_direction(self, group: dict, projector: Projector) -> bool:
        """Hook: whether ``group``'s update is formed at full size and handed to
        :meth:`full_rank_direction` (True for a method that overrides it, e.g.
        GradNormLoRP's row signs) instead of :meth:`factored_update`."""
        return type(self).full_rank_direction is not MethodHooks.full_rank_direction

    def state_free_update(self, step: ParamStep) -> torch.Tensor | None:
        """Hook: an extra increment for a projected parameter, learning rate included,
        subtracted after the main update (e.g. FRUGAL's signSGD on the complement)."""
        return None

    @classmethod
    def _template_projection(cls) -> bool:
        """Whether the class keeps every hook of a projected step at the template's
        default (GaLore, DCT, 8-bit GaLore, Adafactor): its projected groups can step all
        their parameters together, and project back straight into the weight."""
        cached = cls.__dict__.get("_template_projection_cached")
        if cached is None:
            cached = all(getattr(cls, h) is getattr(MethodHooks, h) for h in PROJECTION_HOOKS)
            cls._template_projection_cached = cached
        return cached

    # ------------------------------------------------------------------ memory
    @classmethod
    def param_state_bytes(
        cls, shape: tuple[int, ...], width: int, group: dict, projector: Projector | None = None, group_size: int = 1
    ) -> float:
        """Bytes ``optimizer.state[p]`` keeps for a parameter of ``shape`` whose statistics have
        ``width``-byte elements (a projected parameter's: those of :func:`low_rank_dtype`) in
        ``group``, the projector's own tensors aside (``projector.state_bytes``):
        the moment rule's statistics of G (dense group) or of R, plus the method's own
        (:meth:`method_state_bytes`).  ``group_size``: the group's projected matrices (FRUGAL's
        blocks keep moments for a share of them only, so a matrix costs that share on average).

        Declared here, next to the state it describes, so that the memory estimator
        (:mod:`lowrank_optim.memory`) only adds up; tests/test_memory.py checks the sums
        against the state of real runs."""
        shape = tuple(shape)
        if projector is None:
            return cls.moment_rule.state_bytes(shape, width, group)
        low = projector.estimated_low_shape(shape)
        moments = cls.moment_rule.state_bytes(low, width, group)
        fraction = projector.active_fraction(group_size)
        if fraction != 1:
            moments = fraction * moments
        return moments + cls.method_state_bytes(shape, low, width, group)

    @classmethod
    def method_state_bytes(cls, shape: tuple[int, ...], low_shape: tuple[int, ...], width: int, group: dict) -> int:
        """Bytes of what the method keeps for a projected parameter of ``shape`` (R of
        ``low_shape``) besides the rule's moments and the projector's state: none here."""
        return 0
