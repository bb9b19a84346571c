r"""The INT4-stored basis as one record, and the choice of product on CUDA.

:class:`Int4Basis` is what every INT4 projection needs to know about a stored basis (codes,
scales, zero points, its shape, the group size and its side).  Everything inside the
package passes the record; it is flattened into the ops' arguments only at the op
boundary (``torch.ops.lowrank_optim.int4_project(grad, *basis)``: custom ops take flat
tensors and ints).

The four products (``left``: the basis is P, m x r; otherwise Q, r x n):

.. math::
    \text{project: } P^\top G,\ G Q^\top \qquad \text{project back: } P N,\ N Q.

On CUDA there are two ways to compute them, and which is faster depends on the GPU, the
shape and the dtype: the fused product (``int4_project_fused`` / ``int4_project_back_fused``,
whose CUDA kernel dequantizes tile by tile and never writes the dense basis, but runs on
plain fp32 FMAs, no tensor cores), or dequantizing the basis (``int4_dequantize``) and
one cuBLAS matmul in the dense operand's dtype.  :func:`product` (the CUDA kernel of the
public ``int4_project`` / ``int4_project_back`` ops) measures both once per shape class and
device, on the first call that meets that class, and keeps the faster: a decision by
measurement (:class:`ProductChooser`), not by expectation.  docs/kernels.md, "Choosing
the INT4 product on CUDA", has the details.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

#: ``auto`` (default: measure and keep the faster), ``fused`` or ``dequantize`` (always).
PATH_ENV = "LOWRANK_OPTIM_INT4_PATH"
PATHS = ("fused", "dequantize")
#: The fused op behind each public product (project: False, project back: True).
FUSED_OPS = {False: "int4_project_fused", True: "int4_project_back_fused"}
#: Dtypes a matmul runs in directly; others (fp64) go through fp32, as the default kernel.
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Int4Basis(NamedTuple):
    """A basis stored as INT4 codes: ``rows x cols`` values in the group layout of
    :mod:`lowrank_optim.kernels.reference`; ``left``: it is P (multiplied from the left,
    m x r), else Q (r x n)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    rows: int
    cols: int
    group_size: int
    left: bool

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``rows x cols`` basis in ``dtype`` (through the ``int4_dequantize`` op)."""
        flat = torch.ops.lowrank_optim.int4_dequantize(
            self.packed, self.scales, self.zeros, self.rows * self.cols, self.group_size, dtype
        )
        return flat.view(self.rows, self.cols)


class Plan(NamedTuple):
    """A product as C (M x N) = A (M x K) B (K x N): which operand is the basis, whether it
    enters transposed, and the sizes."""

    basis_is_a: bool
    transpose: bool
    M: int
    N: int
    K: int


def plan(dense_shape: tuple[int, int] | torch.Size, basis: Int4Basis, back: bool) -> Plan:
    """The product of ``dense`` (``dense_shape``) with ``basis``; ``ValueError`` when the
    shapes do not fit (the message every kernel of these ops gives)."""
    m, n = dense_shape
    rows, cols = basis.rows, basis.cols
    if not back and basis.left:
        result = Plan(True, True, cols, n, rows)  # P^T G
    elif not back:
        result = Plan(False, True, m, rows, cols)  # G Q^T
    elif basis.left:
        result = Plan(True, False, rows, n, cols)  # P N
    else:
        result = Plan(False, False, m, cols, rows)  # N Q
    inner = m if result.basis_is_a else n
    if inner != result.K:
        raise ValueError(
            f"int4 projection: a {m}x{n} input does not match the {rows}x{cols} basis (left={basis.left})"
        )
    return result


def output_shape(dense_shape: tuple[int, int] | torch.Size, basis: Int4Basis, back: bool) -> tuple[int, int]:
    """(rows, cols) of the product, without checking the inner size (the fake kernels')."""
    m, n = dense_shape
    if back:
        return (basis.rows, n) if basis.left else (m, basis.cols)
    return (basis.cols, n) if basis.left else (m, basis.rows)


def dense_product(dense: torch.Tensor, matrix: torch.Tensor, left: bool, back: bool) -> torch.Tensor:
    """The product of :func:`plan` with the basis already dense (``matrix``, rows x cols)."""
    if back:
        return matrix @ dense if left else dense @ matrix
    return matrix.t() @ dense if left else dense @ matrix.t()


def dequantize_matmul(dense: torch.Tensor, basis: Int4Basis, back: bool) -> torch.Tensor:
    """The product by dequantizing the whole basis in ``dense``'s dtype, then one matmul
    (cuBLAS on CUDA, tensor cores for bf16/fp16): the path the fused kernel must beat."""
    plan(dense.shape, basis, back)  # the same ValueError as the fused kernels
    work = dense.dtype if dense.dtype in NATIVE_DTYPES else torch.float32
    out = dense_product(dense.to(work), basis.dequantize(work), basis.left, back)
    return out.to(dense.dtype)


def requested_path() -> str:
    """``LOWRANK_OPTIM_INT4_PATH``: ``auto`` (default), ``fused`` or ``dequantize``."""
    value = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", *PATHS):
        raise ValueError(f"{PATH_ENV} must be auto, fused or dequantize, got {value!r}")
    return value


def fused_kernel_registered(back: bool) -> bool:
    """Whether the fused op has a CUDA kernel (the extension's, or Triton's when registered);
    without one it would run the default kernel, and there is nothing to choose."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_optim::{FUSED_OPS[back]}", "CUDA")


def shape_class(dense: torch.Tensor, basis: Int4Basis, back: bool) -> tuple:
    """The key a decision is kept under: device, dtype, which product, and each of M, N, K
    rounded up to a power of two.  A model has a handful of weight shapes, so a handful of
    classes; neighbouring sizes share the fused kernel's tiling and cuBLAS's kernel choice."""
    p = plan(dense.shape, basis, back)
    return (str(dense.device), dense.dtype, back, basis.left, *(max(int(x) - 1, 0).bit_length() for x in (p.M, p.N, p.K)))


def cuda_timer(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds one call of ``fn`` takes on ``device``, synchronized on both sides."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class Decision:
    path: str
    #: Median seconds per call of each path, as measured when the decision was made.
    seconds: dict[str, float]


@dataclass
class ProductChooser:
    """Measures the candidate paths of one shape class once and keeps the faster.

    ``timer(fn, device) -> (seconds, result)`` times one call (injected by the tests, which
    must not depend on real timings); ``capturing()`` tells whether the current stream is
    being captured into a CUDA graph, where a synchronize is illegal: then nothing is
    measured and the fused path runs until a later, uncaptured call decides.
    """

    timer: Callable[[Callable[[], torch.Tensor], torch.device], tuple[float, torch.Tensor]] = cuda_timer
    capturing: Callable[[], bool] = field(default=lambda: torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    #: Timed calls per path after one untimed warm-up call (which also compiles/allocates).
    repeats: int = 3
    decisions: dict[tuple, Decision] = field(default_factory=dict)

    def run(self, key: tuple, device: torch.device, candidates: dict[str, Callable[[], torch.Tensor]]) -> torch.Tensor:
        """The result of the path decided for ``key``, deciding first if it has not been.

        ``candidates`` maps each path of :data:`PATHS` to a call computing the product; the
        first listed wins a tie (so pass ``fused`` first: it holds no dense basis)."""
        decided = self.decisions.get(key)
        if decided is not None:
            return candidates[decided.path]()
        if self.capturing():
            return candidates[next(iter(candidates))]()
        seconds: dict[str, float] = {}
        results: dict[str, torch.Tensor] = {}
        for path, call in candidates.items():
            results[path] = call()  # warm-up; its result is as good as any other call's
            seconds[path] = statistics.median(self.timer(call, device)[0] for _ in range(self.repeats))
        best = min(seconds, key=lambda p: (seconds[p], list(candidates).index(p)))
        self.decisions[key] = Decision(best, seconds)
        return results[best]


#: The process's decisions (``CHOOSER.decisions``: shape class -> path and the times).
CHOOSER = ProductChooser()


def product(dense: torch.Tensor, basis: Int4Basis, back: bool, chooser: ProductChooser | None = None) -> torch.Tensor:
    """The CUDA kernel of ``int4_project`` (``back=False``) / ``int4_project_back``: the
    fused op or dequantize + matmul, whichever :class:`ProductChooser` measured faster for
    this shape class (``LOWRANK_OPTIM_INT4_PATH`` forces one)."""
    fused_op = getattr(torch.ops.lowrank_optim, FUSED_OPS[back])

    def fused() -> torch.Tensor:
        return fused_op(dense, *basis)

    def dequantize() -> torch.Tensor:
        return dequantize_matmul(dense, basis, back)

    requested = requested_path()
    if requested == "dequantize":
        return dequantize()
    if requested == "fused" or not fused_kernel_registered(back):
        return fused()  # without a fused kernel this is the default kernel, as before
    chooser = CHOOSER if chooser is None else chooser
    return chooser.run(shape_class(dense, basis, back), dense.device, {"fused": fused, "dequantize": dequantize})
