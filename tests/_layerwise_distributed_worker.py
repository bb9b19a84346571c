"""The two-process side of tests/test_layerwise_distributed.py: one spawn runs every check.

Each rank trains the same tiny model under DDP and under FSDP2 (gloo, CPU), once with the
ordinary step and once in layer-wise mode, with and without gradient accumulation (by
``accumulation_steps`` and by ``no_sync``/``set_requires_gradient_sync``); it samples the
live gradient bytes in the gradient hooks of an 8-layer model, checkpoints with DCP, and
records the refusals.  Rank 0 writes what the tests compare to ``results.pt``.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import lowrank_optim as lo
from _distributed_worker import error_of, full_params, make_model, run_checks, spawned_record  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

STEPS = 10  # update_proj_gap=4: refreshes at steps 0, 4 and 8
GLOBAL_BATCH = 8
SIZES = (6, 9, 11, 3)


def make_optimizer(name: str, model: nn.Module, **loop) -> torch.optim.Optimizer:
    projected = [model[0].weight, model[2].weight]
    others = [p for p in model.parameters() if all(p is not q for q in projected)]
    # The exact SVD unless named: the regular step refreshes same-shaped matrices together
    # (rsvd batches them), layer-wise mode one by one, and on these tiny matrices with close
    # singular values the two roundings can pick visibly different bases.
    group = {"params": projected, "rank": 2, "update_proj_gap": 4, "projector": "svd"}
    builders = {
        "galore_svd": lambda: lo.GaLoreAdamW([group, {"params": others}], lr=1e-2, weight_decay=0.1, **loop),
        "galore_rsvd": lambda: lo.GaLoreAdamW([{**group, "projector": "rsvd"}, {"params": others}], lr=1e-2, **loop),
        "fira": lambda: lo.FiraAdamW([group, {"params": others}], lr=1e-2, weight_decay=0.1, **loop),
    }
    return builders[name]()


OPTIMIZERS = ("galore_svd", "galore_rsvd", "fira")
#: How a step's gradients accumulate: one backward, two synchronised ones counted by the
#: optimizer (accumulation_steps=2), or two of which the first does not synchronise.
ACCUMULATION = ("none", "steps", "no_sync")


def micro_batch(step: int, micro: int, rank: int, world: int):
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x, y = torch.randn(GLOBAL_BATCH, SIZES[0], generator=gen), torch.randn(GLOBAL_BATCH, SIZES[-1], generator=gen)
    share = GLOBAL_BATCH // world
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def no_sync(model, mode):
    if mode == "ddp":
        return model.no_sync()

    @contextlib.contextmanager
    def fsdp():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return fsdp()


def train(model, optimizer, mode, accumulation, steps, first=0, rank=0, world=1, before_step=None):
    micro_batches = 1 if accumulation == "none" else 2
    for step in range(first, first + steps):
        for micro in range(micro_batches):
            x, y = micro_batch(step, micro, rank, world)
            skip_sync = accumulation == "no_sync" and micro == 0
            with no_sync(model, mode) if skip_sync else contextlib.nullcontext():
                (nn.functional.mse_loss(model(x), y) / micro_batches).backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def wrapped(mode: str):
    """(the module to call, the module whose parameters the optimizer takes)."""
    model = make_model()
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model), model
    fully_shard(model)
    return model, model


def layerwise_run(name, mode, accumulation, rank, world, steps=STEPS, **loop):
    model, inner = wrapped(mode)
    accumulation_steps = 2 if accumulation == "steps" else 1
    optimizer = make_optimizer(name, inner, layerwise=True, accumulation_steps=accumulation_steps, **loop)
    if mode == "ddp":
        optimizer.attach_ddp(model)
    train(model, optimizer, mode, accumulation, steps, rank=rank, world=world)
    return inner, optimizer


def equivalence(rank: int, world: int) -> dict:
    out = {}
    for name in OPTIMIZERS:
        for mode in ("ddp", "fsdp"):
            for accumulation in ACCUMULATION:
                model, inner = wrapped(mode)
                optimizer = make_optimizer(name, inner)
                train(model, optimizer, mode, accumulation, STEPS, rank=rank, world=world)
                layerwise, layerwise_optimizer = layerwise_run(name, mode, accumulation, rank, world)
                out[(name, mode, accumulation)] = {
                    "regular": full_params(inner),
                    "layerwise": full_params(layerwise),
                    "refreshes": int(layerwise_optimizer.state[layerwise[0].weight]["projector"]["refreshes"]),
                    "grads_left": sum(p.grad is not None for p in layerwise.parameters()),
                }
    return out


#: A norm most of the tiny model's gradients exceed, so that clipping acts.
MAX_GRAD_NORM = 0.05


def clipping(rank: int, world: int) -> dict:
    """Layer-wise ``max_grad_norm`` clips each parameter's gradient by its own norm (the whole
    matrix's when sharded): the regular step after ``clip_grad_norm_`` on each parameter."""
    out = {}
    for mode in ("ddp", "fsdp"):
        model, inner = wrapped(mode)
        optimizer = make_optimizer("galore_svd", inner)

        def clip_each(params=list(inner.parameters())):
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], MAX_GRAD_NORM)

        train(model, optimizer, mode, "none", STEPS, rank=rank, world=world, before_step=clip_each)
        layerwise, _ = layerwise_run("galore_svd", mode, "none", rank, world, max_grad_norm=MAX_GRAD_NORM)
        out[mode] = {"regular": full_params(inner), "layerwise": full_params(layerwise)}
    return out


