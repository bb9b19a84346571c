r"""Q-GaLore memory benchmark: optimizer state and weight bytes, per layer and in total.

Run from the repository root::

    python bench/bench_qgalore.py               # LLaMA-60M shapes, 8 blocks (about a minute on CPU)
    python bench/bench_qgalore.py --layers 1    # one block: seconds

Contenders, all on the same LLaMA-60M-shaped stack (hidden 512, MLP 1376, vocab 32000,
rank 128; bf16 weights, as in the paper's runs):

- ``torch.optim.AdamW``: two bf16 moments per weight.
- ``lowrank_optim.GaLoreAdamW``: bf16 basis + bf16 low-rank moments on the attention/MLP
  matrices, AdamW elsewhere.
- ``lowrank_optim.QGaLoreAdamW8bit``: the attention/MLP matrices converted to ``Int8Linear``
  (uint8 weights + per-group scale/zero), packed INT4 basis, 8-bit blockwise moments
  (8-bit AdamW on the dense parameters too, above ``min_8bit_size``).
- ``q_galore_torch``: only its projector storage (``GaLoreProjector(quant=True, n_bit=4)``
  after one ``project``); its 8-bit step does not run with bitsandbytes 0.50.

Bytes are counted from the tensors each optimizer holds after one step (the state is
allocated at the first step, the basis at the first refresh); weights are the model's
parameters and buffers.  Both low-rank optimizers refresh with the randomized SVD (``rsvd``,
Q-GaLore's ``inner``): the stored bytes are those of the exact SVD, the run is faster.
Tables go to stdout and ``DIR/bench_qgalore.md`` (default
``bench/out``), raw numbers to ``DIR/bench_qgalore.json``.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from torch import nn

import lowrank_optim
from lowrank_optim.optim.qgalore import QGaLoreAdamW8bit
from lowrank_optim.quant import convert_linear_to_int8
from tables import table  # bench/ is on sys.path when this file runs as a script

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from q_galore_torch.q_galore_projector import GaLoreProjector as QGaLoreProjector

HIDDEN, INTERMEDIATE, VOCAB, RANK = 512, 1376, 32000, 128
MATRICES = {  # name -> (out_features, in_features)
    "attn.q_proj": (HIDDEN, HIDDEN),
    "attn.k_proj": (HIDDEN, HIDDEN),
    "attn.v_proj": (HIDDEN, HIDDEN),
    "attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
MB = 2**20


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({k.split(".")[1]: nn.Linear(*reversed(v), bias=False) for k, v in MATRICES.items() if k.startswith("attn")})
        self.mlp = nn.ModuleDict({k.split(".")[1]: nn.Linear(*reversed(v), bias=False) for k, v in MATRICES.items() if k.startswith("mlp")})
        self.input_norm = nn.Parameter(torch.ones(HIDDEN))
        self.post_norm = nn.Parameter(torch.ones(HIDDEN))


class Stack(nn.Module):
    """The parameter shapes of LLaMA-60M (no forward: gradients are synthetic)."""

    def __init__(self, layers: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(HIDDEN))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)


def build(layers: int, int8: bool) -> tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]]:
    torch.manual_seed(0)
    model = Stack(layers).to(torch.bfloat16)
    if int8:
        convert_linear_to_int8(model, ("attn", "mlp"), group_size=256)
    low = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and (".attn." in name or ".mlp." in name)]
    dense = [p for p in model.parameters() if all(p is not q for q in low)]
    return model, low, dense


def synthetic_grads(model: nn.Module, low: list[nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        if hasattr(p, "int8_scales"):
            p.float_grad = grad
        else:
            p.grad = grad


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    return 0


def weight_bytes(model: nn.Module) -> int:
    return sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])


def matrix_weight_bytes(module: nn.Module) -> int:
    return sum(nbytes(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def run(layers: int) -> dict:
    results: dict = {"per_matrix": {}, "total": {}}
    contenders = {
        "torch AdamW": (False, lambda low, dense: torch.optim.AdamW([*low, *dense], lr=1e-3)),
        "GaLoreAdamW": (False, lambda low, dense: lowrank_optim.GaLoreAdamW(
            [{"params": low, "rank": RANK, "projector": "rsvd"}, {"params": dense}], lr=1e-3)),
        "QGaLoreAdamW8bit": (True, lambda low, dense: QGaLoreAdamW8bit(
            [{"params": low, "rank": RANK, "projector_args": {"inner": "rsvd"}}, {"params": dense}],
            lr=1e-3, betas=(0.9, 0.95))),
    }
    for label, (int8, make) in contenders.items():
        model, low, dense = build(layers, int8)
        opt = make(low, dense)
        synthetic_grads(model, low)
        opt.step()
        block = model.layers[0]
        for name in MATRICES:
            module = block.get_submodule(name)
            state = opt.state[module.weight]
            row = results["per_matrix"].setdefault(name, {})
            row[f"{label} state"] = nbytes(state)
            row[f"{label} weight"] = matrix_weight_bytes(module)
            if "projector" in state:
                row[f"{label} basis"] = nbytes(state["projector"])
        results["total"][label] = {
            "state": sum(nbytes(s) for s in opt.state.values()),
            "weights": weight_bytes(model),
        }
        del model, opt
    # q_galore_torch: its projector after one project() (its optimizer step is broken).
    gen = torch.Generator().manual_seed(1)
    qg_total = 0
    for name, shape in MATRICES.items():
        projector = QGaLoreProjector(rank=RANK, quant=True, group_size=256, n_bit=4)
        projector.project(torch.randn(shape, generator=gen).to(torch.bfloat16), 0)
        size = sum(nbytes(v) for v in vars(projector).values())
        results["per_matrix"][name]["q_galore_torch basis"] = size
        qg_total += size * layers
    results["total"]["q_galore_torch"] = {"basis": qg_total}
    return results


def report(results: dict, layers: int) -> str:
    kb = lambda b: f"{b / 1024:,.0f}"  # noqa: E731
    per_matrix = [
        (name, kb(row["torch AdamW state"]), kb(row["GaLoreAdamW state"]), kb(row["GaLoreAdamW basis"]),
         kb(row["QGaLoreAdamW8bit state"]), kb(row["QGaLoreAdamW8bit basis"]), kb(row["q_galore_torch basis"]),
         f"{row['QGaLoreAdamW8bit basis'] / row['q_galore_torch basis']:.3f}", kb(row["torch AdamW weight"]),
         kb(row["QGaLoreAdamW8bit weight"]))
        for name, row in results["per_matrix"].items()
    ]  # fmt: skip
    total = results["total"]
    adamw = total["torch AdamW"]["state"] + total["torch AdamW"]["weights"]
    whole = []
    for label in ("torch AdamW", "GaLoreAdamW", "QGaLoreAdamW8bit"):
        s, w = total[label]["state"], total[label]["weights"]
        whole.append((label, f"{s / MB:.1f}", f"{w / MB:.1f}", f"{(s + w) / MB:.1f}", f"{(s + w) / adamw:.2f}"))
    ours = sum(r["QGaLoreAdamW8bit basis"] for r in results["per_matrix"].values()) * layers
    return "\n".join([
        f"## Per matrix (one block of {layers}; KiB)",
        "",
        table(("matrix", "AdamW state", "GaLore state", "GaLore basis", "Q-GaLore state", "Q-GaLore basis",
               "q_galore_torch basis", "basis ratio ours/theirs", "bf16 weight", "INT8 weight"), per_matrix,
              align="l" + "r" * 9),
        "",
        f"## Whole model ({layers} blocks + embedding, LM head, norms; MiB)",
        "",
        table(("optimizer", "optimizer state", "weights", "state + weights", "vs AdamW"), whole, align="lrrrr"),
        f"\nProjection bases of the {7 * layers} attention/MLP matrices: ours {ours / MB:.2f} MiB, "
        f"q_galore_torch {total['q_galore_torch']['basis'] / MB:.2f} MiB ({ours / total['q_galore_torch']['basis']:.3f}x).",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    results = run(args.layers)
    text = report(results, args.layers)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_qgalore.md").write_text(text + "\n")
    (out / "bench_qgalore.json").write_text(json.dumps({"layers": args.layers, **results}, indent=2))


if __name__ == "__main__":
    main()
