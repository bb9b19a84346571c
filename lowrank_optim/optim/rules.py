r"""Moment rules: the per-coordinate statistics an optimizer keeps of the (low-rank) gradient.

A rule is a small stateless object that the optimizer classes compose with a projector
(:class:`~lowrank_optim.optim.base.LowRankOptimizer` holds one as ``moment_rule``).  What
it remembers lives in the state dict it is handed (the parameter's state, or a nested dict
such as GradNormLoRP's magnitude moments), under its own keys plus the int ``step``:

* :meth:`MomentRule.init` creates the statistics for a gradient shaped like ``low``;
* :meth:`MomentRule.update` advances them with one gradient and returns the
  :class:`Update` (direction and step size) for it;
* :meth:`MomentRule.update_many` does the same for a list (one per parameter), with
  ``torch._foreach_*`` kernels where the rule has them: a handful of kernels per group
  instead of a handful per parameter;
* :meth:`MomentRule.remap` re-expresses the statistics in new low-rank coordinates after a
  subspace refresh (``on_refresh="project"``).

``update`` and ``update_many`` round identically (the foreach kernels apply the same
element-wise arithmetic), so the two paths of the step give the same bits.
"""
from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, NamedTuple, Sequence

import torch

from ..projectors.transition import Transition


class Update(NamedTuple):
    """What a moment rule hands back: the direction ``numer / denom`` and its step size.

    Keeping numerator and denominator apart lets a dense group finish with the same
    ``addcdiv_`` as ``torch.optim.AdamW`` (bit-identical), while a projected group divides
    once and projects the quotient back.  ``decay_lr`` overrides the lr used for weight
    decay (Adafactor's relative step); it may be a 0-dim tensor (no host sync).
    """

    numer: torch.Tensor
    denom: torch.Tensor | None
    step_size: float
    decay_lr: Any = None

    def direction(self) -> torch.Tensor:
        return self.numer if self.denom is None else self.numer / self.denom


class MomentRule:
    """Base of the moment rules (see the module docstring)."""

    #: State keys the rule owns (dropped by ``on_refresh="reset"``).
    keys: ClassVar[tuple[str, ...]] = ()
    #: Float state keys whose dtype follows the gradient's (cast when a checkpoint is loaded
    #: into a model of another dtype); the rule's other float state is fp32 by design.
    param_dtype_keys: ClassVar[tuple[str, ...]] = ()
    #: Group keys that decide the layout of the rule's state (a checkpoint must agree).
    layout_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether the rule is element-wise, so that it runs unchanged on one rank's rows of a
    #: sharded (FSDP2) parameter.
    shard_safe: ClassVar[bool] = False

    def init(self, low: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def update(self, low: torch.Tensor, state: dict, group: dict, weight: torch.Tensor) -> Update:
        """Advance the statistics in ``state`` with ``low``; ``state["step"]`` is already
        the new step count.  ``weight`` is the parameter (Adafactor scales by its RMS)."""
        raise NotImplementedError

    def update_many(
        self, lows: Sequence[torch.Tensor], states: Sequence[dict], group: dict, weights: Sequence[torch.Tensor]
    ) -> list[Update]:
        """:meth:`update` for several parameters of one group; rules with foreach kernels
        override it."""
        return [self.update(low, state, group, weight) for low, state, weight in zip(lows, states, weights)]

    def remap(self, state: dict, transition: Transition) -> None:
        raise NotImplementedError

    def state_bytes(self, shape: Sequence[int], width: int, group: dict) -> int:
        """Bytes of the statistics :meth:`init` creates for a gradient of ``shape`` whose
        elements take ``width`` bytes (``group``: the settings that decide the layout).
        The memory estimator (:mod:`lowrank_optim.memory`) adds these up instead of
        knowing each rule's layout itself."""
        raise NotImplementedError


class Adam(MomentRule):
    r"""Adam.  ``eps_style="torch"``: :math:`\hat m/(\sqrt{\hat v}+\epsilon)`, as
    ``torch.optim.AdamW``; ``"hf"``: :math:`m/(\sqrt v+\epsilon)` scaled by
    :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`, as ``galore_torch`` and the old HF AdamW.
    Moments in the gradient's dtype."""

    keys = ("exp_avg", "exp_avg_sq")
    param_dtype_keys = ("exp_avg", "exp_avg_sq")
    shard_safe = True

    def init(self, low: torch.Tensor, state: dict, group: dict) -> None:
        state["exp_avg"] = torch.zeros_like(low, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(low, memory_format=torch.preserve_format)

    def update(self, low: torch.Tensor, state: dict, group: dict, weight: torch.Tensor) -> Update:
        return self.update_many([low], [state], group, [weight])[0]

    def update_many(
        self, lows: Sequence[torch.Tensor], states: Sequence[dict], group: dict, weights: Sequence[torch.Tensor]
    ) -> list[Update]:
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        corrections1 = [1 - beta1 ** s["step"] for s in states]
        corrections2 = [1 - beta2 ** s["step"] for s in states]
        lows = list(lows)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, lows, lows, value=1 - beta2)
        if group.get("eps_style", "torch") == "torch":
            torch._foreach_lerp_(exp_avgs, lows, 1 - beta1)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denoms, [c**0.5 for c in corrections2])
            torch._foreach_add_(denoms, group["eps"])
            return [Update(m, d, group["lr"] / c1) for m, d, c1 in zip(exp_avgs, denoms, corrections1)]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, lows, alpha=1 - beta1)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        # Divided here (not by addcdiv_ in the caller) to round exactly as the reference does.
        directions = torch._foreach_div(exp_avgs, denoms)
        return [
            Update(d, None, group["lr"] * math.sqrt(c2) / c1) for d, c1, c2 in zip(directions, corrections1, corrections2)
        ]

    def remap(self, state: dict, transition: Transition) -> None:
        """The first moment is linear in R and maps exactly; the second moment maps with the
        squared transition (see :class:`~lowrank_optim.projectors.base.Transition`)."""
        state["exp_avg"] = transition.apply(state["exp_avg"])
        state["exp_avg_sq"] = transition.apply(state["exp_avg_sq"], squared=True)

    def state_bytes(self, shape: Sequence[int], width: int, group: dict) -> int:
        return 2 * math.prod(shape) * width  # two moments in the gradient's dtype


