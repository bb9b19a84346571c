"""bench/pretrain.py's command line: its flags, the checks every value passes before any data
is read or weights allocated, and the optimizers the flags configure.

A bad value ends the run with argparse's one-line usage error (exit status 2), not a
traceback; an optimizer's own constructor judges its settings (:func:`optimizer_problem`),
so this module keeps no copy of their rules.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Sequence

import torch

import lowrank_optim
from common import MODEL_SHAPES, VOCAB_SIZE, build_model
from lowrank_optim import _validate as V
from lowrank_optim import options

#: --help's description: the first line of bench/pretrain.py's docstring.
DESCRIPTION = "Pretrain a small byte-level LLaMA with AdamW and with GaLore, and compare them."

#: Options some optimizers need so that this script's schedule, not their own, sets the lr:
#: Adafactor otherwise derives its step from 1/sqrt(t) and scales it by each weight's RMS.
OPTIMIZER_OVERRIDES: dict[str, dict] = {
    "galore_adafactor": {"relative_step": False, "scale_parameter": False},
}

#: ``--dtype``: the dtype of the weights (and so of gradients and of the optimizer state that
#: follows the weights); bf16 halves their memory, with no autocast (the model runs in bf16).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: ``--quick`` changes these defaults; flags given explicitly still win.
QUICK_DEFAULTS = {
    "steps": 12,
    "batch_size": 8,
    "warmup": 2,
    "eval_every": 0,
    "eval_batches": 2,
    "update_proj_gap": 5,
    "corpus_bytes": 200_000,
}


# ---------------------------------------------------------------------------- optimizers
def parse_opt_args(specs: Sequence[str], optimizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--opt-arg [OPTIMIZER:]KEY=VALUE[,KEY=VALUE...]`` flags into keywords per optimizer,
    in the package's one syntax (:mod:`lowrank_optim.options`, as the Trainer's
    ``optim_args``: ``betas=0.9:0.95`` or ``betas=(0.9,0.95)``).  Without ``OPTIMIZER:`` the
    keys go to every optimizer in ``--optimizers``; a key an optimizer does not take is an
    error listing the ones it does."""
    per_optimizer: dict[str, dict[str, Any]] = {name: {} for name in optimizers}
    for spec in specs:
        target, _, assignments = spec.partition(":") if re.match(r"^\w+:", spec) else ("", "", spec)
        if target:
            target = options.canonical_name(target, peers=True) or target
        if target and target not in per_optimizer:
            raise ValueError(f"--opt-arg {spec!r}: {target!r} is not in --optimizers {list(optimizers)}")
        for name in [target] if target else optimizers:
            try:
                per_optimizer[name].update(options.parse_options(name, assignments, owner=f"--opt-arg {spec!r}: {name}"))
            except ValueError as error:
                raise ValueError(str(error)) from None
    return per_optimizer


def optimizer_kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """This script's flags as the optimizer's keywords, then ``--opt-arg`` on top."""
    if name in options.PEERS:
        kwargs = {"lr": args.lr, "weight_decay": args.weight_decay}
    else:
        kwargs = {
            "rank": args.rank,
            "lr": args.galore_lr,
            "update_proj_gap": args.update_proj_gap,
            "scale": args.scale,
            "weight_decay": args.weight_decay,
            **OPTIMIZER_OVERRIDES.get(name, {}),
        }
    return {**kwargs, **args.opt_args.get(name, {})}


def make_optimizer(
    name: str, model: torch.nn.Module, args: argparse.Namespace, summary: bool = True
) -> torch.optim.Optimizer:
    kwargs = optimizer_kwargs(name, args)
    if name in options.PEERS:
        return options.build_peer(name, model.parameters(), **kwargs)
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return lowrank_optim.create_optimizer(name, model, target_modules=targets, summary=summary, **kwargs)


def peak_lr(name: str, args: argparse.Namespace) -> float:
    return optimizer_kwargs(name, args)["lr"]


