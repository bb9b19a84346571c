"""Random projector: a seeded Gaussian or orthonormal basis that is never stored."""
from __future__ import annotations

import math

import torch

from .._validate import boolean, choice
from .base import Projector, orthonormal_columns, register_projector, unit_gaussian_scale
from .options import PRODUCT_DTYPE_CHECK


@register_projector
class RandomProjector(Projector):
    """A data-independent basis regenerated from its seed whenever it is used.

    The state holds the seed and the refresh count (two integers), never the m x r
    matrix: the basis is rebuilt on each projection, trading O(m r) random numbers (plus a
    QR for ``orthonormal``) per step for the memory of the basis.

    Options (``projector_args``): ``distribution`` = ``"orthonormal"`` (default: a
    semi-orthogonal basis, like GaLore's singular vectors) or ``"gaussian"`` (entries
    N(0, 1/r), so E[P P^T] = I as in a Johnson-Lindenstrauss sketch); ``stream`` =
    ``"seeded"`` (default: one generator per (parameter seed, refresh)) or ``"apollo"``
    (``apollo_torch``'s seeds and draws, Gaussian only, for ``ApolloAdamW``'s
    ``reference_compat``; its chain of seeds is an int ``draw_seed`` in the state);
    ``keep`` = False (default) or True: draw the basis once per refresh and keep it in the
    state (``left``/``right``, as the SVD projector's), trading the basis's memory for the
    draw at every step (a Gaussian draw is a large share of APOLLO's step; see
    docs/methods/apollo.md).  The bases are the same either way; ``product_dtype`` (the
    dense projectors' option, :data:`~.options.PRODUCT_DTYPE_CHECK`): ``"gradient"`` by default
    here, ``"auto"`` for the ``gaussian`` projector (APOLLO's sketch: bf16 products from rank
    16).  A drawn basis is rounded to the products' dtype, so a bf16 sketch and the
    back-projection use one basis.
    """

    name = "random"
    refresh_reads_gradient = False  # a seeded draw: no communication under FSDP2
    option_defaults = {"distribution": "orthonormal", "stream": "seeded", "keep": False, "product_dtype": "gradient"}
    option_checks = {
        "distribution": choice("orthonormal", "gaussian"), "stream": choice("seeded", "apollo"), "keep": boolean(),
        "product_dtype": PRODUCT_DTYPE_CHECK,
    }
    # The products' precision changes no state (a kept basis is cast where it is used), so
    # a checkpoint resumes under another product_dtype.
    interchangeable_options = ("product_dtype",)

    def __init__(self, rank, proj_type="std", update_proj_gap=200, density=None, *, seed=0, clock=0, **options):
        super().__init__(rank, proj_type, update_proj_gap, density, seed=seed, clock=clock,
                         **self.stream_defaults(options))

    @classmethod
    def stream_defaults(cls, options) -> dict:
        """``options`` with apollo_torch's arithmetic filled in under its stream: the sketch in
        the gradient's dtype (``reference_compat`` reproduces it to the bit) unless asked."""
        options = dict(options or {})
        if options.get("stream") == "apollo":
            options.setdefault("product_dtype", "gradient")
        return options

    @classmethod
    def recorded_options(cls, options):
        return super().recorded_options(cls.stream_defaults(options))

    @classmethod
    def validate_options(cls, owner: str, options, where: str) -> None:
        super().validate_options(owner, options, where)
        options = dict(options or {})
        if options.get("stream") == "apollo" and options.get("distribution", cls.option_defaults["distribution"]) != "gaussian":
            raise ValueError(
                f"{owner}: projector_args stream='apollo' in {where} draws apollo_torch's Gaussian bases: "
                "it needs distribution='gaussian'"
            )

    @property
    def orthonormal(self) -> bool:  # a Gaussian sketch's P P^T is not a projection
        return self.distribution == "orthonormal"

    def init_state(self, shape: torch.Size, seed: int, group_slot: tuple[int, int] = (0, 1)) -> dict:
        pstate = super().init_state(shape, seed, group_slot)
        pstate["shape"] = tuple(shape)
        return pstate

    def next_state(self, grad: torch.Tensor, pstate: dict, bases: dict | None = None) -> dict:
        # Nothing to factorise: a refresh only moves to the next seed.
        new = {}
        if self.stream == "apollo":
            # apollo_torch's seeds: the parameter's 1-based position, then each refresh
            # draws with the successor of the previous seed (see _successor).
            new["draw_seed"] = pstate["seed"] + 1 if pstate["refreshes"] == 0 else _successor(pstate["draw_seed"])
        if self.keep:  # drawn once for the T steps until the next refresh: the draw bases() would make
            after = {**pstate, **new, "refreshes": pstate["refreshes"] + 1}
            # Kept in the products' dtype: a bf16 sketch keeps half the bytes.
            kept = self._draw_bases(after, grad.device, self.product_dtype_for(pstate["rank"], grad.dtype))
            for key, basis in zip(("left", "right"), kept):
                if basis is not None:
                    new[key] = basis
        return new

    def bases(self, pstate: dict, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.keep:
            return super().bases(pstate, like)
        return self._draw_bases(pstate, like.device, like.dtype)

    def _draw_bases(self, pstate: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        m, n = pstate["shape"]
        want_left, want_right = self.sides(pstate)
        rank = pstate["rank"]
        # Rounded to the products' dtype first, so that every product with it (a bf16 sketch,
        # a transition in fp32) uses one and the same basis.
        rounded = self.product_dtype_for(rank, dtype)
        if self.stream == "apollo":
            # apollo_torch's draw: fp32 N(0, 1) of the basis's own shape, divided by √r.
            gen = torch.Generator(device=device).manual_seed(pstate["draw_seed"])
            shape = (m, rank) if want_left else (rank, n)
            basis = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)).to(rounded).to(dtype)
            return (basis, None) if want_left else (None, basis)
        gen = self.generator(pstate["seed"], pstate["refreshes"], device)
        left = self._draw(m, rank, gen, device).to(rounded).to(dtype) if want_left else None
        right = self._draw(n, rank, gen, device).t().to(rounded).to(dtype) if want_right else None
        return left, right

    def _draw(self, size: int, rank: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        sample = torch.randn(size, rank, generator=gen, device=device)
        if self.distribution == "orthonormal":
            return orthonormal_columns(sample)
        return sample * unit_gaussian_scale(rank)

    def state_bytes(self, shape, width: int) -> int:
        if self.keep:
            return super().state_bytes(shape, width)  # the kept basis, as the SVD projector's
        return 0  # seeds and counts (Python ints): the basis is redrawn when used, never kept


@register_projector
class GaussianProjector(RandomProjector):
    """:class:`RandomProjector` drawing N(0, 1/r) entries by default: APOLLO's sketch, a
    projector of its own name so that it needs no ``projector_args``."""

    name = "gaussian"
    # APOLLO's sketch only estimates norms: bf16 products at the ranks where they pay.
    option_defaults = {**RandomProjector.option_defaults, "distribution": "gaussian", "product_dtype": "auto"}
    # Until the bf16 sketch, every product ran in the gradient's dtype.
    former_defaults = {"product_dtype": "gradient"}


def _successor(seed: int) -> int:
    """The seed after ``seed`` in apollo_torch's chain: the 15th int64 drawn (from [0, 2^63 − 1))
    by a CPU generator seeded with it.  One small draw per refresh."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])
