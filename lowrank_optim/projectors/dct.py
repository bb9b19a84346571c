r"""DCT projector: columns of a fixed DCT-II basis chosen by alignment with the gradient
(Modoranu et al. 2025, "SVD-free low-rank adaptive gradient optimization";
docs/methods/dct.md#update-rule).

With C the orthonormal DCT-II matrix of the projected side (n x n for a right basis,
m x m for a left one), a refresh computes the similarity S and keeps the top-r columns
(right) or rows (left) by norm:

.. math::
    S = G C \ \text{(right)},\quad S = C^\top G \ \text{(left)};\qquad
    \text{idx} = \operatorname{top-}r_i\ \lVert S_{:,i} \rVert \ \text{(right)},\quad
    \lVert S_{i,:} \rVert \ \text{(left)}.

Between refreshes :math:`R = G\,C_{:,\text{idx}}` and back :math:`R\,C_{:,\text{idx}}^\top`
(left: :math:`C_{:,\text{idx}}^\top G` and :math:`C_{:,\text{idx}} R`).  Because C is
orthonormal, :math:`\lVert G - G C_I C_I^\top\rVert_F^2 = \lVert G\rVert_F^2 -
\sum_{i\in I}\lVert S_{:,i}\rVert^2`, so the ℓ2 score picks the best r columns of C for G
exactly; the reference scores by ℓ1, available as ``norm="l1"``.

Per-parameter state is the index tensor (r int64) per projected side plus the base's small
integers and the matrix shape: no dense basis.  C itself depends only on its size, so one
copy per (size, device, dtype) lives in a module-level cache shared by every matrix and
every optimizer (never in ``optimizer.state``: it would be saved once per matrix).
"""
from __future__ import annotations

import math

import torch

from .._validate import choice
from .base import Projector, register_projector
from .transition import IndexMap, Transition

# ----------------------------------------------------------------------------- the basis
_BASES: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

#: fp64 entries computed at once while building a basis: bounds the temporary memory
#: (an n x n fp64 block would be 240 MB at n = 5461, 8 GB at a 32k vocabulary).
_BUILD_CHUNK = 1 << 22


