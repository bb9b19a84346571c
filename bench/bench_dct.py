r"""DCT projector benchmark: the DCT selection against our exact ``svd`` and randomized
``rsvd`` refresh, and the matmul against the FFT (Makhoul) transform.

Run from the repository root::

    python bench/bench_dct.py --threads 1  # LLaMA shapes, about a minute on 2 quiet CPU cores
    python bench/bench_dct.py --quick      # small shapes, seconds
    python bench/bench_dct.py --device cuda

Options: ``--repeats N`` (default 3: the exact SVD of 2048 x 5461 dominates the run),
``--threads N`` (use 1 on a CPU shared with other jobs, see ``bench_galore.py``),
``--out DIR`` (default ``bench/out``, git-ignored).  The timing helpers (round-robin
samples, medians, the gradient-like test matrices) are ``bench/common.py``'s.

Four measurements, all in one process so that every ratio compares numbers taken under
the same load:

1. **Refresh** of one LLaMA-shaped gradient (fresh state, new subspace, one projection:
   the same work ``bench_galore.py`` times): ``svd``, ``rsvd`` (p = 8, q = 2), ``dct`` with
   ``transform="matmul"`` and with ``transform="fft"``.  Also the energy each keeps,
   ||proj(G)||^2 / sum_{i<=r} sigma_i^2.  The test matrices have random singular vectors,
   the worst case for a fixed basis: no r DCT vectors align with them, so the DCT keeps
   far less energy here than on real gradients, whose rows are smoother.
2. **Transform alone**: the similarity S (G C or Cᵀ G) by matmul and by FFT.
3. **Basis build**: the one-off cost of the cached n x n DCT matrix, paid by the first
   refresh of each size (excluded from 1 by a warm-up call).
4. **Projection per step** (project + project back, no refresh): the DCT gathers its r
   basis vectors from the cache on every call, a dense basis is read as is.

Nothing is asserted; tables go to stdout and ``DIR/bench_dct.md``, raw samples to
``DIR/bench_dct.json``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from common import (UPDATE_PROJ_GAP, announce_machine, gradient_like, interleaved_samples, load_average, median,
                    run_record, synchronizer, timing_parser, write_results)  # bench/ is on sys.path when run as a script
from lowrank_optim.projectors import REGISTRY
from lowrank_optim.projectors import dct as dct_module
from lowrank_optim.projectors.base import LEFT, choose_side
from tables import table

#: (label, m, n, rank): LLaMA-60M MLP and the LLaMA-1B attention and MLP projections.
REFRESH_CASES = [("60M MLP", 512, 1376, 128), ("1B attn", 2048, 2048, 512), ("1B MLP", 2048, 5461, 512)]
QUICK_CASES = [("tiny MLP", 128, 344, 32), ("tiny attn", 128, 128, 32)]

#: name -> (projector, projector_args)
CONTENDERS = {
    "svd": ("svd", {}),
    "rsvd": ("rsvd", {}),
    "dct matmul": ("dct", {"transform": "matmul"}),
    "dct fft": ("dct", {"transform": "fft"}),
}


def refresh(name: str, grad: torch.Tensor, rank: int, out: dict) -> Callable[[], object]:
    projector_name, options = CONTENDERS[name]
    projector = REGISTRY[projector_name](rank, "std", UPDATE_PROJ_GAP, **options)

    def run():
        pstate = projector.init_state(grad.shape, seed=0)
        projector.refresh(grad, pstate)
        out["pstate"] = pstate
        out["low"] = projector.project(grad, pstate)

    return run


def similarity(grad: torch.Tensor, transform: str) -> Callable[[], object]:
    """S as the DCT projector computes it for this gradient's ``std`` side."""
    left = choose_side("std", grad.shape) == LEFT
    matrix = grad.t() if left else grad
    return lambda: dct_module.dct_rows(matrix, transform)


def round_trip(name: str, grad: torch.Tensor, pstate: dict, rank: int) -> Callable[[], object]:
    projector_name, options = CONTENDERS[name]
    projector = REGISTRY[projector_name](rank, "std", UPDATE_PROJ_GAP, **options)
    return lambda: projector.project_back(projector.project(grad, pstate), pstate)


def build_time(size: int, device: torch.device, sync) -> float:
    dct_module.clear_dct_cache()
    sync()
    start = time.perf_counter()
    dct_module.dct_matrix(size, device)
    sync()
    return time.perf_counter() - start


