r"""Product precision: the gaussian projector's sketch R = PᵀG in the gradient's dtype (fp32)
against bf16 operands, per rank, at LLaMA-60M shapes.

Run from the repository root::

    python bench/bench_sketch.py --threads 1   # a few seconds on 2 quiet CPU cores
    python bench/bench_sketch.py --quick       # one small shape, seconds
    python bench/bench_sketch.py --device cuda

For each rank and shape it times ``GaussianProjector.project`` with ``product_dtype=
"gradient"`` and ``"bfloat16"`` on an fp32 gradient, the basis kept (``keep=True``) so that
only the product is timed (the draw is the same fp32 draw either way): the bf16 time
includes rounding G.  Also the relative error of the bf16 sketch, ‖R_bf16 − R‖ / ‖R‖, and
that of its per-channel norms (what APOLLO's scaling reads).  The last column says what
``product_dtype="auto"`` picks (bf16 from ``BF16_PRODUCT_MIN_RANK``), so a reader can see
whether that threshold suits this machine.  Contenders run round-robin
(``bench/common.py``); nothing is asserted.  Tables to stdout and ``DIR/bench_sketch.md``,
raw samples to ``DIR/bench_sketch.json``.
"""
from __future__ import annotations

import time

import torch

from common import (announce_machine, gradient_like, interleaved_samples, load_average, median, run_record,
                    synchronizer, timing_parser, write_results)  # bench/ is on sys.path when run as a script
from lowrank_optim.projectors import REGISTRY
from lowrank_optim.projectors.options import BF16_PRODUCT_MIN_RANK
from tables import table

RANKS = (1, 4, 8, 16, 32, 64, 128, 256)
SHAPES = ((512, 512), (512, 1376))  # LLaMA-60M's attention and MLP matrices (1376 x 512 sketches the same)
QUICK = {"ranks": (1, 16), "shapes": ((64, 96),)}


def bench_case(shape: tuple[int, int], rank: int, repeats: int, device: torch.device, sync) -> dict:
    grad = gradient_like(*shape, rank=min(shape) // 4, seed=0, device=device)
    projectors, states = {}, {}
    for name in ("gradient", "bfloat16"):
        projector = REGISTRY["gaussian"](rank, "std", 200, keep=True, product_dtype=name)
        pstate = projector.init_state(grad.shape, seed=1)
        projector.refresh(grad, pstate)
        projectors[name], states[name] = projector, pstate
    samples = interleaved_samples({name: (lambda name=name: projectors[name].project(grad, states[name]))
                                   for name in projectors}, repeats, warmup=2, sync=sync)  # fmt: skip
    exact = projectors["gradient"].project(grad, states["gradient"])
    rounded = projectors["bfloat16"].project(grad, states["bfloat16"])
    # The norms over the rank dimension: one per channel of the side kept at full length.
    along = 0 if rounded.shape[0] == rank else 1
    exact_norms, rounded_norms = exact.norm(dim=along), rounded.norm(dim=along)
    times = {name: median(s) for name, s in samples.items()}
    return {
        "shape": list(shape), "rank": rank, "fp32_ms": times["gradient"] * 1e3, "bf16_ms": times["bfloat16"] * 1e3,
        "ratio": times["bfloat16"] / times["gradient"],
        "error": float((rounded - exact).norm() / exact.norm()),
        "norm_error": float(((rounded_norms - exact_norms).abs() / exact_norms).max()),
        "auto": "bf16" if rank >= BF16_PRODUCT_MIN_RANK else "fp32", "samples": samples,
    }  # fmt: skip


def report(rows: list[dict]) -> str:
    cells = [(f"{r['shape'][0]}x{r['shape'][1]}", r["rank"], f"{r['fp32_ms']:.3f}", f"{r['bf16_ms']:.3f}",
              f"{r['ratio']:.2f}", f"{r['error']:.1e}", f"{r['norm_error']:.1e}", r["auto"]) for r in rows]  # fmt: skip
    header = ("shape", "rank", "fp32 product (ms)", "bf16 product (ms)", "bf16 / fp32", "‖ΔR‖/‖R‖",
              "max channel-norm error", "auto picks")  # fmt: skip
    return table(header, cells, align="lrrrrrrl")


def main(argv=None) -> dict:
    args = timing_parser(__doc__, repeats_default=30, repeats_help="default 30").parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = synchronizer(device)
    info, load_before = announce_machine(device)
    started = time.perf_counter()
    ranks, shapes = (QUICK["ranks"], QUICK["shapes"]) if args.quick else (RANKS, SHAPES)
    rows = [bench_case(shape, rank, args.repeats, device, sync) for shape in shapes for rank in ranks]
    elapsed = time.perf_counter() - started
    load_after = load_average()
    text = (f"### The sketch product R = PᵀG, fp32 gradient, median of {args.repeats}\n\n{report(rows)}\n\n"
            f"Load average at start {load_before}, at end {load_after}; benchmark time {elapsed:.0f} s.")  # fmt: skip
    print("\n" + text)
    raw = run_record(info, args, args.repeats, (load_before, load_after), elapsed, cases=rows)
    write_results(args.out, "bench_sketch", text, raw)
    return raw


if __name__ == "__main__":
    main()