def swapped_like_accelerate(name: str, rank: int, world: int) -> dict:
    """accelerate's FSDP2 ``prepare`` shards a model whose optimizer already exists and swaps
    the sharded parameters into its groups: the layer-wise hooks follow them at the first
    step, which steps the regular way, and from then on the run is layer-wise."""
    model = make_model()
    optimizer = make_optimizer(name, model, layerwise=True)
    originals = list(model.parameters())
    fully_shard(model)
    mapping = {id(old): new for old, new in zip(originals, model.parameters())}
    for group in optimizer.param_groups:
        group["params"] = [mapping[id(p)] for p in group["params"]]
    train(model, optimizer, "fsdp", "none", STEPS, rank=rank, world=world)
    params = full_params(model)
    # One more backward, no step(): in layer-wise mode the hooks step and free every gradient.
    x, y = micro_batch(STEPS, 0, rank, world)
    nn.functional.mse_loss(model(x), y).backward()
    after = full_params(model)
    return {"params": params, "stepped_in_backward": sum(not torch.equal(after[k], params[k]) for k in params),
            "grads_left": sum(p.grad is not None for p in model.parameters())}


class Branchy(nn.Module):
    """``b`` runs only when told: unused by every rank, or by one rank only, on some steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, use_b: bool):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.b(h)) if use_b else h)


def unused_parameters(rank: int, world: int) -> dict:
    """DDP(find_unused_parameters=True): a parameter no rank used gets no step (as in the
    regular step, where DDP leaves its .grad None), one that only some ranks used steps on
    the average."""
    out = {}
    for layerwise in (False, True):
        model = Branchy()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        groups = [{"params": [model.a.weight, model.b.weight], "rank": 2, "update_proj_gap": 4},
                  {"params": [model.a.bias, model.b.bias, *model.head.parameters()]}]
        optimizer = lo.GaLoreAdamW(groups, lr=1e-2, layerwise=layerwise)
        if layerwise:
            optimizer.attach_ddp(ddp)
        for step in range(9):
            use_b = step % 3 == 2 or (step % 3 == 1 and rank == 0)  # 0: nobody, 1: rank 0 only
            x, y = micro_batch(step, 0, rank, world)
            nn.functional.mse_loss(ddp(x, use_b), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out[layerwise] = {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                          "b_steps": int(optimizer.state[model.b.weight]["step"])}
    return out


# ----------------------------------------------------------------------------- memory
LAYERS = 8
WIDTH = 32


def memory_profile(layerwise: bool) -> dict:
    """bench/bench_layerwise_memory.py's measurement on a small FSDP2 model: peak bytes of
    live ``.grad`` over a backward, sampled in a gradient hook of every parameter."""
    import bench_layerwise_memory

    return bench_layerwise_memory.profile("fsdp", layerwise, LAYERS, WIDTH, rank=8)


# ----------------------------------------------------------------------------- checkpoints
def checkpoints(rank: int, world: int, out_dir: str) -> dict:
    """DCP: a layer-wise checkpoint resumes bit-identically; a regular one loads into it."""
    out = {}
    for saved_layerwise in (True, False):
        path = os.path.join(out_dir, f"dcp_layerwise_{saved_layerwise}")
        model, _ = wrapped("fsdp")
        optimizer = make_optimizer("galore_svd", model, layerwise=saved_layerwise)
        train(model, optimizer, "fsdp", "none", 3, rank=rank, world=world)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        train(model, optimizer, "fsdp", "none", 3, first=3, rank=rank, world=world)

        resumed, _ = wrapped("fsdp")
        resumed_optimizer = make_optimizer("galore_svd", resumed, layerwise=True)
        model_sd, optim_sd = get_state_dict(resumed, resumed_optimizer)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(resumed, resumed_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        train(resumed, resumed_optimizer, "fsdp", "none", 3, first=3, rank=rank, world=world)
        out[saved_layerwise] = {"uninterrupted": full_params(model), "resumed": full_params(resumed)}
    return out


# ----------------------------------------------------------------------------- refusals
def refusals(rank: int, world: int) -> dict:
    def backward_without_wrapper():
        model = make_model()
        lo.GaLoreAdamW([{"params": [model[0].weight], "rank": 2}], layerwise=True)
        x, y = micro_batch(0, 0, rank, world)
        nn.functional.mse_loss(model(x), y).backward()

    def attach_to_a_module():
        model = make_model()
        lo.GaLoreAdamW(model.parameters(), layerwise=True).attach_ddp(model)

    def attach_foreign_parameter():
        ddp = nn.parallel.DistributedDataParallel(make_model())
        stranger = nn.Parameter(torch.zeros(3))
        lo.GaLoreAdamW([*ddp.module.parameters(), stranger], layerwise=True).attach_ddp(ddp)

    def attach_without_layerwise():
        ddp = nn.parallel.DistributedDataParallel(make_model())
        lo.GaLoreAdamW(ddp.module.parameters()).attach_ddp(ddp)

    def unsafe_method_under_fsdp():
        model, _ = wrapped("fsdp")
        lo.NaturalGaLoreAdamW([{"params": [model[0].weight], "rank": 2}], layerwise=True)

    return {
        "no_wrapper": error_of(backward_without_wrapper),
        "attach_module": error_of(attach_to_a_module),
        "attach_foreign": error_of(attach_foreign_parameter),
        "attach_not_layerwise": error_of(attach_without_layerwise),
        "natural_galore_fsdp": error_of(unsafe_method_under_fsdp),
    }


def checks(rank: int, world: int, out_dir: str) -> dict:
    return {
        "equivalence": equivalence(rank, world),
        "clipping": clipping(rank, world),
        "swapped": swapped_like_accelerate("galore_svd", rank, world),
        "unused": unused_parameters(rank, world),
        "memory": {lw: memory_profile(lw) for lw in (False, True)},
        "dcp": checkpoints(rank, world, out_dir),
        "errors": refusals(rank, world),
    }


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    run_checks(checks, rank, world, port, out_dir)