def bitsandbytes_functional():
    """``bitsandbytes.functional``, imported quietly (it logs a warning about optional 4-bit
    CPU kernels, none of which we use), or an ImportError saying what needs it."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # optional dependency: only the 8-bit classes need it
        raise ImportError(
            "GaLoreAdamW8bit needs the 'bitsandbytes' package for its 8-bit moments: pip install bitsandbytes"
        ) from err
    finally:
        quiet.setLevel(level)
    return bnb_functional


_QMAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def quantization_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' dynamic maps: signed for the first moment, unsigned for the second.

    Constants shared by every parameter, so they are cached here and never stored in state.
    """
    if device not in _QMAPS:
        F = bitsandbytes_functional()
        _QMAPS[device] = (F.create_dynamic_map(signed=True).to(device), F.create_dynamic_map(signed=False).to(device))
    return _QMAPS[device]


#: Elements per block of an 8-bit moment (one fp32 absmax each), bitsandbytes' default.
BLOCK = 256


class BlockwiseCodes(NamedTuple):
    """One 8-bit moment in the state: uint8 codes shaped like the moment and one fp32 absmax
    per block of 256 (``state[key]``, ``state[key + "_absmax"]``), with the dynamic map of
    its sign.  The state holds only the two tensors (``weights_only`` checkpoints); this
    record is built on use."""

    codes: torch.Tensor
    absmax: torch.Tensor
    qmap: torch.Tensor

    @classmethod
    def of(cls, state: dict, key: str, signed: bool) -> "BlockwiseCodes":
        signed_map, unsigned_map = quantization_maps(state[key].device)
        return cls(state[key], state[key + "_absmax"], signed_map if signed else unsigned_map)

    @classmethod
    def zeros(cls, like: torch.Tensor, state: dict, key: str) -> None:
        state[key] = torch.zeros_like(like, dtype=torch.uint8)
        state[key + "_absmax"] = torch.zeros(math.ceil(like.numel() / BLOCK), dtype=torch.float32, device=like.device)

    def dequantize(self) -> torch.Tensor:
        return bitsandbytes_functional().dequantize_blockwise(
            self.codes, absmax=self.absmax, code=self.qmap, blocksize=BLOCK
        )

    def store(self, dense: torch.Tensor) -> None:
        """Requantize ``dense`` into these codes and scales, in place."""
        codes, qstate = bitsandbytes_functional().quantize_blockwise(
            dense.contiguous(), code=self.qmap, blocksize=BLOCK
        )
        self.codes.copy_(codes)
        self.absmax.copy_(qstate.absmax)


