"""The bulk path of the template step: the parameters of a group stepped together.

The moment rule's ``update_many`` runs one foreach kernel per operation for a whole chunk
of same-device, same-dtype parameters, and the refreshes due at a step are computed in
batches of same-shaped matrices (``rsvd``).  Every dense group takes this path, and the
projected groups of a class that keeps every projection hook at its default; the
arithmetic is the per-parameter path's (:meth:`~lowrank_optim.optim.base.LowRankOptimizer.
_step_param`), through the same prologue and ``_apply_update``.
"""
from __future__ import annotations

import torch

from .. import distributed
from ..projectors import Projector
from ..quant.int8_linear import is_int8_weight
from .groups import is_matrix_stack
from .hooks import MethodHooks

#: Parameter entries per chunk of the bulk path (2^22: 16 MiB of fp32 weights): beyond it a
#: matrix's own kernels are large enough that sharing them gains nothing, and the chunk's
#: temporaries stay a fraction of one large matrix.
BULK_CHUNK_ELEMENTS = 1 << 22


class BulkStepMixin:
    """Stepping many parameters of a group at once (mixed into LowRankOptimizer)."""

    def _partition(self, index: int, params: list, projector: Projector | None) -> tuple[list, list]:
        """(bulk, one by one): group ``index``'s ``params`` split by :meth:`_steps_in_bulk`,
        decided once per parameter in the group's plan (rebuilt with it; see ``_projector``):
        the checks are Python per parameter, a tenth of the step of 96 small matrices."""
        decided = self._plans[index][2]
        bulk, single = [], []
        for p in params:
            key = (id(p), self.foreach)
            in_bulk = decided.get(key)
            if in_bulk is None:
                in_bulk = decided[key] = self._steps_in_bulk(p, projector)
            (bulk if in_bulk else single).append(p)
        return bulk, single

    def _steps_in_bulk(self, p: torch.Tensor, projector: Projector | None) -> bool:
        """Whether ``p`` takes the bulk path (:meth:`_step_many`): a plain tensor (a sharded
        one steps on its rows, per parameter) in a dense group (every method's dense groups
        are its moment rule, hooks unused) or a projected group of a template class; an INT8
        weight keeps its own gradient and storage hooks."""
        if self.foreach is False or distributed.is_dtensor(p) or is_int8_weight(p) or is_matrix_stack(p, projector):
            return False
        return projector is None or self._template_projection()

    def _step_many(self, params: list, group: dict, projector: Projector | None, fresh: dict) -> None:
        """The step of several parameters of one group, the moment rule run once per device
        and dtype (``update_many``: foreach kernels, whose fast multi-tensor form needs one
        of each); the same arithmetic as :meth:`_step_param`."""
        buckets: dict[tuple, list] = {}
        for p in params:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        for bucket in buckets.values():
            # In chunks of at most BULK_CHUNK_ELEMENTS parameter entries: the rule's foreach
            # temporaries (R, the denominators, the directions) live for a whole chunk, so a
            # group of large matrices must not hold them for all at once (a step's peak would
            # grow with the model), while many small matrices still share their kernels.
            chunk, size = [], 0
            for p in bucket:
                if chunk and size + p.numel() > BULK_CHUNK_ELEMENTS:
                    self._step_bucket(chunk, group, projector, fresh)
                    chunk, size = [], 0
                chunk.append(p)
                size += p.numel()
            self._step_bucket(chunk, group, projector, fresh)

    def _step_bucket(self, params: list, group: dict, projector: Projector | None, fresh: dict) -> None:
        stepped, grads, lows, states = [], [], [], []
        for param in params:
            state = self.state[param]
            p, grad = self._as_stepped(param)
            self._init_state(p, state, group, projector, None)
            low = self._low_rank_gradient(p, grad, state, group, projector, None, fresh.get(id(p)))
            if low is None:
                continue
            if state["step"] == 0:  # first step, or the moments were reset at a refresh
                self.moment_rule.init(low, state, group)
            state["step"] += 1
            stepped.append(p)
            grads.append(grad)
            lows.append(low)
            states.append(state)
        if not stepped:  # every one skipped (no usable basis this step)
            return
        updates = self.moment_rule.update_many(lows, states, group, stepped)
        if projector is None and self._decay_then_addcdiv(updates, group):
            # torch.optim.AdamW's foreach arithmetic: decay, then p -= step_size m / denom.
            if group["weight_decay"] != 0:
                torch._foreach_mul_(stepped, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_addcdiv_(stepped, [u.numer for u in updates], [u.denom for u in updates],
                                    [-u.step_size for u in updates])
            return
        for p, grad, low, update, state in zip(stepped, grads, lows, updates, states):
            self._apply_update(p, grad, low, update, state, group, projector)

    @staticmethod
    def _decay_then_addcdiv(updates: list, group: dict) -> bool:
        return not group["decay_after_update"] and all(u.denom is not None and u.decay_lr is None for u in updates)

    def _batched_bases(self, params: list, group: dict, projector: Projector | None) -> dict[int, dict]:
        """New bases of every parameter of ``group`` due for a refresh this step, computed
        together (by id), for projectors that batch (``rsvd``: one op call per chunk of
        same-shaped matrices).

        Only where the refresh reads the raw gradient of a whole matrix: a method that
        maps the gradient first (``prepare_gradient``) or a sharded parameter (its refresh
        gathers, see :mod:`lowrank_optim.distributed`) refreshes on its own in the step.
        A failure here is not an error: those parameters refresh one by one, where a
        failed factorisation is handled per parameter.
        """
        if (
            projector is None
            or not projector.batches_refresh
            or type(self).prepare_gradient is not MethodHooks.prepare_gradient
        ):
            return {}
        due, grads, pstates = [], [], []
        for p in params:
            if distributed.is_dtensor(p) or is_matrix_stack(p, projector):
                continue
            state = self.state[p]
            self._init_state(p, state, group, projector, None)
            if projector.should_refresh(state["projector"]):
                due.append(id(p))
                grads.append(self.gradient(p))
                pstates.append(state["projector"])
        if len(due) < 2:
            return {}
        try:
            return dict(zip(due, projector.compute_bases_many(grads, pstates)))
        except (torch.linalg.LinAlgError, RuntimeError):
            return {}
