"""How a moment follows its subspace when a projector refreshes (``on_refresh="project"``,
and index-based projectors under ``"keep"``): one map per side, dense or by index."""
from __future__ import annotations

import torch


class DenseMap:
    """A linear change of coordinates along one side, applied by a small matmul."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix  # (r_new x r_old) for the left side, (r_old x r_new) for the right

    def apply(self, x: torch.Tensor, dim: int, squared: bool) -> torch.Tensor:
        m = self.matrix.square() if squared else self.matrix
        return m @ x if dim == 0 else x @ m


class IndexMap:
    """Coordinates named by indices: a surviving index keeps its value, a new one starts at 0.

    Matching sorts the old indices and binary-searches the new ones: O(k log k) time and
    O(k) memory (a k x k comparison would be 10^14 booleans for the entries of a
    4096 x 11008 matrix), no matmul, no host sync.  Indices need not be sorted.
    """

    def __init__(self, old: torch.Tensor, new: torch.Tensor):
        self.old, self.new = old, new

    def apply(self, x: torch.Tensor, dim: int, squared: bool) -> torch.Tensor:
        old, new = self.old.to(x.device).long(), self.new.to(x.device).long()
        shape = list(x.shape)
        shape[dim] = len(new)
        if len(old) == 0 or len(new) == 0:
            return x.new_zeros(shape)
        sorted_old, order = old.sort()
        position = torch.searchsorted(sorted_old, new).clamp_(max=len(old) - 1)
        survives = sorted_old[position] == new
        mask = [1] * x.dim()
        mask[dim] = len(new)
        return x.index_select(dim, order[position]) * survives.view(mask).to(x.dtype)


class Transition:
    """Re-expresses a low-rank tensor (a moment) after a refresh, one map per side.

    For a second moment (``squared=True``) a dense map uses its squared entries, which is
    exact when the old coordinates are uncorrelated and keeps the moment non-negative; an
    index map is the same for both moments.
    """

    def __init__(self, left: DenseMap | IndexMap | None = None, right: DenseMap | IndexMap | None = None):
        self.left, self.right = left, right

    def apply(self, x: torch.Tensor, squared: bool = False, left: bool = True, right: bool = True) -> torch.Tensor:
        """``x`` mapped in fp32 and returned in its dtype; ``left``/``right`` pick the sides
        to map (a factored statistic has only one)."""
        y = x.float()
        if left and self.left is not None:
            y = self.left.apply(y, 0, squared)
        if right and self.right is not None:
            y = self.right.apply(y, y.dim() - 1, squared)
        return y.to(x.dtype)
