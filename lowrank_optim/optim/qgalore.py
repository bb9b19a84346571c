r"""Q-GaLore: quantized GaLore (Zhang et al., 2024, arXiv:2407.08296).

GaLore (see :mod:`lowrank_optim.optim.galore`) with three changes
(docs/methods/qgalore.md#update-rule):

1. INT4 basis.  After each SVD the basis P is stored as packed INT4 codes with per-group
   (256) scale and zero point, :math:`\tilde P = s(q - z)`, dequantized for every
   projection: :math:`R_t = \tilde P^\top G_t`, update :math:`\alpha \tilde P N_t`
   (projector ``"int4"``, :mod:`lowrank_optim.projectors.quantized`).
2. Lazy layer-adaptive refresh.  Each layer keeps its own gap T; when the last K = 5
   values of :math:`|\cos(v_{k-1}, v_k)|` (leading singular vectors at consecutive
   refreshes) average at least τ = 0.4, :math:`T \leftarrow \gamma T` with γ = 2.
3. INT8 weights with stochastic rounding.  A weight of an :class:`~lowrank_optim.quant.Int8Linear`
   is uint8 codes with per-group scale/zero; each step

   .. math::
       W = s(q - z);\quad W \leftarrow W(1-\eta\lambda) - \eta\,\alpha\,\tilde P N_t;\quad
       q \leftarrow \lfloor W/s' \rfloor + z' + \mathrm{Bernoulli}(\mathrm{frac}(W/s'))

   with fresh s', z' and no fp32 master copy (:math:`E[s'(q-z')] = W`).  The moments
   :math:`N_t = \hat M_t / (\sqrt{\hat V_t} + \epsilon)` are bitsandbytes' blockwise 8-bit
   Adam, as :class:`~lowrank_optim.optim.galore.GaLoreAdamW8bit`.

``simulate=True`` is for models that keep float weights (no ``Int8Linear``): after each
update a projected weight is rounded through INT8 quantize/dequantize (stochastic rounding
with fresh scales), the same arithmetic in the weight's own dtype (bf16 in the paper's
simulation).

Reference flaws fixed here: the cosine is taken in absolute value (singular vectors have no
sign); the similarity queue is cleared after a doubling (the reference never clears it, so
the gap doubles again at every later refresh); the basis is packed two codes per byte (the
reference stores one per byte, no saving over INT8); INT4/INT8 ranges contain 0, so a
one-signed group no longer saturates and stochastic rounding is unbiased at the group
extremes; the rounding noise derives from (parameter seed, step), so a resumed run is bit
identical; bitsandbytes is called by keyword (its reordered positional arguments make the
reference's 8-bit step a no-op with bitsandbytes 0.50).

Defaults: int4 projector (svd inner, group 256, K 5, τ 0.4, γ 2), INT8 weight groups of 256,
stochastic rounding on; Adam defaults as ``torch.optim.AdamW``.  For pretraining the paper
uses ``betas=(0.9, 0.95)``, ``lr=0.01 .. 0.015``, ``scale=0.25``, ``update_proj_gap=200``.
Layer-wise mode does not support ``Int8Linear`` weights (they have no ``.grad`` for the
post-accumulate hook), which is rejected at construction.

Under DDP (``torch.distributed`` initialised, world size > 1) ``Int8Linear`` weights are
replicas whose ``float_grad`` DDP does not reduce: the step averages them itself first, in
one ``all_reduce`` (:func:`~lowrank_optim.quant.int8_linear.sync_int8_grads`), unless
``lowrank_optim.quant.clip_grad_norm_`` already did since the last backward.  Clip with that
function, not ``torch.nn.utils.clip_grad_norm_``, which does not see ``float_grad``.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from ..projectors.base import CLOCK
from ..quant.int8_linear import (
    SYNCED,
    dequantize_int8,
    is_int8_weight,
    quantize_int8,
    stochastic_round_generator,
    sync_int8_grads,
)
from .galore import GaLoreAdamW8bit


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    """Q-GaLore: GaLore with an INT4 basis, lazy refreshes and INT8 weights (Zhang et al., 2024).

    Update rule, for a weight W in a group with ``rank``: the basis is kept as INT4 codes q with
    a scale s and zero point z per group of 256 entries, P̃ = s (q − z), and

        R = P̃ᵀ G,   N = 8-bit Adam direction of R (as ``GaLoreAdamW8bit``),
        W ← W (1 − ηλ) − η α P̃ N;

    an ``Int8Linear`` weight (``convert_linear_to_int8(model)``), or any projected weight with
    ``simulate=True``, is then requantised to INT8 with fresh scales and stochastic rounding,
    q ← ⌊W/s'⌋ + z' + [u < frac(W/s')], so E[s'(q − z')] = W with no fp32 master copy.  Each
    matrix's gap T doubles when its leading singular vector stays put (the mean |cos| between
    consecutive refreshes, over the last 5, reaches 0.4: the ``int4`` projector's
    ``queue_size``, ``cos_threshold`` and ``gamma``).  Layer-wise mode refuses
    ``Int8Linear`` weights (an integer weight gets no ``.grad`` to trigger its step).
    A group without ``rank`` is 8-bit AdamW.  Page: docs/methods/qgalore.md#update-rule.

    Args:
        eps: ε, added to √V̂ as in ``torch.optim.AdamW`` (bitsandbytes' only placement;
            default 1e-8).
        projector: default ``"int4"`` (the INT4 basis around ``projector_args["inner"]``,
            ``"svd"`` or ``"rsvd"``, with the lazy refresh); another name, as in ``GaLoreAdamW``,
            keeps a float basis refreshed every T steps.
        simulate: round float projected weights through INT8 after each update, as the paper's
            simulation (default False; ``Int8Linear`` weights are always requantised).
        weight_group_size: the group of the simulated INT8 weights (default 256; ``Int8Linear``
            weights carry their own).
        stochastic_round: False rounds the weights to nearest (the paper's ablation; default True).
        int8_grad_sync: ``"auto"`` (default) averages the ``Int8Linear`` weights' ``float_grad``
            over the ranks before the step when ``torch.distributed`` runs more than one process
            (DDP does not); ``"off"`` leaves them per rank.
    """

    #: Read by the base class's parameter checks (which refuse INT8 weights elsewhere).
    steps_int8_weights = True

    method_defaults = {
        **GaLoreAdamW8bit.method_defaults,
        "projector": "int4",
        "simulate": False,
        "weight_group_size": 256,
        "stochastic_round": True,
        "int8_grad_sync": "auto",
    }
    method_checks = {
        **GaLoreAdamW8bit.method_checks,
        "simulate": V.boolean(),
        "weight_group_size": V.int_at_least(1),
        "stochastic_round": V.boolean(),
        "int8_grad_sync": V.choice("auto", "off"),
    }

    def _validate_group(self, group: dict, index: int) -> None:
        super()._validate_group(group, index)
        if self.layerwise and any(is_int8_weight(p) for p in group["params"]):
            raise ValueError(
                f"{type(self).__name__}: layerwise=True in param group {index} cannot step Int8Linear weights "
                "(an integer weight has no .grad to trigger the hook); use layerwise=False"
            )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # its backward must come before the averaging
            with torch.enable_grad():
                loss = closure()
        self.sync_int8_grads()
        super().step()
        return loss

    def sync_int8_grads(self) -> None:
        """Average the INT8 weights' ``float_grad`` over the ranks now (groups with
        ``int8_grad_sync="auto"``; nothing in one process).  Once per backward: the step
        (or ``lowrank_optim.quant.clip_grad_norm_``) skips gradients already averaged."""
        # .get: the param groups of a checkpoint saved before this option lack it.
        sync_int8_grads(
            p for group in self.param_groups if group.get("int8_grad_sync", "auto") == "auto"
            for p in group["params"] if is_int8_weight(p)
        )

    def gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        return p.float_grad if is_int8_weight(p) else p.grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if is_int8_weight(p) and p.float_grad is not None:
                    if set_to_none:
                        p.float_grad = None
                    else:
                        p.float_grad.zero_()
                        setattr(p.float_grad, SYNCED, False)

    def open_weight(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if is_int8_weight(p):
            return dequantize_int8(p, p.int8_scales, p.int8_zeros, p.int8_group_size, torch.float32)
        return p

    def close_weight(self, p: torch.Tensor, weight: torch.Tensor, state: dict, group: dict) -> None:
        if is_int8_weight(p):
            codes, scales, zeros = self._requantize(p, weight, p.int8_group_size, group)
            p.copy_(codes)
            p.int8_scales.copy_(scales)
            p.int8_zeros.copy_(zeros)
        elif group["simulate"] and "projector" in state:
            codes, scales, zeros = self._requantize(p, weight, group["weight_group_size"], group)
            p.copy_(dequantize_int8(codes, scales, zeros, group["weight_group_size"], p.dtype))

    def _requantize(self, p: torch.Tensor, weight: torch.Tensor, group_size: int, group: dict):
        # Noise from (parameter seed, group clock): reproducible on resume with no generator
        # state to save, distinct per parameter and step, identical on data-parallel ranks.
        generator = stochastic_round_generator(self._param_seed(p, group), group.get(CLOCK, 0), weight.device)
        return quantize_int8(weight, group_size, generator, stochastic=group["stochastic_round"])
