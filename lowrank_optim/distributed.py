r"""Data-parallel and sharded training: what the template step needs to know about DTensors.

**DDP** needs nothing from here.  Every rank sees the same all-reduced gradient, so every
rank computes the same basis; randomized projectors draw from a generator seeded by the
parameter's position and refresh count (:meth:`Projector.generator`), which is the same on
every rank.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) hands the optimizer DTensor parameters
and gradients, each rank holding a block of rows (``Shard(0)``; the last blocks are shorter
or empty when the rows do not divide evenly).  For such a parameter W (m x n) with the
local block :math:`W_k` (:math:`m_k` x n):

* the projection runs along the dimension that is *not* sharded: a right basis Q (r x n)
  for ``Shard(0)``, so :math:`R_k = G_k Q^\top` (:math:`m_k` x r) are exactly this rank's
  rows of R = G Qᵀ, the Adam moments are sharded by rows like W, and ``project`` and
  ``project_back`` need no communication.  ``proj_type="std"``/``"reverse_std"`` choose
  that side (:func:`init_projector_state`); a projection that mixes the sharded rows
  (``left``, ``full``, the ``rows`` and ``entries`` coordinate projectors) is refused;
* a refresh gathers the full gradient on one *owner* rank (the parameter's position modulo
  the world size, so the SVDs are spread over the ranks), which runs the ordinary
  ``projector.refresh``, and broadcasts the new projector state (Q: r x n) to the others
  (:func:`refresh`).  That moves (W-1)/W · m n numbers to one rank instead of
  (W-1) · m n for an all-gather, and one SVD instead of W; the owner holds one full
  gradient at a time, only during its refresh.  Projectors whose refresh reads no gradient
  (``refresh_reads_gradient = False``: the coordinate and block projectors) refresh on
  every rank from their seed with no communication at all;
* reductions over the whole matrix (Fira's ``scaling="matrix"`` and its norm-growth
  limiter) sum the local partial sums across the ranks (:func:`global_norm`);
* the step itself runs on the local tensors (:func:`local_step`); on the way out, state
  tensors shaped like the local rows (the moments) are wrapped back into DTensors with the
  parameter's mesh and placements, so ``torch.distributed.checkpoint`` saves them sharded
  and can reload them at another world size.  The projector state (basis, indices, seed
  and counters) is the same on every rank and stays a plain tensor.

A method whose hooks have not been checked for reductions across rows refuses DTensor
parameters (:func:`check_method`): a method lists the hooks it has audited in
``shard_safe_hooks``.  Layer-wise mode (:mod:`lowrank_optim.optim.layerwise`) steps a
sharded parameter from the hook FSDP2 runs after its reduce-scatter, through the same
:func:`local_step` and :func:`refresh`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist

from .projectors.base import LEFT, RIGHT, Projector, RefreshFailed

try:  # torch >= 2.4 has the public module
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: nothing is ever sharded
    DTensor = Shard = None


class ShardLayout(NamedTuple):
    """How a DTensor parameter is split: rows (``dim`` 0) or columns (``dim`` 1) over one
    mesh dimension; any other mesh dimensions replicate it (HSDP)."""

    mesh: object  # DeviceMesh
    placements: tuple
    dim: int  # the tensor dimension that is split
    mesh_dim: int  # the mesh dimension it is split over
    global_shape: torch.Size

    @property
    def group(self):
        return self.mesh.get_group(self.mesh_dim)

    @property
    def world_size(self) -> int:
        return self.mesh.size(self.mesh_dim)

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank(self.mesh_dim)

    def local_sizes(self) -> list[int]:
        """Every rank's length along ``dim``, as ``Shard`` splits it (``torch.chunk``:
        blocks of ceil(m / W), the tail shorter or empty)."""
        length, world = self.global_shape[self.dim], self.world_size
        block = -(-length // world)
        return [max(0, min(block, length - block * k)) for k in range(world)]

    def unsharded_side(self) -> int:
        """The basis side that leaves ``dim`` at full length: right (Q) for split rows
        (a projected parameter is 2-D, so ``dim`` is 0 or 1)."""
        return RIGHT if self.dim == 0 else LEFT


class LocalStep(NamedTuple):
    """What one parameter's step works on: this rank's blocks and how they were split."""

    param: torch.Tensor
    grad: torch.Tensor
    layout: ShardLayout | None  # None: a plain tensor (one process, DDP)


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def shard_layout(p: torch.Tensor) -> ShardLayout | None:
    """The layout of a sharded DTensor parameter, None for anything else (a plain tensor,
    a fully replicated DTensor)."""
    if not is_dtensor(p):
        return None
    shards = [(i, pl) for i, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if not shards:
        return None
    if len(shards) > 1:
        raise ValueError(
            f"lowrank_optim: parameter of shape {tuple(p.shape)} has placements {tuple(p.placements)}: a "
            "parameter split along more than one dimension is not supported (FSDP2 splits one: Shard(0), "
            "possibly with replication over another mesh dimension: HSDP)"
        )
    mesh_dim, placement = shards[0]
    return ShardLayout(p.device_mesh, tuple(p.placements), placement.dim, mesh_dim, p.shape)


def _local(t):
    return t.to_local() if is_dtensor(t) else t


@contextlib.contextmanager
def local_step(p: torch.Tensor, grad: torch.Tensor, state: dict) -> Iterator[LocalStep]:
    """Run one parameter's step on local tensors.

    Inside, ``state`` holds this rank's blocks (in-place updates of a DTensor's local
    tensor update the DTensor); on exit, tensors shaped like the local rows are wrapped
    back as DTensors (:func:`_wrap_state`).  For a plain parameter this does nothing.
    """
    layout = shard_layout(p)
    if layout is None:  # a plain tensor, or a replicated DTensor whose local tensor is whole
        yield LocalStep(_local(p), _local(grad), None)
        return
    for key, value in state.items():
        state[key] = _local(value)
    if isinstance(state.get("projector"), dict):
        pstate = state["projector"]
        for key, value in pstate.items():
            pstate[key] = _local(value)  # replicated: the local tensor is the whole one
    local_param = p.to_local()
    try:
        yield LocalStep(local_param, _local(grad), layout)
    finally:
        _wrap_state(state, local_param, layout)


def _wrap_state(state: dict, local_param: torch.Tensor, layout: ShardLayout) -> None:
    """DTensors for the state tensors split like the parameter: as many dimensions, and this
    rank's length along the split one (the moments: m_k x r for R = G_k Qᵀ, m_k for a
    dense vector).  Their global length is the parameter's; the rest stays plain."""
    d, local_len = layout.dim, local_param.shape[layout.dim]
    for key, value in state.items():
        if (
            isinstance(value, torch.Tensor)
            and not is_dtensor(value)
            and value.dim() == local_param.dim()
            and value.shape[d] == local_len
        ):
            shape = list(value.shape)
            shape[d] = layout.global_shape[d]
            stride = torch.empty(shape, device="meta").stride()  # contiguous, as DTensor's shards
            state[key] = DTensor.from_local(
                value, layout.mesh, layout.placements, run_check=False, shape=torch.Size(shape), stride=stride
            )


