"""Building optimizers from a model: ``param_groups``, ``create_optimizer``, ``available_optimizers``."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .optim import OPTIMIZERS, LowRankOptimizer
from .options import canonical_name
from .quant import Int8Linear


def param_groups(
    model: nn.Module, target_modules: Iterable[str] = ("attn", "mlp"), rank: int | None = 128, **group_kw: Any
) -> list[dict[str, Any]]:
    """Two param groups: the 2-D ``nn.Linear`` weights of modules whose qualified name
    contains one of ``target_modules`` (projected, with ``rank`` or ``density`` and ``group_kw``), and
    everything else (embeddings, norms, biases, the LM head: full-rank AdamW).

    >>> opt = GaLoreAdamW(param_groups(model, ("attn", "mlp"), rank=128, update_proj_gap=200))
    """
    targets = tuple(target_modules)
    if isinstance(target_modules, str) or not targets:
        raise ValueError(f"param_groups: target_modules={target_modules!r} must be a non-empty list of name fragments")
    low_rank_ids, int8_ids = set(), set()
    for module_name, module in model.named_modules():
        if any(t in module_name for t in targets):
            low_rank_ids.update(id(w) for w in projectable_weights(module))
        if isinstance(module, Int8Linear):  # integer codes cannot require grad, yet are trained
            int8_ids.add(id(module.weight))
    low, dense = ([], []), ([], [])
    seen = set()
    for name, p in model.named_parameters():
        if (not p.requires_grad and id(p) not in int8_ids) or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        bucket = low if id(p) in low_rank_ids else dense
        bucket[0].append(name)
        bucket[1].append(p)
    if not low[1]:
        raise ValueError(
            f"param_groups: no nn.Linear (or Conv1D) module name contains any of target_modules={list(targets)}; "
            "check the names with [n for n, _ in model.named_modules()]"
        )
    if group_kw.get("density") is not None:
        rank = None  # the projected size comes from density instead
    groups = [{"params": low[1], "param_names": low[0], "rank": rank, **group_kw}]
    if dense[1]:
        groups.append({"params": dense[1], "param_names": dense[0]})
    return groups


def matrix_weight(module: nn.Module) -> torch.Tensor | None:
    """The 2-D weight of a layer that multiplies by a matrix, or None: ``nn.Linear``, and
    transformers' ``Conv1D`` (GPT-2 and friends: the same matrix stored transposed, which
    projects just as well; matched by name so that transformers stays optional)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return weight
    kind = type(module)
    if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers"):
        return weight
    return None


def projectable_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights of ``module`` (not of its children) that a projected group can take: its
    :func:`matrix_weight`, or the 3-D parameters of a fused-experts module (transformers'
    ``MixtralExperts`` & co, named ``...Experts``: E matrices stacked, each projected on
    its own).  The name rule keeps a ``Conv1d`` kernel (also 3-D) out."""
    weight = matrix_weight(module)
    if weight is not None:
        return [weight]
    if type(module).__name__.endswith("Experts"):
        return [p for p in module.parameters(recurse=False) if p.dim() == 3]
    return []


def projection_summary(groups: list[dict]) -> str:
    """One line on what ``groups`` project: how many matrices, their share of the
    parameters, at what rank; and, when there are any, the parameters of three or more
    dimensions left dense (e.g. fused experts outside ``target_modules``)."""
    projected = [g for g in groups if g.get("rank") is not None or g.get("density") is not None]
    matrices = [p for g in projected for p in g["params"]]
    count = sum(p.shape[0] if p.dim() == 3 else 1 for p in matrices)  # a stack of experts: E matrices
    every = [p for g in groups for p in g["params"]]
    total = sum(p.numel() for p in every) or 1
    sizes = sorted({f"rank {g['rank']}" if g.get("rank") is not None else f"density {g['density']}" for g in projected})
    line = (
        f"lowrank_optim: projecting {count} matrices ({100 * sum(p.numel() for p in matrices) / total:.1f}% of "
        f"{total:,} parameters) at {', '.join(sizes) or 'no rank'}; the rest is dense"
    )
    stacked = [p for g in groups if g not in projected for p in g["params"] if p.dim() >= 3]
    if stacked:
        share = 100 * sum(p.numel() for p in stacked) / total
        line += f"; {len(stacked)} tensors of 3+ dimensions ({share:.1f}%, e.g. fused experts) stay dense"
    return line


_announced: set[str] = set()


def announce(groups: list[dict]) -> str:
    """Print :func:`projection_summary` once per process (on rank 0 under torch.distributed),
    so that what a name pattern selected is never a surprise; returns the line."""
    line = projection_summary(groups)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if line not in _announced and (not distributed or torch.distributed.get_rank() == 0):
        print(line, flush=True)
    _announced.add(line)
    return line


def available_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer` (and by the Trainer as ``lowrank_<name>``)."""
    return sorted(OPTIMIZERS)


def create_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
    target_modules: Iterable[str] = ("attn", "mlp"),
    summary: bool = True,
    **kwargs: Any,
) -> LowRankOptimizer:
    """Build an optimizer by name.

    Given a model and a ``rank``, the projected groups come from :func:`param_groups`
    (``target_modules`` selects them); otherwise ``model_or_params`` is used as given.
    Other keywords are the optimizer's hyperparameters; an unknown one is an error that
    lists the valid ones.  ``summary``: print once what was projected (:func:`announce`).
    """
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"create_optimizer: unknown optimizer {name!r}; available: {', '.join(available_optimizers())}")
    cls = OPTIMIZERS[key]
    accepted = list(cls.hyperparameter_defaults())
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"create_optimizer: {cls.__name__} has no option(s) {unknown}; valid ones are: {', '.join(accepted)}")
    if isinstance(model_or_params, nn.Module):
        size = {k: kwargs.pop(k) for k in ("rank", "density") if kwargs.get(k) is not None}
        if not size and getattr(cls, "preset_rank", None) is not None:
            size = {"rank": cls.preset_rank}  # a preset (APOLLO-Mini: rank 1)
        if not size:
            raise ValueError(
                f"create_optimizer: {name!r} given a model needs rank=... (or density=...) to project its "
                "target_modules; pass model.parameters() (or param groups) for a full-rank optimizer"
            )
        params = param_groups(model_or_params, target_modules, **size)
        if summary:
            announce(params)
    else:
        params = model_or_params
    return cls(params, **kwargs)
