r"""The step engine's targets (issue 12), each against the peer it is stated against.

Run from the repository root::

    python bench/bench_step.py --threads 1      # CPU, every case (about 3 minutes on 2 cores)
    python bench/bench_step.py --quick          # smoke run on tiny shapes (seconds)
    python bench/bench_step.py --device cuda    # adds the GPU-only rows

Cases (rows of ours / peer; docs/benchmarks.md#the-step-engine-issue-12 has the details):
``galore_60m`` GaLoreAdamW vs galore_torch at LLaMA-60M shapes, r = 128: steady step, and the
amortized step over T = 200 with our rsvd; ``overhead_96x64`` 96 matrices of 64x64 vs
``AdamW(foreach=True)``, also with ``foreach=False``; ``fira_60m`` FiraAdamW vs the fira
package; ``compiled`` ``torch.compile(opt.step)`` vs eager; ``peak_1b`` the peak memory of 20
steady steps at 2 LLaMA-1B blocks, r = 512, each optimizer in a fresh subprocess (a process's
high-water mark cannot be reset); ``fused_1b`` / ``kernels_1b`` (CUDA only) vs
``AdamW(fused=True)`` and CUDA kernels per step.  "two-product floor" rows time only the two
matrix products of a GaLore step, the least any implementation of that arithmetic pays.

Settings as bench/compare.py (lr 1e-3, weight decay 0, scale 0.25, ``proj_type="std"``);
fixed seeded gradients in ``.grad``, each contender on its own copy; contenders of a case run
round-robin (common.interleaved_samples).  Steady = median step of an optimizer whose
``update_proj_gap`` is never reached (its first, refreshing step is a warm-up); refresh =
median step of one with T = 1; amortized = (refresh + (T - 1) steady) / T.  Tables go to
stdout and ``OUT/bench_step.md``, raw samples to ``OUT/bench_step.json``; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

import lowrank_optim
from lowrank_optim.memory import process_peak_since, start_process_peak, state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a directory of scripts
from common import (MODELS, announce_machine, interleaved_samples, llama_stack, load_average, median,  # noqa: E402
                    synchronizer, time_once, write_results)
from compare import LR, SCALE  # noqa: E402
from tables import table  # noqa: E402

with warnings.catch_warnings():  # galore_torch imports transformers, which may warn on import
    warnings.simplefilter("ignore")
    import fira
    import galore_torch

NEVER = 10**9  # update_proj_gap of a steady-state optimizer: only its first step refreshes
T = 200  # the refresh period of the amortized step (the paper's)
NEEDS_GPU = "needs a GPU"
PEAK_CONTENDERS = ("ours", "ours foreach=False", "galore_torch")


def params_with_grads(shapes, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """The same seeded weights and gradients on every call: each contender gets its own copy,
    since every optimizer writes its weights (and a peer may write its gradients)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for m, n in shapes:
        p = torch.nn.Parameter((0.02 * torch.randn(m, n, generator=gen)).to(device))
        p.grad = torch.randn(m, n, generator=gen).to(device)
        params.append(p)
    return params


def ours(cls=lowrank_optim.GaLoreAdamW, **kw) -> Callable:
    kw.setdefault("projector", "svd")  # the peers' exact SVD unless a row names another

    def make(params, rank, gap):
        group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": SCALE, "proj_type": "std"}
        return cls([group], lr=LR, weight_decay=0.0, **kw)

    return make


def galore_peer(params, rank, gap):
    group = {"params": params, "rank": rank, "update_proj_gap": gap, "scale": SCALE, "proj_type": "std"}
    return galore_torch.GaLoreAdamW([group], lr=LR, weight_decay=0.0, no_deprecation_warning=True)


def fira_peer(params, rank, gap):
    group = {"params": params, "rank": rank, "update_proj_gap": gap, "alpha": SCALE, "proj_type": "std"}
    return fira.FiraAdamW([group], lr=LR, weight_decay=0.0, no_deprecation_warning=True)


def dense(**kw) -> Callable:
    return lambda params, rank, gap: torch.optim.AdamW(params, lr=LR, weight_decay=0.0, **kw)


class TwoProducts:
    """Only the two matrix products of a GaLore step per matrix (project the gradient, project
    back into the weight: one ``mm``, one ``addmm_``), on a fixed basis: the floor of any
    implementation of this arithmetic, so a ratio target below floor / peer cannot be met."""

    def __init__(self, params, rank, gap):
        gen = torch.Generator().manual_seed(0)
        self.work = []
        for p in params:
            right = p.shape[0] >= p.shape[1]  # std: the basis on the short side
            shape = (rank, p.shape[1]) if right else (p.shape[0], rank)
            self.work.append((p, torch.randn(shape, generator=gen).to(p.device), right))

    @torch.no_grad()
    def step(self):
        for p, basis, right in self.work:
            if right:  # R = G B^T (m x r), W -= lr R B
                p.addmm_(p.grad @ basis.T, basis, alpha=-LR)
            else:  # R = B^T G (r x n), W -= lr B R
                p.addmm_(basis, basis.T @ p.grad, alpha=-LR)


