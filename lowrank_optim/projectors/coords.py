r"""Coordinate and block projectors: FRUGAL's index-based subspaces (Zmushko et al., ICML
2025, arXiv:2411.07837; docs/methods/frugal.md#subspaces-and-what-density-means).

Each selects a subset of the coordinates of a weight W (m x n) instead of a basis, so the
split of the gradient into a projected part and a residual is exact by construction:

================  =========================================  ===================  ============
name              selection (redrawn at every refresh)        low-rank R           state
================  =========================================  ===================  ============
``columns``       k of the n columns                          G[:, idx], m x k     k indices
``rows``          k of the m rows                             G[idx, :], k x n     k indices
``entries``       k of the m n entries                        G.flat[idx], k       k indices
``blocks``        a fraction of the group's whole matrices    G (active) or        a flag
                  (active: R = G; inactive: R is empty)       0 x n (inactive)
================  =========================================  ===================  ============

k = ``rank``, or max(1, int(``density`` * length)) with length n, m or m n.  Back-projection
scatters R into zeros, so up(down(G)) keeps the selected coordinates of G and zeroes the
rest.  The indices of a refresh are a uniformly random k-subset (sorted) drawn from a
generator seeded by the parameter's seed and its refresh count, so every data-parallel rank
draws the same subset; they are stored as int32 when they fit (half of int64's memory:
for ``entries`` there are as many indices as elements in each moment).  Drawing costs
O(length) at a refresh (a permutation of the m n entries for ``entries``), nothing between.

Blocks: in a group of N matrices, K = max(1, round(density * N)) are active (full Adam on
R = G) and the others are inactive (R has zero rows, so their Adam state is empty and the
optimizer's state-free rule does all their updating).  ``projector_args={"order": ...}``
picks the active set of round r (r = optimizer steps // ``update_proj_gap``):

* ``random`` (default): a fresh uniformly random K-subset of the group every round, drawn
  from a generator seeded by the group's seed and r;
* ``ascending``: a window of K consecutive matrices (in the group's order, usually the
  model's layer order) that walks forward K at a time and wraps: slots
  {(r K + j) mod N : j < K}, so round 0 trains the first K matrices;
* ``descending``: the same walk from the end: slots {N - 1 - ((r K + j) mod N)}, so round 0
  trains the last K matrices.

The set depends only on (group seed, r, N): it is the same on every rank and does not
depend on which parameters had a gradient at some step, because r comes from the group's
clock (the optimizer steps the group has taken, kept in the param group).

Moments across a refresh: coordinates are named by their indices, so
:meth:`~CoordinateProjector.transition` is an index map (a coordinate selected before and
after keeps its moments, a new one starts at zero; a block that stays active keeps its
whole moments, one that turns inactive drops them).  Positional carrying (GaLore's
``keep``) would hand one coordinate's statistics to another, and for blocks it does not
even fit the new shape, so ``keep`` uses the index map too (:meth:`Projector.keep_transition`).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .._validate import choice
from .base import FULL, LEFT, RIGHT, Projector, register_projector
from .transition import IndexMap, Transition


def _index_dtype(length: int) -> torch.dtype:
    return torch.int32 if length < 2**31 else torch.int64


class CoordinateProjector(Projector):
    """A random subset of the columns, rows or entries, redrawn at each refresh."""

    #: The dimension the indices select along (None: the flattened matrix).
    dim: ClassVar[int | None]
    side: ClassVar[int]
    refresh_reads_gradient = False  # a seeded draw: no communication under sharding

    def length(self, shape: torch.Size) -> int:
        return shape[0] * shape[1] if self.dim is None else shape[self.dim]

    def rank_for(self, shape: torch.Size, side: int) -> int:
        if self.rank is not None:
            return self.rank
        return max(1, int(self.density * self.length(shape)))

    def validate_shape(self, shape: torch.Size) -> str | None:
        if len(shape) != 2:
            return super().validate_shape(shape)  # the base's message for a non-2-D tensor
        if self.proj_type != "std":
            return f"proj_type={self.proj_type!r} does not apply to the {self.name!r} projector (no side to choose)"
        k, length = self.rank_for(shape, self.side), self.length(shape)
        if k > length:
            return f"rank={k} is larger than the {shape[0]}x{shape[1]} matrix's {length} {self.name} allow"
        return None

    def init_state(self, shape: torch.Size, seed: int, group_slot: tuple[int, int] = (0, 1)) -> dict:
        pstate = super().init_state(shape, seed, group_slot)
        pstate.update(side=self.side, rank=self.rank_for(shape, self.side), shape=tuple(shape))
        return pstate

    def next_state(self, grad: torch.Tensor, pstate: dict, bases: dict | None = None) -> dict:
        # Data-independent: a seeded draw of k indices (the refresh's own number, 1-based,
        # picks the stream, as it always has: checkpoints and ranks agree on it).
        length = self.length(torch.Size(pstate["shape"]))
        gen = self.generator(pstate["seed"], pstate["refreshes"] + 1, grad.device)
        chosen = torch.randperm(length, generator=gen, device=grad.device)[: pstate["rank"]]
        return {"indices": chosen.sort().values.to(_index_dtype(length))}

    def low_shape(self, pstate: dict, shape: torch.Size) -> tuple[int, ...] | None:
        if self.dim is None:
            return (pstate["rank"],)  # entries: R is the flat selection
        return super().low_shape(pstate, shape)

    def _indices(self, pstate: dict, like: torch.Tensor) -> torch.Tensor:
        return pstate["indices"].to(device=like.device, dtype=torch.int64)

    def project(self, grad: torch.Tensor, pstate: dict) -> torch.Tensor:
        idx = self._indices(pstate, grad)
        if self.dim is None:
            return grad.reshape(-1).index_select(0, idx)
        return grad.index_select(self.dim, idx)

    def project_back(self, low: torch.Tensor, pstate: dict) -> torch.Tensor:
        shape, idx = pstate["shape"], self._indices(pstate, low)
        if self.dim is None:
            return low.new_zeros(shape[0] * shape[1]).index_copy_(0, idx, low).view(shape)
        # The other dimension's length from ``low``: a sharded (FSDP2) parameter's rows are
        # this rank's block, shorter than the stored (global) shape.
        full = list(low.shape)
        full[self.dim] = shape[self.dim]
        return low.new_zeros(full).index_copy_(self.dim, idx, low)

    def add_back(self, weight: torch.Tensor, low: torch.Tensor, pstate: dict, alpha: float, beta: float = 1.0) -> None:
        # A scatter-add of the selected coordinates: no m x n zeros to fill and add.
        if beta != 1.0:
            weight.mul_(beta)
        idx = self._indices(pstate, low)
        if self.dim is not None:
            weight.index_add_(self.dim, idx, low, alpha=alpha)
        elif weight.is_contiguous():
            weight.view(-1).index_add_(0, idx, low, alpha=alpha)
        else:
            weight.add_(self.project_back(low, pstate), alpha=alpha)

    exact_split = True

    def residual(self, grad: torch.Tensor, low: torch.Tensor, pstate: dict) -> torch.Tensor | None:
        """G - up(down(G)): the gradient with the selected coordinates zeroed (exactly)."""
        idx = self._indices(pstate, grad)
        if self.dim is None:
            return grad.reshape(-1).index_fill(0, idx, 0).view_as(grad)
        return grad.index_fill(self.dim, idx, 0)

    def keep_transition(self, old: dict, new: dict, like: torch.Tensor) -> Transition:
        return self.transition(old, new, like)  # coordinates are named by their indices

    def transition(self, old: dict, new: dict, like: torch.Tensor) -> Transition:
        index_map = IndexMap(old["indices"], new["indices"])
        # Columns index the last dim of R (m x k); rows and entries its first.
        return Transition(right=index_map) if self.side == RIGHT else Transition(left=index_map)

    def state_bytes(self, shape, width: int) -> int:
        """The k selected indices, in the integer type :meth:`next_state` stores them in."""
        size = torch.Size(shape)
        index_width = torch.empty((), dtype=_index_dtype(self.length(size))).element_size()
        return self.rank_for(size, self.side) * index_width


@register_projector
class ColumnProjector(CoordinateProjector):
    name, dim, side = "columns", 1, RIGHT


@register_projector
class RowProjector(CoordinateProjector):
    name, dim, side = "rows", 0, LEFT


@register_projector
class EntryProjector(CoordinateProjector):
    name, dim, side = "entries", None, FULL


@register_projector
class BlockProjector(Projector):
    """A fraction ``density`` of the group's matrices active (R = G), the rest inactive.

    State: ``active`` (0 or 1), ``round`` (the round it was computed for), ``slot`` and
    ``count`` (position in the group and group size).  An inactive
    matrix's R is G[:0] (0 x n), so its moments hold no elements.
    """

    name = "blocks"
    refresh_reads_gradient = False  # the active set follows the group's seed and clock
    option_defaults = {"order": "random"}
    option_checks = {"order": choice("random", "ascending", "descending")}

    def validate_shape(self, shape: torch.Size) -> str | None:
        if self.rank is not None:
            return (
                f"rank={self.rank!r} does not apply to the 'blocks' projector: give density "
                "(the fraction of the group's matrices that are active)"
            )
        if len(shape) != 2:
            return super().validate_shape(shape)
        if self.proj_type != "std":
            return f"proj_type={self.proj_type!r} does not apply to the 'blocks' projector (whole matrices)"
        return None

    def init_state(self, shape: torch.Size, seed: int, group_slot: tuple[int, int] = (0, 1)) -> dict:
        slot, count = group_slot
        return {
            "age": 0, "refreshes": 0, "round": 0, "active": 0, "slot": slot, "count": count,
            "seed": seed, "shape": tuple(shape),
        }

    def current_round(self) -> int:
        # The group's clock, not the parameter's own count: a matrix that missed a gradient
        # at some step still agrees with the rest of its group.
        return self.clock // self.update_proj_gap

    def should_refresh(self, pstate: dict) -> bool:
        return pstate["refreshes"] == 0 or pstate["round"] != self.current_round()

    def low_shape(self, pstate: dict, shape: torch.Size) -> tuple[int, ...] | None:
        return None  # the whole matrix when active, no rows when not

    def next_state(self, grad: torch.Tensor, pstate: dict, bases: dict | None = None) -> dict:
        r = self.current_round()
        return {"round": r, "active": int(pstate["slot"] in self.active_slots(r, pstate))}

    def active_slots(self, r: int, pstate: dict) -> set[int]:
        """The slots of the group active in round ``r`` (see the module docstring)."""
        count = pstate["count"]
        k = min(count, max(1, round(self.density * count)))
        if self.order == "random":
            gen = self.generator(self.seed, r, torch.device("cpu"))  # the group's seed: one draw per group
            return set(torch.randperm(count, generator=gen)[:k].tolist())
        window = [(r * k + j) % count for j in range(k)]
        return set(window) if self.order == "ascending" else {count - 1 - s for s in window}

    def _rows(self, pstate: dict, like: torch.Tensor) -> torch.Tensor:
        # ``like`` is the gradient: its rows, not the stored shape's, are the ones R holds
        # (fewer on one rank of a sharded parameter).
        return torch.arange(like.shape[0] if pstate["active"] else 0, device=like.device)

    def project(self, grad: torch.Tensor, pstate: dict) -> torch.Tensor:
        return grad if pstate["active"] else grad[:0]

    def project_back(self, low: torch.Tensor, pstate: dict) -> torch.Tensor:
        # A copy even when active: the caller scales the result in place, and ``low`` may
        # be a moment tensor of the rule (Adafactor with beta1 returns its exp_avg).
        return low.clone() if pstate["active"] else low.new_zeros(pstate["shape"])

    def add_back(self, weight: torch.Tensor, low: torch.Tensor, pstate: dict, alpha: float, beta: float = 1.0) -> None:
        if beta != 1.0:
            weight.mul_(beta)
        if pstate["active"]:
            weight.add_(low, alpha=alpha)

    exact_split = True

    def residual(self, grad: torch.Tensor, low: torch.Tensor, pstate: dict) -> torch.Tensor | None:
        """G - up(down(G)): None for an active matrix, G itself for an inactive one."""
        return None if pstate["active"] else grad

    def keep_transition(self, old: dict, new: dict, like: torch.Tensor) -> Transition:
        return self.transition(old, new, like)  # moments by position would not fit the new shape

    def transition(self, old: dict, new: dict, like: torch.Tensor) -> Transition:
        # Rows 0..m-1 when active, none when inactive: active -> active keeps the moments,
        # inactive -> active starts from zeros, active -> inactive drops them.
        return Transition(left=IndexMap(self._rows(old, like), self._rows(new, like)))

    def state_bytes(self, shape, width: int) -> int:
        return 0  # the active flag and the round are integers

    def estimated_low_shape(self, shape) -> tuple[int, ...]:
        return tuple(shape)  # an active matrix's R is G itself

    def active_fraction(self, group_size: int) -> float:
        """K / N: which matrices are active changes per round, how many does not (a
        matrix's expected state is K / N of its full moments)."""
        return min(group_size, max(1, round(self.density * group_size))) / group_size
