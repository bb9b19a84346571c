"""Validation of what enters a LowRankOptimizer, in one place: each param group (at
construction, ``add_param_group`` and ``load_state_dict``) and each parameter (its dtype,
its shape for the group's projector, INT8 weights, sharding), including parameters swapped
in behind the optimizer's back.  Every refusal names the class, the group or parameter and
the value."""
from __future__ import annotations

from typing import Any

import torch

from .. import _validate as V
from .. import distributed
from ..projectors import REGISTRY, Projector, is_projected, make_projector
from ..quant.int8_linear import is_int8_weight
from .groups import BOOKKEEPING_KEYS, is_matrix_stack, param_names


class GroupValidationMixin:
    """Checks of groups and parameters (mixed into LowRankOptimizer)."""

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        owner, where = type(self).__name__, f"param group {index}"
        for key, value in group.items():
            if key not in BOOKKEEPING_KEYS:
                group[key] = V.plain(value)
        V.check_known_keys(owner, group, {*self.defaults, *BOOKKEEPING_KEYS}, f"key in {where}")
        V.check_values(owner, group, self.checks(), where)
        if group["rank"] is not None and group["density"] is not None:
            raise ValueError(
                f"{owner}: rank={group['rank']!r} and density={group['density']!r} both set in {where}: give one"
            )
        projector = None
        if is_projected(group):
            REGISTRY[group["projector"]].validate_options(owner, group.get("projector_args"), where)
            group["projector_args"] = REGISTRY[group["projector"]].recorded_options(group.get("projector_args"))
            projector = make_projector(group)
        for name, p in zip(param_names(group), group["params"]):
            reason = self._unsupported(p, projector)
            if reason:
                raise ValueError(f"{owner}: parameter {name} (shape {tuple(p.shape)}) in {where} {reason}")
            # Sharded already (fully_shard before the optimizer, as FSDP2 wants): refuse a
            # method that is not shard-aware now rather than at the first step.
            distributed.check_method(self, distributed.shard_layout(p))

    def _unsupported(self, p: torch.Tensor, projector: Projector | None) -> str | None:
        """Why this optimizer cannot train ``p`` in a group with ``projector``, or None."""
        if is_int8_weight(p):
            if self.steps_int8_weights:
                return None if projector is None else _prefixed("cannot be projected: ", projector.validate_shape(p.shape))
            return (
                f"is an INT8 weight (Int8Linear, {p.dtype} codes): {type(self).__name__} would never update it (its "
                "gradient is not .grad); use QGaLoreAdamW8bit, or keep the layer in floating point"
            )
        if not (p.is_floating_point() or p.is_complex()):
            return f"has dtype {p.dtype}: only floating-point (or complex) parameters can be trained"
        if projector is None:
            return None  # dense: AdamW's arithmetic, complex parameters as real pairs (as torch does)
        if p.is_complex():
            return (
                "cannot be projected: it is complex, and a low-rank basis of a complex gradient is not "
                "implemented; put it in a group without rank (dense groups step complex parameters as torch.optim.AdamW)"
            )
        if is_matrix_stack(p, projector):
            if distributed.is_dtensor(p):
                return (
                    "cannot be projected: a sharded stack of matrices (fused expert weights) is not supported; "
                    "put it in a group without rank"
                )
            # Fused expert weights (E x m x n): each of the E matrices is projected on its own.
            return _prefixed("cannot be projected: each of its matrices: ", projector.validate_shape(p.shape[1:]))
        return _prefixed("cannot be projected: ", projector.validate_shape(p.shape))

    def _current_param_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for group in self.param_groups for p in group["params"])

    def _follow_swapped_params(self) -> None:
        """Catch up with parameters replaced behind the optimizer's back: accelerate's FSDP2
        ``prepare`` swaps each for its sharded version in the param groups
        (``fsdp2_switch_optimizer_parameters``).  The new ones are validated as at
        construction (a method that is not shard-aware refuses them), the caches keyed by
        parameter are dropped, and in layer-wise mode the hooks move to them (until then
        their gradients reach no hook, and this step takes them the regular way)."""
        ids = self._current_param_ids()
        if ids == self._param_ids:
            return
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
        self._param_ids = ids
        self._positions = self._plans = None
        if self.layerwise:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            for group in self.param_groups:
                self._register_layerwise_hooks(group)


def _prefixed(prefix: str, reason: str | None) -> str | None:
    return None if reason is None else prefix + reason
