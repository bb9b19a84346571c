"""The two-process side of tests/test_distributed.py: one spawn runs every check.

Each rank trains the same tiny model under DDP and under FSDP2 (gloo, CPU) with several
optimizers, and also a single-process run on the whole global batch; rank 0 writes what the
tests compare to ``results.pt`` (plain tensors, numbers and strings only).
"""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import lowrank_optim as lo
from lowrank_optim import memory

STEPS = 5
GLOBAL_BATCH = 8
#: Projected weights (out x in) with an odd row count, so FSDP2's shards are uneven (5 + 4
#: and 6 + 5 rows), and rows >= columns, so ``proj_type="std"`` picks the right basis in a
#: single process too and the runs are comparable.  The head (3 x 11) is a dense group.
SIZES = (6, 9, 11, 3)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    projected = [model[0].weight, model[2].weight]
    if name == "galore_std_wide":  # the 3 x 11 head too: std picks its left side in one process
        projected.append(model[4].weight)
    others = [p for p in model.parameters() if all(p is not q for q in projected)]
    group = {"params": projected, "rank": 2, "update_proj_gap": 2}
    # Under FSDP2 "std" takes the side that keeps the sharded rows whole: the right one.
    std_under_fsdp = "std" if isinstance(model[0].weight, DTensor) else "right"
    builders = {
        "galore_std_wide": lambda g: lo.GaLoreAdamW([{**g[0], "proj_type": std_under_fsdp}, g[1]], lr=1e-2),
        "galore_svd": lambda g: lo.GaLoreAdamW(g, lr=1e-2, weight_decay=0.1),
        "galore_rsvd": lambda g: lo.GaLoreAdamW([{**g[0], "projector": "rsvd"}, g[1]], lr=1e-2),
        # bf16 products: the update is a bf16 product added into each rank's fp32 block
        "galore_rsvd_bf16": lambda g: lo.GaLoreAdamW(
            [{**g[0], "projector": "rsvd", "projector_args": {"product_dtype": "bfloat16"}}, g[1]], lr=1e-2
        ),
        "galore_random_project": lambda g: lo.GaLoreAdamW(
            [{**g[0], "projector": "random", "on_refresh": "project"}, g[1]], lr=1e-2
        ),
        "fira": lambda g: lo.FiraAdamW(g, lr=1e-2, weight_decay=0.1),
        "fira_matrix": lambda g: lo.FiraAdamW(g, lr=1e-2, scaling="matrix", norm_growth_limit=1.05),
        "frugal_svd": lambda g: lo.FrugalAdamW(g, lr=1e-2, weight_decay=0.1, state_free="sgd"),
        "frugal_columns_keep": lambda g: lo.FrugalAdamW(
            [{**g[0], "rank": None, "density": 0.5, "projector": "columns", "on_refresh": "keep"}, g[1]], lr=1e-2
        ),
        "frugal_blocks": lambda g: lo.FrugalAdamW(
            [{**g[0], "rank": None, "density": 0.5, "projector": "blocks", "projector_args": {"order": "ascending"},
              "on_refresh": "keep"}, g[1]], lr=1e-2
        ),
        "dct": lambda g: lo.DCTAdamW(g, lr=1e-2),
        "apollo": lambda g: lo.ApolloAdamW(g, lr=1e-2, weight_decay=0.1),
        "apollo_mini": lambda g: lo.ApolloMiniAdamW([{**g[0], "rank": 1}, g[1]], lr=1e-2),
        # the bf16 sketch product (the default from rank 16), on these rank-2 shapes
        "apollo_bf16_sketch": lambda g: lo.ApolloAdamW(g, lr=1e-2, projector_args={"product_dtype": "bfloat16"}),
    }
    return builders[name]([group, {"params": others}])


OPTIMIZERS = (
    "galore_svd", "galore_std_wide", "galore_rsvd", "galore_rsvd_bf16", "galore_random_project", "fira", "fira_matrix", "frugal_svd",
    "frugal_columns_keep", "frugal_blocks", "dct", "apollo", "apollo_mini", "apollo_bf16_sketch",
)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, SIZES[0], generator=gen), torch.randn(GLOBAL_BATCH, SIZES[-1], generator=gen)


