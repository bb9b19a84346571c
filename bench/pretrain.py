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
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import lowrank_optim
from lowrank_optim import _validate as V
from lowrank_optim import options
from lowrank_optim.memory import state_bytes  # bytes the optimizer state keeps alive

VOCAB_SIZE = 256  # one token per byte value (unless --tokenized)


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
    # bench/convergence.py's model: 3.3M parameters, the largest whose sweeps fit a CPU budget.
    "conv3m": ModelShape(256, 688, 4, 4, seq_len=128, galore_rank=64),
    "small": ModelShape(384, 1024, 6, 8, seq_len=128, galore_rank=96),
    "60m": ModelShape(512, 1376, 8, 8, seq_len=256, galore_rank=128),
    "130m": ModelShape(768, 2048, 12, 12, seq_len=256, galore_rank=256),
    "350m": ModelShape(1024, 2736, 16, 24, seq_len=256, galore_rank=256),
    "1b": ModelShape(2048, 5461, 32, 24, seq_len=256, galore_rank=512),
    "7b": ModelShape(4096, 11008, 32, 32, seq_len=256, galore_rank=1024),
}

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


# ---------------------------------------------------------------------------- model
def build_model(name: str, seq_len: int | None = None, vocab_size: int = VOCAB_SIZE) -> LlamaForCausalLM:
    """A randomly initialised LLaMA of the named shape (seeded by the caller)."""
    shape = MODEL_SHAPES[name]
    config = LlamaConfig(
        vocab_size=vocab_size,
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
    train: Any  # 1-D token ids: a uint8 byte tensor, an int tensor or a NumPy memmap
    validation: Any
    source: str
    vocab_size: int = VOCAB_SIZE


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
    return split_corpus(byte_tensor(raw), source, validation_fraction, min_split, VOCAB_SIZE)


def split_corpus(tokens, source: str, validation_fraction: float, min_split: int, vocab_size: int) -> Corpus:
    """Hold out the last ``validation_fraction`` of ``tokens`` (slices: a memmap stays on disk)."""
    split = int(len(tokens) * (1 - validation_fraction))
    if min(split, len(tokens) - split) < min_split:
        raise ValueError(
            f"corpus {source!r} has {len(tokens)} tokens: "
            f"too few for train and validation windows of {min_split} tokens"
        )
    return Corpus(tokens[:split], tokens[split:], source, vocab_size)


def load_tokenized(
    path: str, validation_fraction: float = 0.1, min_split: int = 2, vocab_size: int | None = None
) -> Corpus:
    """Token ids on disk (see the module docstring): ``.pt`` (torch.save of a 1-D int tensor),
    ``.npy`` or a raw little-endian uint16 ``.bin``; the last two are memory-mapped so a corpus
    larger than RAM works."""
    suffix = Path(path).suffix
    if suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
    elif suffix == ".bin":
        tokens = np.memmap(path, dtype="<u2", mode="r")
    else:
        tokens = torch.load(path, weights_only=True)
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(
                f"--tokenized {path!r}: expected a tensor saved with torch.save, got {type(tokens).__name__}"
            )
    if isinstance(tokens, np.ndarray):
        integer = np.issubdtype(tokens.dtype, np.integer)
    else:
        integer = not (tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool)
    if tokens.ndim != 1 or not integer:
        raise ValueError(
            f"--tokenized {path!r}: expected 1-D integer token ids, got {tokens.dtype} of shape {tuple(tokens.shape)}"
        )
    if vocab_size is None:  # one pass over the ids; pass --vocab-size to skip it on a huge corpus
        vocab_size = int(tokens.max()) + 1
    return split_corpus(tokens, f"{path} (token ids)", validation_fraction, min_split, vocab_size)


def load_data(args: argparse.Namespace) -> Corpus:
    """The corpus the flags name: ``--tokenized`` ids, else ``--data``'s bytes or the stdlib's."""
    if args.tokenized:
        return load_tokenized(args.tokenized, args.validation_fraction, args.seq_len, args.vocab_size)
    return load_corpus(args.data, args.corpus_bytes, args.validation_fraction, min_split=args.seq_len)


def byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(tokens, starts: list[int], seq_len: int) -> torch.Tensor:
    """Token ids (batch x seq_len): the sequences of ``tokens`` that begin at ``starts``.
    ``tokens`` may be a NumPy memmap: only these windows are read, as int64 (torch has few
    uint16 ops)."""
    if isinstance(tokens, np.ndarray):
        return torch.from_numpy(np.stack([tokens[s : s + seq_len] for s in starts]).astype(np.int64))
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
    return lowrank_optim.create_optimizer(name, model, target_modules=("attn", "mlp"), summary=summary, **kwargs)


def peak_lr(name: str, args: argparse.Namespace) -> float:
    return optimizer_kwargs(name, args)["lr"]


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


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for the queued work so timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(args: argparse.Namespace, vocab_size: int = VOCAB_SIZE) -> None:
    """One forward and backward pass on a throwaway model, so that one-time costs (lazy
    initialisation, thread pools, allocator growth) are not charged to the first optimizer."""
    device = torch.device(args.device)
    model = build_model(args.model, args.seq_len, vocab_size).to(device, DTYPES[args.dtype])
    batch = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long, device=device)
    model(input_ids=batch, labels=batch).loss.backward()
    synchronize(device)


