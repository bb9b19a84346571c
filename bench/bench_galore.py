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
import importlib.metadata
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import lowrank_optim
from lowrank_optim.memory import state_bytes
from lowrank_optim.projectors import REGISTRY

with warnings.catch_warnings():  # galore_torch imports transformers, which may warn on import
    warnings.simplefilter("ignore")
    import fira
    import galore_torch
    from galore_torch.galore_projector import GaLoreProjector

#: LLaMA configurations from the GaLore paper (docs/methods/galore.md#paper-settings-and-results):
#: hidden size, MLP intermediate size and the rank the paper trains them with.
#: ``tiny`` is not a paper model; it keeps ``--quick`` to seconds.
MODELS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 344, 32),
    "60m": (512, 1376, 128),
    "130m": (768, 2048, 256),
    "350m": (1024, 2736, 256),
    "1b": (2048, 5461, 512),
}

#: (label, m, n, rank) for the refresh benchmark: one MLP-shaped matrix per model size and
#: the square 1B attention projection (square matrices take the right-side basis under std).
REFRESH_CASES = [
    ("60M MLP", 512, 1376, 128),
    ("130M MLP", 768, 2048, 256),
    ("1B attn", 2048, 2048, 512),
    ("1B MLP", 2048, 5461, 512),
]
QUICK_REFRESH_CASES = [("tiny MLP", 128, 344, 32), ("tiny attn", 128, 128, 32)]

UPDATE_PROJ_GAP = 200  # T: the paper's refresh period, used for the amortized column
RSVD_TARGET = {"shape": (2048, 5461, 512), "min_speedup": 3.0, "min_energy": 0.99}
PEER = "galore_torch"  # the name every ratio is taken against


# ---------------------------------------------------------------------------- timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued kernels, so a timer brackets the work and not just its launch."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved_samples(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``repeats`` samples each.

    Contenders run round-robin (one call each per round) rather than one after the other,
    so a burst of background load on a shared machine slows every contender alike instead
    of landing on whichever happened to run at that moment.  Warm-up calls absorb one-off
    costs (LAPACK workspace queries, allocator growth, lazy optimizer state).
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(time_once(fn, sync))
    return samples


def median(samples: list[float]) -> float:
    # The median, not the mean: on a 2-core machine shared with other jobs the samples have
    # a long right tail (a contender preempted mid-call), and one such outlier would move a
    # mean by more than the differences being measured.
    return statistics.median(samples)


# ---------------------------------------------------------------------------- inputs
def gradient_like(m: int, n: int, rank: int, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded m x n matrix shaped like a training gradient.

    A signal of rank 2r with power-law singular values sigma_i = i^-1 (the spectra of LLM
    weight gradients decay roughly this way, and the tail between r and 2r gives a
    randomized range finder something to miss) plus Gaussian noise whose largest singular
    value is about half of sigma_r, so the spectrum has no clean gap at r.
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n, 2 * rank)
    left = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    right = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32).reciprocal()
    noise_std = 0.5 * float(sigma[rank - 1]) / (m**0.5 + n**0.5)
    grad = (left * sigma) @ right.t() + noise_std * torch.randn(m, n, generator=gen)
    return grad.to(device)


def llama_stack(model: str, layers: int) -> list[tuple[int, int]]:
    """Weight shapes (out x in) of ``layers`` LLaMA blocks: q, k, v, o, gate, up, down."""
    hidden, intermediate, _ = MODELS[model]
    block = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return block * layers


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
    lines = [
        "| case | m x n | rank | galore_torch SVD (s) | ours svd (s) | ours rsvd (s) "
        "| svd / galore_torch | rsvd / galore_torch | rsvd speedup | rsvd energy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m, n, rank = row["shape"]
        peer, svd, rsvd = (median(row["samples"][k]) for k in (PEER, "svd", "rsvd"))
        lines.append(
            f"| {row['label']} | {m}x{n} | {rank} | {peer:.4f} | {svd:.4f} | {rsvd:.4f} "
            f"| {svd / peer:.2f} | {rsvd / peer:.3f} | {peer / rsvd:.1f}x | {row['energy']['rsvd']:.4%} |"
        )
    return "\n".join(lines)


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
    lines = [
        f"| optimizer | steady (ms) | steady / {PEER} | refresh (ms) | refresh / {PEER} "
        f"| amortized T={UPDATE_PROJ_GAP} (ms) | amortized / {PEER} | state (MiB) | state / {PEER} | state / AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in contenders:
        steady = median(c.samples["steady"])
        if c.low_rank:
            refresh = median(c.samples["refresh"])
            refresh_cells = f"{refresh * 1e3:.1f} | {refresh / peer_refresh:.2f}"
        else:
            refresh_cells = "n/a | n/a"
        lines.append(
            f"| {c.label} | {steady * 1e3:.2f} | {steady / peer_steady:.2f} | {refresh_cells} "
            f"| {amortized(c) * 1e3:.2f} | {amortized(c) / peer_amortized:.2f} "
            f"| {c.state_bytes / 2**20:.2f} | {c.state_bytes / peer.state_bytes:.2f} | {c.state_bytes / adamw.state_bytes:.2f} |"
        )
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "galore_torch": importlib.metadata.version("galore-torch"),
        "lowrank_optim": lowrank_optim.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float] | None:
    """1/5/15-minute load average: documents contention from other jobs during the run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------- main
def announce_machine(device: torch.device) -> tuple[dict, list[float] | None]:
    """Print the machine description and load average before a run, and return both."""
    info, load_before = machine_info(device), load_average()
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- load average at start: {load_before}\n")
    return info, load_before


def write_results(out_dir: str, name: str, report: str, raw: dict) -> None:
    """``DIR/name.md`` (the tables) and ``DIR/name.json`` (every raw sample)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(report + "\n")
    (out / f"{name}.json").write_text(json.dumps(raw, indent=1))
    print(f"\nWrote {out / name}.md and {out / name}.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per contender (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default="bench/out", help="directory for the markdown tables and raw JSON")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
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

    raw = {
        "machine": info,
        "args": vars(args),
        "repeats": repeats,
        "load_average": {"start": load_before, "end": load_after},
        "elapsed_s": elapsed,
        "refresh": refresh_rows,
        "steps": {
            "model": model,
            "shapes": shapes,
            "rank": rank,
            "update_proj_gap": UPDATE_PROJ_GAP,
            "samples_s": {c.label: c.samples for c in contenders},
            "amortized_s": {c.label: amortized(c) for c in contenders},
            "state_bytes": {c.label: c.state_bytes for c in contenders},
        },
    }
    write_results(args.out, "bench_galore", report, raw)


if __name__ == "__main__":
    main()
