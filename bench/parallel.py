"""bench/pretrain.py under ``torchrun``: which process this is, and the DDP and FSDP2 plumbing.

``--ddp`` wraps the model in ``DistributedDataParallel``; ``--fsdp`` shards it with FSDP2
(``fully_shard``), so that parameters, gradients and the optimizer state built on them are
split by rows across the ranks.  Without either flag the run is rank 0 of 1 and none of this
touches ``torch.distributed``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, NamedTuple

import torch


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


def shard_model(model: torch.nn.Module) -> None:
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
