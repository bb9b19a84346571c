"""Pretrain a small byte-level LLaMA with AdamW and with GaLore, and compare them.

    python bench/pretrain.py                                  # tiny model, adamw vs galore_adamw
    python bench/pretrain.py --quick                          # smoke test, a few seconds
    python bench/pretrain.py --model small --steps 2000 \\
        --optimizers adamw,galore_adamw,galore_adamw8bit --out results.json
    python bench/pretrain.py --data my_corpus.txt             # any file, read as bytes

Each optimizer trains a freshly initialised model from the same seed on the same batches,
so the rows of the final table differ only by the optimizer.  The table gives the final
validation loss (mean cross-entropy in nats per byte over fixed validation windows), the
optimizer-state memory (bytes of every tensor in ``optimizer.state``, projector bases
included) and its ratio to AdamW's, the mean time of ``optimizer.step()`` and of the whole
training step, and the parameter count.

The vocabulary is the 256 byte values, so nothing is downloaded: no tokenizer, no data
set.  Unless ``--data`` names a file, the corpus is the standard library's own ``.py``
sources, read in sorted order, which makes a run reproducible on a given Python install.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lowrank_optim

VOCAB_SIZE = 256  # one token per byte value


class ModelShape(NamedTuple):
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    seq_len: int  # default --seq-len for this shape
    galore_rank: int  # default --rank


#: ``tiny`` and ``small`` fit a CPU; the others are the LLaMA shapes of the GaLore paper
#: (Zhao et al. 2024, Table 2, with its ranks of about hidden/4), which there use a
#: 32000-token vocabulary: with our 256 byte tokens their embeddings are smaller, so the
#: parameter counts fall short of the names.  ``tiny`` gets hidden/2: at width 64, rank 16
#: ends about 0.08 nats behind AdamW in the default run, rank 32 level with it.
MODEL_SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(64, 172, 4, 2, seq_len=64, galore_rank=32),
    "small": ModelShape(384, 1024, 6, 8, seq_len=128, galore_rank=96),
    "60m": ModelShape(512, 1376, 8, 8, seq_len=256, galore_rank=128),
    "130m": ModelShape(768, 2048, 12, 12, seq_len=256, galore_rank=256),
    "350m": ModelShape(1024, 2736, 16, 24, seq_len=256, galore_rank=256),
    "1b": ModelShape(2048, 5461, 32, 24, seq_len=256, galore_rank=512),
}

#: Options some optimizers need so that this script's schedule, not their own, sets the lr:
#: Adafactor otherwise derives its step from 1/sqrt(t) and scales it by each weight's RMS.
OPTIMIZER_OVERRIDES: dict[str, dict] = {
    "galore_adafactor": {"relative_step": False, "scale_parameter": False},
}

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


# ---------------------------------------------------------------------------- model
def build_model(name: str, seq_len: int | None = None) -> LlamaForCausalLM:
    """A randomly initialised byte-level LLaMA of the named shape (seeded by the caller)."""
    shape = MODEL_SHAPES[name]
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_hidden_layers=shape.num_hidden_layers,
        max_position_embeddings=max(shape.seq_len, seq_len or 0),
        tie_word_embeddings=False,  # as the paper's models: the LM head is a dense AdamW matrix
        use_cache=False,  # training only: the KV cache would just cost memory
    )
    return LlamaForCausalLM(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- data
class Corpus(NamedTuple):
    train: torch.Tensor  # uint8 byte values
    validation: torch.Tensor
    source: str


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files in a fixed order (third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_stdlib(max_bytes: int) -> bytes:
    chunks, total = [], 0
    for path in stdlib_sources():
        if total >= max_bytes:
            break
        data = path.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)[:max_bytes]


def load_corpus(
    data_path: str | None = None, max_bytes: int = 2_000_000, validation_fraction: float = 0.1, min_split: int = 2
) -> Corpus:
    """At most ``max_bytes`` bytes of ``data_path`` (default: the stdlib sources), split so
    that the last ``validation_fraction`` is held out; each split must hold ``min_split``
    bytes (at least one training window)."""
    if data_path:
        raw, source = Path(data_path).read_bytes()[:max_bytes], data_path
    else:
        raw, source = read_stdlib(max_bytes), f"python {sys.version.split()[0]} stdlib sources"
    split = int(len(raw) * (1 - validation_fraction))
    if min(split, len(raw) - split) < min_split:
        raise ValueError(
            f"corpus {source!r} has {len(raw)} bytes: too few for train and validation windows of {min_split} bytes"
        )
    return Corpus(byte_tensor(raw[:split]), byte_tensor(raw[split:]), source)


def byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(tokens: torch.Tensor, starts: list[int], seq_len: int) -> torch.Tensor:
    """Token ids (batch x seq_len): the sequences of ``tokens`` that begin at ``starts``."""
    return torch.stack([tokens[s : s + seq_len] for s in starts]).long()


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=generator)
    return windows(tokens, starts.tolist(), seq_len)


def validation_batches(tokens: torch.Tensor, num_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Evenly spaced windows over the whole validation split: the same for every optimizer
    and every evaluation, so successive losses are comparable."""
    starts = torch.linspace(0, len(tokens) - seq_len, num_batches * batch_size).long().tolist()
    return list(windows(tokens, starts, seq_len).split(batch_size))


