r"""Memory of training with each optimizer: analytical estimate, paper reproduction, measured run.

    python -m lowrank_optim.memory --model 1b --optimizers adamw,galore_adamw,qgalore_adamw8bit \
        --rank 512 --dtype bf16 --format markdown --plot out.png
    python -m lowrank_optim.memory --model 60m --optimizers adamw,galore_adamw,apollo_adamw,apollo_mini_adamw
    python -m lowrank_optim.memory --paper          # GaLore paper, Table 2 memory column
    python -m lowrank_optim.memory --measure        # a tiny LLaMA, state bytes from the state

**What is counted.**  Per parameter (one row per parameter tensor; tied tensors once):
``weights`` (numel x dtype size), ``grads`` (the same: a full gradient per parameter, as in
ordinary, non-layer-wise training), ``state`` (the optimizer's moments and every other
tensor in ``optimizer.state[p]`` except the projector) and ``projector`` (the basis or
whatever the projector keeps: SVD basis, INT4 codes + scales + zero points + similarity
queue, DCT / coordinate indices).  Activations, the temporary full-size update, SVD
workspaces and allocator slack are *not* counted: the estimate is what the state keeps
alive between steps, the quantity ``bench/bench_galore.py``'s ``state_bytes`` measures
(storage-based, each storage once).  ``optimizer`` = state + projector.

**Conventions (all verified against real optimizer state by tests/test_memory.py):**

* Projected parameters: the 2-D weights of ``nn.Linear`` modules whose qualified name
  contains one of ``target_modules`` (default ``("attn", "mlp")``: LLaMA's q/k/v/o and
  gate/up/down), exactly as :func:`lowrank_optim.param_groups`.  Everything else
  (embedding, LM head, norms, biases) gets the optimizer's full-rank AdamW (Adafactor for
  ``galore_adafactor``).
* Side (``std``): m x n weight, right projection when m >= n (basis r x n, R m x r),
  left when m < n (basis m x r, R r x n).  ``r = min(rank, m, n)``; with ``density``,
  r = round(density * min(m, n)).
* Moments and the SVD basis have the parameter's dtype (``--dtype``); 8-bit moments are
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
  the paper's rank for the model.
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
* Units: bytes internally; ``GB`` = 1e9 and ``GiB`` = 2^30 are both printed where it
  matters.
* INT8 weights (Q-GaLore): ``int8_weights=True`` / ``--int8-weights`` (applied to
  ``qgalore_adamw8bit`` only on the CLI), or automatic for a module with ``Int8Linear``s:
  1-byte codes + fp32 scale + uint8 zero point per group of 256.

**The GaLore paper's memory column (Table 2).**  Setting: BF16 weights and states, LM head
untied (``LlamaConfig``'s default; jiaweizzhao/GaLore ``configs/llama_60m.json`` etc. set no
``tie_word_embeddings``), attention + MLP projected,
ranks 128/256/256/512, *no* gradients (the column is "weights + optimizer states").  The
paper's "G" is **GiB** (2^30): the full-rank column is reproduced within 1.5% for 130M and
350M in GiB but is 6-7% off in GB; GB is closer only for Full 60M/1B (-3.2%/+3.0% against
-9.9%/-4.1%), and for the GaLore column GiB is closer in all four rows (GB: +17/+18/+14/+9%).
The summed absolute error is lower in GiB for both columns.  Our numbers (``paper_table()``;
GiB; ``full_GB``/``galore_GB`` are in the same rows):

=====  =========  =====  ===========  =====
model  Full ours  paper  GaLore ours  paper
=====  =========  =====  ===========  =====
60M    0.325      0.36   0.261        0.24
130M   0.749      0.76   0.569        0.52
350M   2.056      2.06   1.293        1.22
1B     7.483      7.80   4.436        4.38
=====  =========  =====  ===========  =====

Within 5%: Full 130M (-1.4%), 350M (-0.2%), 1B (-4.1%), GaLore 1B (+1.3%).  Not within
5%, explained: (a) Full 60M (-9.9%): with the stated config (hidden 512, 8 layers, vocab
32000) the model has 58.1M parameters, so 3 x 2 bytes x 58.1M = 0.325 GiB; 0.36 GiB would
need 64.4M parameters, so the paper counted something beyond the stated shapes that it
does not name; no convention we tried gives 0.36 (GB 0.348, tied 0.233 GiB, with
gradients 0.433 GiB).  (b) GaLore 60M/130M/350M (+8.6/+9.5/+6.0%): ours counts the
projected matrices as mr + 2nr (the paper's own formula; the basis m*r included) plus two
full BF16 Adam moments of the untied embedding and LM head, a remainder that dominates
small models (32.8M of 58.1M parameters at 60M).  Projecting the LM head too
(``paper_table(project_lm_head=True)``, ``--paper --project-lm-head``) gives
0.215/0.509/1.202/4.255 GiB (-10.4/-2.2/-1.5/-2.9%): the paper's GaLore numbers lie
between the two conventions, and the paper does not say which accounting it used.  We
report the convention of the paper's code (LM head full-rank: its ``target_modules`` are
attn and mlp) and test the deviations above exactly.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "LLAMA_CONFIGS",
    "PAPER_TABLE2",
    "ParamSpec",
    "MemoryRow",
    "MemoryEstimate",
    "available_estimators",
    "llama_param_specs",
    "module_param_specs",
    "estimate",
    "paper_table",
    "measure",
    "state_bytes",
    "state_bytes_per_param",
    "plot",
    "main",
]

GB, GIB = 1e9, 2**30

# hidden, intermediate, heads, layers, paper rank
LLAMA_CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "60m": (512, 1376, 8, 8, 128),
    "130m": (768, 2048, 12, 12, 256),
    "350m": (1024, 2736, 16, 24, 256),
    "1b": (2048, 5461, 32, 24, 512),
    "7b": (4096, 11008, 32, 32, 1024),
}
LLAMA_VOCAB = 32000
# GaLore paper Table 2, memory column (weights + optimizer states, BF16): Full, GaLore, "G".
PAPER_TABLE2: dict[str, tuple[float, float]] = {"60m": (0.36, 0.24), "130m": (0.76, 0.52), "350m": (2.06, 1.22), "1b": (7.80, 4.38)}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
EIGHT_BIT = {"galore_adamw8bit", "gradnorm_lorp_adamw8bit", "qgalore_adamw8bit"}
PEERS = ("adamw", "adamw8bit", "sgd")
#: Keep no basis (a seed, redrawn when used) and add Fira's limiter scalar to the moments.
APOLLO = {"apollo_adamw", "apollo_mini_adamw"}
#: Projectors the estimator knows; ``random`` and ``gaussian`` keep only a seed.
PROJECTORS = ("svd", "rsvd", "random", "gaussian", "columns", "rows", "blocks", "dct", "int4")


def available_estimators() -> list[str]:
    """Optimizer names :func:`estimate` accepts: ours plus ``adamw``, ``adamw8bit`` and ``sgd``."""
    from .factory import available_optimizers

    return sorted(set(available_optimizers()) | set(PEERS))


def _check_optimizer(name: str) -> str:
    key = name.lower().removeprefix("lowrank_")
    if key not in available_estimators():
        raise ValueError(f"unknown optimizer {name!r}; valid ones: {', '.join(available_estimators())}")
    return key


def _preset_rank(key: str) -> int | None:
    """The rank ``create_optimizer`` uses for ``key`` given a model and no rank (APOLLO-Mini: 1)."""
    from .optim import OPTIMIZERS

    return getattr(OPTIMIZERS.get(key), "preset_rank", None)


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid ones: {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype.lower()]


@dataclass
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    projected: bool
    int8: bool = False  # Q-GaLore INT8 weight: 1-byte codes + fp32 scale and uint8 zero per 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def llama_param_specs(model: str, tied: bool = False, target_modules: Iterable[str] = ("attn", "mlp"),
                      vocab: int = LLAMA_VOCAB) -> list[ParamSpec]:
    """The parameter shapes of a LLaMA config (names as in ``transformers``' LlamaForCausalLM),
    computed from the config, nothing instantiated."""
    key = model.lower()
    if key not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model {model!r}; valid ones: {', '.join(LLAMA_CONFIGS)} (or pass an nn.Module)")
    h, i, _, layers, _ = LLAMA_CONFIGS[key]
    targets = tuple(target_modules)
    specs = [ParamSpec("model.embed_tokens.weight", (vocab, h), False)]
    for layer in range(layers):
        pre = f"model.layers.{layer}"
        for proj, shape in (("q_proj", (h, h)), ("k_proj", (h, h)), ("v_proj", (h, h)), ("o_proj", (h, h))):
            name = f"{pre}.self_attn.{proj}"
            specs.append(ParamSpec(name + ".weight", shape, any(t in name for t in targets)))
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            name = f"{pre}.mlp.{proj}"
            specs.append(ParamSpec(name + ".weight", shape, any(t in name for t in targets)))
        specs += [ParamSpec(f"{pre}.input_layernorm.weight", (h,), False),
                  ParamSpec(f"{pre}.post_attention_layernorm.weight", (h,), False)]
    specs.append(ParamSpec("model.norm.weight", (h,), False))
    if not tied:
        specs.append(ParamSpec("lm_head.weight", (vocab, h), any(t in "lm_head" for t in targets)))
    return specs


def module_param_specs(model: nn.Module, target_modules: Iterable[str] = ("attn", "mlp")) -> list[ParamSpec]:
    """Shapes of a module's trainable parameters (tied ones once; meta device is fine) and
    which are projected, by the rule of :func:`lowrank_optim.param_groups`."""
    from .quant import Int8Linear

    targets = tuple(target_modules)
    projected = {id(m.weight) for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and any(t in n for t in targets)}
    int8 = {id(m.weight) for m in model.modules() if isinstance(m, Int8Linear)}
    specs, seen = [], set()
    for name, p in model.named_parameters():
        if (not p.requires_grad and id(p) not in int8) or id(p) in seen:
            continue
        seen.add(id(p))
        specs.append(ParamSpec(name, tuple(p.shape), id(p) in projected and p.dim() == 2, id(p) in int8))
    return specs


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
    """Per-parameter rows and totals (bytes) of one optimizer on one model."""

    model: str
    optimizer: str
    dtype: str
    rank: int | None
    density: float | None
    rows: list[MemoryRow] = field(default_factory=list)

    def total(self, what: str = "total") -> float:
        return sum(getattr(r, what) for r in self.rows)

    @property
    def totals(self) -> dict[str, float]:
        out = {k: self.total(k) for k in FIELDS}
        out["optimizer"] = out["state"] + out["projector"]
        out["total"] = sum(out[k] for k in FIELDS)
        return out

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
        return {"model": self.model, "optimizer": self.optimizer, "dtype": self.dtype, "rank": self.rank,
                "density": self.density, "totals": self.totals, "rows": self.records()}


def _rank(m: int, n: int, rank: int | None, density: float | None) -> int:
    if density is not None:
        return max(1, round(density * min(m, n)))
    return min(rank, m, n)


def _moments(numel: int, width: int, eight_bit: bool, min_8bit_size: int = 4096, count: int = 2) -> int:
    """Bytes of ``count`` Adam moments of ``numel`` elements."""
    if eight_bit:
        if numel < min_8bit_size:
            return count * numel * 4
        return count * (numel + 4 * math.ceil(numel / 256))
    return count * numel * width


def _param_state(key: str, spec: ParamSpec, width: int, rank: int | None, density: float | None,
                 projector: str | None, history: int, queue_size: int, min_8bit_size: int,
                 block_fraction: float, beta1: bool) -> tuple[float, float]:
    """(state bytes, projector bytes) of one parameter."""
    numel = spec.numel
    if key == "adamw":
        return 2 * numel * width + 4, 0
    if key == "adamw8bit":
        return _moments(numel, width, True, min_8bit_size), 0
    if key == "sgd":
        return numel * width, 0
    eight = key in EIGHT_BIT
    if not spec.projected:
        if key == "galore_adafactor":
            extra = numel * 4 if beta1 else 0
            if len(spec.shape) >= 2:
                return 4 * (math.prod(spec.shape[:-1]) + math.prod(spec.shape[:-2] + spec.shape[-1:])) + extra, 0
            return 4 * numel + extra, 0
        return _moments(numel, width, eight, min_8bit_size), 0
    m, n = spec.shape
    defaults = {"dct_adamw": "dct", "qgalore_adamw8bit": "int4", **dict.fromkeys(APOLLO, "gaussian")}
    kind = projector or defaults.get(key, "svd")
    if key == "frugal_adamw" and kind == "blocks":
        return block_fraction * 2 * numel * width, 0
    if kind in ("columns", "rows"):
        k = int(density * (n if kind == "columns" else m))
        low = m * k if kind == "columns" else k * n
        basis = 4 * k
    else:
        r = _rank(m, n, rank, density)
        low = max(m, n) * r
        if kind == "dct":
            basis = 8 * r
        elif kind in ("random", "gaussian"):
            basis = 0  # the seed is a Python int: nothing but the moments stays allocated
        elif kind == "int4":
            b = min(m, n) * r
            basis = math.ceil(b / 2) + 5 * math.ceil(b / 256) + 4 * queue_size
        else:
            basis = min(m, n) * r * width
    if key == "galore_adafactor":
        r_rows, r_cols = (m, low // m) if m >= n else (low // n, n)
        state = 4 * (r_rows + r_cols) + (4 * low if beta1 else 0)
    else:
        state = _moments(low, width, eight, min_8bit_size)
    if key == "fira_adamw" or key in APOLLO:
        state += 4  # the norm-growth limiter's previous norm, a 0-dim fp32 tensor
    elif key == "natural_galore_adamw":
        state += history * low * width
    elif key.startswith("gradnorm_lorp"):
        state += 4 * m + _moments(m, 4, eight, min_8bit_size)
    return state, basis


def estimate(model: str | nn.Module, optimizer: str, rank: int | None = None, density: float | None = None,
             dtype: str | torch.dtype = "bf16", target_modules: Iterable[str] = ("attn", "mlp"), tied: bool = False,
             grads: bool = True, projector: str | None = None, history: int = 4, queue_size: int = 5,
             min_8bit_size: int = 4096, beta1: bool = False, int8_weights: bool = False) -> MemoryEstimate:
    """Analytical memory of ``optimizer`` on ``model`` (a LLaMA config name or an ``nn.Module``).

    ``rank`` defaults to the optimizer's preset (``apollo_mini_adamw``: 1), else the paper's
    rank for a LLaMA config name (128 otherwise); with
    ``density`` the rank comes from it (FRUGAL).  ``dtype`` is the weights', gradients' and
    states' dtype (the paper: bf16).  ``grads=False`` leaves gradients out (the paper's
    column; layer-wise training frees them during backward).  ``projector`` names FRUGAL's
    projector (``svd``, ``columns``, ``rows``, ``blocks``); ``history``, ``queue_size``,
    ``min_8bit_size``, ``beta1`` follow the optimizers' options of the same names.
    ``int8_weights`` stores the projected weights as Q-GaLore's INT8 codes (1 byte + 5 bytes
    per group of 256; their gradient stays in ``dtype``); an ``nn.Module`` whose linears
    are ``Int8Linear`` gets this automatically.
    """
    key = _check_optimizer(optimizer)
    dt = _dtype(dtype)
    if rank is None and density is None:
        rank = _preset_rank(key)
    width = torch.empty((), dtype=dt).element_size()
    if isinstance(model, nn.Module):
        specs, label = module_param_specs(model, target_modules), type(model).__name__
    elif isinstance(model, str):
        specs, label = llama_param_specs(model, tied, target_modules), model.lower()
        if rank is None and density is None:
            rank = LLAMA_CONFIGS[model.lower()][4]
    else:
        raise ValueError(f"model must be one of {', '.join(LLAMA_CONFIGS)} or an nn.Module, not {model!r}")
    if key == "frugal_adamw" and density is None and projector in ("columns", "rows", "blocks"):
        raise ValueError(f"frugal_adamw with projector={projector!r} needs density=...")
    if projector not in (None, *PROJECTORS):
        raise ValueError(f"unknown projector {projector!r}; valid ones: {', '.join(PROJECTORS)}")
    if rank is None and density is None:
        rank = 128
    if key not in PEERS and not any(s.projected for s in specs):
        raise ValueError(f"no nn.Linear weight matches target_modules={list(target_modules)}")
    n_proj = sum(s.projected for s in specs)
    block_fraction = max(1, round(density * n_proj)) / n_proj if (density and n_proj) else 0.0
    est = MemoryEstimate(label, key, str(dt).removeprefix("torch."), rank, density)
    for s in specs:
        if int8_weights and s.projected:
            s.int8 = True
        state, basis = _param_state(key, s, width, rank, density, projector, history, queue_size, min_8bit_size,
                                    block_fraction, beta1)
        weights = s.numel + 5 * math.ceil(s.numel / 256) if s.int8 else s.numel * width
        est.rows.append(MemoryRow(s.name, s.shape, s.projected and key not in PEERS, weights,
                                  s.numel * width if grads else 0, state, basis))
    if key == "adamw8bit" and any(s.numel >= min_8bit_size for s in specs):
        est.rows.append(MemoryRow("(bnb qmap)", (2, 256), False, 0, 0, 2 * 256 * 4, 0))
    return est


# ----------------------------------------------------------------------------- paper


def paper_table(project_lm_head: bool = False) -> list[dict[str, Any]]:
    """GaLore paper Table 2 memory column against our estimate (BF16, no gradients, GiB and GB)."""
    rows = []
    for model, (p_full, p_galore) in PAPER_TABLE2.items():
        targets = ("attn", "mlp", "lm_head") if project_lm_head else ("attn", "mlp")
        full = estimate(model, "adamw", dtype="bf16", grads=False).totals
        gal = estimate(model, "galore_adamw", dtype="bf16", grads=False, target_modules=targets).totals
        # AdamW's 4-byte step tensors are no part of the paper's count
        f = full["weights"] + full["optimizer"] - 4 * len(llama_param_specs(model))
        g = gal["weights"] + gal["optimizer"]
        rows.append({"model": model, "rank": LLAMA_CONFIGS[model][4],
                     "full_GiB": f / GIB, "full_GB": f / GB, "paper_full": p_full, "full_err_%": 100 * (f / GIB / p_full - 1),
                     "galore_GiB": g / GIB, "galore_GB": g / GB, "paper_galore": p_galore,
                     "galore_err_%": 100 * (g / GIB / p_galore - 1)})
    return rows


# ----------------------------------------------------------------------------- measured


def _walk_storages(value, seen: set, out: list) -> None:
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            # A wrapper subclass (a DTensor: this rank's block; torchao's 8-bit state: codes,
            # scales, code book) has a placeholder storage: count the tensors it wraps (not
            # its metadata: a DTensor also lists its device mesh, whose rank table is not state).
            for name in value.__tensor_flatten__()[0]:
                inner = getattr(value, name)
                if isinstance(inner, torch.Tensor):
                    _walk_storages(inner, seen, out)
            return
        storage = value.untyped_storage()
        if storage.data_ptr() not in seen or storage.nbytes() == 0:
            seen.add(storage.data_ptr())
            out.append(storage.nbytes())
    elif isinstance(value, dict):
        for v in value.values():
            _walk_storages(v, seen, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_storages(v, seen, out)
    elif hasattr(value, "__dict__"):
        _walk_storages(vars(value), seen, out)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the whole ``optimizer.state`` keeps alive: every tensor reachable from it (inside
    nested dicts and projector objects too), counted by its storage, each storage once, so a
    basis that is a view of a full SVD factor counts the whole factor."""
    sizes: list[int] = []
    _walk_storages(dict(optimizer.state), set(), sizes)
    return sum(sizes)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def start_process_peak() -> int | None:
    """Begin measuring the process's peak resident memory on CPU: returns the baseline to
    pass to :func:`process_peak_since`, or None where the OS cannot tell (not Linux).

    There is no allocator to ask on CPU (``torch.cuda.max_memory_allocated`` is 0), so this
    uses the kernel's high-water mark ``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``.  Freed memory is first returned to the OS (``malloc_trim``)
    so the baseline is what is really in use; the result is still approximate (pages,
    allocator caching), unlike the exact :func:`state_bytes`."""
    import ctypes
    import gc

    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _proc_status("VmRSS")
    except (OSError, KeyError, AttributeError):
        return None


