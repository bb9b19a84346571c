"""Pretrain a small byte-level LLaMA with AdamW and with GaLore, and compare them.

    python bench/pretrain.py                                  # tiny model, adamw vs galore_adamw
    python bench/pretrain.py --quick                          # smoke test, a few seconds
    python bench/pretrain.py --model small --steps 2000 \\
        --optimizers adamw,galore_adamw,galore_adamw8bit --out results.json
    python bench/pretrain.py --data my_corpus.txt             # any file, read as bytes

As a pretraining loop (one optimizer, its hyperparameters, checkpoints, several processes):

    python bench/pretrain.py --model 60m --optimizers galore_adamw \
        --opt-arg galore_adamw:rank=128,update_proj_gap=500 --dtype bf16 --grad-accum 4 \
        --clip-grad 1.0 --tokenized tokens.bin --save-dir ckpt --save-every 1000 --wandb
    python bench/pretrain.py ... --resume ckpt                 # continue where ckpt stopped
    torchrun --nproc_per_node 2 bench/pretrain.py --ddp ...    # data parallel (gloo on CPU)
    torchrun --nproc_per_node 2 bench/pretrain.py --fsdp ...   # sharded: FSDP2 (fully_shard)

``--tokenized PATH`` reads token ids already on disk, in one of three formats, and holds out
the last ``--validation-fraction`` of them: a 1-D integer tensor written with ``torch.save``
(``.pt``), a 1-D integer NumPy array (``.npy``, memory-mapped), or a flat file of
little-endian ``uint16`` ids (``.bin``, memory-mapped, as nanoGPT writes them).  The
vocabulary is then ``--vocab-size`` (default: the largest id + 1).

Each optimizer trains a freshly initialised model from the same seed on the same batches,
so the rows of the final table differ only by the optimizer.  The table gives the final
validation loss (mean cross-entropy in nats per byte over fixed validation windows), the
optimizer-state memory (bytes of every tensor in ``optimizer.state``, projector bases
included) and its ratio to AdamW's, the mean time of ``optimizer.step()`` and of the whole
training step, and the parameter count.

The vocabulary is the 256 byte values, so nothing is downloaded: no tokenizer, no data
set.  Unless ``--data`` names a file, the corpus is the standard library's own ``.py``
sources, read in sorted order, which makes a run reproducible on a given Python install.

This file is the training loop: the schedule, evaluation, ``train_one`` and the results
table.  Beside it in bench/: the flags and the optimizers they configure
(``pretrain_args.py``), the corpus and its batches (``corpus.py``), the ``torchrun`` set-up
(``parallel.py``), checkpoints and wandb (``run_state.py``), the model shapes (``common.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from lowrank_optim.memory import state_bytes  # bytes the optimizer state keeps alive

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is a folder of scripts, not a package
from common import VOCAB_SIZE, build_model, count_parameters, synchronizer  # noqa: E402
from corpus import Corpus, load_data, sample_batch, validation_batches  # noqa: E402
from parallel import Distributed, gradient_sync_off, init_distributed, shard_model  # noqa: E402
from pretrain_args import DTYPES, make_optimizer, optimizer_kwargs, parse_args, peak_lr  # noqa: E402
from run_state import checkpoint_path, find_checkpoint, load_checkpoint, save_checkpoint, start_wandb  # noqa: E402
from tables import table  # noqa: E402


# ---------------------------------------------------------------------------- schedule and evaluation
def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear warmup to 1, then a cosine decay to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    model.eval()
    # Every batch has the same shape, so the mean of batch means is the mean over tokens.
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def warm_up(args: argparse.Namespace, vocab_size: int = VOCAB_SIZE) -> None:
    """One forward and backward pass on a throwaway model, so that one-time costs (lazy
    initialisation, thread pools, allocator growth) are not charged to the first optimizer."""
    device = torch.device(args.device)
    model = build_model(args.model, args.seq_len, vocab_size).to(device, DTYPES[args.dtype])
    batch = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long, device=device)
    model(input_ids=batch, labels=batch).loss.backward()
    synchronizer(device)()


# ---------------------------------------------------------------------------- training loop
def accumulate_gradients(model, micro_batches: list[torch.Tensor], dist_info: Distributed) -> torch.Tensor:
    """Backward over the micro-batches of one optimizer step; returns their mean loss.
    Each loss is divided by their number, so the summed gradient is that of the mean loss,
    as one batch of all of them would give. Under DDP or FSDP2 only the last backward
    reduces the gradients across ranks."""
    losses = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or dist_info.world_size == 1 else gradient_sync_off(model)
        with sync:
            loss = model(input_ids=batch, labels=batch).loss / len(micro_batches)
            loss.backward()
        losses.append(loss.detach())  # kept on the device: no host sync per micro-batch
    return torch.stack(losses).sum().float()


def train_one(
    optimizer_name: str, args: argparse.Namespace, corpus: Corpus | None = None, dist_info: Distributed = Distributed()
) -> dict:
    """Train a fresh model with one optimizer (or resume it); returns the metrics of one table row."""
    corpus = corpus or load_data(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the same initial weights for every optimizer and every rank
    model = build_model(args.model, args.seq_len, corpus.vocab_size).to(device, DTYPES[args.dtype])
    if args.fsdp:
        shard_model(model)  # before the optimizer, which must see the sharded parameters
    optimizer = make_optimizer(optimizer_name, model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))
    # The same batches for every optimizer; each rank its own stream, i.e. its own share of the data.
    batch_stream = torch.Generator().manual_seed(args.seed + dist_info.rank)
    held_out = validation_batches(corpus.validation, args.eval_batches, args.batch_size, args.seq_len)
    trained = torch.nn.parallel.DistributedDataParallel(model) if args.ddp else model
    sync = synchronizer(device)

    if args.resume:
        checkpoint = find_checkpoint(args.resume, optimizer_name)
        progress_state = load_checkpoint(
            checkpoint, optimizer_name, model, optimizer, scheduler, batch_stream, dist_info
        )
    else:
        initial_val_loss = evaluate(model, held_out, device)
        progress_state = {"step": 0, "initial_val_loss": initial_val_loss, "eval_history": [(0, initial_val_loss)]}
    eval_history = progress_state["eval_history"]
    first_step = progress_state["step"] + 1
    wandb_run = start_wandb(optimizer_name, args, dist_info, optimizer_kwargs(optimizer_name, args))
    optimizer_seconds = train_seconds = 0.0
    progress = tqdm(
        range(first_step, args.steps + 1),
        desc=f"{optimizer_name:>16}",
        unit="step",
        initial=first_step - 1,
        total=args.steps,
        disable=args.no_progress or not dist_info.is_main,
    )
    for step in progress:
        micro_batches = [
            sample_batch(corpus.train, args.batch_size, args.seq_len, batch_stream).to(device)
            for _ in range(args.grad_accum)
        ]
        sync()
        started = time.perf_counter()
        loss = accumulate_gradients(trained, micro_batches, dist_info)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        sync()
        step_started = time.perf_counter()
        optimizer.step()
        sync()
        step_finished = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        optimizer_seconds += step_finished - step_started
        train_seconds += time.perf_counter() - started

        metrics = {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}
        if args.eval_every and step % args.eval_every == 0 and step != args.steps:
            eval_history.append((step, evaluate(model, held_out, device)))
            metrics["val/loss"] = eval_history[-1][1]
        if wandb_run is not None:
            wandb_run.log(metrics, step=step)
        if args.save_dir and ((args.save_every and step % args.save_every == 0) or step == args.steps):
            progress_state = {**progress_state, "step": step, "eval_history": eval_history}
            path = checkpoint_path(args.save_dir, optimizer_name, step)
            save_checkpoint(path, optimizer_name, model, optimizer, scheduler, batch_stream, progress_state, dist_info)
        postfix = {"loss": f"{metrics['train/loss']:.3f}", "lr": f"{metrics['train/lr']:.1e}"}
        if len(eval_history) > 1:
            postfix["val"] = f"{eval_history[-1][1]:.3f}"
        progress.set_postfix(postfix, refresh=False)
    progress.close()

    final_val_loss = evaluate(model, held_out, device)
    eval_history.append((args.steps, final_val_loss))
    if wandb_run is not None:
        wandb_run.log({"val/loss": final_val_loss}, step=args.steps)
        wandb_run.finish()
    steps_run = max(1, args.steps - first_step + 1)  # timings cover this process's steps only
    return {
        "optimizer": optimizer_name,
        "peak_lr": peak_lr(optimizer_name, args),
        "initial_val_loss": progress_state["initial_val_loss"],
        "val_loss": final_val_loss,
        "eval_history": eval_history,
        "state_bytes": state_bytes(optimizer),  # under FSDP2: this rank's blocks
        "optimizer_step_ms": 1000 * optimizer_seconds / steps_run,
        "train_step_ms": 1000 * train_seconds / steps_run,
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
    rows = []
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
    return table(TABLE_HEADER, rows, align="l" + "r" * 8, plain=True)  # names left-aligned, numbers right


# ---------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_info = init_distributed(args)
    log = print if dist_info.is_main else (lambda *_, **__: None)
    corpus = load_data(args)
    log(
        f"model {args.model} ({args.dtype}), {args.steps} steps x {args.grad_accum} x {args.batch_size} x "
        f"{args.seq_len} tokens x {dist_info.world_size} processes; corpus: {corpus.source}, "
        f"{len(corpus.train):,} train / {len(corpus.validation):,} validation tokens; "
        f"device {args.device}, {torch.get_num_threads()} threads",
        flush=True,  # before the progress bars, which go to stderr
    )
    warm_up(args, corpus.vocab_size)
    results = [train_one(name, args, corpus, dist_info) for name in args.optimizers]
    adamw = next((r for r in results if r["optimizer"] == "adamw"), None)
    for r in results:
        r["state_ratio_vs_adamw"] = r["state_bytes"] / adamw["state_bytes"] if adamw else None
    log(format_table(results))
    if args.out and dist_info.is_main:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
        log(f"results written to {args.out}")
    if args.ddp or args.fsdp:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
