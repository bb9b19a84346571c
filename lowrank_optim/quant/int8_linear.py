r"""INT8 weights with stochastic rounding: Q-GaLore's weight storage
(docs/methods/qgalore.md#int8-weights-with-stochastic-rounding).

A target ``nn.Linear`` becomes an :class:`Int8Linear` whose ``weight`` is a uint8
parameter (one code per element) with a per-group fp32 scale and uint8 zero point
(buffers ``weight_scales``/``weight_zeros``, groups of ``group_size`` contiguous elements).
Forward and backward dequantize it; the weight's float gradient is accumulated into the
attribute ``weight.float_grad`` (an integer tensor cannot hold ``.grad``), where
:class:`~lowrank_optim.optim.qgalore.QGaLoreAdamW8bit` reads it.  The optimizer
dequantizes, applies the update and decay in fp32 and requantizes with fresh scales:

.. math::
    q = \lfloor x/s \rfloor + z + \mathrm{Bernoulli}(\mathrm{frac}(x/s)),\qquad
    E[s(q - z)] = x,

so small updates survive on average instead of being rounded away (the paper reports
+2..8 perplexity without it).  There is no fp32 master copy.  The formulas (the range is
widened to contain 0 with 254 steps, so no code is ever clamped and the rounding stays
unbiased at the group extremes) are in :mod:`lowrank_optim.kernels.reference`.

``float_grad`` is not ``.grad``, so two things in torch do not see it: DDP does not average
it (the optimizer does, :func:`sync_int8_grads`), and ``torch.nn.utils.clip_grad_norm_``
neither counts nor clips it: use :func:`clip_grad_norm_` from this module instead.
"""
from __future__ import annotations

import collections
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.lowrank_optim)


#: Attribute set on a ``float_grad`` that holds the average over the data-parallel ranks;
#: a backward accumulating into it and ``zero_grad`` clear it, so averaging happens once per
#: backward however many times it is asked for (by the clip, then by the step).
SYNCED = "int8_synced"


def is_int8_weight(p: torch.Tensor) -> bool:
    """A weight stored by :class:`Int8Linear` (its gradient is ``p.float_grad``)."""
    return hasattr(p, "int8_scales")


def stochastic_round_generator(seed: int, step: int, device: torch.device | str) -> torch.Generator:
    """The generator of one requantization, derived from (seed, step) and nothing else: a
    resumed run draws the same noise without any generator state in the checkpoint."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 2_654_435_761 + step * 97_787 + 12_345) % (2**63 - 1))
    return gen


def quantize_int8(
    x: torch.Tensor, group_size: int = 256, generator: torch.Generator | None = None, stochastic: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``x``, fp32 scales, uint8 zeros); stochastic rounding draws
    its uniform noise from ``generator`` (round to nearest when ``stochastic=False``)."""
    noise = None
    if stochastic:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return torch.ops.lowrank_optim.int8_quantize(x.contiguous(), group_size, noise)


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return torch.ops.lowrank_optim.int8_dequantize(codes, scales, zeros, group_size, dtype)