class Adam8bit(MomentRule):
    """bitsandbytes' blockwise 8-bit Adam (blocks of 256, dynamic maps), with fp32 moments for
    tensors of fewer than ``min_8bit_size`` elements, as bitsandbytes does.

    bitsandbytes' ``optimizer_update_8bit_blockwise`` is called by keyword (0.50 reordered
    ``Optimizer2State``'s positional arguments, which turns the upstream class into a silent
    no-op) on a zero scratch tensor with lr 1, which yields the bias-corrected Adam direction;
    ε is placed as in ``torch.optim.AdamW`` (bitsandbytes' only choice).
    """

    keys = ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")
    param_dtype_keys = ()  # uint8 codes with fp32 scales, or fp32 below min_8bit_size
    layout_keys = ("min_8bit_size",)
    _small = Adam()

    @staticmethod
    def quantized(state: dict) -> bool:
        return "exp_avg_absmax" in state

    def init(self, low: torch.Tensor, state: dict, group: dict) -> None:
        if low.numel() < group["min_8bit_size"]:
            self._small.init(low.float(), state, group)
            return
        for key in ("exp_avg", "exp_avg_sq"):
            BlockwiseCodes.zeros(low, state, key)

    def update(self, low: torch.Tensor, state: dict, group: dict, weight: torch.Tensor) -> Update:
        if not self.quantized(state):
            return self._small.update(low.float(), state, group, weight)  # 8-bit groups have no eps_style: torch's
        first, second = BlockwiseCodes.of(state, "exp_avg", True), BlockwiseCodes.of(state, "exp_avg_sq", False)
        beta1, beta2 = group["betas"]
        direction = torch.zeros_like(low, dtype=torch.float32)
        bitsandbytes_functional().optimizer_update_8bit_blockwise(
            optimizer_name="adam",
            g=low.float().contiguous(),
            p=direction,
            state1=first.codes,
            state2=second.codes,
            beta1=beta1,
            beta2=beta2,
            beta3=0.0,
            alpha=0.0,
            eps=group["eps"],
            step=state["step"],
            lr=1.0,  # the scratch tensor receives -m_hat / (sqrt(v_hat) + eps)
            qmap1=first.qmap,
            qmap2=second.qmap,
            absmax1=first.absmax,
            absmax2=second.absmax,
            weight_decay=0.0,
            gnorm_scale=1.0,
            skip_zeros=False,
        )
        return Update(direction.neg_(), None, group["lr"])

    def remap(self, state: dict, transition: Transition) -> None:
        if not self.quantized(state):
            return self._small.remap(state, transition)
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            moment = BlockwiseCodes.of(state, key, signed)
            moment.store(transition.apply(moment.dequantize(), squared=not signed))

    def state_bytes(self, shape: Sequence[int], width: int, group: dict) -> int:
        numel = math.prod(shape)
        if numel < group["min_8bit_size"]:
            return 2 * numel * 4  # fp32 moments below the 8-bit threshold, as init keeps them
        # Per moment: one uint8 code per element and one fp32 absmax per block.
        return 2 * (numel + 4 * math.ceil(numel / BLOCK))


class Adafactor(MomentRule):
    r"""Adafactor (Shazeer & Stern 2018): a factored second moment (one row and one column
    statistic for a matrix), relative step size and RMS clipping, as documented on
    :class:`~lowrank_optim.optim.galore.GaLoreAdafactor`.  All statistics in fp32; the RMS
    clip and ``max(eps2, RMS(W))`` are tensor ops (no host sync)."""

    keys = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
    param_dtype_keys = ()  # fp32 whatever the weight's dtype
    layout_keys = ("beta1",)  # with or without a first moment

    def init(self, low: torch.Tensor, state: dict, group: dict) -> None:
        shape = low.shape
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=low.device)
        if low.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=low.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=low.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=low.device)

    def update(self, low: torch.Tensor, state: dict, group: dict, weight: torch.Tensor) -> Update:
        t = state["step"]
        low = low.float()
        rate = group["lr"]
        if group["relative_step"]:
            rate = rate * min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
        if group["scale_parameter"]:
            rate = rate * _rms(weight.float()).clamp(min=group["eps"][1])
        beta2t = 1.0 - t ** group["decay_rate"]
        squared = low.square().add_(group["eps"][0])
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = (row_factor * col.unsqueeze(-2).rsqrt()).mul_(low)
        else:
            state["exp_avg_sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            update = state["exp_avg_sq"].rsqrt().mul_(low)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(rate)
        if group["beta1"] is not None:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
        return Update(update, None, 1.0, decay_lr=rate)

    def remap(self, state: dict, transition: Transition) -> None:
        # The factored second moment keeps one statistic per row and one per column of R:
        # each side's statistics mix only under that side's map (with squared weights).
        if "exp_avg" in state:
            state["exp_avg"] = transition.apply(state["exp_avg"])
        if "exp_avg_sq" in state:
            state["exp_avg_sq"] = transition.apply(state["exp_avg_sq"], squared=True)
        if "exp_avg_sq_row" in state:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            state["exp_avg_sq_row"] = transition.apply(row.unsqueeze(-1), squared=True, right=False).squeeze(-1)
            state["exp_avg_sq_col"] = transition.apply(col.unsqueeze(-2), squared=True, left=False).squeeze(-2)

    def state_bytes(self, shape: Sequence[int], width: int, group: dict) -> int:
        # fp32 whatever the gradient's dtype: the optional first moment, and the second
        # moment factored into its row and column statistics for a matrix (whole otherwise).
        shape = tuple(shape)
        first = 4 * math.prod(shape) if group["beta1"] is not None else 0
        if len(shape) >= 2:
            return first + 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2] + shape[-1:]))
        return first + 4 * math.prod(shape)


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


__all__ = ["Adafactor", "Adam", "Adam8bit", "BlockwiseCodes", "MomentRule", "Update"]
