"""Live gradient memory per rank in layer-wise mode under DDP and FSDP2 (gloo, CPU).

A model of ``--layers`` square Linear layers trains two steps on each of ``--world``
processes, four ways: DDP and FSDP2 (one ``fully_shard`` unit per layer), each with the
regular step and with ``layerwise=True``.  A gradient hook on every parameter, registered
before the optimizer's (so it runs first), adds up the bytes of the ``.grad`` tensors of
the optimizer's parameters that are alive at that moment (this rank's shards under
FSDP2); the table reports the largest sum over the second step's backward pass, and what is
left when it returns.  DDP's own bucket buffers (one full gradient, allocated once) and
FSDP2's unsharded gradient of the layer being reduced are the frameworks' and are the
same in every row; they are not ``.grad`` of the optimizer's parameters.  Under DDP a
parameter steps when its *bucket* has been all-reduced, so the peak depends on the bucket
size: the table has DDP's default (25 MB) and 1 MB buckets.

    python bench/bench_layerwise_memory.py                # 8 layers of 512 x 512, 2 processes
    python bench/bench_layerwise_memory.py --layers 16 --width 1024

Writes ``layerwise_memory.md`` and ``layerwise_memory.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lowrank_optim as lo  # noqa: E402  (after the path insert)
from tables import table  # noqa: E402  (bench/ is on sys.path when this file runs as a script)


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if lo.distributed.is_dtensor(t) else t
    return t.numel() * t.element_size()


def profile(mode: str, layerwise: bool, layers: int, width: int, rank: int, bucket_mb: float = 25.0) -> dict:
    """One training step of a ``layers`` x (``width`` x ``width``) model on this rank
    (``bucket_mb``: DDP's ``bucket_cap_mb``, 25 by default as in DDP)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if mode == "fsdp":
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    params = list(model.parameters())
    samples: list[int] = []

    def sample(_):
        samples.append(sum(local_bytes(p.grad) for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(sample)
    groups = [{"params": [layer.weight for layer in model], "rank": rank}, {"params": [layer.bias for layer in model]}]
    optimizer = lo.GaLoreAdamW(groups, lr=1e-3, layerwise=layerwise)
    wrapped = model
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
        if layerwise:
            optimizer.attach_ddp(wrapped)
    x = torch.randn(4, width)
    # Two steps, measured in the second: DDP puts every parameter in one bucket for its
    # first backward and builds the buckets of bucket_cap_mb from the order it observed.
    for _ in range(2):
        samples.clear()
        wrapped(x).square().mean().backward()
        left = sum(local_bytes(p.grad) for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    per_layer = [sum(local_bytes(p) for p in layer.parameters()) for layer in model]
    return {
        "mode": mode if mode == "fsdp" else f"ddp, {bucket_mb:g} MB buckets", "layerwise": layerwise, "peak": max(samples), "left_after_backward": left,
        "samples": len(samples), "layer_bytes": per_layer,
    }


def worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shape = (config["layers"], config["width"], config["rank"])
        rows = [profile("ddp", lw, *shape) for lw in (False, True)]
        # A bucket steps once its all-reduce is done: smaller buckets free gradients sooner.
        rows.append(profile("ddp", True, *shape, bucket_mb=1.0))
        rows += [profile("fsdp", lw, *shape) for lw in (False, True)]
        if rank == 0:
            Path(out, "rows.json").write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(rows: list[dict], config: dict) -> str:
    cells = [(r["mode"].replace("ddp", "DDP").replace("fsdp", "FSDP2"), r["layerwise"], mib(r["peak"]),
              mib(r["left_after_backward"]), mib(max(r["layer_bytes"])), mib(sum(r["layer_bytes"]))) for r in rows]
    header = ("wrapper", "layerwise", "peak during backward", "left after backward", "one layer (this rank)",
              "all layers (this rank)")  # fmt: skip
    return "\n".join([
        f"{config['layers']} layers of {config['width']} x {config['width']} (+ bias), GaLoreAdamW rank "
        f"{config['rank']}, {config['world']} gloo processes; bytes of live `.grad` per rank",
        "",
        table(header, cells, align="llrrrr"),
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank of the weights")
    parser.add_argument("--world", type=int, default=2, help="gloo processes")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "layerwise_memory"))
    args = parser.parse_args(argv)
    if args.layers < 1 or args.width < 1 or not 1 <= args.rank <= args.width or args.world < 1:
        parser.error("--layers, --width and --world must be positive and --rank in [1, width]")
    config = {"layers": args.layers, "width": args.width, "rank": args.rank, "world": args.world}
    os.makedirs(args.out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(args.world, port, config, args.out), nprocs=args.world, join=True)
    rows = json.loads(Path(args.out, "rows.json").read_text())
    text = report(rows, config)
    Path(args.out, "layerwise_memory.md").write_text(text)
    Path(args.out, "layerwise_memory.json").write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    print(text)
    return rows


if __name__ == "__main__":
    main()