def local_batch(step: int, rank: int, world: int):
    x, y = batch(step)
    share = GLOBAL_BATCH // world
    return x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]


def train(model, optimizer, steps, rank=0, world=1, first=0) -> None:
    for step in range(first, first + steps):
        x, y = local_batch(step, rank, world)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_params(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.named_parameters()}


def sharded(model: nn.Module) -> nn.Module:
    fully_shard(model)  # one unit: its two Linear weights are Shard(0) DTensors
    return model


def local_state_bytes(optimizer) -> tuple[int, int]:
    """(bytes of sharded state tensors on this rank, bytes of replicated ones)."""
    split = [0, 0]

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, torch.Tensor):
            t = value.to_local() if isinstance(value, DTensor) else value
            split[0 if isinstance(value, DTensor) else 1] += t.numel() * t.element_size()

    for state in optimizer.state.values():
        walk(state)
    return split[0], split[1]


class CollectiveLog:
    """Counts the c10d calls (and elements moved) made through torch.distributed."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "broadcast",
             "broadcast_object_list", "all_reduce", "reduce_scatter_tensor", "scatter")

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.elements: dict[str, int] = {}

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor):
                self.elements[name] = self.elements.get(name, 0) + args[0].numel()
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def error_of(fn) -> str:
    try:
        value = fn()
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    return f"no error: {value}"


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    run_checks(checks, rank, world, port, out_dir)


def run_checks(checks, rank: int, world: int, port: int, out_dir: str) -> None:
    """``checks(rank, world, out_dir)`` in a gloo group; rank 0 saves what it returns to
    ``out_dir/results.pt`` for the tests to read (:func:`spawned_record`)."""

    def work():
        results = checks(rank, world, out_dir)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))

    in_process_group(rank, world, port, out_dir, work)


def spawned_record(run, world: int, out_dir) -> dict:
    """Spawn ``run`` on ``world`` ranks and load what rank 0 saved."""
    spawn(run, world, str(out_dir))
    return torch.load(os.path.join(out_dir, "results.pt"), weights_only=True)


def spawn(run, world: int, out_dir: str) -> None:
    """Start ``run(rank, world, port, out_dir)`` in ``world`` processes on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(run, args=(world, port, out_dir), nprocs=world, join=True)


