"""The projector abstraction shared by every low-rank optimizer.

A :class:`Projector` is a stateless strategy configured from a param group (rank,
``proj_type``, refresh gap and its own options).  Everything it remembers about one
parameter lives in a plain dict of tensors and numbers inside ``optimizer.state[p]``, so
checkpoints load with ``torch.load(weights_only=True)`` and two optimizers never share a
projector object after ``load_state_dict``.

Notation (docs/methods/projectors.md#notation): the gradient G is m x n.  A *left* basis P (m x r, orthonormal
columns) gives R = P^T G (r x n); a *right* basis Q (r x n, orthonormal rows) gives
R = G Q^T (m x r); ``full`` keeps both and gives R = P^T G Q^T (r x r).  The side is decided
once, when the first basis is computed, and stored: it is never re-derived from the shape
of a later tensor (the upstream ``reverse_std`` crash on square matrices comes from that).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .options import ProjectorOptions
from .transition import DenseMap, Transition

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


# The side is stored as bit flags (an int survives load_state_dict; a str does not: torch
# rebuilds iterables element by element).
LEFT, RIGHT = 1, 2
FULL = LEFT | RIGHT
SIDE_CODES = {"left": LEFT, "right": RIGHT, "full": FULL}


def choose_side(proj_type: str, shape: torch.Size) -> int:
    """GaLore's rule: ``std`` keeps the basis of the shorter side (right when m >= n)."""
    m, n = shape
    if proj_type == "std":
        return RIGHT if m >= n else LEFT
    if proj_type == "reverse_std":
        return LEFT if m >= n else RIGHT
    return SIDE_CODES[proj_type]


class RefreshFailed(RuntimeError):
    """The new basis could not be computed; the caller keeps the previous one."""

    def __init__(self, reason: str, nonfinite_gradient: bool = False):
        super().__init__(reason)
        self.nonfinite_gradient = nonfinite_gradient