# ---------------------------------------------------------------------------- training
def make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return lowrank_optim.create_optimizer(
        name,
        model,
        target_modules=("attn", "mlp"),
        rank=args.rank,
        lr=args.galore_lr,
        update_proj_gap=args.update_proj_gap,
        scale=args.scale,
        weight_decay=args.weight_decay,
        **OPTIMIZER_OVERRIDES.get(name, {}),
    )


def peak_lr(name: str, args: argparse.Namespace) -> float:
    return args.lr if name == "adamw" else args.galore_lr


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear warmup to 1, then a cosine decay to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``, recursing into nested containers
    (our optimizers keep the projector's basis in ``state[p]["projector"]``)."""

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return sum(size(s) for s in optimizer.state.values())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    model.eval()
    # Every batch has the same shape, so the mean of batch means is the mean over tokens.
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for the queued work so timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(args: argparse.Namespace) -> None:
    """One forward and backward pass on a throwaway model, so that one-time costs (lazy
    initialisation, thread pools, allocator growth) are not charged to the first optimizer."""
    device = torch.device(args.device)
    model = build_model(args.model, args.seq_len).to(device)
    batch = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long, device=device)
    model(input_ids=batch, labels=batch).loss.backward()
    synchronize(device)


def train_one(optimizer_name: str, args: argparse.Namespace, corpus: Corpus | None = None) -> dict:
    """Train a fresh model with one optimizer; returns the metrics of one table row."""
    corpus = corpus or load_corpus(args.data, args.corpus_bytes, min_split=args.seq_len)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the same initial weights for every optimizer
    model = build_model(args.model, args.seq_len).to(device)
    optimizer = make_optimizer(optimizer_name, model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))
    batch_stream = torch.Generator().manual_seed(args.seed)  # the same batches for every optimizer
    held_out = validation_batches(corpus.validation, args.eval_batches, args.batch_size, args.seq_len)

    initial_val_loss = evaluate(model, held_out, device)
    eval_history = [(0, initial_val_loss)]
    optimizer_seconds = train_seconds = 0.0
    progress = tqdm(range(1, args.steps + 1), desc=f"{optimizer_name:>16}", unit="step", disable=args.no_progress)
    for step in progress:
        batch = sample_batch(corpus.train, args.batch_size, args.seq_len, batch_stream).to(device)
        synchronize(device)
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        synchronize(device)
        step_started = time.perf_counter()
        optimizer.step()
        synchronize(device)
        step_finished = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        optimizer_seconds += step_finished - step_started
        train_seconds += time.perf_counter() - started

        postfix = {"loss": f"{loss.item():.3f}", "lr": f"{scheduler.get_last_lr()[0]:.1e}"}
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            eval_history.append((step, evaluate(model, held_out, device)))
        if len(eval_history) > 1:
            postfix["val"] = f"{eval_history[-1][1]:.3f}"
        progress.set_postfix(postfix, refresh=False)
    progress.close()

    final_val_loss = evaluate(model, held_out, device)
    eval_history.append((args.steps, final_val_loss))
    return {
        "optimizer": optimizer_name,
        "peak_lr": peak_lr(optimizer_name, args),
        "initial_val_loss": initial_val_loss,
        "val_loss": final_val_loss,
        "eval_history": eval_history,
        "state_bytes": state_bytes(optimizer),
        "optimizer_step_ms": 1000 * optimizer_seconds / args.steps,
        "train_step_ms": 1000 * train_seconds / args.steps,
        "parameters": count_parameters(model),
    }


