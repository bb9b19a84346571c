r"""The stages of ``bench/gpu_check.sh`` that are not an existing script, and its summary.

    python bench/gpu_check.py env OUT              # machine, packages, what the later stages need
    python bench/gpu_check.py build OUT            # build_jit() once; OUT/build.details.json has the library
    python bench/gpu_check.py kernels OUT -- ARGS  # bench/bench_kernels.py ARGS (peers stubbed if absent)
    python bench/gpu_check.py step OUT [--tiny]    # GaLore step/refresh vs galore_torch, LLaMA-1B shapes
    python bench/gpu_check.py memory OUT [--tiny]  # CUDA allocator peak per phase (lowrank_optim.memory)
    python bench/gpu_check.py summary OUT          # OUT/summary.md and OUT/summary.json from every stage

Each stage writes ``OUT/<stage>.details.json``; gpu_check.sh writes ``OUT/<stage>.json`` (status,
exit code, seconds, time box) around it, and ``summary`` reads both.  Nothing here asserts a
timing: verdicts are report lines, as in every bench/ script.

The step stage times, on one LLaMA-1B block (2048x2048 x4, 5461x2048 x2, 2048x5461; r = 512,
``proj_type="std"``, scale 0.25, lr 1e-3, no weight decay, fixed gradients), each
optimizer's steady step (its first, refreshing step is a warm-up; ``update_proj_gap`` 200 is
never reached) and its refresh step (``update_proj_gap=1``), and computes the amortized step
(refresh + 199 steady) / 200: the target is ours with ``rsvd`` at most 0.5x galore_torch's
(docs/benchmarks.md, "GPU").  ``--tiny``: 128/344-wide matrices, r = 32, for a CPU dry run.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import runpy
import subprocess
import sys
import time
import types
from pathlib import Path

from tables import table  # standard library only, as this module's top: the summary needs no torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STAGES = ("env", "build", "tests", "kernels", "step", "memory")
#: Packages the stages import; those marked optional are stubbed when absent (see stub_missing).
PACKAGES = ("torch", "triton", "ninja", "transformers", "galore_torch", "fira", "bitsandbytes", "tensorly")
AMORTIZED_TARGET = 0.5
T = 200  # the refresh period of the amortized step (the paper's)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- env
def stage_env(out: Path) -> int:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": {name: importlib.util.find_spec(name) is not None for name in PACKAGES},
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count}  # fmt: skip
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30, check=False)
        info["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        info["nvcc"] = None
    missing = [n for n in ("galore_torch",) if not info["packages"][n]]
    info["notes"] = [f"{n} is not installed: the step stage needs it (carry its wheel, GPU_CHECK_WHEELS)" for n in missing]
    write_json(out / "env.details.json", info)
    print(json.dumps(info, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------- build
def stage_build(out: Path) -> int:
    import torch

    from lowrank_optim.kernels import extension

    details = {"torch_cuda": torch.version.cuda, "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    write_json(out / "build.details.json", details)
    if torch.version.cuda is None:
        details["error"] = f"torch {torch.__version__} is a CPU build: the CUDA extension cannot be built"
        write_json(out / "build.details.json", details)
        print(details["error"], file=sys.stderr)
        return 1
    started = time.perf_counter()
    details["library"] = extension.build_jit(verbose=True)
    details["seconds"] = time.perf_counter() - started
    write_json(out / "build.details.json", details)
    print(f"built {details['library']} in {details['seconds']:.0f} s")
    return 0


# ---------------------------------------------------------------------------- peers
def stub_missing(names: tuple[str, ...]) -> list[str]:
    """Stand-in modules for peers this machine lacks and a stage does not use (galore_torch
    imports bitsandbytes for its 8-bit optimizer only; the kernel benchmark only reports
    galore_torch's version).  Returns what was stubbed: a stage that needs the real package
    checks ``__gpu_check_stub__``."""
    stubbed = []
    for name in names:
        if importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)
        module.__gpu_check_stub__ = True
        module.__path__ = []  # a package, so that `from name.sub import X` finds the stubs below
        sys.modules[name] = module
        stubbed.append(name)
    if "bitsandbytes" in stubbed:  # what galore_torch's adamw8bit imports at module level
        for sub in ("bitsandbytes.optim", "bitsandbytes.optim.optimizer"):
            sys.modules[sub] = types.ModuleType(sub)
        sys.modules["bitsandbytes.optim.optimizer"].Optimizer2State = object
    if "galore_torch" in stubbed:
        projector = types.ModuleType("galore_torch.galore_projector")
        projector.GaLoreProjector = None
        sys.modules["galore_torch.galore_projector"] = projector
        # common.machine_info reports the peer's version from its metadata.
        real_version = importlib.metadata.version

        def version(name: str) -> str:
            if name.replace("-", "_") in stubbed:
                return "not installed (stubbed by gpu_check)"
            return real_version(name)

        importlib.metadata.version = version
    return stubbed


def stage_kernels(out: Path, args: list[str]) -> int:
    stubbed = stub_missing(("bitsandbytes", "fira", "galore_torch"))
    write_json(out / "kernels.details.json", {"argv": args, "stubbed": stubbed})
    sys.path.insert(0, str(BENCH))
    sys.argv = [str(BENCH / "bench_kernels.py"), *args]
    runpy.run_path(str(BENCH / "bench_kernels.py"), run_name="__main__")
    return 0


# ---------------------------------------------------------------------------- step
def stage_step(out: Path, tiny: bool, repeats: int, steady_steps: int) -> int:
    stubbed = stub_missing(("bitsandbytes",))  # galore_torch's GaLoreAdamW is plain PyTorch
    import torch

    import lowrank_optim
    from common import MODELS, llama_stack, median, synchronizer, time_once

    try:
        import galore_torch
    except ImportError as err:
        write_json(out / "step.details.json", {"error": f"galore_torch is not importable: {err}"})
        print(f"galore_torch is not importable ({err}): carry its wheel (GPU_CHECK_WHEELS)", file=sys.stderr)
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    model = "tiny" if tiny else "1b"
    rank = MODELS[model][2]
    shapes = llama_stack(model, 1)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]

    def params():
        out_ = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros(g.shape, device=device).normal_(std=0.02))
            p.grad = g  # shared, never written by these optimizers
            out_.append(p)
        return out_

    def group(ps, gap):
        return [{"params": ps, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}]

    makers = {
        "galore_torch": lambda gap: galore_torch.GaLoreAdamW(group(params(), gap), lr=1e-3, weight_decay=0.0,
                                                             no_deprecation_warning=True),
        "ours svd": lambda gap: lowrank_optim.GaLoreAdamW(group(params(), gap), lr=1e-3, weight_decay=0.0,
                                                          projector="svd"),
        "ours rsvd": lambda gap: lowrank_optim.GaLoreAdamW(group(params(), gap), lr=1e-3, weight_decay=0.0,
                                                           projector="rsvd"),
        # both products on bf16 operands (opt-in): what tensor cores make of fp32 weights
        "ours rsvd bf16": lambda gap: lowrank_optim.GaLoreAdamW(group(params(), gap), lr=1e-3, weight_decay=0.0,
                                                                projector="rsvd",
                                                                projector_args={"product_dtype": "bfloat16"}),
    }  # fmt: skip
    sync = synchronizer(device)
    steady_opts = {k: make(T) for k, make in makers.items()}
    refresh_opts = {k: make(1) for k, make in makers.items()}
    for opt in (*steady_opts.values(), *refresh_opts.values()):
        time_once(opt.step, sync)  # warm-up: the first step refreshes (and allocates the state)
    samples: dict[str, dict[str, list[float]]] = {k: {"steady": [], "refresh": []} for k in makers}
    for _ in range(repeats):  # round-robin, so a slow moment of the machine hits every contender
        for k in makers:
            opt = steady_opts[k]
            samples[k]["steady"].append(time_once(lambda opt=opt: [opt.step() for _ in range(steady_steps)], sync)
                                        / steady_steps)  # fmt: skip
            samples[k]["refresh"].append(time_once(refresh_opts[k].step, sync))
    results = {}
    for k, s in samples.items():
        steady, refresh = median(s["steady"]), median(s["refresh"])
        results[k] = {"steady_s": steady, "refresh_s": refresh, "amortized_s": (refresh + (T - 1) * steady) / T}
    peer = results["galore_torch"]
    ratios = {k: {f"{what}_ratio": r[f"{what}_s"] / peer[f"{what}_s"] for what in ("steady", "refresh", "amortized")}
              for k, r in results.items() if k != "galore_torch"}  # fmt: skip
    details = {"device": str(device), "tiny": tiny, "shapes": shapes, "rank": rank, "T": T, "repeats": repeats,
               "steady_steps": steady_steps, "results": results, "ratios": ratios, "stubbed": stubbed,
               "target": f"amortized ours rsvd / galore_torch <= {AMORTIZED_TARGET}",
               "met": ratios["ours rsvd"]["amortized_ratio"] <= AMORTIZED_TARGET,
               "samples_s": samples}  # fmt: skip
    write_json(out / "step.details.json", details)
    for k, r in results.items():
        print(f"{k:14s} steady {1e3 * r['steady_s']:8.2f} ms  refresh {1e3 * r['refresh_s']:9.1f} ms  "
              f"amortized {1e3 * r['amortized_s']:8.2f} ms")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------- memory
MEMORY_OPTIMIZERS = ("adamw", "galore_adamw", "galore_adamw8bit", "qgalore_adamw8bit")


def stage_memory(out: Path, tiny: bool) -> int:
    import torch

    from lowrank_optim.memory import measure, tiny_llama

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    # One LLaMA-1B-shaped block (hidden 2048, MLP 5461, 16 heads, a 32000-token vocabulary),
    # rank 512; --tiny: the memory module's default tiny LLaMA, rank 8.
    shape = {} if tiny else {"hidden": 2048, "intermediate": 5461, "layers": 1, "heads": 16, "vocab": 32000}
    rank = 8 if tiny else 512
    results, errors = {}, {}
    for name in MEMORY_OPTIMIZERS:
        try:
            model = tiny_llama(**shape).to(device)
            results[name] = measure(name, model=model, steps=3, rank=None if name == "adamw" else rank, batch=2,
                                    seq=16 if tiny else 256)  # fmt: skip
            del model
        except Exception as err:  # noqa: BLE001  (one optimizer's failure is a result, not the end)
            errors[name] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = {name: {"peaks_mib": {k: v / 2**20 for k, v in r["peaks"].items()},
                    "state_mib": r["state_total"] / 2**20} for name, r in results.items()}  # fmt: skip
    write_json(out / "memory.details.json", {"device": str(device), "model": shape or "tiny_llama()", "rank": rank,
                                             "optimizers": table, "errors": errors})  # fmt: skip
    for name, row in table.items():
        peaks = ", ".join(f"{k} {v:.1f} MiB" for k, v in row["peaks_mib"].items()) or "(CPU: no allocator peaks)"
        print(f"{name:20s} state {row['state_mib']:8.2f} MiB; {peaks}")
    for name, err in errors.items():
        print(f"{name}: {err}", file=sys.stderr)
    return 1 if errors else 0


# ---------------------------------------------------------------------------- summary
def tests_line(out: Path) -> str:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(out / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return "no junit report"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped"


def section_kernels(out: Path) -> list[str]:
    raw = read_json(out / "kernels" / "kernels.json")
    report = out / "kernels" / "kernels.md"
    if raw is None or not report.exists():
        return ["No kernel results (see kernels.log)."]
    body = report.read_text().split("\n", 1)[1].strip()
    body = "\n".join("#" + line if line.startswith("## ") else line for line in body.splitlines())  # nest under ours
    return [f"Kernels in use: {raw.get('machine', {}).get('kernels', '?')}", "", body]


def verdict_count(out: Path) -> str:
    """How many of the kernel benchmark's target lines pass."""
    report = out / "kernels" / "kernels.md"
    lines = report.read_text().splitlines() if report.exists() else []
    passed = sum(line.startswith("- [pass]") for line in lines)
    failed = sum(line.startswith("- [FAIL]") for line in lines)
    return f"targets: {passed} pass, {failed} FAIL" if passed + failed else ""


def section_step(out: Path) -> list[str]:
    d = read_json(out / "step.details.json")
    if not d or "results" not in d:
        return [f"No step results ({(d or {}).get('error', 'see step.log')})."]
    rows = [(k, f"{1e3 * r['steady_s']:.2f}", f"{1e3 * r['refresh_s']:.1f}", f"{1e3 * r['amortized_s']:.2f}",
             f"{d['ratios'].get(k, {}).get('amortized_ratio', 1.0):.2f}") for k, r in d["results"].items()]  # fmt: skip
    return [(f"{len(d['shapes'])} matrices ({'tiny' if d['tiny'] else 'one LLaMA-1B block'}), r = {d['rank']}, "
             f"{d['device']}; median of {d['repeats']} rounds; amortized = (refresh + {d['T'] - 1} steady) / {d['T']}."),
            "", table(("optimizer", "steady (ms)", "refresh (ms)", "amortized (ms)", "amortized / galore_torch"), rows,
                      align="lrrrr"),
            "", (f"- [{'pass' if d['met'] else 'FAIL'}] {d['target']}: "
                 f"{d['ratios']['ours rsvd']['amortized_ratio']:.2f}")]  # fmt: skip


def section_memory(out: Path) -> list[str]:
    d = read_json(out / "memory.details.json")
    if not d:
        return ["No memory results (see memory.log)."]
    phases = sorted({p for row in d["optimizers"].values() for p in row["peaks_mib"]})
    rows = [(name, f"{row['state_mib']:.2f}", *(f"{row['peaks_mib'][p]:.1f}" if p in row["peaks_mib"] else "-" for p in phases))
            for name, row in d["optimizers"].items()]  # fmt: skip
    return [(f"Model: {d['model']}, rank {d['rank']}, {d['device']}; CUDA allocator peak (MiB) per phase "
             "(lowrank_optim.memory.measure)."), "",
            table(("optimizer", "state (MiB)", *phases), rows, align="l" + "r" * (1 + len(phases))),
            *(f"- {name}: {err}" for name, err in d["errors"].items())]  # fmt: skip


def stage_summary(out: Path) -> int:
    records = {s: read_json(out / f"{s}.json") for s in STAGES}
    details = {s: read_json(out / f"{s}.details.json") for s in STAGES}
    env = details["env"] or {}
    total = sum(r["seconds"] for r in records.values() if r)
    lines = ["# GPU check (bench/gpu_check.sh)", ""]
    if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
        lines += [("**Dry run on CPU (GPU_CHECK_ALLOW_CPU=1): tiny shapes, no GPU. It proves the plumbing, "
                   "not the kernels or the speed.**"), ""]  # fmt: skip
    gpu = env.get("gpu") or {}
    lines += [(f"- machine: {gpu.get('name', 'no GPU')} (capability {gpu.get('capability', '-')}), "
               f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), {env.get('nvcc') or 'no nvcc'}, "
               f"Python {env.get('python')}"),
              f"- stages took {total:.0f} s in all (time boxes: each stage's `timeout`)", ""]  # fmt: skip
    notes = {"tests": tests_line(out), "kernels": verdict_count(out)}
    step = details["step"] or {}
    if "ratios" in step:
        notes["step"] = (f"amortized ours rsvd / galore_torch {step['ratios']['ours rsvd']['amortized_ratio']:.2f} "
                         f"(target <= {AMORTIZED_TARGET}): {'met' if step['met'] else 'NOT met'}")
    elif step.get("error"):
        notes["step"] = step["error"]
    memory = details["memory"] or {}
    if memory.get("optimizers") is not None:
        notes["memory"] = f"{len(memory['optimizers'])} optimizers measured, {len(memory['errors'])} failed"
    if env.get("notes"):
        notes["env"] = "; ".join(env["notes"])
    if details["build"] and details["build"].get("library"):
        notes["build"] = f"`{details['build']['library']}`"
    elif details["build"] and details["build"].get("error"):
        notes["build"] = details["build"]["error"]
    stages = [(s, "not run", "-", "-", "") if r is None else (s, f"**{r['status']}**", f"{r['seconds']:.0f}", r["timeout_s"], notes.get(s, ""))
              for s, r in records.items()]  # fmt: skip
    lines += [table(("stage", "status", "seconds", "time box (s)", "result"), stages, align="llrrl"),
              "", "## Kernels (bench/bench_kernels.py)", "", *section_kernels(out),
              "", "## GaLore step and refresh vs galore_torch", "", *section_step(out),
              "", "## Memory: CUDA peaks per phase", "", *section_memory(out)]  # fmt: skip
    failed = [s for s in STAGES if records[s] and records[s]["status"] != "passed"]
    if failed:
        lines += ["", "## Logs of the stages that did not pass", ""]
        for s in failed:
            log = out / records[s]["log"]
            tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else ["(no log)"]
            lines += [f"### {s} ({records[s]['status']}, exit code {records[s]['exit_code']})", "", "```",
                      *tail, "```", ""]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    write_json(out / "summary.json", {"stages": records, "details": details, "tests": notes["tests"],
                                      "failed": failed, "seconds": total})  # fmt: skip
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGES, "summary"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny shapes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steady-steps", type=int, default=10)
    # kernels: everything after "--" goes to bench_kernels.py (split off by hand: a REMAINDER
    # positional would also swallow this parser's own options).
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "env":
        return stage_env(args.out)
    if args.stage == "build":
        return stage_build(args.out)
    if args.stage == "kernels":
        return stage_kernels(args.out, rest)
    if args.stage == "step":
        return stage_step(args.out, args.tiny, args.repeats, args.steady_steps)
    if args.stage == "memory":
        return stage_memory(args.out, args.tiny)
    if args.stage == "summary":
        return stage_summary(args.out)
    parser.error(f"the {args.stage} stage is run by gpu_check.sh itself")
    return 2


if __name__ == "__main__":
    sys.exit(main())
