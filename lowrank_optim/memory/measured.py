"""Measured memory: the bytes optimizer state keeps alive, process peaks, a measured run.

:func:`state_bytes` walks ``optimizer.state`` (nested dicts, projector objects, tensor
subclasses) and counts each storage once, so it applies to peer packages as well as ours;
:func:`measure` steps a small model and reports those bytes per parameter (on CUDA also the
allocator's peak per phase); :func:`start_process_peak` / :func:`process_peak_since` read
the process's resident high-water mark where there is no allocator to ask (CPU).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .estimator import PEERS, _check_optimizer, _preset_rank
from .shapes import projected_ids


def _walk_storages(value, seen: set, out: list) -> None:
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            # A wrapper subclass (a DTensor: this rank's block; torchao's 8-bit state: codes,
            # scales, code book) has a placeholder storage: count the tensors it wraps (not
            # its metadata: a DTensor also lists its device mesh, whose rank table is not state).
            for name in value.__tensor_flatten__()[0]:
                inner = getattr(value, name)
                if isinstance(inner, torch.Tensor):
                    _walk_storages(inner, seen, out)
            return
        storage = value.untyped_storage()
        if storage.data_ptr() not in seen or storage.nbytes() == 0:
            seen.add(storage.data_ptr())
            out.append(storage.nbytes())
    elif isinstance(value, dict):
        for v in value.values():
            _walk_storages(v, seen, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_storages(v, seen, out)
    elif hasattr(value, "__dict__"):
        _walk_storages(vars(value), seen, out)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the whole ``optimizer.state`` keeps alive: every tensor reachable from it (inside
    nested dicts and projector objects too), counted by its storage, each storage once, so a
    basis that is a view of a full SVD factor counts the whole factor."""
    sizes: list[int] = []
    _walk_storages(dict(optimizer.state), set(), sizes)
    return sum(sizes)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def start_process_peak() -> int | None:
    """Begin measuring the process's peak resident memory on CPU: returns the baseline to
    pass to :func:`process_peak_since`, or None where the OS cannot tell (not Linux).

    There is no allocator to ask on CPU (``torch.cuda.max_memory_allocated`` is 0), so this
    uses the kernel's high-water mark ``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``.  Freed memory is first returned to the OS (``malloc_trim``)
    so the baseline is what is really in use; the result is still approximate (pages,
    allocator caching), unlike the exact :func:`state_bytes`."""
    import ctypes
    import gc

    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _proc_status("VmRSS")
    except (OSError, KeyError, AttributeError):
        return None


def process_peak_since(baseline: int | None) -> int | None:
    """Peak resident bytes above ``baseline`` since :func:`start_process_peak`."""
    if baseline is None:
        return None
    return max(0, _proc_status("VmHWM") - baseline)


def state_bytes_per_param(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Bytes of ``optimizer.state[p]`` per parameter, by storage, each storage counted once
    across the whole optimizer (as :func:`state_bytes`): a storage
    shared by several parameters (bitsandbytes' qmaps) counts for the first one only."""
    seen: set = set()
    out = {}
    for name, p in named:
        sizes: list[int] = []
        _walk_storages(optimizer.state.get(p, {}), seen, sizes)
        out[name] = sum(sizes)
    return out


def tiny_llama(hidden: int = 64, intermediate: int = 172, layers: int = 2, heads: int = 4, vocab: int = 512) -> nn.Module:
    """A small ``transformers`` LlamaForCausalLM (untied head), for the measured run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def build_optimizer(name: str, model: nn.Module, rank: int | None = None, density: float | None = None,
                    target_modules: str | Iterable[str] = ("attn", "mlp"), summary: bool = True,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """``adamw``, ``sgd`` (torch; SGD with momentum 0.9 unless given), ``adamw8bit``
    (bitsandbytes) or one of ours on ``model``.  ``target_modules`` as the estimator reads
    it: name fragments (:func:`lowrank_optim.param_groups`) or one string, the Trainer's
    full-match regex or ``"all-linear"``.  ``summary``: print once what was projected (the
    CLI leaves it to its settings line, so that CSV and JSON stay parseable)."""
    from .. import options
    from ..factory import announce, create_optimizer

    key = _check_optimizer(name)
    params = [p for p in model.parameters() if p.requires_grad]
    if key in PEERS:
        return options.build_peer(key, params, **kwargs)
    if not isinstance(target_modules, str):
        return create_optimizer(key, model, target_modules, summary=summary, rank=rank, density=density, **kwargs)
    # One pattern: the groups the Trainer would build (param_groups takes fragments only).
    projected = projected_ids(model, target_modules)
    if not projected:
        raise ValueError(f"no nn.Linear, Conv1D or fused-experts weight is selected by target_modules={target_modules!r}")
    size = {"rank": None, "density": density} if density is not None else {"rank": rank or _preset_rank(key)}
    low = [p for p in params if id(p) in projected]
    groups = [{"params": low, **size}, {"params": [p for p in params if id(p) not in projected]}]
    if summary:
        announce([g for g in groups if g["params"]])
    return create_optimizer(key, [g for g in groups if g["params"]], **kwargs)


def measure(name: str, model: nn.Module | None = None, steps: int = 3, rank: int | None = 8, density: float | None = None,
            batch: int = 2, seq: int = 16, target_modules: str | Iterable[str] = ("attn", "mlp"),
            refresh_every: int | None = 2, summary: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Run ``steps`` optimizer steps on ``model`` (default :func:`tiny_llama`) with random
    tokens; return the optimizer-state bytes per parameter (storage-based), their total,
    bytes per parameter element, and on CUDA the allocator's peak per phase (forward,
    backward, step, refresh step: a step that recomputes the bases, forced by
    ``update_proj_gap=refresh_every`` for our optimizers).  CPU runs report ``peaks = {}``."""
    key = _check_optimizer(name)
    torch.manual_seed(0)
    model = model if model is not None else tiny_llama()
    device = next(model.parameters()).device
    if key not in PEERS and refresh_every is not None and "update_proj_gap" not in kwargs:
        kwargs["update_proj_gap"] = refresh_every
    opt = build_optimizer(key, model, rank=rank, density=density, target_modules=target_modules, summary=summary,
                          **kwargs)
    vocab = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
    cuda = device.type == "cuda"
    peaks: dict[str, int] = {}

    def phase(label: str, fn):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
            peaks[label] = max(peaks.get(label, 0), torch.cuda.max_memory_allocated(device))
        return out

    for step in range(steps):
        if vocab is not None:
            ids = torch.randint(0, vocab, (batch, seq), device=device)
            loss = phase("forward", lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        else:
            x = torch.randn(batch, model_in_features(model), device=device)
            loss = phase("forward", lambda x=x: model(x).float().pow(2).mean())
        phase("backward", loss.backward)
        refresh = key not in PEERS and refresh_every and step % refresh_every == 0
        phase("refresh step" if refresh else "step", opt.step)
        opt.zero_grad(set_to_none=True)
    named, seen = [], set()
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            named.append((n, p))
    per_param = state_bytes_per_param(opt, named)
    total = sum(per_param.values())
    numel = sum(p.numel() for _, p in named)
    return {"optimizer": key, "steps": steps, "device": str(device), "state_bytes": per_param, "state_total": total,
            "state_bytes_per_param": total / numel, "weights_bytes": sum(p.numel() * p.element_size() for _, p in named),
            "peaks": peaks}


def model_in_features(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return first.in_features
