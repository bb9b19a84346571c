r"""Every optimizer of ``lowrank_optim`` against every installed peer, side by side, in one process.

Run from the repository root::

    python bench/compare.py                               # CPU: 2 tiny LLaMA blocks, T = 20
    python bench/compare.py --model 60m --threads 1       # CPU, LLaMA-60M shapes
    python bench/compare.py --quick                       # smoke run (seconds; skips torchao)
    python bench/compare.py --device cuda --model 1b      # GPU: LLaMA-1B shapes, T = 200

Contenders step a stack of LLaMA-shaped weight matrices (``--layers`` blocks of q, k, v, o,
gate, up, down; ``common.MODELS`` gives the shapes and the paper's rank) with fixed
gradients, all at matched settings: lr 1e-3, betas (0.9, 0.999), weight decay 0, scale 0.25,
rank and ``update_proj_gap`` T alike; each keeps its own default epsilon (it changes no
timing).  APOLLO runs at its paper's scales instead (α = 1, and APOLLO-Mini's rank 1,
tensor-wise scaling, α = √128, which ``apollo_torch`` spells ``scale=128``: it multiplies
by the square root).  Ours are built by ``lowrank_optim.create_optimizer``; the peers are

- ``galore_torch`` GaLoreAdamW and GaLoreAdafactor, ``fira`` FiraAdamW,
  ``pytorch_optimizer`` GaLore and Fira, ``apollo_torch`` APOLLOAdamW (twice: APOLLO's and
  APOLLO-Mini's settings): the same method as one of ours (the "matching peer"); our
  GaLore with ``projector="random"`` has no package of its own and is set against
  ``galore_torch``'s GaLore;
- ``torch.optim.AdamW`` (foreach, and fused where the device has it), ``bitsandbytes``
  AdamW8bit and ``torchao`` AdamW8bit: dense baselines (our methods without a published
  package are compared with AdamW foreach; GaLoreAdamW8bit with bitsandbytes' 8-bit Adam);
- ``q_galore_torch`` QGaLoreAdamW8bit, which fails with bitsandbytes 0.50: it is listed with
  the exception it raises, like any peer that is missing or crashes.

What is measured, for every contender (each has its own copy of the weights and gradients):

*first period*
    one contender after the other: build the optimizer and take T steps (lazy state, the
    first basis, one-off compiles).  On CUDA the allocator's peak over this period, minus
    what was allocated before the optimizer existed, is the *peak* column (state plus the
    step's temporaries); on CPU it is the rise of the process's resident-memory high-water
    mark over the period (``memory.start_process_peak``: Linux only, approximate, "n/m"
    elsewhere), after two throwaway steps of another instance so that one-off library
    setup is not counted.
*timed periods*
    ``--repeats`` rounds; in each round every contender takes one full period of T steps
    (round-robin, so background load on a shared machine hits all alike), each step timed on
    its own.  *refresh* = median of the slowest step of each period (the step that recomputes
    the basis: galore_torch refreshes at step 0, T, ... and pytorch_optimizer at 1, T, 2T,
    ..., so its position in the period differs, but every period holds exactly one);
    *steady* = median of the other steps; *amortized* = (refresh + (T - 1) steady) / T, the
    mean step over one period from the two medians (robust to preempted steps on a shared
    machine; the raw median period mean is in the JSON as ``period_mean_s``).  Dense
    optimizers have no refresh: all three are the median step.
*state*
    ``lowrank_optim.memory.state_bytes`` after the timed periods: every tensor reachable from
    ``optimizer.state`` (inside projector objects too), counted by the storage it keeps
    alive, applied to ours and to the peers alike.  *minimum* is the analytical state of the
    method (``lowrank_optim.memory.estimate``: what the method must store, docs/methods.md,
    e.g. GaLore's basis plus two moments of the projected gradient); measured / minimum is
    1.00 when nothing is kept beyond it.

Tables go to stdout and to ``OUT/compare.md``, raw samples to ``OUT/compare.json``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.metadata
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

import lowrank_optim
from lowrank_optim.memory import estimate, process_peak_since, start_process_peak, state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a directory of scripts
from common import MODELS, announce_machine, load_average, synchronizer, time_once, write_results  # noqa: E402
from tables import table  # noqa: E402

LR, SCALE = 1e-3, 0.25
ADAMW = "torch AdamW foreach"  # the dense reference every contender is also compared with
#: Peer packages by import name -> distribution name (for the versions in the report).
PACKAGES = {
    "galore_torch": "galore-torch",
    "fira": "fira",
    "apollo_torch": "apollo-torch",
    "pytorch_optimizer": "pytorch-optimizer",
    "bitsandbytes": "bitsandbytes",
    "torchao": "torchao",
    "q_galore_torch": "q-galore-torch",
}


# ---------------------------------------------------------------------------- the stack
class Block(nn.Module):
    """One LLaMA block's projected matrices, named as in ``transformers``, so that
    ``lowrank_optim.param_groups`` selects them by the usual ``("attn", "mlp")``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        linear = lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False)  # noqa: E731
        self.self_attn = nn.ModuleDict({k: linear(hidden, hidden) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict(
            {"gate_proj": linear(hidden, intermediate), "up_proj": linear(hidden, intermediate),
             "down_proj": linear(intermediate, hidden)}
        )  # fmt: skip


class LlamaStack(nn.Module):
    def __init__(self, model: str, layers: int):
        super().__init__()
        hidden, intermediate, _ = MODELS[model]
        self.layers = nn.ModuleList(Block(hidden, intermediate) for _ in range(layers))


def stack_with_grads(model: str, layers: int, device: torch.device, seed: int = 0) -> LlamaStack:
    """Seeded weights (std 0.02) and fixed seeded gradients in ``.grad``."""
    gen = torch.Generator().manual_seed(seed)
    stack = LlamaStack(model, layers)
    for p in stack.parameters():
        p.data = (0.02 * torch.randn(p.shape, generator=gen)).to(device)
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return stack


def fresh_copy(stack: LlamaStack) -> LlamaStack:
    """Weights and gradients of their own: optimizers write the weights, and a peer that
    edited ``.grad`` in place would otherwise change every other contender's input."""
    clone = copy.deepcopy(stack)
    for p, q in zip(stack.parameters(), clone.parameters()):
        q.grad = p.grad.clone()
    return clone


# ---------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    label: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    package: str  # import name: "lowrank_optim", "torch" or a key of PACKAGES
    peer: str | None = None  # label of the contender every ratio is taken against
    method: str | None = None  # lowrank_optim.memory.estimate key for the analytical minimum
    projector: str | None = None  # passed to estimate (FRUGAL, DCT, rsvd ...)
    low_rank: bool = True  # False: a dense optimizer, which has no refresh step
    rank: int | None = None  # the contender's own rank where it is not the run's (APOLLO-Mini: 1)
    skip: str | None = None  # why this run leaves it out (e.g. --quick and a slow compile)
    error: str | None = None
    step_times: list[float] = field(default_factory=list)  # seconds, every timed step in order
    state_bytes: int = 0
    minimum_bytes: float | None = None
    peak_bytes: int | None = None
    optimizer: torch.optim.Optimizer | None = None  # built by the first period, stepped by the timed ones


def peer_group(stack: nn.Module, rank: int, gap: int, **keys) -> list[dict]:
    """galore-torch-style param group: every matrix projected, with the package's own key names."""
    return [{"params": list(stack.parameters()), "rank": rank, "update_proj_gap": gap, **keys}]


def contenders(rank: int, gap: int) -> list[Contender]:
    """Ours first, then the peers; ``peer`` names the row each ratio is taken against."""

    def ours(name: str, **extra):
        def make(stack):
            kw = {"rank": rank, "update_proj_gap": gap, "lr": LR, "weight_decay": 0.0, **extra}
            if lowrank_optim.optim.OPTIMIZERS[name].hyperparameter_defaults()["projector"] == "rsvd":
                kw.setdefault("projector", "svd")  # the peers' exact SVD unless a row names another
            if name != "frugal_adamw":  # FRUGAL's state-full part takes the full step (scale 1)
                kw.setdefault("scale", SCALE)
            return lowrank_optim.create_optimizer(name, stack, summary=False, **kw)

        return make

    def peer(module: str, attr: str, grouped: dict | None = None, group_rank: int | None = None, **kw):
        """``module.attr`` on a projected param group with ``grouped`` keys (rank ``group_rank``,
        default the run's), or on the plain parameters when ``grouped`` is None (dense optimizers)."""

        def make(stack):
            cls = getattr(importlib.import_module(module), attr)
            if grouped is None:
                params = list(stack.parameters())
            else:
                params = peer_group(stack, group_rank or rank, gap, **grouped)
            return cls(params, lr=LR, weight_decay=0.0, **kw)

        return make

    galore_keys = {"scale": SCALE, "proj_type": "std"}
    adafactor = {"relative_step": False, "scale_parameter": False}  # lr from us, as in bench/pretrain.py
    q_galore_keys = {**galore_keys, "quant": True, "quant_n_bit": 4, "quant_group_size": 256,
                     "cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 5}  # fmt: skip
    # APOLLO's paper scales (its scripts: apollo_scale 1, and 128 with rank 1 for Mini);
    # apollo_torch multiplies by sqrt(scale), ours by scale.
    apollo_keys = {"proj": "random", "proj_type": "std", "scale_type": "channel", "scale": 1.0}
    mini_keys = {"proj": "random", "proj_type": "std", "scale_type": "tensor", "scale": 128.0}
    G, F = "galore_torch GaLoreAdamW", "fira FiraAdamW"
    A, AM = "apollo_torch APOLLOAdamW", "apollo_torch APOLLOAdamW mini"
    return [
        Contender("ours GaLoreAdamW svd", ours("galore_adamw"), "lowrank_optim", G, "galore_adamw"),
        Contender("ours GaLoreAdamW rsvd", ours("galore_adamw", projector="rsvd"), "lowrank_optim", G, "galore_adamw", "rsvd"),
        Contender("ours GaLoreAdamW random", ours("galore_adamw", projector="random"), "lowrank_optim", G, "galore_adamw", "random"),
        # Both products on bf16 operands (the basis kept in bf16): opt-in for GaLore.
        Contender("ours GaLoreAdamW rsvd bf16", ours("galore_adamw", projector="rsvd", projector_args={"product_dtype": "bfloat16"}),
                  "lowrank_optim", G, "galore_adamw", "rsvd"),
        Contender("ours GaLoreAdafactor", ours("galore_adafactor", **adafactor), "lowrank_optim", "galore_torch GaLoreAdafactor", "galore_adafactor"),
        Contender("ours GaLoreAdamW8bit", ours("galore_adamw8bit"), "lowrank_optim", "bitsandbytes AdamW8bit", "galore_adamw8bit"),
        Contender("ours QGaLoreAdamW8bit", ours("qgalore_adamw8bit"), "lowrank_optim", "q_galore_torch QGaLoreAdamW8bit", "qgalore_adamw8bit"),
        Contender("ours FiraAdamW", ours("fira_adamw"), "lowrank_optim", F, "fira_adamw"),
        Contender("ours DCTAdamW", ours("dct_adamw"), "lowrank_optim", ADAMW, "dct_adamw", "dct"),
        Contender("ours FrugalAdamW svd", ours("frugal_adamw"), "lowrank_optim", ADAMW, "frugal_adamw", "svd"),
        Contender("ours NaturalGaLoreAdamW", ours("natural_galore_adamw"), "lowrank_optim", ADAMW, "natural_galore_adamw"),
        Contender("ours GradNormLoRPAdamW", ours("gradnorm_lorp_adamw"), "lowrank_optim", ADAMW, "gradnorm_lorp_adamw"),
        Contender("ours GradNormLoRPAdamW8bit", ours("gradnorm_lorp_adamw8bit"), "lowrank_optim", ADAMW, "gradnorm_lorp_adamw8bit"),
        Contender("ours ApolloAdamW", ours("apollo_adamw", scale=apollo_keys["scale"]), "lowrank_optim", A, "apollo_adamw"),
        # The sketch kept between refreshes (projector_args keep): r x n floats per matrix
        # above the minimum column (which is APOLLO's default: no basis kept).
        Contender("ours ApolloAdamW keep", ours("apollo_adamw", scale=apollo_keys["scale"], projector_args={"keep": True}),
                  "lowrank_optim", A, "apollo_adamw"),
        # The sketch product in the gradient's dtype (fp32 here), apollo_torch's arithmetic:
        # the default runs it in bf16 from rank 16 (projectors.options.BF16_PRODUCT_MIN_RANK).
        Contender("ours ApolloAdamW fp32 sketch", ours("apollo_adamw", scale=apollo_keys["scale"],
                                                       projector_args={"product_dtype": "gradient"}),
                  "lowrank_optim", A, "apollo_adamw"),
        Contender("ours ApolloMiniAdamW", ours("apollo_mini_adamw", rank=1, scale=math.sqrt(mini_keys["scale"]), scaling="tensor"),
                  "lowrank_optim", AM, "apollo_mini_adamw", rank=1),
        Contender(G, peer("galore_torch", "GaLoreAdamW", galore_keys, no_deprecation_warning=True), "galore_torch", method="galore_adamw"),
        Contender("galore_torch GaLoreAdafactor", peer("galore_torch", "GaLoreAdafactor", galore_keys, **adafactor), "galore_torch", method="galore_adafactor"),
        Contender(F, peer("fira", "FiraAdamW", {"alpha": SCALE, "proj_type": "std"}), "fira", method="fira_adamw"),
        Contender("pytorch_optimizer GaLore", peer("pytorch_optimizer", "GaLore", {"scale": SCALE, "projection_type": "std"}), "pytorch_optimizer", G, "galore_adamw"),
        Contender("pytorch_optimizer Fira", peer("pytorch_optimizer", "Fira", {"scale": SCALE, "projection_type": "std"}), "pytorch_optimizer", F, "fira_adamw"),
        Contender(A, peer("apollo_torch", "APOLLOAdamW", apollo_keys), "apollo_torch", method="apollo_adamw"),
        Contender(AM, peer("apollo_torch", "APOLLOAdamW", mini_keys, group_rank=1), "apollo_torch", method="apollo_mini_adamw", rank=1),
        Contender("q_galore_torch QGaLoreAdamW8bit", peer("q_galore_torch", "QGaLoreAdamW8bit", q_galore_keys), "q_galore_torch", method="qgalore_adamw8bit"),
        Contender(ADAMW, peer("torch.optim", "AdamW", foreach=True), "torch", method="adamw", low_rank=False),
        # fused: CUDA, and CPU since torch 2.4; where a device lacks it, the row lists the error
        Contender("torch AdamW fused", peer("torch.optim", "AdamW", fused=True), "torch", ADAMW, "adamw", low_rank=False),
        Contender("bitsandbytes AdamW8bit", peer("bitsandbytes.optim", "AdamW8bit"), "bitsandbytes", ADAMW, "adamw8bit", low_rank=False),
        Contender("torchao AdamW8bit", peer("torchao.optim", "AdamW8bit"), "torchao", "bitsandbytes AdamW8bit", "adamw8bit", low_rank=False),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- measuring
def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def analytical_minimum(c: Contender, stack: nn.Module, rank: int) -> float | None:
    """Bytes the method must store (``memory.estimate``, fp32 state, no gradients)."""
    if c.method is None:
        return None
    est = estimate(stack, c.method, rank=c.rank or rank, dtype=stack.layers[0].mlp.up_proj.weight.dtype, grads=False,
                   projector=c.projector)  # fmt: skip
    return est.totals["optimizer"]


def first_period(c: Contender, stack: LlamaStack, gap: int, rank: int, device: torch.device, sync) -> Callable[[], None] | None:
    """Build ``c`` on its own copy of the stack and take T steps; returns the period runner
    (None, with ``c.error`` set, when the peer is missing or crashes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # galore_torch imports transformers, which may warn on import
            importlib.import_module(c.package)
    except Exception as error:  # ImportError, or a package that breaks while importing
        c.error = f"not importable: {describe(error)}"
        return None
    own = fresh_copy(stack)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter of the research packages
            if device.type != "cuda":
                # The process's resident memory also grows the first time a code path runs
                # (LAPACK workspaces, torchao's compile): two throwaway steps first, so the
                # peak below is this optimizer's memory, not one-off library setup.
                warm_up = c.make(fresh_copy(stack))
                warm_up.step()
                warm_up.step()
                del warm_up
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                rss_baseline = start_process_peak()
            optimizer = c.make(own)
            for _ in range(gap):
                optimizer.step()
            sync()
    except Exception as error:
        c.error = describe(error)
        return None
    if device.type == "cuda":
        c.peak_bytes = torch.cuda.max_memory_allocated(device) - before
    else:
        c.peak_bytes = process_peak_since(rss_baseline)
    c.minimum_bytes = analytical_minimum(c, stack, rank)
    c.optimizer = optimizer  # kept alive for the timed periods and the final state count

    def period():
        for _ in range(gap):
            c.step_times.append(time_once(optimizer.step, sync))

    return period


def measure(cs: list[Contender], stack: LlamaStack, gap: int, rank: int, repeats: int, device: torch.device, progress: bool) -> None:
    sync = synchronizer(device)
    runners: dict[str, Callable[[], None]] = {}
    for c in tqdm(cs, desc="first period", disable=not progress):
        if c.skip:
            continue
        runner = first_period(c, stack, gap, rank, device, sync)
        if runner is not None:
            runners[c.label] = runner
    by_label = {c.label: c for c in cs}
    for _ in tqdm(range(repeats), desc=f"timed rounds of {len(runners)} x {gap} steps", disable=not progress):
        for label, runner in runners.items():  # round-robin: one period of each per round
            runner()
    for label in runners:
        c = by_label[label]
        c.state_bytes = state_bytes(c.optimizer)


# ---------------------------------------------------------------------------- summary
def periods(c: Contender, gap: int) -> list[list[float]]:
    return [c.step_times[i : i + gap] for i in range(0, len(c.step_times), gap)]


def summary(c: Contender, gap: int) -> dict:
    """Step times from the timed periods: *refresh* = median of each period's slowest step,
    *steady* = median of the other steps, *amortized* = (refresh + (T - 1) steady) / T.

    The amortized time is computed from the two medians rather than taken as the mean of a
    period: on a machine shared with other jobs nearly every period holds a few preempted
    steps, and a mean moves with them by more than the differences measured here.  The raw
    mean of each period is kept as ``period_mean`` (JSON) for a quiet machine.
    """
    chunks = periods(c, gap)
    period_mean = statistics.median(sum(p) / len(p) for p in chunks)
    if not c.low_rank:
        steady = statistics.median(c.step_times)
        return {"amortized": steady, "refresh": None, "steady": steady, "period_mean": period_mean}
    refresh = statistics.median(max(p) for p in chunks)
    steady = statistics.median(t for p in chunks for t in sorted(p)[:-1])
    return {"amortized": (refresh + (gap - 1) * steady) / gap, "refresh": refresh, "steady": steady,
            "period_mean": period_mean}  # fmt: skip


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b in (None, 0) else f"{a / b:.2f}"


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def rows(cs: list[Contender], gap: int) -> list[dict]:
    """One record per measured contender, with every ratio against its peer and AdamW."""
    measured = {c.label: c for c in cs if c.step_times}
    run = {c.label for c in cs}  # what --only kept: a peer left out of it did not fail
    stats = {label: summary(c, gap) for label, c in measured.items()}
    out = []
    for label, c in measured.items():
        s, peer = stats[label], measured.get(c.peer)
        p = stats.get(c.peer, {})
        adamw = measured.get(ADAMW)
        missing = "(failed)" if c.peer in run else "(not in --only)"
        out.append({
            "label": label, "peer": c.peer if peer else (f"{c.peer} {missing}" if c.peer else None),
            **{f"{k}_s": v for k, v in s.items()},
            **{f"{k}_vs_peer": (v / p[k] if peer and v is not None and p.get(k) else None) for k, v in s.items()},
            "state_bytes": c.state_bytes, "minimum_bytes": c.minimum_bytes,
            "state_vs_minimum": c.state_bytes / c.minimum_bytes if c.minimum_bytes else None,
            "state_vs_peer": c.state_bytes / peer.state_bytes if peer else None,
            "state_vs_adamw": c.state_bytes / adamw.state_bytes if adamw else None,
            "peak_bytes": c.peak_bytes,
            "peak_vs_peer": c.peak_bytes / peer.peak_bytes if peer and c.peak_bytes and peer.peak_bytes else None,
        })  # fmt: skip
    return out


def results_table(records: list[dict], gap: int) -> str:
    def cell(x):
        return "-" if x is None else f"{x:.2f}"

    header = ("optimizer", "matching peer", f"amortized T={gap} (ms)", "/ peer", "refresh (ms)", "/ peer", "steady (ms)",
              "/ peer", "state (MiB)", "/ peer", "/ minimum", "/ AdamW", "peak (MiB)", "/ peer")  # fmt: skip
    rows = [(r["label"], r["peer"] or "-", ms(r["amortized_s"]), cell(r["amortized_vs_peer"]), ms(r["refresh_s"]),
             cell(r["refresh_vs_peer"]), ms(r["steady_s"]), cell(r["steady_vs_peer"]), mib(r["state_bytes"]),
             cell(r["state_vs_peer"]), cell(r["state_vs_minimum"]), cell(r["state_vs_adamw"]),
             mib(r["peak_bytes"]) if r["peak_bytes"] is not None else "n/m", cell(r["peak_vs_peer"]))
            for r in records]  # fmt: skip
    return table(header, rows, align="ll" + "r" * 12)


def failures(cs: list[Contender]) -> list[dict]:
    return [{"label": c.label, "reason": c.skip or c.error} for c in cs if c.skip or c.error]


def versions() -> dict[str, str]:
    out = {}
    for module, dist in PACKAGES.items():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 tiny block, T = 3, 2 rounds, no torchao")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny", help="LLaMA shapes (and the paper's rank)")
    parser.add_argument("--layers", type=int, default=None, help="blocks in the stack (default 2, quick 1)")
    parser.add_argument("--rank", type=int, default=None, help="default: the paper's rank for --model")
    parser.add_argument("--gap", type=int, default=None, help="update_proj_gap T (default: 20 on CPU, 200 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed periods per contender (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings, any case: keep the contenders whose label has one")
    parser.add_argument("--out", default="bench/out", help="directory for compare.md / compare.json (git-ignored)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layers = args.layers or (1 if args.quick else 2)
    gap = args.gap or (3 if args.quick else 200 if device.type == "cuda" else 20)
    repeats = args.repeats or (2 if args.quick else 5)
    rank = args.rank or MODELS[args.model][2]
    info, load_before = announce_machine(device)
    cs = contenders(rank, gap)
    if args.only:
        # Any case: "apollo" selects our ApolloAdamW rows with the apollo_torch ones.
        keep = [s.strip().lower() for s in args.only.split(",") if s.strip()]
        cs = [c for c in cs if any(k in c.label.lower() for k in keep)]
    if args.quick:
        for c in cs:
            if c.package == "torchao" and not c.skip:  # its first step compiles for about a minute on CPU
                c.skip = "skipped in --quick (first step compiles for ~1 min on CPU)"
    stack = stack_with_grads(args.model, layers, device)

    started = time.perf_counter()
    measure(cs, stack, gap, rank, repeats, device, progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    records = rows(cs, gap)
    failed = failures(cs)
    hidden, intermediate, _ = MODELS[args.model]
    shapes = f"{hidden}x{hidden} x4, {intermediate}x{hidden} x2, {hidden}x{intermediate}"
    report = "\n\n".join([
        f"### {layers} LLaMA-{args.model} block(s) ({shapes} per block), rank {rank}, T = {gap}, "
        f"{args.device}, {torch.get_num_threads()} threads; median of {repeats} periods",
        results_table(records, gap),
        "Not measured (missing, crashed or skipped):\n\n" + "\n".join(f"- {f['label']}: {f['reason']}" for f in failed)
        if failed else "Every peer ran.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())
        + f"; load average at start {load_before}, at end {load_average()}; {elapsed:.0f} s.",
    ])  # fmt: skip
    print("\n" + report)
    raw = {
        "machine": info, "args": vars(args), "rank": rank, "update_proj_gap": gap, "layers": layers,
        "versions": versions(), "rows": records, "failed": failed, "elapsed_s": elapsed,
        "step_times_s": {c.label: c.step_times for c in cs if c.step_times},
    }  # fmt: skip
    write_results(args.out, "compare_quick" if args.quick else "compare", report, raw)
    return raw


if __name__ == "__main__":
    main()