class Projector(ProjectorOptions):
    """Maps a full gradient to a low-rank one and an update back, per parameter.

    Subclasses implement :meth:`compute_bases` (new bases from a gradient at a refresh)
    and, when they do not store dense bases, :meth:`bases`.  Per-parameter state keys
    used here: ``side`` (bit flags LEFT=1, RIGHT=2), ``rank`` (this matrix's), ``age`` (steps since the last refresh), ``refreshes``
    (how many bases have been computed) and ``seed`` (per parameter, identical on every
    data-parallel rank because it derives from the parameter's position).
    """

    name: ClassVar[str]
    #: The side a projector always uses (coordinate subsets), or None: chosen by ``proj_type``.
    side: ClassVar[int | None] = None
    #: Whether :meth:`refresh` reads the gradient's values.  A refresh that only advances a
    #: seed (``random``, coordinate subsets) is the same on every rank without the
    #: gradient, so a sharded parameter refreshes it with no communication.
    refresh_reads_gradient: ClassVar[bool] = True
    #: Projectors of one family keep the same state (the same keys, shapes and meaning),
    #: so a checkpoint of one resumes under another (the exact and the randomized SVD:
    #: orthonormal singular-vector bases); None: a state of its own.
    state_family: ClassVar[str | None] = None

    def __init__(
        self,
        rank: int | None,
        proj_type: str = "std",
        update_proj_gap: int = 200,
        density: float | None = None,
        *,
        seed: int = 0,
        clock: int = 0,
        **options: Any,
    ):
        self.rank = rank  # a fixed rank, or None to take ``density`` of each matrix
        self.density = density
        self.seed = seed  # the group's seed (per-parameter seeds live in the state)
        self.clock = clock  # optimizer steps the group has taken: a schedule shared by the group
        self.proj_type = proj_type
        self.update_proj_gap = update_proj_gap
        for key, default in self.option_defaults.items():
            setattr(self, key, options.get(key, default))

    def rank_for(self, shape: torch.Size, side: int) -> int:
        """This matrix's rank: the fixed ``rank``, or ``density`` times the projected side's
        length (m for a left basis, n for a right one, min(m, n) for both)."""
        if self.rank is not None:
            return self.rank
        m, n = shape
        length = {LEFT: m, RIGHT: n}.get(side, min(m, n))
        return max(1, round(self.density * length))

    def validate_shape(self, shape: torch.Size) -> str | None:
        """Return why this parameter cannot be projected, or None."""
        if len(shape) != 2:
            return (
                f"a {len(shape)}-D tensor cannot be projected: low-rank projection needs a 2-D "
                "weight (a 1-D tensor such as a bias, a norm or a flattened shard has no rank "
                "structure; reshape higher-order weights or put them in a group without 'rank')"
            )
        rank = self.rank_for(shape, choose_side(self.proj_type, shape))
        if rank > min(shape):
            return f"rank={rank} is larger than the {shape[0]}x{shape[1]} matrix allows (at most {min(shape)})"
        return None

    # ------------------------------------------------------------------ schedule
    def init_state(self, shape: torch.Size, seed: int, group_slot: tuple[int, int] = (0, 1)) -> dict:
        """Fresh per-parameter state.  ``group_slot`` = (index in its group, group size)."""
        side = choose_side(self.proj_type, shape)
        return {"side": side, "rank": self.rank_for(shape, side), "age": 0, "refreshes": 0, "seed": seed}

    def should_refresh(self, pstate: dict) -> bool:
        """Refresh before the first step and then every ``update_proj_gap`` steps.

        Counting the age since the last successful refresh gives GaLore's schedule
        (steps 0, T, 2T, ...) and retries on the next step when a refresh failed.
        """
        return pstate["refreshes"] == 0 or pstate["age"] >= self.gap(pstate)

    def gap(self, pstate: dict) -> int:
        return self.update_proj_gap

    def tick(self, pstate: dict) -> None:
        pstate["age"] += 1

    def refresh(self, grad: torch.Tensor, pstate: dict, bases: dict[str, torch.Tensor] | None = None) -> None:
        """Move ``pstate`` to its next subspace, from ``grad``: the one refresh of every
        projector (a template: :meth:`next_state` is what differs).

        ``bases``: the result of :meth:`compute_bases` for this gradient, already computed
        together with other parameters' by :meth:`compute_bases_many`.

        Raises :class:`RefreshFailed` and leaves ``pstate`` untouched when the gradient is
        not finite or the factorisation fails.  The finiteness check costs one host sync
        per refresh (every T steps), never one per step; it runs for the projectors whose
        refresh does not read the gradient too, so that the step on a non-finite gradient
        is skipped whatever the projector.
        """
        self.require_finite(grad)
        new = self.next_state(grad, pstate, bases)
        pstate.update(new)
        pstate["age"] = 0
        pstate["refreshes"] += 1

    def next_state(self, grad: torch.Tensor, pstate: dict, bases: dict[str, torch.Tensor] | None = None) -> dict:
        """The entries of ``pstate`` a refresh replaces (``refresh`` then updates its
        counters; during this call ``pstate["refreshes"]`` is still the count before it).
        Default: the dense bases of :meth:`compute_bases`, kept in the gradient's dtype, as
        the reference does: the subspace is computed in fp32 but a bf16 model keeps a bf16
        basis (half the memory)."""
        new = bases if bases is not None else self.checked_bases(grad.detach().float(), pstate)
        stored = self.product_dtype_for(pstate["rank"], grad.dtype)  # bf16 products keep a bf16 basis
        return {k: compact(t.to(stored)) if t.is_floating_point() else t for k, t in new.items()}

    def checked_bases(self, matrix: torch.Tensor, pstate: dict, compute=None) -> dict[str, torch.Tensor]:
        """``compute(matrix, pstate)`` (default :meth:`compute_bases`), a failed or
        non-finite factorisation raised as :class:`RefreshFailed`."""
        try:
            new = (compute or self.compute_bases)(matrix, pstate)
        except (torch.linalg.LinAlgError, RuntimeError) as err:  # LAPACK/cuSOLVER failures
            raise RefreshFailed(f"the factorisation failed: {err}") from err
        if not all(bool(torch.isfinite(t).all()) for t in new.values()):
            raise RefreshFailed("the factorisation returned non-finite values")
        return new

    # ------------------------------------------------------------------ accessors
    # What callers outside the projectors may know of a parameter's projector state; the
    # keys themselves (which differ per projector) stay the projectors' business.
    @staticmethod
    def has_basis(pstate: dict) -> bool:
        """Whether a refresh has succeeded yet (a step needs a subspace to project on)."""
        return pstate["refreshes"] > 0

    @staticmethod
    def seed_of(pstate: dict) -> int:
        """The parameter's seed: its position in the optimizer, the same on every rank."""
        return pstate["seed"]

    @staticmethod
    def stored_side(pstate: dict) -> int | None:
        """The side the state projects on (LEFT, RIGHT, BOTH), or None where the projector
        has no side (FRUGAL's blocks: whole matrices)."""
        return pstate.get("side")

    def use_side(self, pstate: dict, side: int, shape: torch.Size) -> None:
        """Project on ``side`` from now on (a fresh state only: e.g. FSDP2 keeping the
        sharded dimension whole), with the rank that side gets."""
        pstate.update(side=side, rank=self.rank_for(shape, side))

    @property
    def param_dtype_keys(self) -> tuple[str, ...]:
        """State keys holding tensors in the gradient's dtype (dense bases): a checkpoint
        loaded into a model of another dtype casts them.  Other float state (INT4 scales,
        similarity queues) keeps its dtype, and so does a basis kept in bf16 for bf16
        products (:meth:`bases` casts it where it is used)."""
        return ("left", "right") if self.product_dtype == "gradient" else ()

    def low_shape(self, pstate: dict, shape: torch.Size) -> tuple[int, ...] | None:
        """The shape of R for a parameter of ``shape`` (None: it varies, e.g. FRUGAL's blocks)."""
        m, n = shape
        rank = pstate["rank"]
        want_left, want_right = self.sides(pstate)
        return (rank if want_left else m, rank if want_right else n)

    def state_mismatch(self, pstate: dict, shape: torch.Size) -> str | None:
        """Why ``pstate`` (e.g. a checkpoint's) cannot be the state of a parameter of
        ``shape``, or None.  Reads the matrix shape a projector stores and its dense bases."""
        m, n = shape
        stored = pstate.get("shape", (pstate["rows"], pstate["cols"]) if "rows" in pstate else None)
        if stored is not None and tuple(stored) != (m, n):
            return f"its projector state is for a {stored[0]}x{stored[1]} matrix"
        left, right = pstate.get("left"), pstate.get("right")
        if left is not None and left.shape[0] != m:
            return f"its left basis has {left.shape[0]} rows, the parameter {m}"
        if right is not None and right.shape[-1] != n:
            return f"its right basis has {right.shape[-1]} columns, the parameter {n}"
        return None

    @staticmethod
    def require_finite(grad: torch.Tensor) -> None:
        """Raise :class:`RefreshFailed` when ``grad`` has a non-finite entry: a refresh on
        it would poison the basis, and the step on it the moments and weights.  One host
        sync per refresh (every T steps), never one per step."""
        if not bool(torch.isfinite(grad).all()):
            raise RefreshFailed("the gradient has non-finite entries", nonfinite_gradient=True)

    def compute_bases(self, matrix: torch.Tensor, pstate: dict) -> dict[str, torch.Tensor]:
        """New bases for fp32 ``matrix``: ``{"left": P}``, ``{"right": Q}`` or both, per side
        (or what stands for them, e.g. integer indices, which are stored as they are).

        Projectors that store dense bases implement this; those that store something else
        (a seed, indices) override :meth:`next_state` and :meth:`bases` instead.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement compute_bases or next_state")

    #: Whether :meth:`compute_bases_many` computes many parameters' bases in one call.
    batches_refresh: ClassVar[bool] = False

    def compute_bases_many(self, grads: list[torch.Tensor], pstates: list[dict]) -> list[dict[str, torch.Tensor]]:
        """:meth:`compute_bases` for several parameters refreshing at the same step, in as
        few calls as the projector can (a model has dozens of matrices of each shape).
        ``grads`` are in their own dtype; the projector converts them to fp32 in chunks,
        so a whole model's gradients never exist twice in fp32.  Projectors that set
        ``batches_refresh`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not batch its refreshes")

    # ------------------------------------------------------------------ projection
    def bases(self, pstate: dict, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P, Q): the left basis (m x r) and right basis (r x n); None for an unused side.
        ``like`` gives the dtype (a stored basis is cast, a no-op unless a checkpoint or the
        product dtype changed it) and, for projectors that build their bases on use, the device."""
        return tuple(None if b is None else b.to(like.dtype) for b in (pstate.get("left"), pstate.get("right")))

    def project(self, grad: torch.Tensor, pstate: dict) -> torch.Tensor:
        operand = grad.to(self.product_dtype_for(pstate["rank"], grad.dtype))
        left, right = self.bases(pstate, operand)
        low = operand
        if left is not None:
            low = left.t() @ low
        if right is not None:
            low = low @ right.t()
        return low.to(grad.dtype)

    def project_back(self, low: torch.Tensor, pstate: dict) -> torch.Tensor:
        operand = low.to(self.product_dtype_for(pstate["rank"], low.dtype))
        left, right = self.bases(pstate, operand)
        full = operand
        if left is not None:
            full = left @ full
        if right is not None:
            full = full @ right
        return full.to(low.dtype)

    #: Whether up(down(·)) is an orthogonal projection (orthonormal bases, coordinate
    #: subsets), so that ‖G - up(down(G))‖² = ‖G‖² - ‖down(G)‖² holds along each kept
    #: channel (Fira's residual norm without forming the residual).
    orthonormal: ClassVar[bool] = True

    @property
    def residual_norm_from_low(self) -> bool:
        """Whether ‖G - up(down(G))‖² = ‖G‖² - ‖down(G)‖² holds to the gradient's precision, so
        that a method may take the residual's norm without forming it: an orthogonal projection
        with products in the gradient's dtype.  bf16 products round R by about 2⁻⁸, and the
        subtraction turns that into a large error when R holds most of G's energy."""
        return self.orthonormal and self.product_dtype == "gradient"

    #: Whether :meth:`bases` gives the dense matrices :meth:`project_back` multiplies by, so
    #: that :meth:`add_back` can multiply straight into the weight.
    dense_bases: ClassVar[bool] = True

    def add_back(self, weight: torch.Tensor, low: torch.Tensor, pstate: dict, alpha: float, beta: float = 1.0) -> None:
        """``weight <- beta * weight + alpha * project_back(low)``, in place and without an
        m x n temporary where the projector allows: one ``addmm_`` with a dense basis (P N,
        N Q; P (N Q) for both sides), a scatter of coordinates for index-based projectors.
        With bf16 products into a wider weight the product is one bf16 m x n temporary,
        added in place (``addmm_`` takes one dtype)."""
        if self.dense_bases:
            operand = low.to(self.product_dtype_for(pstate["rank"], low.dtype))
            left, right = self.bases(pstate, operand)
            if left is not None and right is not None:
                operand, right = operand @ right, None  # r x n: the small product first
            if left is not None or right is not None:
                if operand.dtype == weight.dtype:
                    if left is not None:
                        weight.addmm_(left, operand, beta=beta, alpha=alpha)
                    else:
                        weight.addmm_(operand, right, beta=beta, alpha=alpha)
                    return
                product = left @ operand if left is not None else operand @ right
                if beta != 1.0:
                    weight.mul_(beta)
                weight.add_(product, alpha=alpha)
                return
        if beta != 1.0:
            weight.mul_(beta)
        weight.add_(self.project_back(low, pstate), alpha=alpha)

    def transition(self, old: dict, new: dict, like: torch.Tensor) -> "Transition":
        """How the low-rank coordinates of the ``old`` state map to those of ``new``.

        Dense bases: R_new ~= A R_old B with A = P_new^T P_old (left) and
        B = Q_old Q_new^T (right).  Index-based projectors override this with an
        :class:`IndexMap` (carry surviving coordinates over, start new ones at zero).
        """
        (old_left, old_right), (new_left, new_right) = self.bases(old, like), self.bases(new, like)
        return Transition(
            left=DenseMap(new_left.float().t() @ old_left.float()) if new_left is not None else None,
            right=DenseMap(old_right.float() @ new_right.float().t()) if new_right is not None else None,
        )

    #: True when up(down(x)) keeps some coordinates of x and zeroes the rest (coordinate
    #: subsets): the residual then lies in the complement exactly, and so does any
    #: element-wise function of it (FRUGAL's sign).
    exact_split: ClassVar[bool] = False

    def residual(self, grad: torch.Tensor, low: torch.Tensor, pstate: dict) -> torch.Tensor | None:
        """G - up(down(G)), given ``low`` = down(G); None when it is zero by construction."""
        return grad - self.project_back(low, pstate)

    def keep_transition(self, old: dict, new: dict, like: torch.Tensor) -> "Transition | None":
        """What ``on_refresh="keep"`` does: None carries the moments by position (GaLore's
        reference).  Index-based projectors return their index map instead: carrying by
        position would hand one coordinate's statistics to another."""
        return None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def generator(seed: int, refreshes: int, device: torch.device) -> torch.Generator:
        """A generator that every data-parallel rank seeds identically for this refresh."""
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * 1_000_003 + refreshes * 7_919) % (2**63 - 1))
        return gen

    def sides(self, pstate: dict) -> tuple[bool, bool]:
        """(uses a left basis, uses a right basis)."""
        return bool(pstate["side"] & LEFT), bool(pstate["side"] & RIGHT)

    # ------------------------------------------------------------------ memory
    # What a projector keeps is its own business, so it also says how much that is: the
    # memory estimator (:mod:`lowrank_optim.memory`) sums these, and tests/test_memory.py
    # compares the sums with the state of real runs, byte for byte.
    def state_bytes(self, shape: Sequence[int], width: int) -> int:
        """Bytes of the tensors this projector keeps in the state of a parameter of
        ``shape`` whose gradient has ``width``-byte elements (its integers cost nothing).
        Dense bases: P (m x r) and/or Q (r x n), stored in the gradient's dtype."""
        m, n = shape
        pstate = self.init_state(torch.Size(shape), 0)
        want_left, want_right = self.sides(pstate)
        rank = pstate["rank"]
        if width > 2 and self.product_dtype_for(rank, torch.float32) == torch.bfloat16:
            width = 2  # kept in bf16 for bf16 products
        return ((m * rank if want_left else 0) + (rank * n if want_right else 0)) * width

    def estimated_low_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of R for a parameter of ``shape`` whenever R is not empty (the moment
        rule keeps its statistics at this shape)."""
        size = torch.Size(shape)
        return tuple(self.low_shape(self.init_state(size, 0), size))

    def active_fraction(self, group_size: int) -> float:
        """The share of a group's ``group_size`` projected matrices whose R is not empty
        at a step: all of them here (FRUGAL's blocks keep only some active)."""
        return 1


REGISTRY: dict[str, type[Projector]] = {}


def register_projector(cls: type[Projector]) -> type[Projector]:
    REGISTRY[cls.name] = cls
    return cls


def make_projector(group: Mapping[str, Any]) -> Projector | None:
    """The projector configured by a param group, or None for a dense (full-rank) group."""
    if not is_projected(group):
        return None
    cls = REGISTRY[group["projector"]]
    return cls(
        group["rank"], group["proj_type"], group["update_proj_gap"], group.get("density"),
        seed=group["seed"], clock=group.get(CLOCK, 0), **(group.get("projector_args") or {}),
    )


#: The param-group key counting the optimizer steps a group has taken (saved with the groups).
CLOCK = "steps_taken"


def is_projected(group: Mapping[str, Any]) -> bool:
    """A group is projected when it sets a ``rank`` or a ``density``."""
    return group.get("rank") is not None or group.get("density") is not None


def compact(basis: torch.Tensor) -> torch.Tensor:
    """The basis in storage of its own size, not a view that keeps a whole factor alive.

    A slice of an SVD factor can even be a dense view (the first r columns of a
    column-major U) whose storage is still all of U, so the test is the storage size.
    LAPACK returns column-major factors; keeping that layout (instead of making the copy
    row-major) makes the projections round exactly as ``galore_torch``'s, which keeps a
    view of the full factor (and so all of its memory).
    """
    if basis.untyped_storage().nbytes() == basis.numel() * basis.element_size():
        return basis
    if basis.dim() == 2 and basis.stride(0) == 1 and basis.shape[1] > 1:
        return basis.t().clone(memory_format=torch.contiguous_format).t()
    return basis.clone(memory_format=torch.contiguous_format)


def orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """Q of a reduced QR: an orthonormal basis of the column space (fp32)."""
    return torch.linalg.qr(matrix, mode="reduced").Q


def unit_gaussian_scale(rank: int) -> float:
    """Entries N(0, 1/r) make E[P P^T] the identity (a Johnson-Lindenstrauss sketch)."""
    return 1.0 / math.sqrt(rank)
