"""``python -m lowrank_optim.memory``: the estimate, a rank sweep, the paper table or a measured
run, printed with the settings they assume."""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .estimator import (
    DTYPES,
    PEERS,
    _check_optimizer,
    _dtype,
    _preset_rank,
    available_estimators,
    estimate,
)
from .measured import measure, tiny_llama
from .paper import paper_table
from .report import log_wandb, plot, plot_ranks, render, render_measured, render_paper
from .shapes import LLAMA_CONFIGS, ModelSource, resolve_model

#: The rank of the measured run on the tiny LLaMA when none is given (hidden size 64).
TINY_RANK = 8


def _parser() -> argparse.ArgumentParser:
    from .. import memory  # the package's docstring opens with the one-line description

    parser = argparse.ArgumentParser(prog="python -m lowrank_optim.memory", description=memory.__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help=f"a LLaMA preset ({', '.join(LLAMA_CONFIGS)}), a config.json or a local model folder "
                             "(read locally, nothing downloaded); default 60m, with --measure a tiny LLaMA")
    parser.add_argument("--optimizers", default="adamw,galore_adamw",
                        help="comma-separated; " + ", ".join(available_estimators())
                             + " (also with the lowrank_ prefix and as ..._8bit)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, default=None,
                      help="default: the optimizer's preset (apollo_mini_adamw: 1), else the paper's rank for a "
                           "preset, else 128 capped at the narrowest projected matrix")
    size.add_argument("--ranks", default=None, help="a sweep, e.g. 64,128,256: one row per optimizer and rank; "
                                                    "--plot draws state bytes against rank")
    parser.add_argument("--density", type=float, default=None)
    parser.add_argument("--projector", default=None, help="FRUGAL projector: svd, columns, rows, blocks")
    parser.add_argument("--dtype", default=None,
                        help=", ".join(sorted(DTYPES)) + "; default: each parameter's own (a config's dtype; "
                             "for a preset bf16, the paper's)")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--target-modules", default="attn,mlp",
                         help="comma-separated module name fragments (as param_groups), or all-linear")
    targets.add_argument("--target-regex", default=None,
                         help="one regex every selected module name matches in full (the Trainer's "
                              "optim_target_modules string)")
    parser.add_argument("--opt-arg", action="append", default=[], metavar="[OPTIMIZER:]KEY=VALUE,...",
                        help="optimizer options in the package's syntax (betas=0.9:0.95, "
                             "projector_args=k:v;k:v); without OPTIMIZER: for every one; repeatable")
    parser.add_argument("--tied", action="store_true", help="tie the LM head to the embedding (a preset)")
    parser.add_argument("--int8-weights", action="store_true", help="projected weights as INT8 (Q-GaLore)")
    parser.add_argument("--no-grads", action="store_true", help="leave gradients out (the paper's column)")
    parser.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
    parser.add_argument("--unit", default="GiB", choices=["GiB", "GB", "MiB"])
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--plot", default=None, help="write a PNG here (with --ranks: state bytes against rank)")
    parser.add_argument("--paper", action="store_true", help="GaLore paper Table 2 reproduction")
    parser.add_argument("--project-lm-head", action="store_true", help="with --paper: GaLore projects the LM head too")
    parser.add_argument("--measure", action="store_true",
                        help="build --model (random weights) and measure its optimizer state after --steps steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --measure")
    parser.add_argument("--wandb", action="store_true", help="also log a wandb table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    names, ranks, opt_args, targets, source = _check_args(parser, args)
    if args.paper:
        note = ("GaLore paper Table 2 memory column: BF16 weights + optimizer states, no gradients, LM head "
                f"untied and {'projected' if args.project_lm_head else 'full-rank'}, attention+MLP projected; "
                "the paper's G is GiB.")
        print(note, file=sys.stderr if args.format in ("csv", "json") else sys.stdout)
        print(render_paper(paper_table(args.project_lm_head), args.format))
        return 0
    common = {"density": args.density, "target_modules": targets, "projector": args.projector}
    if args.measure:
        return _measure(args, names, ranks, opt_args, source, common)
    estimates = [estimate(source, name, rank=rank, dtype=args.dtype, tied=args.tied, grads=not args.no_grads,
                          int8_weights=args.int8_weights and name == "qgalore_adamw8bit", options=opt_args[name],
                          **common)
                 for name in names for rank in ([None] if name in PEERS else ranks)]
    print(render(estimates, args.format, args.unit, args.per_layer))
    if args.plot:
        (plot_ranks if args.ranks else plot)(estimates, args.plot, args.unit)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.wandb:
        log_wandb(estimates)
    return 0


def _measure(args: argparse.Namespace, names: list[str], ranks: list[int | None], opt_args: dict[str, dict],
             source: ModelSource | None, common: dict[str, Any]) -> int:
    """Build the model, step each optimizer on it, and put the state it keeps beside the
    estimate for the same model."""
    dtype = _dtype(args.dtype) if args.dtype else None
    if source is None:
        model = tiny_llama().to(device=args.device, dtype=dtype)
        label, kind = "tiny LLaMA", "hidden 64, 2 layers, vocabulary 512, random weights"
    else:
        model = source.build(args.device, dtype, args.tied)
        label, kind = source.label, f"{source.kind}, built with random weights"
    built = ModelSource(label, kind, module=model, dtype_note="given" if dtype is not None else "the built model's")
    print(f"measured: {label} ({kind}) on {args.device}, {args.steps} steps, random tokens", file=sys.stderr)
    records, estimates = [], []
    for name in names:
        for rank in [None] if name in PEERS else ranks:
            if rank is None and source is None and common["density"] is None and _preset_rank(name) is None:
                rank = TINY_RANK
            est = estimate(built, name, rank=rank, options=opt_args[name], **common)
            # the size is the estimate's (from --rank, --density or an --opt-arg); the rest as given
            extra = {k: v for k, v in opt_args[name].items() if k not in ("rank", "density")}
            if args.projector and name not in PEERS:
                extra.setdefault("projector", args.projector)
            res = measure(name, model=model, steps=args.steps, rank=est.rank, density=est.density,
                          target_modules=common["target_modules"], summary=False, **extra)
            estimates.append(est)
            records.append({"optimizer": name, "rank": est.rank, "density": est.density,
                            "measured_state_bytes": res["state_total"],
                            "estimated_state_bytes": int(est.totals["optimizer"]),
                            "bytes_per_param": res["state_bytes_per_param"],
                            "cuda_peaks": res["peaks"]})
    print(render_measured(records, estimates, args.format))
    return 0


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Refuse a bad value before any work, with argparse's one-line usage error (exit 2);
    returns the optimizer names, the ranks, their options, the target modules and the model."""
    from pathlib import Path

    from .. import _validate as V
    from .. import options
    from ..optim.groups import COMMON_CHECKS

    # --rank and --density follow the optimizers' own rules for the same hyperparameters.
    checks = {"rank": COMMON_CHECKS["rank"], "density": COMMON_CHECKS["density"], "steps": V.int_at_least(1)}
    for dest, check in checks.items():
        if not check(getattr(args, dest)):
            parser.error(f"--{dest} must be {check.expected}, got {getattr(args, dest)!r}")
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not names:
        parser.error(f"--optimizers {args.optimizers!r}: name at least one of {', '.join(available_estimators())}")
    try:
        names = _unique([_check_optimizer(o) for o in names])
    except ValueError as err:
        parser.error(f"--optimizers: {err}")
    ranks: list[int | None] = [args.rank]
    if args.ranks is not None:
        try:
            ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
        except ValueError:
            parser.error(f"--ranks {args.ranks!r}: comma-separated integers, e.g. 64,128,256")
        bad = [r for r in ranks if not COMMON_CHECKS["rank"](r)]
        if not ranks or bad:
            parser.error(f"--ranks {args.ranks!r}: each must be {COMMON_CHECKS['rank'].expected}")
        if args.density is not None:
            parser.error("--ranks sweeps the rank; with --density the rank comes from the density")
        ranks = sorted(set(ranks))
    if args.dtype is not None and args.dtype.lower() not in DTYPES:
        parser.error(f"--dtype {args.dtype!r}: valid ones: {', '.join(sorted(DTYPES))}")
    if args.target_regex is not None:
        try:
            re.compile(args.target_regex)
        except re.error as err:
            parser.error(f"--target-regex {args.target_regex!r}: not a regular expression ({err})")
        targets: Any = args.target_regex
    elif args.target_modules.strip().replace("_", "-") == "all-linear":
        targets = "all-linear"
    else:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        if not targets:
            parser.error(f"--target-modules {args.target_modules!r}: name at least one module name fragment")
    opt_args = _opt_args(parser, args.opt_arg, names, options)
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
    source = None
    if not args.paper and (args.model is not None or not args.measure):
        try:
            source = resolve_model(args.model or "60m")
        except (ValueError, ImportError) as err:
            parser.error(f"--model: {err}")
        if args.tied and source.preset is None:
            parser.error(f"--tied applies to a LLaMA preset; {source.label} says whether it ties its embeddings")
    return names, ranks, opt_args, targets, source


def _opt_args(parser: argparse.ArgumentParser, specs: Sequence[str], names: list[str], options) -> dict[str, dict]:
    """``--opt-arg [OPTIMIZER:]KEY=VALUE,...`` per optimizer, in the package's one syntax
    (:func:`lowrank_optim.options.parse_options`, as ``bench/pretrain.py --opt-arg``)."""
    out: dict[str, dict] = {name: {} for name in names}
    for spec in specs:
        target, _, assignments = spec.partition(":") if re.match(r"^\w+:", spec) else ("", "", spec)
        if target:
            key = options.canonical_name(target, peers=True)
            if key not in out:
                parser.error(f"--opt-arg {spec!r}: {target!r} is not in --optimizers {names}")
            target = key
        for name in [target] if target else names:
            try:
                out[name].update(options.parse_options(name, assignments, owner=f"--opt-arg {spec!r}: {name}"))
            except (ValueError, ImportError) as err:
                parser.error(str(err))
    return out


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