class _Int8Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly in forward and backward (never kept)."""

    @staticmethod
    def forward(ctx, x, codes, bias, scales, zeros, group_size):
        ctx.save_for_backward(x, codes, scales, zeros)
        ctx.group_size = group_size
        ctx.has_bias = bias is not None
        weight = dequantize_int8(codes, scales, zeros, group_size, x.dtype)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, scales, zeros = ctx.saved_tensors
        weight = dequantize_int8(codes, scales, zeros, ctx.group_size, grad_out.dtype)
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        # Accumulate like .grad does (gradient accumulation over micro-batches).
        if getattr(codes, "float_grad", None) is None:
            codes.float_grad = grad_w
        else:
            codes.float_grad.add_(grad_w)
            setattr(codes.float_grad, SYNCED, False)  # now holds a local part again
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None, None, None


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored as INT8 codes (see the module docstring).

    Build one with :meth:`from_linear` or :func:`convert_linear_to_int8`.  It stays an
    ``nn.Linear`` (``in_features``, ``out_features``, ``bias``), so
    :func:`lowrank_optim.param_groups` finds its weight.  The codes, scales and zero points
    are in the module's ``state_dict``; the float gradient is not.

    .. warning::
        ``torch.nn.utils.clip_grad_norm_`` silently skips this weight (its gradient is
        ``weight.float_grad``, not ``weight.grad``): clip with
        :func:`lowrank_optim.quant.clip_grad_norm_`.  Under DDP the weight's gradient is
        averaged by ``QGaLoreAdamW8bit`` (or that clip), not by DDP.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 256,
                 device=None, dtype=None):
        nn.Module.__init__(self)  # no float weight is ever allocated
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = dtype or torch.get_default_dtype()
        groups = -(-in_features * out_features // group_size)
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scales", torch.ones(groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zeros", torch.zeros(groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=self.compute_dtype)) if bias else None
        self._link()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> "Int8Linear":
        """Round ``linear``'s weight to nearest INT8 (the one deterministic quantization)."""
        weight = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                  device=weight.device, dtype=weight.dtype)
        new.set_weight(weight, stochastic=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return new

    def _link(self) -> None:
        # The optimizer sees only the parameter: give it the quantization record.
        self.weight.int8_scales = self.weight_scales
        self.weight.int8_zeros = self.weight_zeros
        self.weight.int8_group_size = self.group_size
        self.weight.int8_compute_dtype = self.compute_dtype  # the gradient's dtype, for sync_int8_grads
        if not hasattr(self.weight, "float_grad"):
            self.weight.float_grad = None

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() replace the buffers with new tensors: relink them to the weight, and
        # keep the scales fp32 through .to(bfloat16) (the codes were computed against fp32
        # scales; rounding the scales alone would shift every dequantized value).
        scales = self.weight_scales
        result = super()._apply(fn, recurse)
        if self.weight_scales.dtype != torch.float32:
            self.weight_scales = scales.to(self.weight_scales.device)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        self._link()
        return result

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scales, self.weight_zeros, self.group_size,
                               dtype or self.compute_dtype)

    @torch.no_grad()
    def set_weight(self, value: torch.Tensor, stochastic: bool = True, generator: torch.Generator | None = None) -> None:
        """Requantize ``value`` into this layer with fresh scales (in place)."""
        codes, scales, zeros = quantize_int8(value, self.group_size, generator, stochastic)
        self.weight.copy_(codes)
        self.weight_scales.copy_(scales)
        self.weight_zeros.copy_(zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Matmul.apply(x, self.weight, self.bias, self.weight_scales, self.weight_zeros, self.group_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sync_int8_grads(weights: Iterable[torch.Tensor]) -> None:
    """Average the ``float_grad`` of INT8 weights over the default process group.

    DDP averages only the ``.grad`` of parameters that require grad, which an integer weight
    cannot.  Assumption: with ``torch.distributed`` initialised and a world size > 1 an INT8
    weight is a replica (data parallel); INT8 weights are never sharded here.  Every rank
    must pass the same weights in the same order (e.g. one optimizer's, or
    ``model.parameters()``).

    One ``all_reduce`` per (device, compute dtype) of the weights, over a fixed layout: a
    weight with no gradient on this rank contributes zeros and a presence count of 0, so a
    weight used on some ranks only gets the average on all of them, and one with no gradient
    anywhere stays ``None``.  Reading those counts is a host sync, made only by a rank that
    lacks the gradient of one of the weights (none when every weight has one here).  The
    averages are marked (:data:`SYNCED`): a second call before the next backward does
    nothing.  In one process: returns at once.  Memory: a transient flat copy of the
    gradients.
    """
    weights = list(weights)
    world = _world_size()
    if world == 1 or not weights:
        return
    grads = [w.float_grad for w in weights]
    if any(g is not None for g in grads) and all(g is None or getattr(g, SYNCED, False) for g in grads):
        return  # averaged since the last backward (e.g. by clip_grad_norm_, then the step)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for w in weights:  # keys from the weights, not the gradients: the same on every rank
        buckets.setdefault((w.device, getattr(w, "int8_compute_dtype", torch.float32)), []).append(w)
    for (device, dtype), bucket in buckets.items():
        here = [w.float_grad is not None for w in bucket]
        parts = [w.float_grad.reshape(-1).to(dtype) if has else torch.zeros(w.numel(), device=device, dtype=dtype)
                 for w, has in zip(bucket, here)]
        buffer = torch.cat(parts + [torch.tensor(here, device=device, dtype=dtype)])
        dist.all_reduce(buffer)
        buffer.div_(world)
        sizes = [w.numel() for w in bucket]
        *averages, counts = buffer.split(sizes + [len(bucket)])
        anywhere = here if all(here) else counts.gt(0).tolist()
        for w, has, has_any, average in zip(bucket, here, anywhere, averages):
            if has:
                w.float_grad.copy_(average.view(w.float_grad.shape))
            elif has_any:
                w.float_grad = average.view(w.shape).clone()  # not a view: the buffer is freed
            if w.float_grad is not None:
                setattr(w.float_grad, SYNCED, True)


# torch's clip reads ``.grad`` of what it is handed: these hand it the float gradients.
_FloatGrad = collections.namedtuple("_FloatGrad", "grad")


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    int8_grad_sync: str = "auto",
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over ``.grad`` *and* the INT8 weights' ``float_grad``.

    torch's own reads only ``.grad``: with :class:`Int8Linear` weights it leaves them
    unclipped and out of the norm, silently.  This one takes the global norm over both (via
    ``torch.nn.utils.get_total_norm``), scales both by ``min(1, max_norm / (norm + 1e-6))``
    (``clip_grads_with_norm_``) and returns the norm.  Under ``torch.distributed`` (world
    size > 1) it first averages the INT8 gradients (:func:`sync_int8_grads`;
    ``int8_grad_sync="off"`` skips that), so every rank clips the same averaged gradients as
    one process on the whole batch would; the optimizer's step does not average them again.
    Call it after the last backward, before ``optimizer.step()``.
    """
    if int8_grad_sync not in ("auto", "off"):
        raise ValueError(f"clip_grad_norm_: invalid int8_grad_sync={int8_grad_sync!r}: must be one of 'auto', 'off'")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    int8 = [p for p in params if is_int8_weight(p)]
    if int8_grad_sync == "auto":
        sync_int8_grads(int8)
    holders = [p for p in params if not is_int8_weight(p) and p.grad is not None]
    holders += [_FloatGrad(p.float_grad) for p in int8 if p.float_grad is not None]
    total = torch.nn.utils.get_total_norm([h.grad for h in holders], norm_type, error_if_nonfinite, foreach)
    torch.nn.utils.clip_grads_with_norm_(holders, max_norm, total, foreach)
    return total


def convert_linear_to_int8(
    model: nn.Module, target_modules: Iterable[str] = ("attn", "mlp"), group_size: int = 256
) -> nn.Module:
    """Swap (in place) every ``nn.Linear`` whose qualified name contains one of
    ``target_modules`` for an :class:`Int8Linear`; returns ``model``.

    Raises ValueError when ``group_size`` is not a positive integer or nothing matches.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = tuple(target_modules)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"convert_linear_to_int8: invalid group_size={group_size!r}: must be an integer >= 1")
    swaps = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and any(t in name for t in targets)
    ]
    if not swaps:
        raise ValueError(
            f"convert_linear_to_int8: no nn.Linear module name contains any of target_modules={list(targets)}"
        )
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(module, group_size))
    return model
