"""Random projector: a seeded Gaussian or orthonormal basis that is never stored."""
from __future__ import annotations

import math

import torch

from .._validate import boolean, choice
from .base import Projector, orthonormal_columns, register_projector, unit_gaussian_scale


#: The rank from which ``sketch_dtype="auto"`` sketches an fp32 gradient in bf16.  From
#: there the product is bound by its r multiply-adds per gradient entry, which bf16 units run
#: 2-4x faster, and that pays for the pass that rounds G; below it (APOLLO-Mini's rank 1 is a
#: matrix-vector product, bound by memory) the rounding pass costs more than it saves
#: (measured: docs/methods/projectors.md#sketch-precision).
BF16_SKETCH_MIN_RANK = 16


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
    docs/methods/apollo.md).  The bases are the same either way; ``sketch_dtype`` =
    ``"gradient"`` (default here: the product R = PᵀG in the gradient's dtype),
    ``"bfloat16"`` (an fp32 or fp64 gradient is sketched in bf16: the basis is drawn, kept and
    used rounded to bf16, and R comes back in the gradient's dtype) or ``"auto"`` (bf16 from
    rank :data:`BF16_SKETCH_MIN_RANK`, the gradient's dtype below; the default of the
    ``gaussian`` projector, APOLLO's).  See docs/methods/projectors.md#sketch-precision.
    """

    name = "random"
    refresh_reads_gradient = False  # a seeded draw: no communication under FSDP2
    option_defaults = {"distribution": "orthonormal", "stream": "seeded", "keep": False, "sketch_dtype": "gradient"}
    option_checks = {
        "distribution": choice("orthonormal", "gaussian"), "stream": choice("seeded", "apollo"), "keep": boolean(),
        "sketch_dtype": choice("gradient", "bfloat16", "auto"),
    }
    # The product's precision changes no state (the kept basis is cast where it is used), so
    # a checkpoint resumes under another sketch_dtype.
    interchangeable_options = ("sketch_dtype",)

    def __init__(self, rank, proj_type="std", update_proj_gap=200, density=None, *, seed=0, clock=0, **options):
        super().__init__(rank, proj_type, update_proj_gap, density, seed=seed, clock=clock,
                         **self.stream_defaults(options))

    @classmethod
    def stream_defaults(cls, options) -> dict:
        """``options`` with apollo_torch's arithmetic filled in under its stream: the sketch in
        the gradient's dtype (``reference_compat`` reproduces it to the bit) unless asked."""
        options = dict(options or {})
        if options.get("stream") == "apollo":
            options.setdefault("sketch_dtype", "gradient")
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
            # Kept in the sketch's dtype: a bf16 sketch keeps half the bytes.
            kept = self._draw_bases(after, grad.device, self.sketch_dtype_for(pstate["rank"], grad.dtype))
            for key, basis in zip(("left", "right"), kept):
                if basis is not None:
                    new[key] = basis
        return new

    def bases(self, pstate: dict, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.keep:
            return tuple(None if b is None else b.to(like.dtype) for b in (pstate.get("left"), pstate.get("right")))
        return self._draw_bases(pstate, like.device, like.dtype)

    def project(self, grad: torch.Tensor, pstate: dict) -> torch.Tensor:
        sketch = self.sketch_dtype_for(pstate["rank"], grad.dtype)
        if sketch == grad.dtype:
            return super().project(grad, pstate)
        return super().project(grad.to(sketch), pstate).to(grad.dtype)

    def sketch_dtype_for(self, rank: int, dtype: torch.dtype) -> torch.dtype:
        """The dtype the basis is rounded to and R = PᵀG computed in, for a gradient of
        ``dtype`` at ``rank``: bf16 where ``sketch_dtype`` asks for it and the gradient is
        wider; a bf16 or fp16 gradient is sketched in its own dtype."""
        bf16 = self.sketch_dtype == "bfloat16" or (self.sketch_dtype == "auto" and rank >= BF16_SKETCH_MIN_RANK)
        return torch.bfloat16 if bf16 and dtype in (torch.float32, torch.float64) else dtype

    @property
    def param_dtype_keys(self) -> tuple[str, ...]:
        # A basis kept in the sketch's dtype stays in it when a checkpoint is loaded into a
        # model of another dtype (bases() casts it where it is used).
        return super().param_dtype_keys if self.sketch_dtype == "gradient" else ()

    def _draw_bases(self, pstate: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        m, n = pstate["shape"]
        want_left, want_right = self.sides(pstate)
        rank = pstate["rank"]
        # Rounded to the sketch's dtype first, so that the projection and any back-projection
        # (GaLore's, in the gradient's dtype) use one and the same basis.
        sketch = self.sketch_dtype_for(rank, dtype)
        if self.stream == "apollo":
            # apollo_torch's draw: fp32 N(0, 1) of the basis's own shape, divided by √r.
            gen = torch.Generator(device=device).manual_seed(pstate["draw_seed"])
            shape = (m, rank) if want_left else (rank, n)
            basis = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)).to(sketch).to(dtype)
            return (basis, None) if want_left else (None, basis)
        gen = self.generator(pstate["seed"], pstate["refreshes"], device)
        left = self._draw(m, rank, gen, device).to(sketch).to(dtype) if want_left else None
        right = self._draw(n, rank, gen, device).t().to(sketch).to(dtype) if want_right else None
        return left, right

    def _draw(self, size: int, rank: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        sample = torch.randn(size, rank, generator=gen, device=device)
        if self.distribution == "orthonormal":
            return orthonormal_columns(sample)
        return sample * unit_gaussian_scale(rank)

    def state_bytes(self, shape, width: int) -> int:
        if self.keep:  # the kept basis, as the SVD projector's, in the sketch's dtype
            rank = self.init_state(torch.Size(shape), 0)["rank"]
            bf16 = self.sketch_dtype_for(rank, torch.float32) == torch.bfloat16 and width > 2
            return super().state_bytes(shape, 2 if bf16 else width)
        return 0  # seeds and counts (Python ints): the basis is redrawn when used, never kept


@register_projector
class GaussianProjector(RandomProjector):
    """:class:`RandomProjector` drawing N(0, 1/r) entries by default: APOLLO's sketch, a
    projector of its own name so that it needs no ``projector_args``."""

    name = "gaussian"
    # APOLLO's sketch only estimates norms: bf16 products at the ranks where they pay.
    option_defaults = {**RandomProjector.option_defaults, "distribution": "gaussian", "sketch_dtype": "auto"}
    # Until the bf16 sketch, every product ran in the gradient's dtype.
    former_defaults = {"sketch_dtype": "gradient"}


def _successor(seed: int) -> int:
    """The seed after ``seed`` in apollo_torch's chain: the 15th int64 drawn (from [0, 2^63 − 1))
    by a CPU generator seeded with it.  One small draw per refresh."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])