def bench_case(label, m, n, rank, repeats, device, sync) -> dict:
    grad = gradient_like(m, n, rank, seed=m * 7 + n, device=device)
    best_energy = float(torch.linalg.svdvals(grad.float())[:rank].square().sum())
    side_size = m if choose_side("std", grad.shape) == LEFT else n
    build = build_time(side_size, device, sync)  # leaves the fp32 basis cached

    outputs = {name: {} for name in CONTENDERS}
    # No warm-up round: build_time left the basis cached, and one more exact SVD of the
    # 2048 x 5461 case would cost more than the rest of the run on 2 cores.
    refresh_samples = interleaved_samples(
        {name: refresh(name, grad, rank, outputs[name]) for name in CONTENDERS}, repeats, warmup=0, sync=sync
    )
    energy = {name: float(out["low"].float().square().sum()) / best_energy for name, out in outputs.items()}
    transform_samples = interleaved_samples(
        {t: similarity(grad, t) for t in ("matmul", "fft")}, repeats, warmup=1, sync=sync
    )
    step_samples = interleaved_samples(
        {name: round_trip(name, grad, outputs[name]["pstate"], rank) for name in ("svd", "dct matmul")},
        repeats,
        warmup=1,
        sync=sync,
    )
    print(
        f"  {label} {m}x{n} r={rank}: "
        + ", ".join(f"{k} {median(v):.4f}s" for k, v in refresh_samples.items())
        + f"; S by matmul {median(transform_samples['matmul']):.4f}s, fft {median(transform_samples['fft']):.4f}s"
    )
    return {
        "label": label,
        "shape": (m, n, rank),
        "basis_size": side_size,
        "build_s": build,
        "refresh": refresh_samples,
        "energy": energy,
        "transform": transform_samples,
        "round_trip": step_samples,
    }


def tables(rows: list[dict], repeats: int) -> str:
    refresh, energy, similarity, per_step = [], [], [], []
    for row in rows:
        m, n, rank = row["shape"]
        t = {k: median(v) for k, v in row["refresh"].items()}
        refresh.append((row["label"], f"{m}x{n}", rank, *(f"{t[k] * 1e3:.1f}" for k in CONTENDERS),
                        *(f"{t[dct] / t[peer]:.3f}" for dct in ("dct fft", "dct matmul") for peer in ("svd", "rsvd"))))
        energy.append((row["label"], *(f"{row['energy'][k]:.4%}" for k in CONTENDERS)))
        mm, fft = median(row["transform"]["matmul"]), median(row["transform"]["fft"])
        similarity.append((row["label"], row["basis_size"], f"{mm * 1e3:.2f}", f"{fft * 1e3:.2f}", f"{fft / mm:.3f}",
                           f"{row['build_s'] * 1e3:.1f}"))
        svd, dct = median(row["round_trip"]["svd"]), median(row["round_trip"]["dct matmul"])
        per_step.append((row["label"], f"{svd * 1e3:.2f}", f"{dct * 1e3:.2f}", f"{dct / svd:.2f}"))
    return "\n".join([
        f"### Refresh: new subspace + one projection (median of {repeats}; ratio < 1: DCT faster)",
        table(("case", "m x n", "rank", *(f"{k} (ms)" for k in CONTENDERS), "dct fft / svd", "dct fft / rsvd",
               "dct matmul / svd", "dct matmul / rsvd"), refresh, align="ll" + "r" * 9),
        "",
        "Energy kept, ||proj(G)||^2 / sum_{i<=r} sigma_i^2 (random singular vectors: the worst case for a fixed basis)",
        "",
        table(("case", *CONTENDERS), energy, align="lrrrr"),
        "",
        f"### Similarity S = G C (or Cᵀ G): matmul vs FFT (median of {repeats})",
        table(("case", "basis size", "matmul (ms)", "fft (ms)", "fft / matmul", "basis build, once per size (ms)"),
              similarity, align="lrrrrr"),
        "",
        f"### Per step: project + project back, no refresh (median of {repeats})",
        table(("case", "svd dense basis (ms)", "dct gathered basis (ms)", "dct / svd"), per_step, align="lrrr"),
    ])  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    return timing_parser(__doc__, repeats_default=3, repeats_help="default 3").parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats
    device = torch.device(args.device)
    sync = synchronizer(device)
    info, load_before = announce_machine(device)

    started = time.perf_counter()
    rows = [bench_case(*case, repeats, device, sync) for case in (QUICK_CASES if args.quick else REFRESH_CASES)]
    elapsed = time.perf_counter() - started
    load_after = load_average()
    report = (
        tables(rows, repeats)
        + f"\n\nLoad average at start {load_before}, at end {load_after}; benchmark time {elapsed:.0f} s."
    )
    print("\n" + report)

    raw = run_record(info, args, repeats, (load_before, load_after), elapsed, cases=rows)
    write_results(args.out, "bench_dct", report, raw)


if __name__ == "__main__":
    main()