# ---------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny",
        choices=sorted(MODEL_SHAPES),
        help="model shape; 60m..1b are the GaLore paper's LLaMA shapes but with a 256-byte vocabulary "
        "instead of 32000 tokens (every model here is byte-level), hence fewer parameters than the name",
    )
    parser.add_argument(
        "--optimizers",
        default="adamw,galore_adamw",
        help="comma-separated: the peers "
        + ", ".join(f"'{k}' ({v})" for k, v in options.PEERS.items())
        + " and any of " + ", ".join(lowrank_optim.available_optimizers())
        + " (also with the Trainer's lowrank_ prefix or transformers' _8bit spelling)",
    )
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per optimizer")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (None: the model's)")
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="AdamW's peak lr (on the tiny model 3e-3 beats 1e-3 and 1e-2)"
    )
    parser.add_argument(
        "--galore-lr",
        type=float,
        default=1e-2,
        help="peak lr of the low-rank optimizers (their dense params too); with --scale 0.25 the projected "
        "weights move at about a quarter of it, so GaLore wants a larger lr than AdamW",
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled, the same for every optimizer")
    parser.add_argument("--rank", type=int, default=None, help="GaLore rank (None: the model's, see MODEL_SHAPES)")
    parser.add_argument("--update-proj-gap", type=int, default=200, help="steps between subspace refreshes")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore's alpha on the projected-back update")
    parser.add_argument("--target-modules", default="attn,mlp",
                        help="comma-separated module-name substrings whose nn.Linear weights are projected "
                        "(lm_head adds the LM head)")
    parser.add_argument("--warmup", type=int, default=150, help="linear warmup steps, then cosine to 10%% of peak")
    parser.add_argument("--eval-every", type=int, default=500, help="validation every N steps (0: start and end only)")
    parser.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    parser.add_argument(
        "--opt-arg",
        action="append",
        default=[],
        metavar="[OPTIMIZER:]KEY=VALUE[,KEY=VALUE...]",
        help="an optimizer hyperparameter (repeatable), e.g. galore_adamw:rank=64,scale=0.25 or betas=(0.9,0.95); "
        "without OPTIMIZER: for every optimizer; overrides the flags above; typed like the optimizer's default",
    )
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of the weights")
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches of --batch-size summed in .grad per optimizer step (leave the optimizers' own "
        "accumulation_steps at 1)",
    )
    parser.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", default=None, help="train on this file's bytes instead of the stdlib sources")
    data.add_argument(
        "--tokenized", default=None, help="train on token ids on disk: .pt (torch.save), .npy or uint16 .bin"
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="with --tokenized (None: the largest id + 1)")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="held-out end of the corpus")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000, help="read at most this many corpus bytes")
    parser.add_argument("--save-dir", default=None, help="write checkpoints to DIR/OPTIMIZER/step_N.pt")
    parser.add_argument(
        "--save-every", type=int, default=0, help="with --save-dir: checkpoint every N steps and after the last"
    )
    parser.add_argument(
        "--resume", default=None, help="continue from a checkpoint file, or from a --save-dir's latest one"
    )
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (rank 0 only)")
    parser.add_argument("--wandb-project", default="lowrank-optim-pretrain", help="wandb project")
    parser.add_argument(
        "--wandb-mode", default=None, choices=["online", "offline", "disabled"], help="None: WANDB_MODE or online"
    )
    parser.add_argument("--wandb-dir", default=None, help="where wandb/ goes (None: WANDB_DIR or the current one)")
    parallel = parser.add_mutually_exclusive_group()
    parallel.add_argument(
        "--ddp", action="store_true", help="data parallel under torchrun (gloo on CPU, nccl on CUDA)"
    )
    parallel.add_argument(
        "--fsdp",
        action="store_true",
        help="FSDP2 (fully_shard) under torchrun: parameters, gradients and optimizer state sharded by rows",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: PyTorch's default; 1 is faster for tiny on a busy machine)",
    )
    parser.add_argument("--out", default=None, help="also write the arguments and results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--quick", action="store_true", help=f"a very short run for smoke tests: {QUICK_DEFAULTS}")
    return parser