def row(case, ours_label, ours_value, peer_label, peer_value, target=None, met=None, unit="s", note=""):
    """One table row; ``target``: the stated bound (text), ``met``: whether it holds (None: no target)."""
    ratio = ours_value / peer_value if ours_value is not None and peer_value else None
    return {"case": case, "ours_label": ours_label, "ours": ours_value, "peer_label": peer_label, "peer": peer_value,
            "unit": unit, "ratio": ratio, "target": target, "met": met, "note": note}  # fmt: skip


def ratio_row(case, ours_label, ours_value, peer_label, peer_value, bound: float | None):
    met = None if bound is None else ours_value / peer_value <= bound
    return row(case, ours_label, ours_value, peer_label, peer_value, None if bound is None else f"<= {bound}", met)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.sync = synchronizer(self.device)
        self.quick = args.quick
        self.repeats = args.repeats or (3 if args.quick else 50)
        self.samples: dict[str, list[float]] = {}  # "case/label" -> seconds per timed step
        self.extra: dict = {}

    def steady(self, case: str, makers: dict[str, Callable], shapes, rank: int, gap: int = NEVER, warmup: int = 2,
               repeats: int | None = None) -> dict[str, float]:
        """Median step of each contender, round-robin; the warm-up takes the first refresh."""
        steps = {label: make(params_with_grads(shapes, self.device), rank, gap).step for label, make in makers.items()}
        samples = interleaved_samples(steps, repeats or self.repeats, warmup, self.sync)
        self.samples.update({f"{case}/{label}": s for label, s in samples.items()})
        return {label: median(s) for label, s in samples.items()}

    def galore_60m(self) -> list[dict]:
        hidden, inter, rank = MODELS["tiny" if self.quick else "60m"]
        shapes = [(inter, hidden), (hidden, inter), (hidden, hidden), (hidden, hidden)]
        makers = {"ours svd": ours(), "ours rsvd": ours(projector="rsvd"), "galore_torch": galore_peer,
                  "two products": TwoProducts}  # fmt: skip
        steady = self.steady("galore_60m", makers, shapes, rank)
        # T = 1: every step is a refresh for both (galore_torch: step % T == 0; ours: age >= T)
        refresh = self.steady("galore_60m refresh", {k: makers[k] for k in ("ours rsvd", "galore_torch")}, shapes,
                              rank, gap=1, warmup=1, repeats=min(self.repeats, 7))
        amortized = {k: (refresh[k] + (T - 1) * steady[k]) / T for k in refresh}
        self.extra["galore_60m"] = {"steady_s": steady, "refresh_s": refresh, "amortized_s": amortized}
        return [ratio_row("galore_60m steady", "ours svd", steady["ours svd"], "galore_torch", steady["galore_torch"], 0.75),
                ratio_row("galore_60m two-product floor", "2 products only", steady["two products"], "galore_torch",
                          steady["galore_torch"], None),
                ratio_row(f"galore_60m amortized T={T}", "ours rsvd", amortized["ours rsvd"], "galore_torch (svd)",
                          amortized["galore_torch"], None)]  # fmt: skip

    def overhead_96x64(self) -> list[dict]:
        makers = {"ours": ours(), "ours foreach=False": ours(foreach=False), "AdamW foreach": dense(foreach=True)}
        t = self.steady("overhead_96x64", makers, [(64, 64)] * 96, 16)
        return [ratio_row("overhead_96x64", "ours", t["ours"], "torch AdamW foreach", t["AdamW foreach"], 1.5),
                ratio_row("overhead_96x64 per-parameter", "ours foreach=False", t["ours foreach=False"],
                          "torch AdamW foreach", t["AdamW foreach"], None)]  # fmt: skip

    def fira_60m(self) -> list[dict]:
        hidden, inter, rank = MODELS["tiny" if self.quick else "60m"]
        shapes = [(inter, hidden), (hidden, inter), (hidden, hidden), (hidden, hidden)]
        makers = {"ours": ours(lowrank_optim.FiraAdamW), "fira": fira_peer, "two products": TwoProducts}
        t = self.steady("fira_60m", makers, shapes, rank)
        # ours needs these two products, the fira package one more (the residual's projection back)
        return [ratio_row("fira_60m steady", "ours FiraAdamW", t["ours"], "fira FiraAdamW", t["fira"], 0.6),
                ratio_row("fira_60m two-product floor", "2 products only", t["two products"], "fira FiraAdamW",
                          t["fira"], None)]  # fmt: skip

    def compiled(self) -> list[dict]:
        # --quick: one tiny matrix, since compile time grows with the graphs (one per matrix)
        hidden, inter, rank = MODELS["tiny" if self.quick else "60m"]
        shapes = [(inter, hidden)] + ([] if self.quick else [(hidden, inter), (hidden, hidden), (hidden, hidden)])
        torch._dynamo.reset()
        eager = ours()(params_with_grads(shapes, self.device), rank, NEVER)
        compiled = ours()(params_with_grads(shapes, self.device), rank, NEVER)
        steps = {"compiled": torch.compile(compiled.step, backend=self.args.compile_backend), "eager": eager.step}
        # Warm-up by hand, both alike: the first step refreshes, the first compiled ones also
        # compile (dynamo guards on each matrix, so a frame recompiles per matrix and per
        # refresh branch); the compile time is what the compiled warm-up took beyond eager's.
        warm = {k: sum(time_once(step, self.sync) for _ in range(4)) for k, step in steps.items()}
        samples = interleaved_samples(steps, self.repeats, 0, self.sync)
        self.samples.update({f"compiled/{k}": s for k, s in samples.items()})
        self.extra["compile_s"] = warm["compiled"] - warm["eager"]
        return [row("compiled", f"torch.compile(step), {self.args.compile_backend}", median(samples["compiled"]), "eager step",
                    median(samples["eager"]), note=f"compile {self.extra['compile_s']:.1f} s (4 warm-up steps)")]

    def peak_1b(self) -> list[dict]:
        # Children may run side by side: a high-water mark is per process, so they cannot mix,
        # and nothing here is timed; but no more than the cores hold at --threads each (OpenMP
        # threads of oversubscribed processes spin-wait on each other: 3x the wall time).
        width = len(PEAK_CONTENDERS) if self.quick or self.device.type == "cuda" else \
            max(1, (os.cpu_count() or 1) // torch.get_num_threads())
        results = {}
        for start in range(0, len(PEAK_CONTENDERS), width):
            children = {}
            for who in PEAK_CONTENDERS[start : start + width]:
                cmd = [sys.executable, __file__, "--peak-child", who, "--device", self.args.device,
                       "--threads", str(torch.get_num_threads())] + (["--quick"] if self.quick else [])  # fmt: skip
                children[who] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for who, child in children.items():
                out, err = child.communicate()
                if child.returncode:
                    raise RuntimeError(f"peak child {who} failed ({child.returncode}):\n{err[-2000:]}")
                results[who] = json.loads(out.strip().splitlines()[-1])
        self.extra["peak_1b"] = results
        p = results["galore_torch"]

        def peak_row(case, who, target):
            o = results[who]
            fewer = p["peak_matrices"] - o["peak_matrices"]
            note = f"{o['peak_matrices']:.2f} vs {p['peak_matrices']:.2f} matrices: {abs(fewer):.2f} {'fewer' if fewer >= 0 else 'more'}"
            return row(case, who, o["peak_bytes"], "galore_torch", p["peak_bytes"], target,
                       None if target is None else fewer >= 1, unit="B", note=note)

        return [peak_row("peak_1b", "ours", ">= 1 m x n temporary fewer"),
                peak_row("peak_1b per-parameter", "ours foreach=False", None)]

    def gpu_1b(self) -> list[dict]:
        if self.device.type != "cuda":
            return [row(case, "ours", None, peer, None, target, None, note=NEEDS_GPU)
                    for case, peer, target in (("fused_1b", "torch AdamW fused", "<= 1.3"),
                                               ("kernels_1b", "torch AdamW fused", None))]  # fmt: skip
        rank = MODELS["1b"][2]
        makers = {"ours": ours(), "AdamW fused": dense(fused=True)}
        shapes = llama_stack("1b", 2)
        t = self.steady("fused_1b", makers, shapes, rank)
        kernels = {label: kernels_per_step(make(params_with_grads(shapes, self.device), rank, NEVER))
                   for label, make in makers.items()}  # fmt: skip
        return [ratio_row("fused_1b", "ours", t["ours"], "torch AdamW fused", t["AdamW fused"], 1.3),
                row("kernels_1b", "ours", kernels["ours"], "torch AdamW fused", kernels["AdamW fused"], unit="kernels")]


def kernels_per_step(optimizer, steps: int = 5) -> float:
    """CUDA kernel events per steady step (after two warm-up steps) in a torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        optimizer.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            optimizer.step()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()) / steps


def peak_child(args: argparse.Namespace) -> dict:
    """In a fresh process: the peak over steady steps above what exists before the first one."""
    device = torch.device(args.device)
    model, layers, steps = ("tiny", 1, 3) if args.quick else ("1b", 2, 20)
    shapes = llama_stack(model, layers)
    params = params_with_grads(shapes, device)
    make = {"ours": ours(), "ours foreach=False": ours(foreach=False), "galore_torch": galore_peer}[args.peak_child]
    optimizer = make(params, MODELS[model][2], NEVER)
    for _ in range(2):  # the first step refreshes and allocates the state: not in the peak
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        baseline = start_process_peak()
    for _ in range(steps):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = process_peak_since(baseline)
    matrix_bytes = max(p.numel() * p.element_size() for p in params)
    return {"model": model, "layers": layers, "steps": steps, "peak_bytes": peak, "matrix_bytes": matrix_bytes,
            "peak_matrices": peak / matrix_bytes if peak is not None else math.nan, "state_bytes": state_bytes(optimizer),
            "weights_grads_bytes": 2 * sum(p.numel() * p.element_size() for p in params)}  # fmt: skip


def cell(value, unit) -> str:
    if value is None:
        return "-"
    return {"s": f"{value * 1e3:.2f} ms", "B": f"{value / 2**20:.1f} MiB"}.get(unit, f"{value:.1f}")


def targets_table(rows: list[dict]) -> str:
    cells = []
    for r in rows:
        gpu = r["note"] == NEEDS_GPU
        verdict = NEEDS_GPU if gpu else {True: "**met**", False: "**not met**", None: "-"}[r["met"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        cells.append((r["case"], r["ours_label"], r["peer_label"], cell(r["ours"], r["unit"]), cell(r["peer"], r["unit"]),
                      ratio, r["target"] or "-", verdict, "" if gpu else r["note"]))  # fmt: skip
    header = ("case", "ours", "peer", "ours", "peer", "ours / peer", "target", "verdict", "note")
    return table(header, cells, align="lllrrr")


def peak_table(results: dict) -> str:
    any_child = next(iter(results.values()))
    rows = [(who, f"{r['state_bytes'] / 2**20:.1f}", cell(r["peak_bytes"], "B").removesuffix(" MiB"), f"{r['peak_matrices']:.2f}")
            for who, r in results.items()]  # fmt: skip
    return "\n".join([
        f"Peak over {any_child['steps']} steady steps, {any_child['layers']} LLaMA-{any_child['model']} block(s), "
        f"one process each; a matrix = the largest m x n weight, {any_child['matrix_bytes'] / 2**20:.1f} MiB; "
        f"weights + gradients {any_child['weights_grads_bytes'] / 2**20:.1f} MiB in each process.",
        "",
        table(("optimizer", "state (MiB)", "peak rise (MiB)", "peak rise (matrices)"), rows, align="lrrr"),
    ])  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 3 timed rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per contender (default 50, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default="bench/out", help="directory for bench_step.md / bench_step.json")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled case (default inductor; quick: aot_eager, "
                             "which skips inductor's code generation, 10-15 s on CPU with a cold cache)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--peak-child", choices=PEAK_CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    return args


CASES = ("galore_60m", "overhead_96x64", "fira_60m", "compiled", "peak_1b", "gpu_1b")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        print(json.dumps(peak_child(args)))
        return {}
    info, load_before = announce_machine(torch.device(args.device))
    bench, rows, started = Bench(args), [], time.perf_counter()
    for case in tqdm(CASES, desc="cases", disable=args.no_progress):
        rows += getattr(bench, case)()
    elapsed = time.perf_counter() - started
    report = "\n\n".join([
        f"### Step engine, {args.device}, {torch.get_num_threads()} threads, median of {bench.repeats} rounds"
        + (" (--quick: tiny shapes)" if args.quick else ""),
        targets_table(rows),
        peak_table(bench.extra["peak_1b"]),
        f"Load average at start {load_before}, at end {load_average()}; {elapsed:.0f} s.",
    ])  # fmt: skip
    print("\n" + report)
    raw = {"machine": info, "args": vars(args), "repeats": bench.repeats, "rows": rows, "extra": bench.extra,
           "samples_s": bench.samples, "elapsed_s": elapsed}  # fmt: skip
    write_results(args.out, "bench_step", report, raw)
    return raw


if __name__ == "__main__":
    main()
