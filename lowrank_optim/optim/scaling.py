r"""Norm-ratio scaling and the norm-growth limiter, shared by Fira and APOLLO.

Both methods measure how much the moment rule scaled the low-rank gradient R, per channel
or for the whole matrix,

.. math::
    φ = \frac{\lVert N\rVert}{\lVert R\rVert + 10^{-8}}

(N the rule's direction, norms along the rank dimension of R for a per-channel φ, i.e.
one factor per channel of the side the basis keeps at full length), apply φ to a full-size
matrix S built from the gradient (Fira: the residual G − P R; APOLLO: G itself), and cap
the growth of ‖S‖ from step to step at γ (the norm-growth limiter of Fira, arXiv:2410.01623,
which APOLLO adopts).  The limited norm is kept as the 0-dim tensor
``state["residual_norm"]``; the first step only stores it.  All tensor ops: no host sync.
Norms of a sharded (FSDP2) parameter are reduced over the ranks through
:mod:`lowrank_optim.distributed`.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from .. import distributed
from ..projectors import is_projected
from .hooks import ParamStep

#: γ of the norm-growth limiter, as a hyperparameter check.
NORM_GROWTH_LIMIT = V.Check(
    lambda g: V.real()(g) and g >= 1, "a finite number >= 1, or None to disable the limiter", optional=True
)


def refuse_per_channel_on_two_sides(owner: str, group: dict, index: int, per_channel: str, whole: str) -> None:
    """A per-channel φ needs a side kept at full length, which ``proj_type="full"`` lacks."""
    if is_projected(group) and group["scaling"] == per_channel and group["proj_type"] == "full":
        raise ValueError(
            f"{owner}: scaling={per_channel!r} cannot be combined with proj_type='full' in param group {index}: "
            f"a two-sided projection keeps no side at full length; use scaling={whole!r}"
        )


def norm(
    x: torch.Tensor, dim: int | None = None, layout: distributed.ShardLayout | None = None, reference: bool = False
) -> torch.Tensor:
    """Norms along ``dim`` (kept), or of the whole matrix (over every rank's block when
    sharded).  ``reference``: by ``torch.linalg.vector_norm`` along ``dim``, as the reference
    packages compute them (their bits), instead of :func:`squared_channel_norms`."""
    # Half-precision norms accumulate in fp32: the limiter's 1% threshold is finer than bf16.
    dtype = torch.promote_types(x.dtype, torch.float32)
    if dim is None:
        return distributed.global_norm(x, layout, dtype=dtype)
    if reference or not _by_row_blocks(x, dim):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    return squared_channel_norms(x, dim).sqrt_()


#: Rows per block of :func:`squared_channel_norms` on CPU.
NORM_BLOCK_ROWS = 256


def squared_channel_norms(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ x² along ``dim`` (kept), in fp32 or wider, without a squared copy of ``x``.

    On CPU, ``torch.linalg.vector_norm`` over dim 0 of a row-major matrix is 5-15x slower
    than over dim 1 (1.5 ms against 0.04 ms at 1376 x 512, 31 ms at 2048 x 5461, torch 2.13,
    one thread): there the sums run over blocks of rows instead (0.1 ms and 2 ms), whose
    squares are the only temporary.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if not _by_row_blocks(x, dim):
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype).square()
    total = torch.zeros((1, x.shape[1]), dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], NORM_BLOCK_ROWS):
        total.add_(x[start : start + NORM_BLOCK_ROWS].to(dtype).square().sum(0, keepdim=True))
    return total


def _by_row_blocks(x: torch.Tensor, dim: int) -> bool:
    return dim == 0 and x.dim() == 2 and x.device.type == "cpu"


def norm_ratio(step: ParamStep, per_channel: bool, reference: bool = False) -> tuple[int | None, torch.Tensor]:
    """(the rank dimension of R or None, φ) with φ in the norms' fp32-or-wider dtype;
    ``reference``: the norms as the reference packages compute them (see :func:`norm`)."""
    dim = None
    if per_channel:
        _, right = step.projector.sides(step.state["projector"])
        dim = 1 if right else 0  # the rank dimension: G Q^T is m x r, P^T G is r x n
    low_direction = norm(step.low_direction, dim, step.layout, reference)
    return dim, low_direction / (norm(step.low, dim, step.layout, reference) + 1e-8)


def scaled_norm(
    grad: torch.Tensor, dim: int | None, ratio: torch.Tensor, layout=None, minus: torch.Tensor | None = None
) -> torch.Tensor:
    """‖(G − up(down(G))) φ‖ (``minus`` = R, an orthogonal split) or ‖G φ‖ (``minus`` None),
    from per-channel squared norms, without forming the scaled matrix: along a channel,
    ‖G − P R‖² = ‖G‖² − ‖R‖² (clamped at 0 against rounding, which costs relative precision
    ε‖G‖²/‖S‖² when the residual is a small part of G)."""
    # Squared norms by a reduction (no squared copy of G: that would be the m x n temporary
    # the factored update avoids).
    channel = norm(grad).square() if dim is None else squared_channel_norms(grad, dim)
    if minus is not None:
        channel = channel - (norm(minus).square() if dim is None else squared_channel_norms(minus, dim))
    if dim is None:  # sharded: every rank's rows hold part of the sums
        channel = distributed.all_reduce_sum(channel, layout)
    total = (channel.clamp_(min=0) * ratio.square()).sum()
    if dim is not None:  # per-row channels of a sharded matrix: this rank's rows
        total = distributed.all_reduce_sum(total, layout)
    return total.sqrt()


def limit_factor(norm_now: torch.Tensor, state: dict, gamma: float | None) -> torch.Tensor:
    """c = min(‖S‖, γ ‖S_prev‖) / ‖S‖, the factor that caps the growth of ‖S‖ (1 on the
    first step and without a limiter); stores the limited norm.  A zero S stays zero."""
    if gamma is None:
        return torch.ones_like(norm_now)
    previous = state.get("residual_norm")
    if previous is None:
        state["residual_norm"] = norm_now
        return torch.ones_like(norm_now)
    limited = torch.minimum(norm_now, previous * gamma)
    state["residual_norm"] = limited
    return limited / norm_now.clamp(min=torch.finfo(norm_now.dtype).tiny)


def limiter_state_bytes(group: dict, width: int) -> int:
    """Bytes of the limiter's state: the 0-dim ``residual_norm``, in the norms' fp32-or-wider
    dtype (see :func:`norm`), kept only when the limiter is on."""
    return 0 if group["norm_growth_limit"] is None else max(width, 4)


def limit_growth(s: torch.Tensor, state: dict, gamma: float | None, reference: bool, layout=None) -> torch.Tensor:
    """The limiter applied to a formed ``s``.  ``reference``: the arithmetic of the ``fira``
    and ``apollo_torch`` packages, S / ℓ with ℓ = max(‖S‖ / (‖S_prev‖ + 1e-8), γ) / γ
    (bit for bit); otherwise :func:`limit_factor`'s."""
    if gamma is None:
        return s
    norm_now = norm(s, layout=layout)
    previous = state.get("residual_norm")
    if previous is None:
        state["residual_norm"] = norm_now  # first step: nothing to compare with
        return s
    if reference:
        limiter = (norm_now / (previous + 1e-8) / gamma).clamp(min=1.0)
        state["residual_norm"] = norm_now / limiter
        return s / limiter
    return s * limit_factor(norm_now, state, gamma)