# ---------------------------------------------------------------------------- report
def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


TABLE_HEADER = (
    "optimizer",
    "peak lr",
    "init val loss",
    "val loss",
    "optim state",
    "vs AdamW",
    "step ms",
    "train step ms",
    "params",
)


def format_table(results: list[dict]) -> str:
    rows = [TABLE_HEADER]
    for r in results:
        ratio = r.get("state_ratio_vs_adamw")
        rows.append(
            (
                r["optimizer"],
                f"{r['peak_lr']:.0e}",
                f"{r['initial_val_loss']:.4f}",
                f"{r['val_loss']:.4f}",
                format_bytes(r["state_bytes"]),
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{r['optimizer_step_ms']:.2f}",
                f"{r['train_step_ms']:.2f}",
                f"{r['parameters']:,}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]

    def line(row) -> str:  # names left-aligned, numbers right-aligned
        return " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    lines = [line(row) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
        help="comma-separated: 'adamw' (torch.optim.AdamW) and any of "
        + ", ".join(lowrank_optim.available_optimizers()),
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
    parser.add_argument("--warmup", type=int, default=150, help="linear warmup steps, then cosine to 10%% of peak")
    parser.add_argument("--eval-every", type=int, default=500, help="validation every N steps (0: start and end only)")
    parser.add_argument("--eval-batches", type=int, default=8, help="fixed validation batches per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    parser.add_argument("--data", default=None, help="train on this file's bytes instead of the stdlib sources")
    parser.add_argument("--corpus-bytes", type=int, default=2_000_000, help="read at most this many corpus bytes")
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # re-parse so that explicit flags override the quick defaults
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    known = {"adamw", *lowrank_optim.available_optimizers()}
    unknown = [name for name in args.optimizers if name not in known]
    if unknown or not args.optimizers:
        parser.error(f"--optimizers: unknown {unknown or 'empty list'}; choose from {', '.join(sorted(known))}")
    shape = MODEL_SHAPES[args.model]
    if args.seq_len is None:
        args.seq_len = shape.seq_len
    if args.rank is None:
        args.rank = shape.galore_rank
    for flag in ("steps", "batch_size", "seq_len", "eval_batches", "update_proj_gap", "rank"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data, args.corpus_bytes, min_split=args.seq_len)
    print(
        f"model {args.model}, {args.steps} steps x {args.batch_size} x {args.seq_len} bytes; "
        f"corpus: {corpus.source}, {len(corpus.train):,} train / {len(corpus.validation):,} validation bytes; "
        f"device {args.device}, {torch.get_num_threads()} threads",
        flush=True,  # before the progress bars, which go to stderr
    )
    warm_up(args)
    results = [train_one(name, args, corpus) for name in args.optimizers]
    adamw = next((r for r in results if r["optimizer"] == "adamw"), None)
    for r in results:
        r["state_ratio_vs_adamw"] = r["state_bytes"] / adamw["state_bytes"] if adamw else None
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
        print(f"results written to {args.out}")
    return results


if __name__ == "__main__":
    main()
