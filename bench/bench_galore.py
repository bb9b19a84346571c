r"""GaLore speed benchmark: ``lowrank_optim`` against ``galore_torch`` and ``torch.optim.AdamW``.

Run from the repository root::

    python bench/bench_galore.py                    # full CPU run (a few minutes on 2 cores)
    python bench/bench_galore.py --quick            # smoke run on small shapes (seconds)
    python bench/bench_galore.py --device cuda --model 1b --layers 2   # GPU run, LLaMA-1B shapes

Options: ``--repeats N`` (timed rounds per contender), ``--threads N``
(``torch.set_num_threads``), ``--out DIR`` (default ``bench/out``, git-ignored).  On a CPU
shared with other jobs use ``--threads 1``: with every core busy elsewhere, torch's OpenMP
threads wait on each other at every barrier and a 2-thread SVD can take 3-6x longer than
a 1-thread one, which swamps the differences measured here.

Two measurements, each reported as a ratio to the peer measured in the same process:

1. **Subspace refresh** for single LLaMA-shaped gradients: our ``svd`` and ``rsvd``
   projectors against ``galore_torch``'s ``GaLoreProjector`` (exact SVD).  A refresh here
   is "compute the basis and project the gradient once", which is exactly what
   ``GaLoreProjector.project(grad, 0)`` does, so both sides do the same work.  For every
   contender the captured energy ||proj(G)||_F^2 / sum_{i<=r} sigma_i^2 is reported; an
   orthonormal basis makes ||proj(G)||_F^2 the energy it keeps, whichever side it projects.
2. **Optimizer step** on a stack of LLaMA-shaped weight matrices with fixed gradients:
   ``lowrank_optim.GaLoreAdamW`` (svd, rsvd), ``galore_torch.GaLoreAdamW`` and
   ``torch.optim.AdamW``: the steady-state step (no refresh), the refresh step, and the
   amortized step (refresh + (T - 1) steady) / T over one refresh period T, *computed* from
   the two measured medians rather than timed over T real steps.

Tables go to stdout and to ``DIR/bench_galore.md``; the raw samples and the machine
description go to ``DIR/bench_galore.json``.  Targets are reported as pass/fail lines;
nothing here asserts on a timing.
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

import lowrank_optim
from common import (MODELS, UPDATE_PROJ_GAP, announce_machine, gradient_like, interleaved_samples, llama_stack,
                    load_average, median, run_record, synchronizer, timing_parser, write_results)  # bench/ is on sys.path
from lowrank_optim.memory import state_bytes
from lowrank_optim.projectors import REGISTRY
from tables import table

with warnings.catch_warnings():  # galore_torch imports transformers, which may warn on import
    warnings.simplefilter("ignore")
    import fira
    import galore_torch
    from galore_torch.galore_projector import GaLoreProjector

#: (label, m, n, rank) for the refresh benchmark: one MLP-shaped matrix per model size and
#: the square 1B attention projection (square matrices take the right-side basis under std).
REFRESH_CASES = [
    ("60M MLP", 512, 1376, 128),
    ("130M MLP", 768, 2048, 256),
    ("1B attn", 2048, 2048, 512),
    ("1B MLP", 2048, 5461, 512),
]
QUICK_REFRESH_CASES = [("tiny MLP", 128, 344, 32), ("tiny attn", 128, 128, 32)]

RSVD_TARGET = {"shape": (2048, 5461, 512), "min_speedup": 3.0, "min_energy": 0.99}
PEER = "galore_torch"  # the name every ratio is taken against


# ---------------------------------------------------------------------------- 1. refresh
def ours_refresh(name: str, grad: torch.Tensor, rank: int, out: dict) -> Callable[[], object]:
    """Our projector: a fresh per-parameter state, a new basis, one projection."""
    projector = REGISTRY[name](rank, "std", UPDATE_PROJ_GAP)

    def run():
        pstate = projector.init_state(grad.shape, seed=0)
        projector.refresh(grad, pstate)
        out["low"] = projector.project(grad, pstate)

    return run


def peer_refresh(grad: torch.Tensor, rank: int, out: dict) -> Callable[[], object]:
    """galore_torch: a fresh projector's ``project(grad, 0)`` computes the SVD, then projects."""

    def run():
        projector = GaLoreProjector(rank, update_proj_gap=UPDATE_PROJ_GAP, proj_type="std")
        out["low"] = projector.project(grad, 0)

    return run


