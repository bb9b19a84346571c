r"""DCT projector benchmark: the DCT selection against our exact ``svd`` and randomized
``rsvd`` refresh, and the matmul against the FFT (Makhoul) transform.

Run from the repository root::

    python bench/bench_dct.py --threads 1  # LLaMA shapes, about a minute on 2 quiet CPU cores
    python bench/bench_dct.py --quick      # small shapes, seconds
    python bench/bench_dct.py --device cuda

Options: ``--repeats N`` (default 3: the exact SVD of 2048 x 5461 dominates the run),
``--threads N`` (use 1 on a CPU shared with other jobs, see ``bench_galore.py``),
``--out DIR`` (default ``bench/out``, git-ignored).  The timing helpers (round-robin
samples, medians, the gradient-like test matrices) are ``bench_galore.py``'s.

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

from bench_galore import (  # bench/ is on sys.path when this file runs as a script
    UPDATE_PROJ_GAP,
    announce_machine,
    gradient_like,
    interleaved_samples,
    load_average,
    median,
    synchronizer,
    write_results,
)
from lowrank_optim.projectors import REGISTRY
from lowrank_optim.projectors import dct as dct_module
from lowrank_optim.projectors.base import LEFT, choose_side

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
    out = [
        f"### Refresh: new subspace + one projection (median of {repeats}; ratio < 1: DCT faster)",
        "| case | m x n | rank | svd (ms) | rsvd (ms) | dct matmul (ms) | dct fft (ms) "
        "| dct fft / svd | dct fft / rsvd | dct matmul / svd | dct matmul / rsvd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        m, n, rank = row["shape"]
        t = {k: median(v) for k, v in row["refresh"].items()}
        out.append(
            f"| {row['label']} | {m}x{n} | {rank} | {t['svd'] * 1e3:.1f} | {t['rsvd'] * 1e3:.1f} "
            f"| {t['dct matmul'] * 1e3:.1f} | {t['dct fft'] * 1e3:.1f} "
            f"| {t['dct fft'] / t['svd']:.3f} | {t['dct fft'] / t['rsvd']:.3f} "
            f"| {t['dct matmul'] / t['svd']:.3f} | {t['dct matmul'] / t['rsvd']:.3f} |"
        )
    out += [
        "",
        "Energy kept, ||proj(G)||^2 / sum_{i<=r} sigma_i^2 (random singular vectors: the worst case for a fixed basis)",
        "",
        "| case | svd | rsvd | dct matmul | dct fft |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        e = row["energy"]
        out.append(f"| {row['label']} | {e['svd']:.4%} | {e['rsvd']:.4%} | {e['dct matmul']:.4%} | {e['dct fft']:.4%} |")
    out += [
        "",
        f"### Similarity S = G C (or Cᵀ G): matmul vs FFT (median of {repeats})",
        "| case | basis size | matmul (ms) | fft (ms) | fft / matmul | basis build, once per size (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mm, fft = median(row["transform"]["matmul"]), median(row["transform"]["fft"])
        out.append(
            f"| {row['label']} | {row['basis_size']} | {mm * 1e3:.2f} | {fft * 1e3:.2f} | {fft / mm:.3f} "
            f"| {row['build_s'] * 1e3:.1f} |"
        )
    out += [
        "",
        f"### Per step: project + project back, no refresh (median of {repeats})",
        "| case | svd dense basis (ms) | dct gathered basis (ms) | dct / svd |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        svd, dct = median(row["round_trip"]["svd"]), median(row["round_trip"]["dct matmul"])
        out.append(f"| {row['label']} | {svd * 1e3:.2f} | {dct * 1e3:.2f} | {dct / svd:.2f} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes only: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per contender (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default="bench/out", help="directory for the markdown tables and raw JSON")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser.parse_args(argv)


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

    raw = {
        "machine": info,
        "args": vars(args),
        "repeats": repeats,
        "load_average": {"start": load_before, "end": load_after},
        "elapsed_s": elapsed,
        "cases": rows,
    }
    write_results(args.out, "bench_dct", report, raw)


if __name__ == "__main__":
    main()
