r"""Optimizer-state and weight memory of every optimizer, per layer and in total.

    python bench/bench_memory.py                      # 2 LLaMA-60M blocks, rank 128
    python bench/bench_memory.py --model 1b --layers 1

Each optimizer takes two steps on a stack of LLaMA-shaped linear layers (q, k, v, o,
gate, up, down per block) with fixed random gradients, so every state tensor exists; then
the bytes each layer's state keeps alive are summed (every tensor reachable from
``optimizer.state[p]``, counted by its storage, each storage once: a basis that is a view
of a full SVD factor counts the whole factor).  Weights are counted the same way from the
parameters (and, for an INT8-weight model, from its integer codes and scales).  Bytes are
reported in MiB (2^20).  Peers: ``torch.optim.AdamW`` and, where installed, the
projectors of ``galore_torch`` (``GaLoreAdamW``) and ``q_galore_torch`` (its projector
storage only: its 8-bit step is broken with bitsandbytes 0.50, see
docs/methods/qgalore.md#where-we-differ-from-q_galore_torch).
"""
from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch

import lowrank_optim as lo
from common import MODELS, llama_stack, write_results  # bench/ is on sys.path
from lowrank_optim.memory import state_bytes_per_param
from tables import table

BLOCK_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_names(layers: int) -> list[str]:
    """Names in LLaMA's layout, so per-layer rows read like a model's."""
    return [f"layers.{i}.{'self_attn' if j < 4 else 'mlp'}.{name}" for i in range(layers) for j, name in enumerate(BLOCK_NAMES)]


def peers(rank: int) -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    group = lambda ps, **kw: [{"params": ps, "rank": rank, "update_proj_gap": 200, **kw}]  # noqa: E731
    optimizers = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps),
        "GaLoreAdamW": lambda ps: lo.GaLoreAdamW(group(ps)),
        "GaLoreAdamW8bit": lambda ps: lo.GaLoreAdamW8bit(group(ps)),
        "FiraAdamW": lambda ps: lo.FiraAdamW(group(ps)),
        "DCTAdamW": lambda ps: lo.DCTAdamW(group(ps)),
        "FrugalAdamW blocks": lambda ps: lo.FrugalAdamW([{"params": ps, "density": 0.25, "projector": "blocks"}]),
        "NaturalGaLoreAdamW": lambda ps: lo.NaturalGaLoreAdamW(group(ps)),
        # The reference's configuration: two-sided (r x r) projection, the paper's s = 20.
        "NaturalGaLoreAdamW full s=20": lambda ps: lo.NaturalGaLoreAdamW(group(ps, proj_type="full"), history=20),
        # INT4 basis + 8-bit moments; its INT8 weights are measured by bench/bench_qgalore.py
        # (they need Int8Linear modules, not bare parameters).
        "QGaLoreAdamW8bit": lambda ps: lo.QGaLoreAdamW8bit(group(ps)),
        "GradNormLoRPAdamW": lambda ps: lo.GradNormLoRPAdamW(group(ps)),
        "GradNormLoRPAdamW8bit": lambda ps: lo.GradNormLoRPAdamW8bit(group(ps)),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import galore_torch

        optimizers["galore_torch GaLoreAdamW"] = lambda ps: galore_torch.GaLoreAdamW(
            group(ps, scale=0.25, proj_type="std"), no_deprecation_warning=True
        )
    except ImportError:
        pass
    return optimizers


def measure(make, shapes, names) -> tuple[dict[str, int], int]:
    """Per-layer state bytes after two steps, and the weights' bytes."""
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    optimizer = make(params)
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        optimizer.step()
    per_layer = state_bytes_per_param(optimizer, list(zip(names, params)))
    weights = sum(p.untyped_storage().nbytes() for p in params)
    return per_layer, weights


def report(results: dict[str, tuple[dict[str, int], int]], names: list[str], blocks: int) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    labels = list(results)
    adamw_total = sum(results["torch AdamW"][0].values())
    # every block has the same shapes: show the first
    per_layer = [(name, *(mib(results[k][0][name]) for k in labels)) for name in names[: len(BLOCK_NAMES)]]
    totals = []
    for label in labels:
        layers, weights = results[label]
        total = sum(layers.values())
        totals.append((label, mib(total), f"{total / adamw_total:.2f}", mib(weights), mib(total + weights)))
    return "\n".join([
        "### Optimizer state per layer (MiB)",
        "",
        table(("layer", *labels), per_layer, align="l" + "r" * len(labels)),
        "",
        f"### Totals ({blocks} blocks, {len(names)} matrices)",
        "",
        table(("optimizer", "state (MiB)", "state / AdamW", "weights (MiB)", "weights + state (MiB)"), totals,
              align="lrrrr"),
    ])  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="60m")
    parser.add_argument("--layers", type=int, default=2, help="LLaMA blocks (7 matrices each)")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shapes, names = llama_stack(args.model, args.layers), layer_names(args.layers)
    rank = MODELS[args.model][2]
    results = {label: measure(make, shapes, names) for label, make in peers(rank).items()}
    text = f"Model {args.model}, rank {rank}, fp32 weights and states.\n\n" + report(results, names, args.layers)
    print(text)
    raw = {label: {"per_layer": per_layer, "weights": w} for label, (per_layer, w) in results.items()}
    write_results(args.out, "bench_memory", text, {"args": vars(args), "results": raw})


if __name__ == "__main__":
    main()
