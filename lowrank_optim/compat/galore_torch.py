r"""``galore_torch`` 1.0's optimizers by their names, keywords and defaults, on our step engine.

A script written for ``galore_torch`` changes only its import::

    from lowrank_optim.compat.galore_torch import GaLoreAdamW   # was: from galore_torch import ...

    param_groups = [{"params": other_params},
                    {"params": matrices, "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
    optimizer = GaLoreAdamW(param_groups, lr=0.01)

and trains as it did.  Each class is a thin subclass of ours that takes ``galore_torch``'s
constructor signature and defaults and pins the arithmetic that package uses:

* :class:`GaLoreAdamW` (``galore_torch.GaLoreAdamW``, transformers' old AdamW): ε on the raw
  √v (``eps_style="hf"``), eps 1e-6, weight decay 0 and, when given, ``W ← W − η λ W``
  after the update; ``correct_bias=False`` (no bias correction) is honoured.  Bit for bit.
* :class:`GaLoreAdafactor` (``galore_torch.GaLoreAdafactor``, transformers' Adafactor): its
  defaults are ours; weight decay ``W ← W − ρ_t λ W`` before the update, in that form, and
  the projected-back update formed at full size before it is subtracted, as that package
  rounds it.  Bit for bit.
* :class:`GaLoreAdamW8bit` (``galore_torch.GaLoreAdamW8bit``, bitsandbytes' blockwise 8-bit
  Adam): the learning rate goes into bitsandbytes' kernel, as there, and projected groups
  decay after the update while dense groups decay inside the step as bitsandbytes does.
  Bit for bit on bitsandbytes' CPU kernels wherever ``galore_torch`` works; see the class
  for where it does not (with bitsandbytes 0.50 its small projected matrices never move).

A group with ``rank`` must also give ``update_proj_gap``, ``scale`` and ``proj_type``, as
``galore_torch`` reads all four (it fails with ``KeyError`` at its first step otherwise, and
its own default scale, 1.0, is not the paper's 0.25: we do not guess).  The arithmetic
switches of our classes (``eps_style``, ``decay_after_update``) are fixed to
``galore_torch``'s: a param group may repeat that value but not change it (for other
choices use :mod:`lowrank_optim`'s classes).  Our other group
options (``projector``, ``on_refresh``, ...) work as in those classes.

Keywords of ``galore_torch`` whose value we cannot honour are refused with a ``ValueError``
that names the class, the keyword, the value and the reason, rather than ignored.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from .. import _validate as V
from ..optim import galore as _galore
from ..optim.groups import ADAM_CHECKS, ADAM_DEFAULTS
from ..optim.rules import (
    Adam,
    Adam8bit,
    BlockwiseCodes,
    Update,
    bitsandbytes_functional,
)
from ..projectors import Projector, is_projected

#: The group keys ``galore_torch`` reads from every group that has a ``rank``.
GALORE_TORCH_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def _refuse(cls_name: str, keyword: str, value: Any, reason: str, where: str = "") -> ValueError:
    where = f" in {where}" if where else ""
    return ValueError(
        f"lowrank_optim.compat.galore_torch.{cls_name}: {keyword}={value!r}{where} is not supported: {reason}"
    )


class _GaLoreTorchGroups:
    """galore_torch's constructor and param-group rules, shared by the three classes (see
    the module docstring).  Each class declares its constructor as data: ``constructor_keywords``
    (galore_torch's keywords in its order, with its defaults) and ``reference_only``."""

    #: galore_torch's keywords that are not ours and have no effect here, with the check of
    #: their type (GaLoreAdamW's ``no_deprecation_warning``).
    reference_switches: ClassVar[dict[str, V.Check]] = {}
    #: galore_torch's keywords that are not ours: keyword -> (whether a value is the one we
    #: implement anyway, why the others are refused).
    reference_only: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    def __init__(self, params: Iterable, *args: Any, **kwargs: Any):
        bound = self.__signature__.bind(params, *args, **kwargs)  # a TypeError for a keyword galore_torch lacks
        bound.apply_defaults()
        values = dict(bound.arguments)
        del values["params"]
        name = type(self).__name__
        for key, check in self.reference_switches.items():
            if not check(values[key]):
                raise V.fail(name, key, values[key], "the constructor", check.expected)
            del values[key]
        for key, (implemented, reason) in self.reference_only.items():
            if not implemented(values[key]):
                raise _refuse(name, key, values[key], reason)
            del values[key]
        super().__init__(params, **values)

    def pinned_group_values(self, param_group: dict[str, Any]) -> dict[str, Any]:
        """Our group keys whose value is fixed to galore_torch's arithmetic, for this group."""
        return {"decay_after_update": self.defaults["decay_after_update"]}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name, where = type(self).__name__, f"param group {len(self.param_groups)}"
        param_group = dict(param_group)  # torch fills defaults into the dict it is given
        self._refuse_unpinned(param_group, where)
        param_group.update(self.pinned_group_values(param_group))
        # galore_torch's basis is the exact SVD's (ours defaults to the randomized one); a
        # group may still name another projector, which galore_torch does not have.
        param_group.setdefault("projector", "svd")
        if param_group.get("rank") is not None:
            missing = [key for key in GALORE_TORCH_GROUP_KEYS if key not in param_group]
            if missing:
                raise ValueError(
                    f"lowrank_optim.compat.galore_torch.{name}: {where} sets rank={param_group['rank']!r} but not "
                    f"{', '.join(missing)}: galore_torch reads rank, update_proj_gap, scale and proj_type from every "
                    "group with a rank (and fails with KeyError without them); give all four (the paper uses "
                    "update_proj_gap=200, scale=0.25, proj_type='std')"
                )
        super().add_param_group(param_group)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        # Here too, so that a checkpoint (load_state_dict validates its groups here) cannot
        # bring in our arithmetic, e.g. lowrank_optim.GaLoreAdamW's eps_style="torch".
        super()._validate_group(group, index)
        self._refuse_unpinned(group, f"param group {index}")

    def _refuse_unpinned(self, group: dict[str, Any], where: str) -> None:
        name = type(self).__name__
        for key, value in self.pinned_group_values(group).items():
            if key in group and group[key] != value:
                raise _refuse(
                    name, key, group[key],
                    f"this class follows galore_torch's arithmetic, which is {key}={value!r} here; use "
                    f"lowrank_optim.{name} to choose {key}",
                    where,
                )
        product = (group.get("projector_args") or {}).get("product_dtype", "gradient")
        if product != "gradient":
            raise _refuse(
                name, "projector_args product_dtype", product,
                f"galore_torch multiplies in the gradient's dtype; use lowrank_optim.{name} for bf16 products", where,
            )

    def materializes_direction(self, group: dict, projector: Projector) -> bool:
        # galore_torch forms scale * project_back(N) at full size and then adds it to the
        # weight; fusing the two (our addmm_ into the weight) rounds differently.
        return True


class _GaLoreTorchAdam(Adam):
    """Adam with ε on the raw √v, as ``galore_torch`` (our ``eps_style="hf"``), and its
    ``correct_bias`` switch: without bias correction the step size is the learning rate
    itself (BERT's Adam), the direction m / (√v + ε) being the same."""

    def update_many(self, lows, states, group, weights) -> list[Update]:
        updates = super().update_many(lows, states, group, weights)
        if group["correct_bias"]:
            return updates
        return [update._replace(step_size=group["lr"]) for update in updates]


class GaLoreAdamW(_GaLoreTorchGroups, _galore.GaLoreAdamW):
    """``galore_torch.GaLoreAdamW`` (transformers' old AdamW with GaLore), bit for bit.

    Args:
        params: parameters or param groups; a group with ``rank`` (and ``update_proj_gap``,
            ``scale``, ``proj_type``) is projected, the others get plain AdamW.
        lr, betas, eps, weight_decay: ``galore_torch``'s defaults (eps 1e-6, no decay);
            ε is added to the raw √v and decay, when given, is ``W ← W − η λ W`` after the
            update, as there.
        correct_bias: False drops Adam's bias correction (step size η), as there.
        no_deprecation_warning: accepted for compatibility; ``galore_torch`` warns that
            transformers' AdamW it copies is deprecated, which does not apply here.
    """

    method_defaults: ClassVar[dict[str, Any]] = {
        **ADAM_DEFAULTS,
        "eps": 1e-6,
        "weight_decay": 0.0,
        "eps_style": "hf",
        "decay_after_update": True,
        "correct_bias": True,
    }
    method_checks: ClassVar[dict[str, V.Check]] = {**ADAM_CHECKS, "correct_bias": V.boolean()}
    moment_rule = _GaLoreTorchAdam()

    def pinned_group_values(self, param_group: dict[str, Any]) -> dict[str, Any]:
        return {"eps_style": "hf", "decay_after_update": True}

    constructor_keywords: ClassVar[dict[str, Any]] = {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "correct_bias": True,
        "no_deprecation_warning": False,
    }
    reference_switches: ClassVar[dict[str, V.Check]] = {"no_deprecation_warning": V.boolean()}


class GaLoreAdafactor(_GaLoreTorchGroups, _galore.GaLoreAdafactor):
    """``galore_torch.GaLoreAdafactor`` (transformers' Adafactor with GaLore), bit for bit.

    The keywords and defaults are transformers' (and our :class:`~lowrank_optim.GaLoreAdafactor`'s):
    ``lr=None`` with ``relative_step=True``, ``eps=(1e-30, 1e-3)``, ``clip_threshold=1.0``,
    ``decay_rate=-0.8``, ``beta1=None``, ``weight_decay=0.0``, ``scale_parameter=True``,
    ``warmup_init=False``.  Weight decay is ``W ← W − ρ_t λ W`` before the update, in that
    form, as transformers applies it.
    """

    constructor_keywords: ClassVar[dict[str, Any]] = {
        "lr": None, "eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None,
        "weight_decay": 0.0, "scale_parameter": True, "relative_step": True, "warmup_init": False,
    }

    def _apply_update(self, p, grad, low, update: Update, state, group, projector, layout=None) -> None:
        if group["weight_decay"] != 0:
            # transformers' form W + (-λ ρ_t) W, before the update (ours is W (1 - ρ_t λ),
            # which rounds differently).  With scale_parameter, ρ_t is a 0-dim tensor that
            # becomes a number here, a host sync as in transformers: the price of its bits.
            p.add_(p, alpha=-group["weight_decay"] * update.decay_lr)
            group = {**group, "weight_decay": 0.0}
        super()._apply_update(p, grad, low, update, state, group, projector, layout)


class _Bitsandbytes32bitAdam(Adam):
    """bitsandbytes' 32-bit Adam, which it runs for moments of fewer than ``min_8bit_size``
    elements: ε scaled by √(1 − β2ᵗ) on the raw √v, the quotient rounded before the step
    size η √(1 − β2ᵗ)/(1 − β1ᵗ) multiplies it (the same value as torch's placement, other
    roundings)."""

    def update_many(self, lows, states, group, weights) -> list[Update]:
        beta1, beta2 = group["betas"]
        updates = []
        for low, state in zip(lows, states):
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            correction1 = 1.0 - beta1 ** state["step"]
            correction2 = math.sqrt(1.0 - beta2 ** state["step"])
            quotient = exp_avg / (exp_avg_sq.sqrt() + group["eps"] * correction2)
            updates.append(Update(quotient, None, group["lr"] * correction2 / correction1))
        return updates


class _GaLoreTorchAdam8bit(Adam8bit):
    """bitsandbytes' Adam as ``galore_torch`` drives it.  8-bit moments: the learning rate
    goes inside the blockwise kernel, which writes −η m̂ / (√v̂ + ε) into a zero scratch
    tensor (the reference's zeroed ``p.data``); weight decay is applied by the step, not
    the kernel.  Moments of fewer than ``min_8bit_size`` elements: fp32, with
    bitsandbytes' 32-bit arithmetic."""

    _small = _Bitsandbytes32bitAdam()

    def update(self, low: torch.Tensor, state: dict, group: dict, weight: torch.Tensor) -> Update:
        if not self.quantized(state):
            return super().update(low, state, group, weight)
        first, second = BlockwiseCodes.of(state, "exp_avg", True), BlockwiseCodes.of(state, "exp_avg_sq", False)
        beta1, beta2 = group["betas"]
        scratch = torch.zeros_like(low, dtype=torch.float32)
        bitsandbytes_functional().optimizer_update_8bit_blockwise(
            optimizer_name="adam", g=low.float().contiguous(), p=scratch,
            state1=first.codes, state2=second.codes, beta1=beta1, beta2=beta2, beta3=0.0, alpha=0.0,
            eps=group["eps"], step=state["step"], lr=group["lr"],
            qmap1=first.qmap, qmap2=second.qmap, absmax1=first.absmax, absmax2=second.absmax,
            weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False,
        )
        # The step subtracts step_size * direction: -scratch with step size 1 adds the
        # kernel's own result (negation is exact), and decay uses lr.
        return Update(scratch.neg_(), None, 1.0, decay_lr=group["lr"])


class GaLoreAdamW8bit(_GaLoreTorchGroups, _galore.GaLoreAdamW8bit):
    """``galore_torch.GaLoreAdamW8bit`` (bitsandbytes' 8-bit AdamW with GaLore).

    Defaults are bitsandbytes' ``AdamW8bit``'s (lr 1e-3, eps 1e-8, weight decay 1e-2,
    moments of fewer than ``min_8bit_size`` = 4096 elements in fp32).  As there, a
    projected group decays ``W ← W − η λ W`` after the update and a dense group decays
    ``W ← W (1 − η λ)`` before it.

    ``galore_torch``'s own class does not step on a CPU-only torch: it calls
    ``torch.cuda.synchronize()`` after every parameter.  With that call stubbed out (it
    only waits), on bitsandbytes' CPU kernels, this class equals it bit for bit: projected
    matrices with 8-bit moments, and dense groups with 8-bit or fp32 moments
    (tests/test_compat_galore_torch.py).  Where it does not, ``galore_torch`` is at fault:
    with bitsandbytes releases whose ``Optimizer2State`` no longer takes
    ``percentile_clipping`` and ``block_wise`` (0.50 here), its positional call hands them
    over as ``max_unorm=100`` and ``skip_zeros=True``.  ``max_unorm`` clips every update of
    a tensor with fp32 moments to 100 times the norm of the tensor bitsandbytes steps:

    * a projected matrix with fp32 moments (a low-rank gradient of fewer than
      ``min_8bit_size`` elements, 4096 by default) is stepped through a zeroed scratch
      weight, so its update is clipped to zero: it never moves there, and does here;
    * a dense tensor with fp32 moments whose Adam update exceeds 100 times its norm (a
      zero-initialised bias) is clipped there (never moves from zero) and not here.

    bitsandbytes' CPU kernels ignore ``skip_zeros``; a kernel that honours it leaves the
    moments of exactly-zero gradient entries alone there, where they decay here.  On CUDA (not
    measured) the projected 8-bit update runs the same kernel on the same zero scratch as
    ``galore_torch``; bitsandbytes' fused CUDA kernels update dense weights in place, where
    this class adds the kernel's result to the weight in a second operation, so dense
    groups may differ there in the last bit.

    Keywords bitsandbytes has and we do not implement are refused: ``amsgrad=True``
    (bitsandbytes ignores it), ``optim_bits`` other than 8 and 32 (``galore_torch`` passes 8 to
    bitsandbytes whatever it is given, so its default 32 means 8-bit moments too),
    ``args`` (bitsandbytes' per-parameter overrides), ``percentile_clipping`` other than
    100 (off), ``block_wise=False`` and ``is_paged=True``.
    """

    moment_rule = _GaLoreTorchAdam8bit()

    constructor_keywords: ClassVar[dict[str, Any]] = {
        "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False, "optim_bits": 32,
        "args": None, "min_8bit_size": 4096, "percentile_clipping": 100, "block_wise": True, "is_paged": False,
    }
    reference_only: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {
        "amsgrad": (lambda v: v is False, "bitsandbytes' 8-bit Adam has no AMSGrad (it accepts the keyword "
                    "and ignores it, and so does galore_torch); use amsgrad=False"),
        "optim_bits": (lambda v: v in (8, 32), "galore_torch always keeps 8-bit moments (it passes 8 to "
                       "bitsandbytes whatever optim_bits is), so only 8 and its default 32 mean what it does; for "
                       "32-bit moments use lowrank_optim.compat.galore_torch.GaLoreAdamW"),
        "args": (lambda v: v is None, "bitsandbytes' per-parameter override arguments (GlobalOptimManager) "
                 "are not implemented; set hyperparameters per param group instead"),
        "percentile_clipping": (lambda v: v == 100, "clipping at a percentile of recent gradient norms is "
                                "not implemented (100 is off); clip gradients before step(), e.g. with "
                                "torch.nn.utils.clip_grad_norm_"),
        "block_wise": (lambda v: v is True, "only blockwise 8-bit moments (one scale per 256 elements) are "
                       "implemented, not one scale per tensor"),
        "is_paged": (lambda v: v is False, "paged optimizer state (CUDA unified memory that spills to the "
                     "host) is not implemented"),
    }

    def pinned_group_values(self, param_group: dict[str, Any]) -> dict[str, Any]:
        # galore_torch lifts the decay out of bitsandbytes' kernel for projected groups and
        # applies it after the update; dense groups keep bitsandbytes' decay, before it.
        return {"decay_after_update": is_projected({**self.defaults, **param_group})}


__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit"]
