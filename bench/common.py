"""What the bench/ scripts share: LLaMA shapes and models, test gradients, timing, the machine
a run is on, and the files a run writes.  Tables are bench/tables.py's.

bench/ is a folder of scripts, not a package: ``python bench/NAME.py`` (and ``torchrun``) puts
bench/ first on ``sys.path``, so ``from common import ...`` finds this file; a script that is
also imported from elsewhere (by a test, by another script) inserts bench/ itself first.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import lowrank_optim
from lowrank_optim.memory import LLAMA_CONFIGS  # the GaLore paper's LLaMA shapes, 60m to 7b

# ---------------------------------------------------------------------------- weight shapes
#: Hidden size, MLP intermediate size and the rank the GaLore paper trains them with
#: (docs/methods/galore.md#paper-settings-and-results), for the benchmarks that step stacks of
#: bare weight matrices, whose ``--model`` goes up to 1B.  ``tiny`` is not a paper model; it
#: keeps ``--quick`` to seconds.
MODELS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 344, 32),
    **{name: (hidden, intermediate, rank)
       for name, (hidden, intermediate, _, _, rank) in LLAMA_CONFIGS.items() if name != "7b"},
}  # fmt: skip

#: T, the GaLore paper's refresh period: steps between two subspace refreshes.
UPDATE_PROJ_GAP = 200


def llama_stack(model: str, layers: int) -> list[tuple[int, int]]:
    """Weight shapes (out x in) of ``layers`` LLaMA blocks: q, k, v, o, gate, up, down."""
    hidden, intermediate, _ = MODELS[model]
    block = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return block * layers


def gradient_like(m: int, n: int, rank: int, seed: int, device: torch.device) -> torch.Tensor:
    """A seeded m x n matrix shaped like a training gradient.

    A signal of rank 2r with power-law singular values sigma_i = i^-1 (the spectra of LLM
    weight gradients decay roughly this way, and the tail between r and 2r gives a
    randomized range finder something to miss) plus Gaussian noise whose largest singular
    value is about half of sigma_r, so the spectrum has no clean gap at r.
    """
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n, 2 * rank)
    left = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    right = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    sigma = torch.arange(1, k + 1, dtype=torch.float32).reciprocal()
    noise_std = 0.5 * float(sigma[rank - 1]) / (m**0.5 + n**0.5)
    grad = (left * sigma) @ right.t() + noise_std * torch.randn(m, n, generator=gen)
    return grad.to(device)


# ---------------------------------------------------------------------------- trained models
VOCAB_SIZE = 256  # byte-level: one token per byte value (unless a corpus of token ids says otherwise)


class ModelShape(NamedTuple):
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    seq_len: int  # default --seq-len for this shape
    galore_rank: int  # default --rank


#: The models bench/pretrain.py and bench/convergence.py train.  ``tiny`` and ``small`` fit a
#: CPU; the others are the LLaMA shapes of the GaLore paper (Zhao et al. 2024, Table 2, with
#: its ranks of about hidden/4), which there use a 32000-token vocabulary: with our 256 byte
#: tokens their embeddings are smaller, so the parameter counts fall short of the names.
#: ``tiny`` gets hidden/2: at width 64, rank 16 ends about 0.08 nats behind AdamW in the
#: default run, rank 32 level with it.
MODEL_SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(64, 172, 4, 2, seq_len=64, galore_rank=32),
    # bench/convergence.py's model: 3.3M parameters, the largest whose sweeps fit a CPU budget.
    "conv3m": ModelShape(256, 688, 4, 4, seq_len=128, galore_rank=64),
    "small": ModelShape(384, 1024, 6, 8, seq_len=128, galore_rank=96),
    **{name: ModelShape(hidden, intermediate, heads, layers, seq_len=256, galore_rank=rank)
       for name, (hidden, intermediate, heads, layers, rank) in LLAMA_CONFIGS.items()},
}  # fmt: skip


def build_model(name: str, seq_len: int | None = None, vocab_size: int = VOCAB_SIZE) -> torch.nn.Module:
    """A randomly initialised ``transformers.LlamaForCausalLM`` of the named shape (seeded by
    the caller).  transformers is imported here: the scripts that time bare matrices do without."""
    from transformers import LlamaConfig, LlamaForCausalLM

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


# ---------------------------------------------------------------------------- timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued kernels, so a timer brackets the work and not just its launch."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_once(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved_samples(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int, sync: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``repeats`` samples each.

    Contenders run round-robin (one call each per round) rather than one after the other,
    so a burst of background load on a shared machine slows every contender alike instead
    of landing on whichever happened to run at that moment.  Warm-up calls absorb one-off
    costs (LAPACK workspace queries, allocator growth, lazy optimizer state).
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(time_once(fn, sync))
    return samples


def median(samples: list[float]) -> float:
    # The median, not the mean: on a 2-core machine shared with other jobs the samples have
    # a long right tail (a contender preempted mid-call), and one such outlier would move a
    # mean by more than the differences being measured.
    return statistics.median(samples)


# ---------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "galore_torch": importlib.metadata.version("galore-torch"),
        "lowrank_optim": lowrank_optim.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float] | None:
    """1/5/15-minute load average: documents contention from other jobs during the run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def announce_machine(device: torch.device) -> tuple[dict, list[float] | None]:
    """Print the machine description and load average before a run, and return both."""
    info, load_before = machine_info(device), load_average()
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print(f"- load average at start: {load_before}\n")
    return info, load_before


# ---------------------------------------------------------------------------- flags and results
def timing_parser(doc: str, repeats_default: int | None, repeats_help: str) -> argparse.ArgumentParser:
    """The command line bench_galore.py and bench_dct.py share: the script's docstring, whose
    first paragraph describes it, and ``--quick``, ``--repeats``, ``--threads``, ``--out`` and
    ``--device``; a script adds its own flags after these."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes only: a smoke run in seconds")
    parser.add_argument("--repeats", type=int, default=repeats_default, help=f"timed rounds per contender ({repeats_help})")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default="bench/out", help="directory for the markdown tables and raw JSON")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    return parser


def run_record(info: dict, args, repeats: int, loads: tuple, elapsed: float, **results) -> dict:
    """The raw record of a timed run: the machine, the flags, the load average at its start and
    end, how long it took, then its ``results``."""
    start, end = loads
    return {"machine": info, "args": vars(args), "repeats": repeats, "load_average": {"start": start, "end": end},
            "elapsed_s": elapsed, **results}  # fmt: skip


def write_results(out_dir: str, name: str, report: str, raw: dict) -> None:
    """``DIR/name.md`` (the tables) and ``DIR/name.json`` (every raw sample)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(report + "\n")
    (out / f"{name}.json").write_text(json.dumps(raw, indent=1))
    print(f"\nWrote {out / name}.md and {out / name}.json")