def bench_refresh(cases, repeats: int, device: torch.device, sync) -> list[dict]:
    rows = []
    for label, m, n, rank in cases:
        grad = gradient_like(m, n, rank, seed=m * 7 + n, device=device)
        best_energy = float(torch.linalg.svdvals(grad.float())[:rank].square().sum())
        outputs = {key: {} for key in ("svd", "rsvd", PEER)}
        contenders = {
            "svd": ours_refresh("svd", grad, rank, outputs["svd"]),
            "rsvd": ours_refresh("rsvd", grad, rank, outputs["rsvd"]),
            PEER: peer_refresh(grad, rank, outputs[PEER]),
        }
        samples = interleaved_samples(contenders, repeats, warmup=1, sync=sync)
        energy = {key: float(out["low"].float().square().sum()) / best_energy for key, out in outputs.items()}
        rows.append({"label": label, "shape": (m, n, rank), "samples": samples, "energy": energy})
        print(f"  refresh {label} {m}x{n} r={rank}: " + ", ".join(f"{k} {median(v):.4f}s" for k, v in samples.items()))
    return rows


def refresh_table(rows: list[dict]) -> str:
    header = ("case", "m x n", "rank", "galore_torch SVD (s)", "ours svd (s)", "ours rsvd (s)", "svd / galore_torch",
              "rsvd / galore_torch", "rsvd speedup", "rsvd energy")  # fmt: skip
    cells = []
    for row in rows:
        m, n, rank = row["shape"]
        peer, svd, rsvd = (median(row["samples"][k]) for k in (PEER, "svd", "rsvd"))
        cells.append((row["label"], f"{m}x{n}", rank, f"{peer:.4f}", f"{svd:.4f}", f"{rsvd:.4f}", f"{svd / peer:.2f}",
                      f"{rsvd / peer:.3f}", f"{peer / rsvd:.1f}x", f"{row['energy']['rsvd']:.4%}"))  # fmt: skip
    return table(header, cells, align="llrrrrrrrr")


# ---------------------------------------------------------------------------- 2. step
@dataclass
class StepContender:
    label: str
    make: Callable[[list[torch.nn.Parameter], int], torch.optim.Optimizer]  # (params, T) -> optimizer
    low_rank: bool = True  # False: dense AdamW, which has no refresh step
    samples: dict[str, list[float]] = field(default_factory=dict)
    state_bytes: int = 0  # after the steady-state steps


def step_contenders(rank: int, lr: float) -> list[StepContender]:
    """Every optimizer under test, configured alike: lr, scale 0.25, no weight decay.

    Weight decay is off, galore_torch's default (with it on, every contender pays one more
    pass over each weight); each keeps its own default epsilon, which does not affect time.
    """

    def ours(projector: str, cls=lowrank_optim.GaLoreAdamW, **extra):
        def make(params, gap):
            group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
            return cls([group], lr=lr, weight_decay=0.0, projector=projector, **extra)

        return make

    def peer(params, gap):
        group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
        return galore_torch.GaLoreAdamW([group], lr=lr, weight_decay=0.0, no_deprecation_warning=True)

    def fira_peer(params, gap):
        group = {"params": params, "rank": rank, "update_proj_gap": gap, "alpha": 0.25, "proj_type": "std"}
        return fira.FiraAdamW([group], lr=lr, weight_decay=0.0)

    def frugal(projector: str, **group_kw):
        def make(params, gap):
            group = {"params": params, "update_proj_gap": gap, "projector": projector, **group_kw}
            return lowrank_optim.FrugalAdamW([group], lr=lr, weight_decay=0.0)

        return make

    def dense(**kw):
        return lambda params, gap: torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kw)

    return [
        StepContender(PEER, peer),
        StepContender("ours svd", ours("svd")),
        StepContender("ours rsvd", ours("rsvd")),
        # galore_torch's arithmetic (eps on the raw sqrt(v)) saves one division per element
        # of R; this row separates that from the rest of the step.
        StepContender("ours svd eps_style=hf", ours("svd", eps_style="hf", eps=1e-6)),
        StepContender("fira (package)", fira_peer),
        StepContender("ours FiraAdamW svd", ours("svd", cls=lowrank_optim.FiraAdamW)),
        StepContender("ours FiraAdamW dct", ours("dct", cls=lowrank_optim.FiraAdamW)),
        StepContender("ours DCTAdamW", ours("dct", cls=lowrank_optim.DCTAdamW)),
        # FRUGAL at the paper's density 0.25: a basis of 1/4 of the short side, or 1/4 of
        # the columns, or 1/4 of the matrices (blocks).
        StepContender("ours FrugalAdamW svd", frugal("svd", density=0.25)),
        StepContender("ours FrugalAdamW columns", frugal("columns", density=0.25)),
        StepContender("ours FrugalAdamW blocks", frugal("blocks", density=0.25)),
        StepContender("torch AdamW foreach=False", dense(foreach=False), low_rank=False),
        # On CPU the default resolves to the for-loop implementation too; on CUDA to foreach.
        StepContender("torch AdamW default", dense(), low_rank=False),
    ]