# ----------------------------------------------------------------------------- checks
#: The template's hooks (see :class:`~lowrank_optim.optim.hooks.MethodHooks`).
HOOKS = (
    "gradient", "prepare_gradient", "open_weight", "close_weight", "after_refresh", "transform_low_rank_grad",
    "full_rank_direction", "factored_update", "materializes_direction", "state_free_update",
)


def check_method(optimizer: torch.optim.Optimizer, layout: ShardLayout | None) -> None:
    """Refuse a sharded parameter when a hook of the method has not been audited for it.

    A hook that reduces over the sharded dimension (a norm of the whole matrix, a mean over
    rows, a Gram matrix of a flattened gradient) would silently use only this rank's rows;
    so every hook must be listed in ``shard_safe_hooks`` of the class that defines it
    (:class:`~lowrank_optim.optim.hooks.MethodHooks` lists its own: they are element-wise).
    """
    if layout is None:
        return
    cls = type(optimizer)
    unaudited = []
    for name in HOOKS:
        owner = next(k for k in cls.__mro__ if name in vars(k))
        if name not in vars(owner).get("shard_safe_hooks", ()):  # the class's own list, not inherited
            unaudited.append(f"{owner.__name__}.{name}")
    if not cls.moment_rule.shard_safe:  # e.g. 8-bit blocks or Adafactor's row/column means
        unaudited.append(f"the {type(cls.moment_rule).__name__} moment rule")
    if unaudited:
        raise ValueError(
            f"{cls.__name__}: sharded (FSDP2/DTensor) parameters with placements {layout.placements} are not "
            f"supported: {', '.join(unaudited)} may reduce over the sharded dimension and has not been made "
            "shard-aware; use DDP, or one of GaLoreAdamW, DCTAdamW, FiraAdamW, FrugalAdamW (docs/distributed.md)"
        )


# ----------------------------------------------------------------------------- projector
def init_projector_state(
    owner: str, projector: Projector, shape: torch.Size, seed: int, slot: tuple[int, int], layout: ShardLayout | None
) -> dict:
    """The projector's fresh state for a parameter of (global) ``shape``.

    Under sharding ``std`` and ``reverse_std`` take the side that keeps the split dimension
    whole; an explicit side that would mix the split rows is refused here, at the first
    step, where the placement is first known.
    """
    pstate = projector.init_state(shape, seed, slot)
    if layout is None or projector.stored_side(pstate) is None:  # blocks: whole matrices, nothing to choose
        return pstate
    keep = layout.unsharded_side()
    if projector.side is None and projector.proj_type in ("std", "reverse_std"):
        projector.use_side(pstate, keep, shape)
    if projector.stored_side(pstate) != keep:
        what = f"proj_type={projector.proj_type!r}" if projector.side is None else f"projector={projector.name!r}"
        fix = (
            f"proj_type='std' or {'right' if keep == RIGHT else 'left'!r}" if projector.side is None
            else f"the {'columns' if keep == RIGHT else 'rows'!r} projector"
        )
        raise ValueError(
            f"{owner}: {what} projects the parameter of shape {tuple(shape)} across its sharded dimension "
            f"{layout.dim} (placements {layout.placements}), which would need the other ranks' blocks at every "
            f"step; use {fix}, which keeps that dimension whole (docs/distributed.md)"
        )
    return pstate


