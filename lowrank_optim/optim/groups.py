"""What a param group of a :class:`~lowrank_optim.optim.base.LowRankOptimizer` holds: the
hyperparameters every class shares (defaults and checks, as tables), and how a group's
parameters are named, laid out and matched to a projector."""
from __future__ import annotations

from typing import Any

import torch

from .. import _validate as V
from ..projectors import PROJ_TYPES, REGISTRY, Projector, is_projected
from ..projectors.base import CLOCK

#: Hyperparameters every LowRankOptimizer group carries, with their checks.
COMMON_CHECKS: dict[str, V.Check] = {
    # A float: torch also takes a Tensor lr (for compiled fused steps), but this step
    # computes with the learning rate on the host, where a Tensor would mean a sync.
    "lr": V.Check(lambda x: not isinstance(x, torch.Tensor) and V.nonneg_float()(x),
                  "a finite float >= 0 (not a Tensor)"),
    "weight_decay": V.nonneg_float(),
    "rank": V.int_at_least(1, optional=True),
    "density": V.Check(lambda x: 0 < x <= 1, "a fraction in (0, 1]", optional=True),
    "update_proj_gap": V.int_at_least(1),
    # 0 would silently freeze the projected weights, a negative scale climbs the loss.
    "scale": V.pos_float(),
    "proj_type": V.choice(*PROJ_TYPES),
    "projector": V.Check(lambda name: name in REGISTRY, "a registered projector: " + ", ".join(sorted(REGISTRY))),
    "projector_args": V.Check(lambda d: isinstance(d, dict), "a dict of projector options", optional=True),
    "on_refresh": V.choice("keep", "reset", "project"),
    "decay_after_update": V.boolean(),
    "seed": V.int_at_least(0),
}

#: The low-rank options every method accepts (per-group defaults).
LOW_RANK_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "density": None,  # instead of rank: this fraction of each matrix's projected side
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    # The randomized SVD (docs/benchmarks.md: within seed noise of the exact one at 15
    # tokens per parameter, and its refresh many times faster); projector="svd" reproduces
    # galore_torch to the bit.
    "projector": "rsvd",
    "projector_args": None,
    "on_refresh": "keep",
    "decay_after_update": False,
    "seed": 0,
}

#: Group keys that decide what the per-parameter state means (its tensors' shapes, what a
#: basis is): a checkpoint whose groups differ from the optimizer's in one of these does not
#: fit it, so ``load_state_dict`` refuses it unless told ``strict=False``.
LAYOUT_KEYS = ("rank", "density", "proj_type", "projector", "projector_args")

#: Group keys that are not hyperparameters: torch's and LR schedulers' (``initial_lr``)
#: and the group's clock.
BOOKKEEPING_KEYS = ("params", "param_names", "initial_lr", CLOCK)

#: The top-level key of ``state_dict()`` naming the class that saved it.
SAVED_BY = "saved_by"

#: torch.optim's keywords that this package does not offer as options: the values it
#: implements anyway are accepted (so code written for torch.optim.AdamW runs), any other
#: is refused with the reason.  ``foreach`` is a real option (LOOP_DEFAULTS).
TORCH_OPTIM_KEYWORDS: dict[str, tuple[tuple, str]] = {
    "fused": ((None, False), "there is no fused kernel for a low-rank step; foreach=None (the default) already "
              "steps each group with foreach kernels, the fastest path here"),
    "maximize": ((False,), "not implemented; minimise the negated objective instead (the same updates)"),
    "capturable": ((False,), "the step cannot be captured in a CUDA graph: a refresh computes a basis and checks "
                   "it on the host every update_proj_gap steps"),
    "differentiable": ((False,), "the step runs under torch.no_grad (refreshes are not differentiated through)"),
    "amsgrad": ((False,), "not implemented for the moments of projected gradients"),
}

#: Options of the optimizer as a whole (layer-wise mode), not of a group.
#: ``foreach``: None or True steps the parameters of a group together where the method
#: allows (one foreach kernel per operation of the moment rule); False steps each on its own
#: (the same arithmetic, one parameter at a time: for debugging and comparison).
LOOP_DEFAULTS: dict[str, Any] = {"layerwise": False, "accumulation_steps": 1, "max_grad_norm": None, "foreach": None}
LOOP_CHECKS: dict[str, V.Check] = {
    "layerwise": V.boolean(),
    "accumulation_steps": V.int_at_least(1),
    "max_grad_norm": V.pos_float(optional=True),
    "foreach": V.Check(lambda x: isinstance(x, bool), "True, False or None", optional=True),
}

#: Adam's own hyperparameters and their defaults (``torch.optim.AdamW``'s), shared by the
#: Adam-based classes.
ADAM_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 1e-2,
    "eps_style": "torch",
}
ADAM_CHECKS: dict[str, V.Check] = {
    "betas": V.betas(),
    "eps": V.nonneg_float(),
    "eps_style": V.choice("torch", "hf"),
}


def param_names(group: dict) -> list[str]:
    """The names of a group's parameters for messages: its ``param_names``, else ``#i``."""
    return group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]


#: Seeds of the matrices of a stack (fused experts): the stack's seed plus multiples of this,
#: far from the seeds of other parameters (which differ by their position, 1 per parameter).
STACK_SEED_STRIDE = 1_000_000_007


def is_matrix_stack(p: torch.Tensor, projector: Projector | None) -> bool:
    """Whether ``p`` is a stack of matrices (E x m x n: fused expert weights) in a projected
    group, each of whose matrices is projected on its own."""
    return projector is not None and p.dim() == 3


def projector_key(group: dict) -> tuple:
    """The group values a projector is built from (its clock aside, which changes every step)."""
    if not is_projected(group):
        return (None,)
    return (group["projector"], group["rank"], group.get("density"), group["proj_type"], group["update_proj_gap"],
            group["seed"], repr(group.get("projector_args")))