def fresh_params(shapes, grads, device) -> list[torch.nn.Parameter]:
    """Every contender steps its own copy: optimizers mutate the weights they update."""
    params = []
    for shape, grad in zip(shapes, grads):
        p = torch.nn.Parameter(torch.zeros(shape, device=device).normal_(std=0.02))
        p.grad = grad  # shared and never written to by any optimizer here
        params.append(p)
    return params


def bench_steps(model: str, layers: int, repeats: int, steady_steps: int, device, sync) -> tuple[list, list]:
    """Steady and refresh step times of every contender on one LLaMA-shaped stack.

    Steady: an optimizer with T = 200 takes its first (refreshing) step, then every timed
    step lies strictly inside the first period.  Refresh: a second optimizer with T = 1
    refreshes on every step, with the same state sizes, so each of its steps is a refresh
    step for both galore_torch (``step % T == 0``) and ours (``age >= T``).
    """
    rank = MODELS[model][2]
    shapes = llama_stack(model, layers)
    grads = [gradient_like(m, n, rank, seed=i, device=device) for i, (m, n) in enumerate(shapes)]
    contenders = step_contenders(rank, lr=1e-3)
    # One warm-up call of ``steady_steps`` steps (its first step is the initial refresh),
    # then ``repeats`` timed calls: all of them must fit inside the first refresh period.
    if (1 + repeats) * steady_steps >= UPDATE_PROJ_GAP:
        raise SystemExit(
            f"--repeats {repeats} x --steady-steps {steady_steps} would cross the refresh at step {UPDATE_PROJ_GAP}"
        )

    def stepper(optimizer, count):
        def run():
            for _ in range(count):
                optimizer.step()

        return run

    optimizers = {c.label: c.make(fresh_params(shapes, grads, device), UPDATE_PROJ_GAP) for c in contenders}
    steady = {label: stepper(opt, steady_steps) for label, opt in optimizers.items()}
    samples = interleaved_samples(steady, repeats, warmup=1, sync=sync)
    for c in contenders:
        c.samples["steady"] = [s / steady_steps for s in samples[c.label]]
        c.state_bytes = state_bytes(optimizers[c.label])

    refreshing = {c.label: stepper(c.make(fresh_params(shapes, grads, device), 1), 1) for c in contenders if c.low_rank}
    samples = interleaved_samples(refreshing, repeats, warmup=1, sync=sync)
    for c in contenders:
        if c.low_rank:
            c.samples["refresh"] = samples[c.label]
    return contenders, shapes


def amortized(c: StepContender, gap: int = UPDATE_PROJ_GAP) -> float:
    """(refresh + (T - 1) steady) / T, from the measured medians; dense AdamW: its steady step."""
    steady = median(c.samples["steady"])
    if not c.low_rank:
        return steady
    return (median(c.samples["refresh"]) + (gap - 1) * steady) / gap


def step_table(contenders: list[StepContender]) -> str:
    peer = next(c for c in contenders if c.label == PEER)
    adamw = next(c for c in contenders if not c.low_rank)
    peer_steady, peer_refresh, peer_amortized = median(peer.samples["steady"]), median(peer.samples["refresh"]), amortized(peer)
    header = ("optimizer", "steady (ms)", f"steady / {PEER}", "refresh (ms)", f"refresh / {PEER}",
              f"amortized T={UPDATE_PROJ_GAP} (ms)", f"amortized / {PEER}", "state (MiB)", f"state / {PEER}",
              "state / AdamW")  # fmt: skip
    rows = []
    for c in contenders:
        steady = median(c.samples["steady"])
        if c.low_rank:
            refresh = median(c.samples["refresh"])
            refresh_cells = (f"{refresh * 1e3:.1f}", f"{refresh / peer_refresh:.2f}")
        else:
            refresh_cells = ("n/a", "n/a")
        rows.append((c.label, f"{steady * 1e3:.2f}", f"{steady / peer_steady:.2f}", *refresh_cells,
                     f"{amortized(c) * 1e3:.2f}", f"{amortized(c) / peer_amortized:.2f}", f"{c.state_bytes / 2**20:.2f}",
                     f"{c.state_bytes / peer.state_bytes:.2f}", f"{c.state_bytes / adamw.state_bytes:.2f}"))  # fmt: skip
    return table(header, rows, align="l" + "r" * 9)