def refresh(projector: Projector, grad: torch.Tensor, pstate: dict, layout: ShardLayout | None) -> None:
    """``projector.refresh(grad, pstate)`` for the whole matrix, from this rank's block.

    Sharded and the refresh reads the gradient: the owner rank gathers the blocks (a gather
    to one rank, not an all-gather), updates, and broadcasts the new state; a failure
    (:class:`RefreshFailed`) is broadcast too and raised on every rank, so all keep the
    old basis together.
    """
    if layout is None:
        projector.refresh(grad, pstate)
        return
    if not projector.refresh_reads_gradient:
        # Seeded: every rank computes the same state, but each sees only its rows of the
        # gradient, so they agree first on whether any block is non-finite (one
        # collective per refresh): all ranks skip the step together or none does.
        nonfinite = (~torch.isfinite(grad)).any().to(torch.int32).reshape(1)
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX, group=layout.group)
        if bool(nonfinite):
            raise RefreshFailed("the gradient has non-finite entries", nonfinite_gradient=True)
        projector.refresh(grad, pstate)
        return
    group = layout.group
    owner = projector.seed_of(pstate) % layout.world_size  # seeds follow positions: round robin
    src = dist.get_global_rank(group, owner)
    full = _gather_to(owner, grad, layout)
    message: list = [None]
    if layout.rank == owner:
        try:
            projector.refresh(full, pstate)
            message = [{k: _spec(v) for k, v in pstate.items()}]
        except RefreshFailed as err:
            message = [("failed", str(err), err.nonfinite_gradient)]
    # The new entries' metadata (and the integers themselves) first, so the other ranks
    # can allocate; then one broadcast per tensor.
    dist.broadcast_object_list(message, src=src, group=group)
    if isinstance(message[0], tuple):
        _, reason, nonfinite = message[0]
        raise RefreshFailed(reason, nonfinite_gradient=nonfinite)
    for key, spec in message[0].items():
        if not isinstance(spec, _TensorSpec):
            pstate[key] = spec
            continue
        if layout.rank == owner:
            dist.broadcast(pstate[key].contiguous(), src=src, group=group)
            continue
        received = torch.empty(spec.shape, dtype=spec.dtype, device=grad.device)
        dist.broadcast(received, src=src, group=group)
        # The owner's memory layout too (an SVD factor is column-major): products with the
        # basis then round the same way on every rank.
        pstate[key] = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device=grad.device).copy_(received)


class _TensorSpec(NamedTuple):
    shape: tuple
    stride: tuple
    dtype: torch.dtype


def _spec(value):
    if isinstance(value, torch.Tensor):
        return _TensorSpec(tuple(value.shape), value.stride(), value.dtype)
    return value


def _gather_to(owner: int, block: torch.Tensor, layout: ShardLayout) -> torch.Tensor | None:
    """The full matrix on rank ``owner`` (None elsewhere): each rank sends its block, padded
    to the longest block's length (gather needs equal sizes), and the owner trims."""
    sizes, d = layout.local_sizes(), layout.dim
    longest = max(sizes)
    padded = block
    if block.shape[d] < longest:
        pad = list(block.shape)
        pad[d] = longest - block.shape[d]
        padded = torch.cat([block, block.new_zeros(pad)], dim=d)
    padded = padded.contiguous()
    received = [torch.empty_like(padded) for _ in sizes] if layout.rank == owner else None
    dist.gather(padded, received, dst=dist.get_global_rank(layout.group, owner), group=layout.group)
    if received is None:
        return None
    return torch.cat([piece.narrow(d, 0, size) for piece, size in zip(received, sizes)], dim=d)


# ----------------------------------------------------------------------------- reductions
def all_reduce_sum(t: torch.Tensor, layout: ShardLayout | None) -> torch.Tensor:
    """Sum of ``t`` over the ranks that hold the other blocks (in place); a no-op unsharded."""
    if layout is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=layout.group)
    return t


def global_norm(x: torch.Tensor, layout: ShardLayout | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """‖X‖_F of the whole matrix whose block on this rank is ``x`` (0-dim).

    Unsharded it is ``vector_norm`` itself (bit for bit as before); sharded, the squares
    are summed locally, all-reduced and rooted, which agrees to rounding.
    """
    if layout is None:
        return torch.linalg.vector_norm(x, dtype=dtype)
    squares = x.to(dtype or x.dtype).square().sum()
    return all_reduce_sum(squares, layout).sqrt()


__all__ = [
    "LocalStep", "ShardLayout", "all_reduce_sum", "check_method", "global_norm",
    "init_projector_state", "local_step", "refresh", "shard_layout",
]
