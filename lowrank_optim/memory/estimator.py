r"""The analytical estimate: bytes of weights, gradients, optimizer state and projector.

**What is counted.**  Per parameter (one row per parameter tensor; tied tensors once):
``weights`` (numel x dtype size), ``grads`` (the same: a full gradient per parameter, as in
ordinary, non-layer-wise training), ``state`` (the optimizer's moments and every other
tensor in ``optimizer.state[p]`` except the projector) and ``projector`` (the basis or
whatever the projector keeps: SVD basis, INT4 codes + scales + zero points + similarity
queue, DCT / coordinate indices).  Activations, the temporary full-size update, SVD
workspaces and allocator slack are *not* counted: the estimate is what the state keeps
alive between steps, the quantity :func:`lowrank_optim.memory.state_bytes` measures
(storage-based, each storage once).  ``optimizer`` = state + projector.

**Who declares what.**  The estimator knows no method's layout: each optimizer class says
what it keeps for a parameter (``LowRankOptimizer.param_state_bytes``: its moment rule's
``state_bytes`` on G or R, plus ``method_state_bytes``: Fira's and APOLLO's limiter norm,
Natural GaLore's history, GradNormLoRP's magnitude and its moments), and each projector what
it keeps (``Projector.state_bytes``).  Only the peers (``adamw``, ``adamw8bit``, ``sgd``) are
described here, in :data:`PEER_STATE`.

**Conventions (all verified against real optimizer state by tests/test_memory.py):**

* Projected parameters: the tensors :func:`lowrank_optim.factory.projectable_weights`
  takes (the matrix of an ``nn.Linear`` or of transformers' ``Conv1D``, the 3-D stacks of a
  fused-experts module) in the modules ``target_modules`` selects (default
  ``("attn", "mlp")``: LLaMA's q/k/v/o and gate/up/down): name fragments as
  :func:`lowrank_optim.param_groups`, one string as the Trainer's full-match regex or
  ``"all-linear"`` (:mod:`lowrank_optim.memory.shapes`).  A stack of E expert matrices
  (E x m x n) counts as E matrices of m x n, each with its own basis and moments (the
  optimizer's ``state[p]["matrices"]``).  Everything else (embedding, LM head, norms,
  biases, a router) gets the optimizer's full-rank AdamW (Adafactor for
  ``galore_adafactor``).
* Side (``std``): m x n weight, right projection when m >= n (basis r x n, R m x r),
  left when m < n (basis m x r, R r x n).  ``r = min(rank, m, n)``; with ``density``,
  r = round(density * min(m, n)).
* dtype: each parameter's own (a module's, or a config's ``dtype``, on the meta-device
  model built from it; a config without one builds float32), a preset's the paper's
  bfloat16; ``dtype=`` / ``--dtype`` imposes one on every parameter.  The settings line
  says which.  Moments and the SVD basis have the parameter's dtype; 8-bit moments are
  1 byte per element + one fp32 absmax per block of 256, and stay fp32 below
  ``min_8bit_size`` = 4096 elements (ours and bitsandbytes' alike).  Adafactor's factors,
  Fira's residual norm (0-dim), GradNorm-LoRP's magnitude (m x 1) and its moments are fp32.
  Q-GaLore's INT4 basis: ceil(numel/2) bytes of packed codes, an fp32 scale and a uint8
  zero point per group of 256, and a ``queue_size`` (5) fp32 similarity queue.  DCT keeps
  r int64 column indices; ``columns`` / ``rows`` keep int(density * n) / int(density * m)
  int32 indices; Natural GaLore keeps ``history`` (4) x numel(R) gradients.
* ``projector="random"`` (a seeded Gaussian or orthonormal basis, redrawn when used) keeps
  no tensor: the projector column is 0.  APOLLO and APOLLO-Mini use it by default, so a
  projected matrix costs exactly its two moments, 2 r max(m, n) numbers in the
  parameter's dtype (the std side rule above), plus the norm-growth limiter's fp32 0-dim
  ``residual_norm`` (4 bytes; with the default limiter, as for Fira).  Without a rank,
  ``apollo_mini_adamw`` gets its preset (``ApolloMiniAdamW.preset_rank`` = 1), the others
  the paper's rank for a preset, else 128 capped at the smallest projected matrix's
  min(m, n) (a rank every projected matrix accepts).
* FRUGAL ``blocks``: K = max(1, round(density * N)) of the group's N projected matrices
  are active (full Adam) in a round, which ones changes per round; each projected row
  carries the *expected* state K/N x 2mn, so the total is exact when the projected
  matrices share one shape and per-layer rows are averages otherwise.
* ``adamw`` = ``torch.optim.AdamW`` (two moments in the parameter's dtype + a 4-byte fp32
  ``step`` tensor per parameter); ``sgd`` = ``torch.optim.SGD(momentum=0.9)`` (one momentum
  buffer in the parameter's dtype: the "SGD-like memory" APOLLO-Mini is measured against);
  ``adamw8bit`` = ``bitsandbytes.optim.AdamW8bit``
  (blockwise, 256; plus its two 256-entry fp32 quantization maps, shared by all
  parameters, reported as the row ``(bnb qmap)``).
* "vs AdamW": the estimate's optimizer bytes (state + projector) and its total, each over
  the same quantity for ``torch.optim.AdamW`` on the same parameters in the same dtype
  (weights unquantized, gradients counted alike).
* Units: bytes internally; ``GB`` = 1e9 and ``GiB`` = 2^30 are both printed where it
  matters.
* INT8 weights (Q-GaLore): ``int8_weights=True`` / ``--int8-weights`` (applied to
  ``qgalore_adamw8bit`` only on the CLI), or automatic for a module with ``Int8Linear``s:
  1-byte codes + fp32 scale + uint8 zero point per group of 256.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import options as _options
from ..optim.hooks import low_rank_dtype
from ..optim.rules import Adam, Adam8bit
from .shapes import (
    DEFAULT_RANK,
    LLAMA_CONFIGS,
    PRESET_DTYPE,
    ModelSource,
    ParamSpec,
    describe_targets,
    resolve_model,
)

GB, GIB = 1e9, 2**30

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _adamw_state(shape: tuple[int, ...], width: int, group: dict) -> int:
    # amsgrad keeps the running maximum of exp_avg_sq as a third buffer
    extra = math.prod(shape) * width if group.get("amsgrad") else 0
    return Adam().state_bytes(shape, width, group) + extra + 4


def _sgd_state(shape: tuple[int, ...], width: int, group: dict) -> int:
    # torch's SGD creates no buffer at momentum 0
    return math.prod(shape) * width if group.get("momentum", 0.9) else 0


#: The state the peers (not classes of this package) keep per parameter of ``shape`` with
#: ``width``-byte elements in ``group`` (their own options: ``amsgrad``, ``momentum``,
#: ``min_8bit_size``): torch's AdamW also keeps its ``step`` as a 4-byte fp32 tensor;
#: bitsandbytes' AdamW8bit lays its moments out as our 8-bit rule does; SGD with momentum
#: keeps one buffer.
PEER_STATE: dict[str, Callable[[tuple[int, ...], int, dict], int]] = {
    "adamw": _adamw_state,
    "adamw8bit": lambda shape, width, group: Adam8bit().state_bytes(shape, width, group),
    "sgd": _sgd_state,
}
PEERS = tuple(_options.PEERS)
assert set(PEERS) == set(PEER_STATE), "every peer of lowrank_optim.options needs its state layout here"


def available_estimators() -> list[str]:
    """Optimizer names :func:`estimate` accepts: ours plus ``adamw``, ``adamw8bit`` and ``sgd``
    (any spelling :func:`lowrank_optim.options.canonical_name` reads, listed canonically)."""
    return sorted(set(_options.ours()) | set(PEERS))


def _check_optimizer(name: str) -> str:
    """The canonical name of ``name`` (the package's one name table), or a ValueError."""
    key = _options.canonical_name(name, peers=True)
    if key is None:
        raise ValueError(f"unknown optimizer {name!r}; valid ones: {', '.join(available_estimators())}")
    return key


def _optimizer_class(key: str):
    return _options.ours().get(key)


def _preset_rank(key: str) -> int | None:
    """The rank ``create_optimizer`` uses for ``key`` given a model and no rank (APOLLO-Mini: 1)."""
    return getattr(_optimizer_class(key), "preset_rank", None)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid ones: {', '.join(sorted(DTYPES))}")
    return DTYPES[str(dtype).lower()]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class MemoryRow:
    name: str
    shape: tuple[int, ...]
    projected: bool
    weights: float
    grads: float
    state: float
    projector: float

    @property
    def optimizer(self) -> float:
        return self.state + self.projector

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.state + self.projector


FIELDS = ("weights", "grads", "state", "projector")


@dataclass
class MemoryEstimate:
    """Per-parameter rows and totals (bytes) of one optimizer on one model, with the
    settings they were computed under (:meth:`settings`) and AdamW's totals on the same
    model (:meth:`vs_adamw`)."""

    model: str
    optimizer: str
    dtype: str
    rank: int | None
    density: float | None
    rows: list[MemoryRow] = field(default_factory=list)
    source: str = ""  # what the model was given as: "LLaMA preset", "config.json", ...
    parameters: int = 0  # trainable elements, tied tensors once
    dtype_note: str = ""  # why this dtype: given, the module's own, the config's, the preset's
    rank_note: str = ""  # why this rank: given, a preset, the paper's, the default
    matrices: int = 0  # projected matrices (a stack of E experts: E)
    projected_share: float = 0.0  # their share of the parameters
    clamped: int = 0  # projected matrices narrower than the rank (counted at min(m, n))
    targets: str = ""
    grads_counted: bool = True
    adamw: dict[str, float] = field(default_factory=dict)  # AdamW's "optimizer" and "total" bytes

    def total(self, what: str = "total") -> float:
        return sum(getattr(r, what) for r in self.rows)

    @property
    def totals(self) -> dict[str, float]:
        out = {k: self.total(k) for k in FIELDS}
        out["optimizer"] = out["state"] + out["projector"]
        out["total"] = sum(out[k] for k in FIELDS)
        return out

    def vs_adamw(self) -> dict[str, float]:
        """This estimate over AdamW's on the same parameters: ``optimizer`` (state +
        projector over AdamW's state) and ``total`` (everything counted)."""
        totals = self.totals
        return {k: totals[k] / self.adamw[k] if self.adamw.get(k) else math.nan for k in ("optimizer", "total")}

    def settings(self) -> dict[str, Any]:
        """What the numbers assume: model, parameters, what was projected, rank, dtype."""
        return {"model": self.model, "source": self.source, "parameters": self.parameters,
                "target_modules": self.targets, "projected_matrices": self.matrices,
                "projected_share": self.projected_share, "rank": self.rank, "rank_note": self.rank_note,
                "density": self.density, "clamped_matrices": self.clamped, "dtype": self.dtype,
                "dtype_note": self.dtype_note, "with_grads": self.grads_counted}

    def per_layer(self) -> dict[str, dict[str, float]]:
        """Rows grouped by transformer block (``layers.<i>``), the rest by parameter name."""
        groups: dict[str, dict[str, float]] = {}
        for r in self.rows:
            parts = r.name.split(".")
            key = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts[:-1] else r.name
            g = groups.setdefault(key, dict.fromkeys(FIELDS, 0.0))
            for k in FIELDS:
                g[k] += getattr(r, k)
        return groups

    def records(self) -> list[dict[str, Any]]:
        return [{"name": r.name, "shape": "x".join(map(str, r.shape)), "projected": r.projected,
                 **{k: getattr(r, k) for k in FIELDS}, "total": r.total} for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, **self.settings(), "totals": self.totals,
                "vs_adamw": self.vs_adamw(), "rows": self.records()}


class _Projectors:
    """The group's projector, built once per rank value: a matrix smaller than the rank
    gets ``min(rank, m, n)`` (the optimizer would refuse it; the estimate stays defined,
    and says how many matrices it clamped)."""

    def __init__(self, group: dict):
        self.group, self.built = group, {}

    def for_shape(self, shape: tuple[int, ...]):
        """(projector, whether the rank was clamped for this shape)."""
        rank = self.group["rank"]
        if rank is not None and self._build(rank).validate_shape(torch.Size(shape)) is not None:
            return self._build(min(rank, *shape)), True
        return self._build(rank), False

    def _build(self, rank: int | None):
        from ..projectors import make_projector

        if rank not in self.built:
            self.built[rank] = make_projector({**self.group, "rank": rank})
        return self.built[rank]


def _group(cls, rank: int | None, density: float | None, projector: str | None, history: int, queue_size: int,
           min_8bit_size: int, beta1: bool, options: dict) -> dict:
    """The param group the estimate describes: the class's defaults with these settings,
    ``options`` (any of the class's keywords) last."""
    from ..projectors import REGISTRY

    group = {**cls.hyperparameter_defaults(), "rank": None if density is not None else rank, "density": density}
    if projector is not None:
        group["projector"] = projector
    # The options the estimator exposes, where the class (or its projector) has them.
    for key, value in (("min_8bit_size", min_8bit_size), ("history", history), ("beta1", 0.9 if beta1 else None)):
        if key in group:
            group[key] = value
    if "queue_size" in REGISTRY[group["projector"]].option_defaults:
        group["projector_args"] = {**(group["projector_args"] or {}), "queue_size": queue_size}
    unknown = sorted(set(options) - set(group))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {unknown}; valid ones: {', '.join(group)}")
    if options.get("projector_args"):
        options = {**options, "projector_args": {**(group["projector_args"] or {}), **options["projector_args"]}}
    return {**group, **options}


def _check_peer_options(key: str, options: dict) -> None:
    """A peer's options must be keywords it takes (where its package is here to ask)."""
    try:
        valid = _options.hyperparameter_defaults(key)
    except ImportError:  # bitsandbytes absent: its keywords cannot be listed, only counted
        return
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{key} ({_options.PEERS[key]}) has no option(s) {unknown}; valid ones: {', '.join(valid)}")


def _default_rank(key: str, source: ModelSource, specs: list[ParamSpec]) -> tuple[int, str]:
    """The rank an estimate without one uses, and why (module docstring)."""
    preset = _preset_rank(key)
    if preset is not None:
        return preset, f"{key}'s preset"
    if source.preset is not None:
        return LLAMA_CONFIGS[source.preset][4], f"the GaLore paper's for {source.preset}"
    sides = [min(s.matrix_shape) for s in specs if s.projected]
    if sides and min(sides) < DEFAULT_RANK:
        return min(sides), f"default {DEFAULT_RANK}, capped at the narrowest projected matrix"
    return DEFAULT_RANK, "default"


def estimate(model: Any, optimizer: str, rank: int | None = None, density: float | None = None,
             dtype: str | torch.dtype | None = None, target_modules: str | Iterable[str] = ("attn", "mlp"),
             tied: bool = False, grads: bool = True, projector: str | None = None, history: int = 4,
             queue_size: int = 5, min_8bit_size: int = 4096, beta1: bool = False, int8_weights: bool = False,
             options: dict[str, Any] | None = None) -> MemoryEstimate:
    """Analytical memory of ``optimizer`` on ``model``.

    ``model``: a LLaMA preset name (``60m`` ... ``7b``), a ``transformers`` config, a path to
    a ``config.json`` or to a local model folder (nothing downloaded; built on the meta
    device), or an ``nn.Module`` (:func:`~lowrank_optim.memory.shapes.resolve_model`).
    ``optimizer``: any spelling of :func:`lowrank_optim.options.canonical_name` (ours, with
    or without ``lowrank_``, ``..._8bit``; ``adamw``, ``adamw8bit``, ``sgd``).
    ``rank`` defaults to the optimizer's preset (``apollo_mini_adamw``: 1), else the paper's
    rank for a preset, else 128 capped at the narrowest projected matrix; with ``density``
    the rank comes from it (FRUGAL).  ``dtype``: every parameter's dtype; None keeps each
    parameter's own (a preset's: bf16, the paper's).  ``target_modules``: name fragments
    (a list), or one string, a full-match regex or ``"all-linear"``.  ``grads=False`` leaves
    gradients out (the paper's column; layer-wise training frees them during backward).
    ``projector`` names the projector (FRUGAL's ``svd``, ``columns``, ``rows``, ``blocks``,
    or any registered one); ``history``, ``queue_size``, ``min_8bit_size``, ``beta1`` follow
    the optimizers' options of the same names, and ``options`` sets any keyword of the
    optimizer (``{"proj_type": "full"}``; a peer's ``amsgrad``, ``momentum``), as parsed by
    :func:`lowrank_optim.options.parse_options`.
    ``int8_weights`` stores the projected weights as Q-GaLore's INT8 codes (1 byte + 5 bytes
    per group of 256; their gradient stays in ``dtype``); an ``nn.Module`` whose linears
    are ``Int8Linear`` gets this automatically.
    """
    from ..projectors import REGISTRY

    key = _check_optimizer(optimizer)
    options = dict(options or {})
    # the size and the projector may come as options too (--opt-arg rank=64)
    rank = options.pop("rank", rank)
    density = options.pop("density", density)
    projector = options.pop("projector", projector)
    source = resolve_model(model)
    given = None if dtype is None else _dtype(dtype)
    specs = source.specs(target_modules, tied)
    for s in specs:
        s.dtype = given or s.dtype or PRESET_DTYPE
    if density is None and key not in PEERS and projector == "blocks":
        # blocks are a share of the group's matrices: there is no rank to size them by
        raise ValueError(f"{key} with projector={projector!r} needs density=...")
    if projector is not None and projector not in REGISTRY:
        raise ValueError(f"unknown projector {projector!r}; valid ones: {', '.join(sorted(REGISTRY))}")
    if key not in PEERS and not any(s.projected for s in specs):
        raise ValueError(f"{source.label}: no nn.Linear, Conv1D or fused-experts weight is selected by "
                         f"target_modules={target_modules!r}")
    rank_note = "given" if rank is not None else ""
    if key in PEERS:
        rank, density, rank_note = None, None, ""
    elif density is not None:
        rank_note = "from density"
    elif rank is None:
        rank, rank_note = _default_rank(key, source, specs)
    est = MemoryEstimate(source.label, key, _describe_dtypes(specs), rank, density, source=source.kind,
                         dtype_note="given" if given is not None else source.dtype_note, rank_note=rank_note,
                         targets=describe_targets(target_modules), grads_counted=grads)
    if key in PEERS:
        _check_peer_options(key, options)
        group = {"min_8bit_size": min_8bit_size, **_options.PEER_DEFAULTS.get(key, {}), **options}
        cls, projectors = None, None
    else:
        cls = _optimizer_class(key)
        group = _group(cls, rank, density, projector, history, queue_size, min_8bit_size, beta1, options)
        projectors = _Projectors(group)
    # The projected group's parameters, as the optimizer's group holds them (a stack is one).
    n_proj = sum(s.projected for s in specs)
    adamw = {"optimizer": 0.0, "total": 0.0}
    for s in specs:
        width = s.dtype.itemsize
        if int8_weights and s.projected:
            s.int8 = True
        if cls is None:
            state, basis = PEER_STATE[key](s.shape, width, group), 0
        elif s.projected:
            # A fused-experts stack is E matrices, each with its own basis and moments.
            proj, clamped = projectors.for_shape(s.matrix_shape)
            low_width = low_rank_dtype(s.dtype).itemsize  # fp16 weights keep fp32 statistics
            state = s.matrices * cls.param_state_bytes(s.matrix_shape, low_width, group, proj, group_size=n_proj)
            basis = s.matrices * proj.state_bytes(s.matrix_shape, width)
            est.clamped += s.matrices if clamped else 0
        else:
            state, basis = cls.param_state_bytes(s.shape, width, group), 0
        weights = s.numel + 5 * math.ceil(s.numel / 256) if s.int8 else s.numel * width
        est.rows.append(MemoryRow(s.name, s.shape, s.projected and key not in PEERS, weights,
                                  s.numel * width if grads else 0, state, basis))
        base_state = _adamw_state(s.shape, width, {})
        adamw["optimizer"] += base_state
        adamw["total"] += s.numel * width * (2 if grads else 1) + base_state
    if key == "adamw8bit" and any(s.numel >= group["min_8bit_size"] for s in specs):
        est.rows.append(MemoryRow("(bnb qmap)", (2, 256), False, 0, 0, 2 * 256 * 4, 0))
    est.adamw = adamw
    est.parameters = sum(s.numel for s in specs)
    projected = [s for s in specs if s.projected and key not in PEERS]
    est.targets = est.targets if projected else ""
    est.matrices = sum(s.matrices for s in projected)
    est.projected_share = sum(s.numel for s in projected) / max(1, est.parameters)
    return est


def _describe_dtypes(specs: list[ParamSpec]) -> str:
    """The dtype of the parameters: one name, or the main one and the others by count."""
    numel: dict[torch.dtype, int] = {}
    count: dict[torch.dtype, int] = {}
    for s in specs:
        numel[s.dtype] = numel.get(s.dtype, 0) + s.numel
        count[s.dtype] = count.get(s.dtype, 0) + 1
    main = max(numel, key=numel.get)
    others = [f"{_dtype_name(d)}: {count[d]} of {len(specs)} tensors" for d in numel if d != main]
    return _dtype_name(main) + (f" ({'; '.join(others)})" if others else "")
