"""What a bench/pretrain.py run leaves behind: checkpoints to resume it from (``--save-dir``,
``--save-every``, ``--resume``) and its Weights & Biases log (``--wandb``).

A checkpoint holds everything the rest of the run depends on, so that a resumed run equals
an uninterrupted one: model, optimizer, scheduler, every rank's RNG state (which decides its
future batches) and the progress so far.  It is a ``torch.save`` file that loads with
``weights_only=True``; under FSDP2 the model and optimizer go beside it, sharded.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from parallel import Distributed, gather


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


def start_wandb(optimizer_name: str, args: argparse.Namespace, dist_info: Distributed, optimizer_kwargs: dict):
    """A wandb run on rank 0 with ``--wandb``, else None; its config is the flags and the
    optimizer's keywords. Imported here: wandb is optional."""
    if not (args.wandb and dist_info.is_main):
        return None
    import wandb

    config = {**vars(args), "optimizer": optimizer_name, "optimizer_kwargs": optimizer_kwargs}
    return wandb.init(
        project=args.wandb_project,
        name=f"{args.model}-{optimizer_name}",
        config=json.loads(json.dumps(config, default=str)),
        # Read WANDB_MODE / WANDB_DIR now: wandb itself reads them once per process, at its first run.
        mode=args.wandb_mode or os.environ.get("WANDB_MODE"),
        dir=args.wandb_dir or os.environ.get("WANDB_DIR"),
    )