# ---------------------------------------------------------------------------- distributed
class Distributed(NamedTuple):
    """This process's place in a ``torchrun`` job (rank 0 of 1 without ``--ddp``/``--fsdp``)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:  # the one process that prints, logs and saves
        return self.rank == 0


def init_distributed(args: argparse.Namespace) -> Distributed:
    """With ``--ddp`` or ``--fsdp``, join the process group that ``torchrun`` describes in RANK,
    WORLD_SIZE, MASTER_ADDR and MASTER_PORT: gloo on CPU, nccl on CUDA, each process on its
    LOCAL_RANK GPU."""
    if not (args.ddp or args.fsdp):
        return Distributed()
    if torch.device(args.device).type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())


def gather(obj: Any, dist_info: Distributed) -> list:
    """``obj`` from every rank, in rank order (all ranks must call this)."""
    if dist_info.world_size == 1:
        return [obj]
    gathered = [None] * dist_info.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_path(directory: str, optimizer_name: str, step: int) -> Path:
    return Path(directory) / optimizer_name / f"step_{step:07d}.pt"


def sharded_part(path: Path) -> Path:
    """The directory beside ``step_N.pt`` that holds an FSDP2 run's sharded model and
    optimizer state (``torch.distributed.checkpoint``: one file per rank)."""
    return path.with_suffix(".dcp")


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def find_checkpoint(resume: str, optimizer_name: str) -> Path:
    """``--resume`` names a checkpoint file, or a ``--save-dir`` whose latest checkpoint of
    this optimizer is taken."""
    path = Path(resume)
    if path.is_file():
        return path
    found = sorted((path / optimizer_name).glob("step_*.pt"))
    if not found:
        raise FileNotFoundError(f"--resume {resume!r}: no {optimizer_name}/step_*.pt checkpoint there")
    return found[-1]


def rng_state(batch_stream: torch.Generator) -> dict[str, torch.Tensor]:
    """What decides this rank's future batches and any random op, so a resumed run draws the
    same ones as an uninterrupted run would have."""
    state = {"batch_stream": batch_stream.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    path: Path, optimizer_name: str, model, optimizer, scheduler, batch_stream, progress: dict, dist_info: Distributed
) -> None:
    """Everything the run depends on, through ``torch.save`` (loadable with weights_only=True).
    Every rank must call this: rank 0 writes, with every rank's RNG state.  Under FSDP2 the
    model and optimizer go to the directory :func:`sharded_part` names instead, every rank
    writing its own shards with ``torch.distributed.checkpoint``."""
    rng = gather(rng_state(batch_stream), dist_info)
    sharded = is_sharded(model)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=sharded_part(path))
    if not dist_info.is_main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {} if sharded else {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    checkpoint = {
        **weights,
        "sharded": sharded,
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "optimizer_name": optimizer_name,
        **progress,  # step, initial_val_loss, eval_history
    }
    partial = path.with_suffix(".tmp")  # an interrupted save must not leave a truncated checkpoint
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def load_checkpoint(
    path: Path, optimizer_name: str, model, optimizer, scheduler, batch_stream, dist_info: Distributed
) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the progress entries."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["optimizer_name"] != optimizer_name:
        raise ValueError(
            f"--resume {str(path)!r} is a checkpoint of {checkpoint['optimizer_name']}, not of {optimizer_name}"
        )
    if len(checkpoint["rng"]) != dist_info.world_size:
        raise ValueError(
            f"--resume {str(path)!r} was saved by {len(checkpoint['rng'])} processes; resume it with as many, "
            f"not {dist_info.world_size}"
        )
    if checkpoint.get("sharded"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        # DCP loads into a state dict of the right structure: the fresh one of this run
        # (get_state_dict first initialises the optimizer's state with a zero-lr step).
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=sharded_part(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rng = checkpoint["rng"][dist_info.rank]
    batch_stream.set_state(rng["batch_stream"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return {key: checkpoint[key] for key in ("step", "initial_val_loss", "eval_history")}


# ---------------------------------------------------------------------------- logging
def start_wandb(optimizer_name: str, args: argparse.Namespace, dist_info: Distributed):
    """A wandb run on rank 0 with ``--wandb``, else None. Imported here: wandb is optional."""
    if not (args.wandb and dist_info.is_main):
        return None
    import wandb

    config = {**vars(args), "optimizer": optimizer_name, "optimizer_kwargs": optimizer_kwargs(optimizer_name, args)}
    return wandb.init(
        project=args.wandb_project,
        name=f"{args.model}-{optimizer_name}",
        config=json.loads(json.dumps(config, default=str)),
        # Read WANDB_MODE / WANDB_DIR now: wandb itself reads them once per process, at its first run.
        mode=args.wandb_mode or os.environ.get("WANDB_MODE"),
        dir=args.wandb_dir or os.environ.get("WANDB_DIR"),
    )


# ---------------------------------------------------------------------------- training loop
def shard_model(model: LlamaForCausalLM) -> None:
    """FSDP2: each decoder layer is one unit (its parameters are all-gathered for its forward
    and backward only), the embeddings, final norm and head form the root unit.  Every
    parameter becomes a DTensor holding this rank's rows; the optimizer is built after."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def gradient_sync_off(model) -> contextlib.AbstractContextManager:
    """Accumulate a micro-batch's gradient locally, without the cross-rank reduction."""
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():  # FSDP2 has a switch instead of a context
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return fsdp_no_sync()


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
    wandb_run = start_wandb(optimizer_name, args, dist_info)
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
        synchronize(device)
        started = time.perf_counter()
        loss = accumulate_gradients(trained, micro_batches, dist_info)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        synchronize(device)
        step_started = time.perf_counter()
        optimizer.step()
        synchronize(device)
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
