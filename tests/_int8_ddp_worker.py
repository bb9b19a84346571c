"""The two-process side of the INT8-under-DDP tests in tests/test_qgalore.py: one spawn.

Each rank trains a small model with ``Int8Linear`` weights under DDP (gloo, CPU) on its half
of the global batch with ``QGaLoreAdamW8bit`` (with and without
``lowrank_optim.quant.clip_grad_norm_``, and with ``int8_grad_sync="off"``), and the same
model in one process on the whole batch; each rank writes what the tests compare to
``rank{r}.pt`` (plain tensors, numbers and None only).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from _distributed_worker import in_process_group
from lowrank_optim import QGaLoreAdamW8bit
from lowrank_optim.quant import Int8Linear, clip_grad_norm_, convert_linear_to_int8, sync_int8_grads

STEPS = 6
GLOBAL_BATCH = 16
MAX_NORM = 0.05  # below the gradient norm at every step: the clip is active
RUNS = ("single", "single_clip", "ddp", "ddp_clip", "ddp_off")


def make_model() -> nn.Module:
    """A tanh between attn and a 3-wide head: with a 1-wide linear head the first gradient
    of attn is rank 1 and its basis beyond the first vector is rounding noise, which no two
    runs (DDP or not) share."""
    torch.manual_seed(0)
    layers = OrderedDict(mlp=nn.Linear(12, 20), act1=nn.Tanh(), attn=nn.Linear(20, 9), act2=nn.Tanh(),
                         head=nn.Linear(9, 3))
    return convert_linear_to_int8(nn.Sequential(layers), group_size=32)


def make_optimizer(model: nn.Module, sync: str) -> QGaLoreAdamW8bit:
    int8 = [model.mlp.weight, model.attn.weight]
    others = [p for p in model.parameters() if all(p is not q for q in int8)]
    # The exact SVD inside the INT4 basis, as when the "it trained" margin of the test was set.
    groups = [{"params": int8, "rank": 3, "update_proj_gap": 2, "projector_args": {"inner": "svd"}}, {"params": others}]
    return QGaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=16, int8_grad_sync=sync)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(GLOBAL_BATCH, 12, generator=torch.Generator().manual_seed(100 + step))
    share = GLOBAL_BATCH // world
    x = x[rank * share : (rank + 1) * share]
    return x, torch.sin(3 * x[:, :3])


class AllReduceCount:
    """Counts ``dist.all_reduce`` calls from Python (DDP's reducer runs in C++: not counted)."""

    def __enter__(self):
        self.calls, self.saved = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self.saved(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.saved


def train(run: str, rank: int, world: int) -> dict:
    model = make_model()
    # The one-process runs take "off": the world size is 2 here, yet each rank runs them
    # alone on the whole batch, with nothing to average.
    sync = "auto" if run in ("ddp", "ddp_clip") else "off"
    optimizer = make_optimizer(model, sync)
    trained = model if run.startswith("single") else nn.parallel.DistributedDataParallel(model)
    if run.startswith("single"):
        rank, world = 0, 1
    norms, all_reduces = [], []
    for step in range(STEPS):
        x, y = local_batch(step, rank, world)
        with AllReduceCount() as count:
            nn.functional.mse_loss(trained(x), y).backward()
            if run.endswith("clip"):
                norms.append(clip_grad_norm_(model.parameters(), MAX_NORM, int8_grad_sync=sync).item())
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        all_reduces.append(count.calls)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dequantized = {name: getattr(model, name).dequantized_weight(torch.float32) for name in ("mlp", "attn")}
    return {"state": state, "dequantized": dequantized, "norms": norms, "all_reduces": all_reduces}


def missing_gradients(rank: int) -> dict:
    """Weight a has a gradient on rank 0 only, b on no rank."""
    a, b = Int8Linear(3, 2, group_size=4), Int8Linear(3, 2, group_size=4)
    a.weight.float_grad = torch.ones(2, 3) if rank == 0 else None
    with AllReduceCount() as first:
        sync_int8_grads([a.weight, b.weight])
    with AllReduceCount() as again:  # nothing accumulated since: no collective
        sync_int8_grads([a.weight, b.weight])
    averaged = a.weight.float_grad.clone()
    a(torch.ones(1, 3)).sum().backward()  # accumulates: a local part again
    with AllReduceCount() as after_backward:
        sync_int8_grads([a.weight, b.weight])
    return {"a": averaged, "b": b.weight.float_grad, "calls": [first.calls, again.calls, after_backward.calls]}


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    def work():
        results = {name: train(name, rank, world) for name in RUNS}
        results["missing_gradients"] = missing_gradients(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))

    in_process_group(rank, world, port, out_dir, work)