def dct_matrix(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""The orthonormal DCT-II matrix D = Cᵀ (``size`` x ``size``), cached and shared.

    Row k is the k-th basis vector :math:`D_{kj} = s_k \cos(\pi (2j+1) k / (2N))` with
    :math:`s_0 = \sqrt{1/N}`, :math:`s_k = \sqrt{2/N}`, so :math:`D D^\top = D^\top D = I`
    and ``x @ D.T`` is ``scipy.fft.dct(x, norm="ortho")``.  Rows (not columns) are stored
    contiguously so that selecting basis vectors is a row gather.

    Built once per (size, device, dtype) in fp64 on the CPU, with the angle reduced modulo
    4N in exact integer arithmetic, then rounded once to ``dtype``: every process and every
    refresh sees the same bits.  The returned tensor is shared: do not modify it.
    """
    device = torch.device(device)
    key = (size, device, dtype)
    basis = _BASES.get(key)
    if basis is None:
        basis = _build_dct_matrix(size, dtype).to(device)
        _BASES[key] = basis
    return basis


def _build_dct_matrix(size: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(size, size, dtype=dtype)
    odd = 2 * torch.arange(size, dtype=torch.int64) + 1  # 2j + 1
    rows = max(1, _BUILD_CHUNK // size)
    for start in range(0, size, rows):
        k = torch.arange(start, min(start + rows, size), dtype=torch.int64)
        angle = (k[:, None] * odd[None, :]) % (4 * size)  # exact: cos has period 4N here
        block = torch.cos(angle.to(torch.float64) * (math.pi / (2 * size))) * math.sqrt(2.0 / size)
        if start == 0:
            block[0] = math.sqrt(1.0 / size)
        out[start : start + len(k)] = block.to(dtype)
    return out


def clear_dct_cache() -> None:
    """Free every cached DCT basis (they are rebuilt, bit for bit, on next use)."""
    _BASES.clear()


def cached_dct_sizes() -> list[tuple[int, torch.device, torch.dtype]]:
    """The (size, device, dtype) keys of the bases currently cached."""
    return list(_BASES)


# ----------------------------------------------------------------------------- transforms
def dct_rows(matrix: torch.Tensor, transform: str = "fft") -> torch.Tensor:
    """Orthonormal DCT-II of every row of an fp32 matrix: ``matrix @ C``.

    ``matmul`` multiplies by the cached basis, O(m n^2); ``fft`` uses Makhoul's algorithm,
    O(m n log n), see :func:`dct_rows_fft`.
    """
    if transform == "fft":
        return dct_rows_fft(matrix)
    return matrix @ dct_matrix(matrix.shape[-1], matrix.device, matrix.dtype).t()


def dct_rows_fft(matrix: torch.Tensor) -> torch.Tensor:
    r"""Orthonormal DCT-II along the last dimension through one real FFT (Makhoul 1980).

    Reorder :math:`v = (x_0, x_2, x_4, \ldots, x_5, x_3, x_1)`, take :math:`V = \mathrm{FFT}(v)`;
    then :math:`X_k = 2\,\mathrm{Re}(e^{-i\pi k/(2N)} V_k)` scaled by :math:`\sqrt{1/(4N)}`
    (k = 0) or :math:`\sqrt{1/(2N)}`.  ``rfft`` computes :math:`V_k` for k <= N/2 and the
    rest follow from :math:`V_{N-k} = \overline{V_k}` (v is real).  Computed in fp32: torch's
    FFT rejects bf16 ("Unsupported dtype BFloat16", the reference's bf16 failure).
    """
    x = matrix.float()
    size = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    half = torch.fft.rfft(v, dim=-1)  # V_0 .. V_{N//2}
    mirrored = half[..., 1 : size - size // 2].flip(-1)  # conj of V_k for k = N//2+1 .. N-1
    cos, sin = _twiddles(size, x.device)
    low = size // 2 + 1
    # 2 s_k Re(e^{-i pi k / 2N} V_k) = 2 s_k (Re V_k cos + Im V_k sin), conj flipping Im.
    return torch.cat(
        [
            half.real * cos[:low] + half.imag * sin[:low],
            mirrored.real * cos[low:] - mirrored.imag * sin[low:],
        ],
        dim=-1,
    )


_TWIDDLES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _twiddles(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pi k / 2N times the orthonormal scale (2 sqrt(1/4N) for k = 0,
    2 sqrt(1/2N) otherwise), computed in fp64 once per (size, device)."""
    key = (size, device)
    if key not in _TWIDDLES:
        k = torch.arange(size, dtype=torch.float64)
        scale = torch.full((size,), math.sqrt(2.0 / size), dtype=torch.float64)  # 2 sqrt(1/2N)
        scale[0] = math.sqrt(1.0 / size)  # 2 sqrt(1/4N)
        angle = k * (math.pi / (2 * size))
        _TWIDDLES[key] = (
            (torch.cos(angle) * scale).to(device, torch.float32),
            (torch.sin(angle) * scale).to(device, torch.float32),
        )
    return _TWIDDLES[key]


# ----------------------------------------------------------------------------- projector
@register_projector
class DCTProjector(Projector):
    """Top-r DCT-II basis vectors by alignment with the gradient (module docstring).

    Options (``projector_args``):

    - ``norm``: ``"l2"`` (default; exactly minimises the reconstruction error, see the
      module docstring) or ``"l1"`` (the reference's score).
    - ``transform``: how the full similarity S is computed at a refresh.  ``"fft"``
      (default) uses Makhoul's algorithm in fp32, O(m n log n); ``"matmul"`` multiplies by
      the cached n x n basis, O(m n^2).  Only the refresh changes: projections between
      refreshes are O(m n r) GEMMs against the r selected vectors either way, and both
      select the same indices up to near-ties (S agrees to ~1e-6).  The default comes from
      bench/bench_dct.py on a 2-core CPU (one thread): the FFT computed S in 0.25-0.35x
      the matmul's time at n = 2048 and the whole refresh in 0.45-0.8x at the LLaMA-60M
      and 1B shapes; it also needs no fp32 copy of the basis for a bf16 model.  On an
      H100 the FFT has been reported to bring no speedup at n <= 2048, where ``"matmul"``
      may be preferable (docs/methods/dct.md#fast-transform); amortised over a refresh
      period either is far below 1% of the step.

    ``proj_type="full"`` keeps an index set on each side, each chosen by its own score
    (row norms of Cᵀ G, column norms of G C).  This is the same marginal rule as the one-
    sided case, not the joint optimum: the best r x r block of Cᵀ G C is a combinatorial
    (biclique) problem, whereas for the SVD the two marginal choices happen to coincide
    with it.

    State per parameter: ``left_indices`` and/or ``right_indices`` (int64, length r,
    ascending), ``shape`` (the matrix's, to find the basis size when projecting back) and
    the base's integers.  Projections gather the r selected rows of the cached basis, an
    O(r n) copy that is negligible next to the O(m n r) GEMM it feeds (project + back
    measured 0.99-1.02x the time with a stored dense basis), rather than take the full
    transform and select (O(m n^2) matmul or O(m n log n) FFT on every step, and no bf16
    FFT).
    """

    name = "dct"
    option_defaults = {"norm": "l2", "transform": "fft"}
    option_checks = {"norm": choice("l2", "l1"), "transform": choice("matmul", "fft")}

    def init_state(self, shape: torch.Size, seed: int, group_slot: tuple[int, int] = (0, 1)) -> dict:
        pstate = super().init_state(shape, seed, group_slot)
        pstate["shape"] = tuple(shape)
        return pstate

    # ------------------------------------------------------------------ refresh
    def compute_bases(self, matrix: torch.Tensor, pstate: dict) -> dict[str, torch.Tensor]:
        """New indices from the fp32 gradient (bf16 scores would tie and reorder)."""
        want_left, want_right = self.sides(pstate)
        new = {}
        if want_left:  # rows of Cᵀ G are the DCT of G's columns
            new["left_indices"] = self._top(dct_rows(matrix.t(), self.transform), pstate["rank"])
        if want_right:  # columns of G C are the DCT coefficients of G's rows
            new["right_indices"] = self._top(dct_rows(matrix, self.transform), pstate["rank"])
        return new

    def scores(self, similarity: torch.Tensor) -> torch.Tensor:
        """One score per basis vector from S laid out with one row per signal (m' x N).

        The squared ℓ2 norm orders exactly as the norm and needs no square root.
        """
        if self.norm == "l1":
            return similarity.abs().sum(dim=0)
        return similarity.square().sum(dim=0)

    def _top(self, similarity: torch.Tensor, rank: int) -> torch.Tensor:
        # Ascending order: a selection that does not change gives the same state bits
        # whatever order topk returned it in, and R's coordinates run low to high frequency.
        return torch.topk(self.scores(similarity), rank, sorted=False).indices.sort().values

    # ------------------------------------------------------------------ projection
    def bases(self, pstate: dict, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        m, n = pstate["shape"]
        want_left, want_right = self.sides(pstate)
        left = right = None
        if want_left:
            left = dct_matrix(m, like.device, like.dtype).index_select(0, pstate["left_indices"]).t()
        if want_right:
            right = dct_matrix(n, like.device, like.dtype).index_select(0, pstate["right_indices"])
        return left, right

    def keep_transition(self, old: dict, new: dict, like: torch.Tensor) -> Transition:
        """``on_refresh="keep"`` is the index map too: the coordinates are named by their
        frequencies, and carrying moments by position would hand one frequency's
        statistics to another (so keep and project coincide for this projector)."""
        return self.transition(old, new, like)

    def transition(self, old: dict, new: dict, like: torch.Tensor) -> Transition:
        """Surviving indices keep their moments, new ones start at zero (no matmul)."""
        want_left, want_right = self.sides(new)
        return Transition(
            left=IndexMap(old["left_indices"], new["left_indices"]) if want_left else None,
            right=IndexMap(old["right_indices"], new["right_indices"]) if want_right else None,
        )

    def state_bytes(self, shape, width: int) -> int:
        """r int64 indices per projected side; the DCT basis is a shared cache, not state."""
        pstate = self.init_state(torch.Size(shape), 0)
        return 8 * pstate["rank"] * sum(self.sides(pstate))


__all__ = ["DCTProjector", "cached_dct_sizes", "clear_dct_cache", "dct_matrix", "dct_rows", "dct_rows_fft"]