def in_process_group(rank: int, world: int, port: int, out_dir: str, work) -> None:
    """Run ``work()`` as ``rank`` of a gloo group of ``world`` (one thread each); a failure's
    traceback goes to ``out_dir/error{rank}.txt`` for the test to show."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    else:
        # Leave together: rank 0 hosts the TCP store, and a rank still tearing down its
        # process group when the store's host has exited aborts ("terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def checks(rank: int, world: int, out_dir: str) -> dict:
    results: dict = {"world": world}
    for name in OPTIMIZERS:
        single = make_model()
        single_optimizer = make_optimizer(name, single)
        train(single, single_optimizer, STEPS)

        ddp_model = make_model()
        ddp = nn.parallel.DistributedDataParallel(ddp_model)
        train(ddp, make_optimizer(name, ddp_model), STEPS, rank, world)

        fsdp_model = sharded(make_model())
        optimizer = make_optimizer(name, fsdp_model)
        train(fsdp_model, optimizer, STEPS, rank, world)
        sharded_bytes, replicated_bytes = local_state_bytes(optimizer)
        gathered = [None] * world
        dist.all_gather_object(gathered, (sharded_bytes, replicated_bytes))
        results[name] = {
            "single": full_params(single),
            "ddp": full_params(ddp_model),
            "fsdp": full_params(fsdp_model),
            "single_state_bytes": memory.state_bytes(single_optimizer),
            "fsdp_state_bytes": gathered,
            "fsdp_memory_state_bytes": memory.state_bytes(optimizer),
            "sides": [optimizer.state[w]["projector"].get("side") for w in optimizer.param_groups[0]["params"]],
            "moment_types": sorted({type(v).__name__ for s in optimizer.state.values() for v in s.values()
                                    if isinstance(v, torch.Tensor)}),
        }

    results["collectives"] = refresh_collectives()
    results["failed_refresh"] = failed_refresh(rank, world)
    results["dcp"] = checkpoint_checks(rank, world, out_dir)
    results["errors"] = refusal_checks()
    return results


def refresh_collectives() -> dict:
    """Collectives of one refresh step and of one ordinary step of GaLore (svd) under FSDP2."""
    model = sharded(make_model())
    optimizer = make_optimizer("galore_svd", model)
    logs = []
    for step in range(2):  # step 0 refreshes (update_proj_gap=2), step 1 does not
        x, y = local_batch(step, dist.get_rank(), dist.get_world_size())
        nn.functional.mse_loss(model(x), y).backward()
        with CollectiveLog() as log:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logs.append({"calls": log.calls, "elements": log.elements})
    weights = (model[0].weight, model[2].weight)
    return {"refresh": logs[0], "ordinary": logs[1], "shapes": [tuple(w.shape) for w in weights]}


def failed_refresh(rank: int, world: int) -> dict:
    """A NaN in one rank's block at a refresh: the owner's refresh fails, every rank hears
    of it (no rank left waiting in a collective) and keeps its basis."""
    import warnings

    model = sharded(make_model())
    optimizer = make_optimizer("galore_svd", model)
    train(model, optimizer, 2, rank, world)  # refreshed at step 0; step 2 refreshes again
    weight = model[0].weight
    before = optimizer.state[weight]["projector"]["right"].clone()
    x, y = local_batch(2, rank, world)
    nn.functional.mse_loss(model(x), y).backward()
    if rank == world - 1:
        weight.grad.to_local()[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    pstate = optimizer.state[weight]["projector"]
    return {"refreshes": pstate["refreshes"], "basis_kept": bool(torch.equal(pstate["right"], before)),
            "warned": any("refresh skipped" in str(w.message) for w in caught)}


def checkpoint_checks(rank: int, world: int, out_dir: str) -> dict:
    """Save after 3 FSDP2 steps with DCP; resume in a fresh model and optimizer."""
    out = {}
    for name in ("galore_svd", "fira", "dct"):
        path = os.path.join(out_dir, f"dcp_{name}")
        model = sharded(make_model())
        optimizer = make_optimizer(name, model)
        train(model, optimizer, 3, rank, world)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        train(model, optimizer, 2, rank, world, first=3)

        resumed = sharded(make_model())
        resumed_optimizer = make_optimizer(name, resumed)
        model_sd, optim_sd = get_state_dict(resumed, resumed_optimizer)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(resumed, resumed_optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        train(resumed, resumed_optimizer, 2, rank, world, first=3)
        out[name] = {"uninterrupted": full_params(model), "resumed": full_params(resumed), "path": path}
    return out


def refusal_checks() -> dict:
    def step_once(optimizer, model):
        x, y = local_batch(0, dist.get_rank(), dist.get_world_size())
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()

    def fsdp_with(build):
        model = sharded(make_model())
        return lambda: step_once(build(model), model)

    weights = lambda m: [{"params": [m[0].weight, m[2].weight], "rank": 2}]  # noqa: E731
    return {
        "qgalore_fsdp": error_of(fsdp_with(lambda m: lo.QGaLoreAdamW8bit(weights(m), min_8bit_size=16))),
        "natural_galore_fsdp": error_of(fsdp_with(lambda m: lo.NaturalGaLoreAdamW(weights(m)))),
        "left_fsdp": error_of(fsdp_with(lambda m: lo.GaLoreAdamW([{**weights(m)[0], "proj_type": "left"}]))),
        "rows_fsdp": error_of(fsdp_with(lambda m: lo.FrugalAdamW(
            [{**weights(m)[0], "rank": None, "density": 0.5, "projector": "rows"}]))),
    }