#: What each numeric flag must be, checked once the defaults are resolved; a flag that may
#: be left unset allows None.  tests/test_pretrain_script.py checks every numeric flag is here.
FLAG_CHECKS: dict[str, V.Check] = {
    "steps": V.int_at_least(1),
    "batch_size": V.int_at_least(1),
    "seq_len": V.int_at_least(1),
    # Zero or less would train nothing, or uphill; the optimizers accept lr=0 and any scale.
    "lr": V.pos_float(),
    "galore_lr": V.pos_float(),
    "scale": V.pos_float(),
    "weight_decay": V.nonneg_float(),
    "rank": V.int_at_least(1),
    "update_proj_gap": V.int_at_least(1),
    "warmup": V.int_at_least(0),
    "eval_every": V.int_at_least(0),
    "eval_batches": V.int_at_least(1),
    # torch takes 64-bit seeds; each rank adds its rank, so leave headroom above.
    "seed": V.Check(lambda s: -(2**63) <= s < 2**63, "an integer in [-2**63, 2**63)"),
    "grad_accum": V.int_at_least(1),
    # 0 is refused, not read as "off": clipping to norm 0 would erase every update.
    "clip_grad": V.pos_float(optional=True),
    "vocab_size": V.int_at_least(1, optional=True),
    # Both splits must be non-empty; outside (0, 1) the split fails later with a misleading message.
    "validation_fraction": V.Check(lambda f: 0 < f < 1, "a number in (0, 1)"),
    "corpus_bytes": V.int_at_least(1),
    "save_every": V.int_at_least(0),
    "threads": V.int_at_least(0),
}


def device_problem(text: str) -> str | None:
    """Why ``--device text`` cannot be used on this machine, or None."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        return f"not a torch device ({error})"
    if device.type == "cpu":
        return None
    # Asked of torch.cuda, torch.mps, ... without touching the device: under --ddp each rank
    # later picks its own GPU, and a context made here on GPU 0 would stay there.
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "is_available"):
        return f"cannot train on {device.type}: use cpu or an accelerator (cuda, mps, xpu)"
    if not backend.is_available():
        return f"{device.type.upper()} is not available on this machine"
    if device.index is not None and device.index >= backend.device_count():
        return f"this machine has {backend.device_count()} {device.type} device(s)"
    return None


def optimizer_problem(args: argparse.Namespace) -> str | None:
    """The first complaint of an optimizer's constructor about its settings, or None.
    Each optimizer is built on a meta-device copy of the model (no memory, no compute), so
    its own checks judge the settings, shapes and dtype included, and the script keeps no
    copy of their rules."""
    with torch.device("meta"):
        # The vocabulary only sizes the dense embedding and head: any stands in for --tokenized's.
        model = build_model(args.model, args.seq_len, args.vocab_size or VOCAB_SIZE).to(dtype=DTYPES[args.dtype])
    for name in args.optimizers:
        try:
            make_optimizer(name, model, args, summary=False)  # a check, not the run: nothing to report
        except (ValueError, TypeError) as error:
            return f"{name}: {error}"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, every value checked before any data is read or weights allocated: a bad one
    ends the run with argparse's one-line usage error (exit status 2), not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that explicit flags override the quick defaults
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    # The package's name table: ours (any case, lowrank_ prefix, transformers' _8bit spelling)
    # and the peers the profiler knows too.
    unknown = [name for name in names if options.canonical_name(name, peers=True) is None]
    if unknown or not names:
        known = sorted({*options.PEERS, *lowrank_optim.available_optimizers()})
        parser.error(f"--optimizers: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    args.optimizers = [options.canonical_name(name, peers=True) for name in names]
    shape = MODEL_SHAPES[args.model]
    if args.seq_len is None:
        args.seq_len = shape.seq_len
    if args.rank is None:
        args.rank = shape.galore_rank
    for dest, check in FLAG_CHECKS.items():
        if not check(getattr(args, dest)):
            parser.error(f"--{dest.replace('_', '-')} must be {check.expected}, got {getattr(args, dest)!r}")
    if args.save_every and not args.save_dir:
        parser.error("--save-every needs --save-dir")
    if args.vocab_size is not None and not args.tokenized:
        parser.error(f"--vocab-size {args.vocab_size} needs --tokenized (bytes always have 256 values)")
    problem = device_problem(args.device)
    if problem:
        parser.error(f"--device {args.device!r}: {problem}")
    try:
        args.opt_args = parse_opt_args(args.opt_arg, args.optimizers)
    except ValueError as error:
        parser.error(str(error))
    problem = optimizer_problem(args)
    if problem:
        parser.error(problem)
    return args
