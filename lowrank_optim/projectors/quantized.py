r"""INT4 projector with lazy, layer-adaptive refresh: Q-GaLore's basis (docs/methods/qgalore.md).

Wraps a dense projector (``inner``: ``svd`` or ``rsvd``).  At a refresh the inner projector
computes the basis in fp32; only its INT4 quantization is kept (packed codes, two per
byte, plus a per-group fp32 scale and uint8 zero point, see
:mod:`lowrank_optim.kernels.reference`) and every :meth:`project`/:meth:`project_back`
multiplies by it straight from the codes through ``torch.ops.lowrank_optim.int4_project`` /
``int4_project_back`` (fp32 accumulation; the CUDA kernel dequantizes tile by tile, so not
even a transient dense basis is written).  No dense basis is stored: about 0.52 bytes per
basis element against the reference's 1.03.  :meth:`bases` still dequantizes, for what
needs the dense matrices (moment transitions, the refresh similarity).

Lazy refresh, per layer.  With :math:`v_k` the leading singular vector at refresh k (the
first column of P, or the first row of Q),

.. math::
    c_k = |\cos(v_{k-1}, v_k)|,\qquad
    \text{if the last } K \text{ values } c \text{ are all known and }
    \tfrac1K\sum c \ge \tau:\ T \leftarrow \lfloor\gamma T\rfloor,\ \text{queue cleared}.

Defaults K = ``queue_size`` = 5, τ = ``cos_threshold`` = 0.4, γ = ``gamma`` = 2; T starts
at the group's ``update_proj_gap`` and lives in the parameter's state (``gap``), so each
layer keeps its own schedule and a resumed run keeps it too.  Two deliberate departures
from the reference (``q_galore_torch``):

* |cos|: singular vectors are defined only up to sign; the reference's signed cosine
  reads a flipped but identical vector as -1 (a total change).
* The queue is cleared after a doubling: the reference keeps it, so once its mean crosses
  τ the gap doubles at *every* later refresh (T, 2T, 4T, ... after a single stable
  stretch).  Clearing means each doubling needs K fresh similar refreshes.

:math:`v_{k-1}` is recovered from the stored INT4 basis (dequantized once per refresh),
not stored: no extra state.  INT4 error moves |cos| of a unit vector by ~1e-2, far below
what τ = 0.4 resolves.  The queue is a K-vector ``similarities`` plus a count ``queued``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import _validate as V
from ..kernels.int4 import Int4Basis
from ..quant.int4 import quantize_int4
from .base import REGISTRY, Projector, register_projector

#: Inner projectors that compute a dense fp32 basis (what there is to quantize).
DENSE_INNER = ("svd", "rsvd")


@register_projector
class QuantizedProjector(Projector):
    """INT4-stored basis of an inner dense projector, refreshed lazily per layer.

    Options (``projector_args``): ``inner`` (``"svd"`` | ``"rsvd"``), ``inner_args`` (the
    inner projector's own options, e.g. ``{"oversample": 8}``), ``group_size`` (256),
    ``lazy`` (True), ``queue_size`` K (5), ``cos_threshold`` τ (0.4), ``gamma`` γ (2).
    """

    name = "int4"
    # project_back multiplies straight from the packed codes (a fused op): keep it, rather
    # than dequantizing a dense basis for add_back's product.
    dense_bases = False
    orthonormal = False  # INT4 rounding: the stored basis is only nearly orthonormal
    option_defaults = {
        "inner": "rsvd",
        "inner_args": None,
        "group_size": 256,
        "lazy": True,
        "queue_size": 5,
        "cos_threshold": 0.4,
        "gamma": 2.0,
    }
    # The inner default was "svd" until the randomized SVD became the package's default
    # (docs/benchmarks.md); both keep orthonormal singular vectors, so a checkpoint of one
    # resumes under the other.
    former_defaults = {"inner": "svd"}
    interchangeable_options = ("inner",)
    option_checks = {
        "inner": V.choice(*DENSE_INNER),
        "inner_args": V.Check(lambda d: isinstance(d, dict), "a dict of the inner projector's options", optional=True),
        "group_size": V.int_at_least(1),
        "lazy": V.boolean(),
        "queue_size": V.int_at_least(1),
        "cos_threshold": V.Check(lambda x: V.real()(x) and 0 <= x <= 1, "a number in [0, 1]"),
        "gamma": V.Check(lambda x: V.real()(x) and x >= 1, "a finite number >= 1"),
    }

    def __init__(self, rank, proj_type="std", update_proj_gap=200, density=None, *, seed=0, clock=0, **options: Any):
        super().__init__(rank, proj_type, update_proj_gap, density, seed=seed, clock=clock, **options)
        self.inner_projector = REGISTRY[self.inner](
            rank, proj_type, update_proj_gap, density, seed=seed, clock=clock, **(self.inner_args or {})
        )

    @classmethod
    def validate_options(cls, owner: str, options: Mapping[str, Any] | None, where: str) -> None:
        super().validate_options(owner, options, where)
        options = dict(options or {})
        inner = REGISTRY[options.get("inner", cls.option_defaults["inner"])]
        inner.validate_options(owner, options.get("inner_args"), f"{where} (inner_args of projector 'int4')")
        if "product_dtype" in (options.get("inner_args") or {}):
            # The inner projector only computes the basis; every product runs from the INT4 codes.
            raise ValueError(
                f"{owner}: projector_args inner_args product_dtype={options['inner_args']['product_dtype']!r} in "
                f"{where} has no effect: projector 'int4' multiplies from its INT4 codes, not with the inner basis"
            )

    # ------------------------------------------------------------------ schedule
    def init_state(self, shape: torch.Size, seed: int, group_slot: tuple[int, int] = (0, 1)) -> dict:
        state = super().init_state(shape, seed, group_slot)
        state.update(rows=int(shape[0]), cols=int(shape[1]), gap=self.update_proj_gap, queued=0)
        return state

    def gap(self, pstate: dict) -> int:
        return pstate.get("gap", self.update_proj_gap)

    def next_state(self, grad: torch.Tensor, pstate: dict, bases: dict | None = None) -> dict:
        """Inner basis in fp32 (checked as every projector's), lazy-refresh bookkeeping,
        then INT4 storage."""
        matrix = grad.detach().float()
        dense = self.checked_bases(matrix, pstate, self.inner_projector.compute_bases)
        new: dict[str, Any] = {}
        if self.lazy:
            if pstate["refreshes"] > 0:
                previous = leading_vector(*self.bases(pstate, matrix))
                new.update(self._record_similarity(previous, leading_vector(dense.get("left"), dense.get("right")), pstate))
            elif "similarities" not in pstate:
                new["similarities"] = torch.zeros(self.queue_size, dtype=torch.float32, device=matrix.device)
        for side, basis in dense.items():
            for key, value in quantize_int4(basis, self.group_size).items():
                new[f"{side}_{key}"] = value
        return new

    def _record_similarity(self, previous: torch.Tensor, current: torch.Tensor, pstate: dict) -> dict[str, Any]:
        """Push |cos| into the queue; double the gap (and clear the queue) when it is full
        and its mean reaches the threshold.  One host sync per refresh, none per step."""
        similarity = torch.nn.functional.cosine_similarity(previous, current, dim=0).abs()
        queue = torch.roll(pstate["similarities"], -1)
        queue[-1] = similarity
        queued = min(pstate["queued"] + 1, self.queue_size)
        if queued == self.queue_size and bool(queue.mean() >= self.cos_threshold):
            return {"similarities": torch.zeros_like(queue), "queued": 0, "gap": int(self.gap(pstate) * self.gamma)}
        return {"similarities": queue, "queued": queued}

    # ------------------------------------------------------------------ projection
    def bases(self, pstate: dict, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        left, right = (self.stored_basis(pstate, side) for side in ("left", "right"))
        return (
            left.dequantize(like.dtype) if left is not None else None,
            right.dequantize(like.dtype) if right is not None else None,
        )

    def project(self, grad: torch.Tensor, pstate: dict) -> torch.Tensor:
        """P^T G, G Q^T or P^T G Q^T, straight from the INT4 codes."""
        low = grad
        for side in ("left", "right"):
            basis = self.stored_basis(pstate, side)
            if basis is not None:  # flattened here, at the op boundary
                low = torch.ops.lowrank_optim.int4_project(low, *basis)
        return low

    def project_back(self, low: torch.Tensor, pstate: dict) -> torch.Tensor:
        """P N, N Q or P N Q, straight from the INT4 codes."""
        full = low
        for side in ("left", "right"):
            basis = self.stored_basis(pstate, side)
            if basis is not None:
                full = torch.ops.lowrank_optim.int4_project_back(full, *basis)
        return full

    def stored_basis(self, pstate: dict, side: str) -> Int4Basis | None:
        """The INT4 basis of ``side`` ("left": P, m x r; "right": Q, r x n), or None when
        that side is not stored.  The state keeps its tensors under ``<side>_codes``,
        ``<side>_scales`` and ``<side>_zeros`` (the checkpoint format) and the shape as
        ``rank``, ``rows`` and ``cols``."""
        if f"{side}_codes" not in pstate:
            return None
        rank, rows, cols = pstate["rank"], pstate["rows"], pstate["cols"]
        shape = (rows, rank) if side == "left" else (rank, cols)
        return Int4Basis(
            pstate[f"{side}_codes"], pstate[f"{side}_scales"], pstate[f"{side}_zeros"], *shape, self.group_size, side == "left"
        )

    def state_bytes(self, shape, width: int) -> int:
        """Per stored side of b = rows x cols basis entries: ceil(b / 2) bytes of packed
        codes, a 4-byte scale and a 1-byte zero point per group; plus the fp32 similarity
        queue of the lazy refresh (one per matrix)."""
        pstate = self.init_state(torch.Size(shape), 0)
        (m, n), rank = shape, pstate["rank"]
        want_left, want_right = self.sides(pstate)
        total = 4 * self.queue_size if self.lazy else 0
        for entries in ((m * rank,) if want_left else ()) + ((rank * n,) if want_right else ()):
            total += -(-entries // 2) + 5 * -(-entries // self.group_size)
        return total


def leading_vector(left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """The leading singular vector: P's first column, else Q's first row (fp32)."""
    return (left[:, 0] if left is not None else right[0]).float()