def process_peak_since(baseline: int | None) -> int | None:
    """Peak resident bytes above ``baseline`` since :func:`start_process_peak`."""
    if baseline is None:
        return None
    return max(0, _proc_status("VmHWM") - baseline)


def state_bytes_per_param(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Bytes of ``optimizer.state[p]`` per parameter, by storage, each storage counted once
    across the whole optimizer (as :func:`state_bytes`): a storage
    shared by several parameters (bitsandbytes' qmaps) counts for the first one only."""
    seen: set = set()
    out = {}
    for name, p in named:
        sizes: list[int] = []
        _walk_storages(optimizer.state.get(p, {}), seen, sizes)
        out[name] = sum(sizes)
    return out


def tiny_llama(hidden: int = 64, intermediate: int = 172, layers: int = 2, heads: int = 4, vocab: int = 512) -> nn.Module:
    """A small ``transformers`` LlamaForCausalLM (untied head), for the measured run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def build_optimizer(name: str, model: nn.Module, rank: int | None = None, density: float | None = None,
                    target_modules: Iterable[str] = ("attn", "mlp"), **kwargs: Any) -> torch.optim.Optimizer:
    """``adamw``, ``sgd`` (torch; SGD with momentum 0.9 unless given), ``adamw8bit``
    (bitsandbytes) or one of ours on ``model``."""
    key = _check_optimizer(name)
    params = [p for p in model.parameters() if p.requires_grad]
    if key == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if key == "sgd":
        return torch.optim.SGD(params, **{"momentum": 0.9, **kwargs})
    if key == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    from .factory import create_optimizer

    return create_optimizer(key, model, target_modules, rank=rank, density=density, **kwargs)


def measure(name: str, model: nn.Module | None = None, steps: int = 3, rank: int | None = 8, density: float | None = None,
            batch: int = 2, seq: int = 16, target_modules: Iterable[str] = ("attn", "mlp"), refresh_every: int | None = 2,
            **kwargs: Any) -> dict[str, Any]:
    """Run ``steps`` optimizer steps on ``model`` (default :func:`tiny_llama`) with random
    tokens; return the optimizer-state bytes per parameter (storage-based), their total,
    bytes per parameter element, and on CUDA the allocator's peak per phase (forward,
    backward, step, refresh step: a step that recomputes the bases, forced by
    ``update_proj_gap=refresh_every`` for our optimizers).  CPU runs report ``peaks = {}``."""
    key = _check_optimizer(name)
    torch.manual_seed(0)
    model = model if model is not None else tiny_llama()
    device = next(model.parameters()).device
    if key not in PEERS and refresh_every is not None and "update_proj_gap" not in kwargs:
        kwargs["update_proj_gap"] = refresh_every
    opt = build_optimizer(key, model, rank=rank, density=density, target_modules=target_modules, **kwargs)
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    cuda = device.type == "cuda"
    peaks: dict[str, int] = {}

    def phase(label: str, fn):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
            peaks[label] = max(peaks.get(label, 0), torch.cuda.max_memory_allocated(device))
        return out

    for step in range(steps):
        if vocab is not None:
            ids = torch.randint(0, vocab, (batch, seq), device=device)
            loss = phase("forward", lambda: model(input_ids=ids, labels=ids).loss)
        else:
            x = torch.randn(batch, model_in_features(model), device=device)
            loss = phase("forward", lambda: model(x).float().pow(2).mean())
        phase("backward", loss.backward)
        refresh = key not in PEERS and refresh_every and step % refresh_every == 0
        phase("refresh step" if refresh else "step", opt.step)
        opt.zero_grad(set_to_none=True)
    named, seen = [], set()
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((n, p))
    per_param = state_bytes_per_param(opt, named)
    total = sum(per_param.values())
    numel = sum(p.numel() for _, p in named)
    return {"optimizer": key, "steps": steps, "device": str(device), "state_bytes": per_param, "state_total": total,
            "state_bytes_per_param": total / numel, "weights_bytes": sum(p.numel() * p.element_size() for _, p in named),
            "peaks": peaks}


def model_in_features(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return first.in_features


# ----------------------------------------------------------------------------- output


def _fmt(b: float, unit: str) -> str:
    return f"{b / (GIB if unit == 'GiB' else GB if unit == 'GB' else 2**20 if unit == 'MiB' else 1):.4f}"


def summary_rows(estimates: Sequence[MemoryEstimate]) -> list[dict[str, Any]]:
    return [{"optimizer": e.optimizer, "model": e.model, "dtype": e.dtype, "rank": e.rank, "density": e.density,
             **e.totals} for e in estimates]


def render(estimates: Sequence[MemoryEstimate], fmt: str = "table", unit: str = "GiB", per_layer: bool = False) -> str:
    """Totals per optimizer (and with ``per_layer`` one row per block) as ``table``,
    ``markdown``, ``csv`` (bytes) or ``json`` (bytes, with every parameter row)."""
    if fmt == "json":
        return json.dumps([e.to_dict() for e in estimates], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        if per_layer:
            w = csv.writer(buf)
            w.writerow(["optimizer", "layer", *FIELDS, "total"])
            for e in estimates:
                for layer, g in e.per_layer().items():
                    w.writerow([e.optimizer, layer, *(g[k] for k in FIELDS), sum(g.values())])
        else:
            rows = summary_rows(estimates)
            w = csv.DictWriter(buf, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"unknown format {fmt!r}; valid ones: table, markdown, csv, json")
    head = ["optimizer", "rank", f"weights ({unit})", f"grads ({unit})", f"state ({unit})", f"projector ({unit})",
            f"total ({unit})"]
    body = [[e.optimizer, _size(e), *(_fmt(e.totals[k], unit) for k in (*FIELDS, "total"))] for e in estimates]
    if per_layer:
        for e in estimates:
            for layer, g in e.per_layer().items():
                body.append([f"{e.optimizer}: {layer}", _size(e), *(_fmt(g[k], unit) for k in FIELDS),
                             _fmt(sum(g.values()), unit)])
    return _grid(head, body, fmt)


def _size(e: MemoryEstimate) -> str:
    """The rank column: rows of one table can differ (APOLLO-Mini's preset rank 1)."""
    if e.optimizer in PEERS:
        return "-"
    return f"density {e.density:g}" if e.density is not None else str(e.rank)


def _grid(head: list[str], body: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda r: "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in body])


def render_paper(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    head = ["model", "rank", "Full GiB", "Full GB", "paper", "err %", "GaLore GiB", "GaLore GB", "paper", "err %"]
    body = [[r["model"], str(r["rank"]), f"{r['full_GiB']:.3f}", f"{r['full_GB']:.3f}", f"{r['paper_full']:.2f}",
             f"{r['full_err_%']:+.1f}", f"{r['galore_GiB']:.3f}", f"{r['galore_GB']:.3f}", f"{r['paper_galore']:.2f}",
             f"{r['galore_err_%']:+.1f}"] for r in rows]
    return _grid(head, body, "markdown" if fmt == "markdown" else "table")


def plot(estimates: Sequence[MemoryEstimate], path: str, unit: str = "GiB", per_layer: bool = True) -> str:
    """PNG: stacked bars per optimizer (weights / grads / state / projector) and, with
    ``per_layer``, per-layer stacked bars of the first optimizer.  Uses the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = GIB if unit == "GiB" else GB if unit == "GB" else 2**20
    ncols = 2 if per_layer else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols + 2, 4.5), squeeze=False)
    ax = axes[0][0]
    labels = [e.optimizer for e in estimates]
    bottom = [0.0] * len(estimates)
    for k in FIELDS:
        vals = [e.totals[k] / scale for e in estimates]
        ax.bar(labels, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel(unit)
    ax.set_title(f"{estimates[0].model}, {estimates[0].dtype}")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    if per_layer:
        ax = axes[0][1]
        names: list[str] = []
        for e in estimates:
            names += [n for n in e.per_layer() if n not in names]
        width = 0.8 / len(estimates)
        for j, e in enumerate(estimates):
            groups = e.per_layer()
            vals = [(groups[n]["state"] + groups[n]["projector"]) / scale if n in groups else 0.0 for n in names]
            ax.bar([x + j * width for x in range(len(names))], vals, width=width, label=e.optimizer)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))],
                      [n.replace("model.", "").removesuffix(".weight") for n in names], rotation=90, fontsize=6)
        ax.set_ylabel(f"optimizer state + projector ({unit})")
        ax.set_title("per layer")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_wandb(estimates: Sequence[MemoryEstimate], project: str = "lowrank_optim-memory") -> None:
    """Log the totals as a wandb table (imported only here)."""
    import wandb

    rows = summary_rows(estimates)
    run = wandb.run or wandb.init(project=project, job_type="memory")
    run.log({"memory": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_optim.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="60m", help=f"LLaMA config: {', '.join(LLAMA_CONFIGS)}")
    parser.add_argument("--optimizers", default="adamw,galore_adamw", help="comma-separated; " + ", ".join(available_estimators()))
    parser.add_argument("--rank", type=int, default=None,
                        help="default: the optimizer's preset (apollo_mini_adamw: 1), else the paper's rank for the model")
    parser.add_argument("--density", type=float, default=None)
    parser.add_argument("--projector", default=None, help="FRUGAL projector: svd, columns, rows, blocks")
    parser.add_argument("--dtype", default="bf16", help=", ".join(sorted(DTYPES)))
    parser.add_argument("--target-modules", default="attn,mlp")
    parser.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    parser.add_argument("--int8-weights", action="store_true", help="projected weights as INT8 (Q-GaLore)")
    parser.add_argument("--no-grads", action="store_true", help="leave gradients out (the paper's column)")
    parser.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
    parser.add_argument("--unit", default="GiB", choices=["GiB", "GB", "MiB"])
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--plot", default=None, help="write a PNG here")
    parser.add_argument("--paper", action="store_true", help="GaLore paper Table 2 reproduction")
    parser.add_argument("--project-lm-head", action="store_true", help="with --paper: GaLore projects the LM head too")
    parser.add_argument("--measure", action="store_true", help="measured run on a tiny LLaMA")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --measure")
    parser.add_argument("--wandb", action="store_true", help="also log a wandb table")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if args.paper:
        note = ("GaLore paper Table 2 memory column: BF16 weights + optimizer states, no gradients, LM head "
                f"untied and {'projected' if args.project_lm_head else 'full-rank'}, attention+MLP projected; "
                "the paper's G is GiB.")
        print(note, file=sys.stderr if args.format in ("csv", "json") else sys.stdout)
        print(render_paper(paper_table(args.project_lm_head), args.format))
        return 0
    targets = tuple(t for t in args.target_modules.split(",") if t)
    if args.measure:
        model = tiny_llama()
        rows = []
        print(f"measured: tiny LLaMA ({sum(p.numel() for p in model.parameters())} fp32 parameters) on {args.device}, "
              f"{args.steps} steps, random tokens", file=sys.stderr)
        for o in names:
            rank = args.rank or _preset_rank(_check_optimizer(o)) or 8
            res = measure(o, model=tiny_llama().to(args.device), steps=args.steps, rank=rank, density=args.density,
                          target_modules=targets, **({"projector": args.projector} if args.projector else {}))
            est = estimate(model, o, rank=rank, density=args.density, dtype="fp32", target_modules=targets,
                           projector=args.projector)
            rows.append([o, str(res["state_total"]), str(int(est.totals["optimizer"])), f"{res['state_bytes_per_param']:.3f}",
                         "; ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in res["peaks"].items()) or "(CPU: no peaks)"])
        head = ["optimizer", "measured state B", "estimated B", "B / param", "CUDA peaks"]
        print(_grid(head, rows, "markdown" if args.format == "markdown" else "table"))
        return 0
    estimates = [estimate(args.model, o, rank=args.rank, density=args.density, dtype=args.dtype, target_modules=targets,
                          tied=args.tied, grads=not args.no_grads, projector=args.projector,
                          int8_weights=args.int8_weights and o == "qgalore_adamw8bit") for o in names]
    print(render(estimates, args.format, args.unit, args.per_layer))
    if args.plot:
        plot(estimates, args.plot, args.unit)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.wandb:
        log_wandb(estimates)
    return 0


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad value before any work, with argparse's one-line usage error (exit 2)."""
    from pathlib import Path

    from . import _validate as V
    from .optim.base import COMMON_CHECKS

    # --rank and --density follow the optimizers' own rules for the same hyperparameters.
    checks = {"rank": COMMON_CHECKS["rank"], "density": COMMON_CHECKS["density"], "steps": V.int_at_least(1)}
    for dest, check in checks.items():
        if not check(getattr(args, dest)):
            parser.error(f"--{dest} must be {check.expected}, got {getattr(args, dest)!r}")
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not names:
        parser.error(f"--optimizers {args.optimizers!r}: name at least one of {', '.join(available_estimators())}")
    for o in names:
        try:
            _check_optimizer(o)
        except ValueError as err:
            parser.error(f"--optimizers: {err}")
    # Refused rather than created: a typo in the path should not leave new folders behind.
    if args.plot and not Path(args.plot).absolute().parent.is_dir():
        parser.error(f"--plot {args.plot!r}: folder {str(Path(args.plot).parent)!r} does not exist")
    if args.measure:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            parser.error(f"--device {args.device!r}: not a torch device ({err})")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device!r}: CUDA is not available on this machine")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as err:  # bad model / optimizer / dtype: the message lists the valid ones
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