# ---------------------------------------------------------------------------- verdicts
def verdicts(refresh_rows: list[dict], contenders: list[StepContender]) -> list[str]:
    """One pass/fail line per CPU target (nothing is asserted: these are reports)."""
    lines = []
    target = next((r for r in refresh_rows if tuple(r["shape"]) == RSVD_TARGET["shape"]), None)
    m, n, rank = RSVD_TARGET["shape"]
    if target is None:
        lines.append(f"- rsvd refresh at {m}x{n} r={rank}: not measured in this run (use the full run).")
    else:
        speedup = median(target["samples"][PEER]) / median(target["samples"]["rsvd"])
        energy = target["energy"]["rsvd"]
        ok = speedup >= RSVD_TARGET["min_speedup"] and energy >= RSVD_TARGET["min_energy"]
        lines.append(
            f"- rsvd refresh at {m}x{n} r={rank}: {speedup:.1f}x faster than {PEER}'s SVD "
            f"(target >= {RSVD_TARGET['min_speedup']:.0f}x), energy {energy:.4%} (target >= "
            f"{RSVD_TARGET['min_energy']:.0%}): **{'PASS' if ok else 'FAIL'}**"
        )
    by_label = {c.label: c for c in contenders}
    peer_steady = median(by_label[PEER].samples["steady"])
    for label in ("ours svd", "ours rsvd"):
        ratio = median(by_label[label].samples["steady"]) / peer_steady
        # "Within noise": the spread of the peer's own samples, as a fraction of its median.
        spread = (max(by_label[PEER].samples["steady"]) - min(by_label[PEER].samples["steady"])) / peer_steady
        verdict = "PASS" if ratio <= 1.0 else ("within noise" if ratio <= 1.0 + spread else "FAIL")
        lines.append(
            f"- steady-state step, {label}: {ratio:.2f}x {PEER}'s (target <= 1.0; "
            f"{PEER}'s own min-max spread {spread:.0%}): **{verdict}**"
        )
    return lines


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = timing_parser(__doc__, repeats_default=None, repeats_help="default 5, quick 3")
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="step-benchmark shapes (default 60m, quick tiny)")
    parser.add_argument("--layers", type=int, default=2, help="LLaMA blocks in the step-benchmark stack (7 matrices each)")
    parser.add_argument("--steady-steps", type=int, default=20, help="steps per timed steady-state sample")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    model = args.model or ("tiny" if args.quick else "60m")
    cases = QUICK_REFRESH_CASES if args.quick else REFRESH_CASES
    device = torch.device(args.device)
    sync = synchronizer(device)
    torch.manual_seed(0)  # initial weights (the gradients are seeded separately)

    info, load_before = announce_machine(device)

    started = time.perf_counter()
    print("Measuring subspace refresh ...")
    refresh_rows = bench_refresh(cases, repeats, device, sync)
    print("Measuring optimizer steps ...")
    contenders, shapes = bench_steps(model, args.layers, repeats, args.steady_steps, device, sync)
    elapsed = time.perf_counter() - started
    load_after = load_average()

    hidden, intermediate, rank = MODELS[model]
    report = "\n\n".join(
        [
            f"### Subspace refresh (median of {repeats}; ratios < 1 are faster than {PEER})",
            refresh_table(refresh_rows),
            f"### Optimizer step: {args.layers} LLaMA-{model} blocks ({len(shapes)} matrices, "
            f"{hidden}x{hidden} and {hidden}x{intermediate}), rank {rank}, fixed gradients "
            f"(median of {repeats} samples; steady = mean of {args.steady_steps} steps per sample; "
            f"amortized computed as (refresh + {UPDATE_PROJ_GAP - 1} x steady) / {UPDATE_PROJ_GAP})",
            step_table(contenders),
            "### Targets (CPU)",
            "\n".join(verdicts(refresh_rows, contenders)),
            f"Load average at start {load_before}, at end {load_after}; benchmark time {elapsed:.0f} s.",
        ]
    )
    print("\n" + report)

    steps = {
        "model": model,
        "shapes": shapes,
        "rank": rank,
        "update_proj_gap": UPDATE_PROJ_GAP,
        "samples_s": {c.label: c.samples for c in contenders},
        "amortized_s": {c.label: amortized(c) for c in contenders},
        "state_bytes": {c.label: c.state_bytes for c in contenders},
    }
    raw = run_record(info, args, repeats, (load_before, load_after), elapsed, refresh=refresh_rows, steps=steps)
    write_results(args.out, "bench_galore", report, raw)


if __name__ == "__main__":
    main()
