r"""``LowRankOptimizer``: the one template step every method in this package shares.

For a parameter W with gradient G in a group with ``rank`` (a *projected* group)::

    G   <- prepare_gradient(gradient(W))                 hooks (e.g. GradNormLoRP's chain rule)
    if projector.should_refresh(): basis <- projector.refresh(G)         (fp32, every T steps)
                                    moments <- keep | reset | project     (``on_refresh``)
                                    after_refresh()                       hook (other state)
    R   <- projector.project(G)                          low-rank gradient
    R   <- transform_low_rank_grad(R)                    hook (e.g. Natural GaLore)
    N, step_size <- moment_rule.update(R)                rule object: Adam, 8-bit Adam, Adafactor
    W'  <- open_weight(W)                                hook (e.g. dequantize INT8 weights)
    N', c <- factored_update(N, G, R)                    hook (e.g. Fira: N - c phi R, c phi)
    W'  <- (1 - lr wd) W' - step_size scale (back(N') + c G)   projector.add_back: one addmm_
           or, where a method forms the full direction (materializes_direction):
           D <- full_rank_direction(scale back(N)); W' <- W'(1 - lr wd) - step_size D
    W'  <- W' - state_free_update(G, R)                  hook (e.g. FRUGAL's signSGD part)
    close_weight(W, W')                                  hook (e.g. requantize)

A group without ``rank`` skips the projection and runs the same moment rule on G, which for
Adam is ``torch.optim.AdamW`` to the bit.  Learning rate, bias correction and weight decay
live here and nowhere else; methods override the small hooks, never the loop.

Two paths run this template.  The bulk path (:meth:`LowRankOptimizer._step_many`) steps
all the parameters of a group together, the rule's ``update_many`` running one foreach
kernel per operation for the whole group: every dense group takes it, and the projected
groups of a class that keeps every projection hook at its default (GaLore, DCT, 8-bit
GaLore, Adafactor).  The per-parameter path (:meth:`LowRankOptimizer._step_param`) serves
the methods with hooks, layer-wise mode, INT8 weights and sharded parameters, and
``foreach=False``.  Both share the projection prologue and :meth:`_apply_update`, so they
round alike (docs/guide.md#the-step-engine-for-contributors).

A sharded (FSDP2) parameter runs the same loop on this rank's rows: the refresh and the
state's DTensor wrapping go through :mod:`lowrank_optim.distributed` (docs/distributed.md).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, ClassVar, Iterable, NamedTuple

import torch
from torch.optim import Optimizer

from .. import _validate as V
from .. import distributed
from ..projectors import PROJ_TYPES, REGISTRY, Projector, RefreshFailed, is_projected, make_projector
from ..projectors.base import CLOCK
from ..quant.int8_linear import is_int8_weight
from .argdocs import complete_args, own_args
from .layerwise import LayerwiseMixin
from .rules import Adam, MomentRule, Update

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


class ParamStep(NamedTuple):
    """What the projection hooks see of the projected parameter being stepped."""

    param: torch.Tensor
    grad: torch.Tensor  # G, the full-size gradient (after prepare_gradient)
    low: torch.Tensor  # R, the projected (and transformed) gradient
    low_direction: torch.Tensor  # N, the moment rule's direction in the low-rank space
    state: dict
    group: dict
    projector: Projector
    #: How the parameter is sharded (None: whole); the tensors above are this rank's
    #: blocks, so a hook reducing over the whole matrix uses ``lowrank_optim.distributed``.
    layout: distributed.ShardLayout | None = None


class LowRankOptimizer(LayerwiseMixin, Optimizer):
    """Base class: param groups, lazy state, validation and the template step.

    Subclasses set :attr:`method_checks`, compose a :attr:`moment_rule` and usually
    override only the projection hooks (:meth:`transform_low_rank_grad`,
    :meth:`factored_update`, ...).  The hooks are for projected groups: a dense group is
    the moment rule alone (every method's dense groups take the bulk path, which calls no
    hook), so a hook must leave a dense group's parameters as they are.

    Layer-wise mode (``layerwise=True``; :class:`~lowrank_optim.optim.layerwise.
    LayerwiseMixin`) steps each parameter as soon as its gradient is final (accumulated;
    under DDP all-reduced, see :meth:`attach_ddp`; under FSDP2 reduce-scattered) and then
    frees the gradient, so full-rank gradients never coexist in memory.  It honours
    ``accumulation_steps`` (backward passes are counted by the optimizer, not per
    parameter: on the window's last backward each parameter steps as its gradient
    arrives, and at the end of that backward the parameters that got gradients earlier in
    the window but none in its last micro-batch step too, so no gradient leaks into the
    next window) and ``max_grad_norm`` (clipped per parameter: a global norm would need
    every gradient at once, which is exactly what this mode avoids).  With
    ``torch.amp.GradScaler``, call :meth:`attach_grad_scaler` before the first backward:
    the hooks then unscale each gradient and skip the step of a parameter whose gradient
    is not finite (docs/guide.md).  In this mode :meth:`step` runs the closure and steps
    only gradients no hook saw; call it (and your LR scheduler) once per optimizer step
    as usual.
    """

    #: The method's own hyperparameters and defaults (lr, betas, ...), declared once.
    method_defaults: ClassVar[dict[str, Any]] = {}
    method_checks: ClassVar[dict[str, V.Check]] = ADAM_CHECKS
    #: The statistics kept of the (low-rank) gradient: Adam, 8-bit Adam, Adafactor
    #: (:mod:`lowrank_optim.optim.rules`).
    moment_rule: ClassVar[MomentRule] = Adam()
    #: Hooks *defined in this class* that are correct on one rank's rows of a sharded
    #: (FSDP2) parameter; reductions over the whole matrix go through
    #: ``lowrank_optim.distributed``.  Read from each class's own namespace: a method that
    #: overrides a hook without listing it refuses sharded parameters.  The defaults here
    #: (Adam, identity hooks) are element-wise.
    shard_safe_hooks: ClassVar[tuple[str, ...]] = distributed.HOOKS

    def __init__(self, params: Iterable, **hyperparameters: Any):
        owner = type(self).__name__
        known = self.hyperparameter_defaults()
        for key in list(hyperparameters):
            if key in TORCH_OPTIM_KEYWORDS and key not in known:
                honoured, reason = TORCH_OPTIM_KEYWORDS[key]
                if hyperparameters[key] not in honoured:
                    raise ValueError(f"{owner}: {key}={hyperparameters[key]!r} is not supported: {reason}")
                del hyperparameters[key]  # the value this optimizer implements anyway
            elif key not in known:
                raise TypeError(f"{owner} got an unexpected keyword argument {key!r}; valid ones are: {', '.join(known)}")
        values = {**known, **hyperparameters}
        V.check_values(owner, values, {**LOOP_CHECKS, **self.checks()}, "the constructor")
        if values["projector_args"]:
            REGISTRY[values["projector"]].validate_options(owner, values["projector_args"], "the constructor")
        # Loop options belong to the optimizer; everything else is a per-group default.
        for key in LOOP_DEFAULTS:
            setattr(self, key, values.pop(key))
        self._init_runtime()
        super().__init__(params, V.plain(values))  # validates each group through add_param_group

    def _init_runtime(self) -> None:
        """What the optimizer keeps besides its state and groups: caches, hooks, counters.
        Rebuilt (never pickled) after ``copy.deepcopy``/``torch.load`` of the optimizer."""
        self._warned: set[int] = set()
        self._positions: dict[int, tuple[int, int]] | None = None
        self._init_layerwise_runtime()
        self._plans: list | None = None  # per group: (configuration, projector), see _projector
        # The parameters the groups held when last checked (see _follow_swapped_params).
        self._param_ids = self._current_param_ids() if hasattr(self, "param_groups") else ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each method declares its hyperparameters once, as data (``method_defaults``);
        # the constructor's signature is generated from that table plus the shared
        # low-rank options, so ``help()``, ``inspect.signature`` and the Trainer
        # integration see every keyword without a 20-argument block per class.
        super().__init_subclass__(**kwargs)
        keyword = inspect.Parameter.KEYWORD_ONLY
        cls.__signature__ = inspect.Signature(
            [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(k, keyword, default=v) for k, v in cls.hyperparameter_defaults().items()]
        )
        # The same for ``help()``: a class describes only its own keywords under ``Args:``,
        # the shared descriptions are filled in from one table (optim/argdocs.py).  A class
        # with a constructor of its own (lowrank_optim.compat) documents that one itself.
        init = vars(cls).get("__init__")
        named = init is not None and any(
            p.kind is not inspect.Parameter.VAR_KEYWORD for p in list(inspect.signature(init).parameters.values())[2:]
        )
        if "__doc__" in vars(cls) and not named:
            cls._own_arg_docs = own_args(vars(cls)["__doc__"])  # as written, before completion
            inherited = [vars(base).get("_own_arg_docs", {}) for base in cls.__mro__[1:]]
            cls.__doc__ = complete_args(vars(cls)["__doc__"], cls.hyperparameter_defaults(), inherited)

    @classmethod
    def hyperparameter_defaults(cls) -> dict[str, Any]:
        """Every constructor keyword and its default: the method's own (which may override a
        shared default, e.g. FRUGAL's ``scale``), then the shared ones."""
        shared = {**LOW_RANK_DEFAULTS, **LOOP_DEFAULTS}
        return {**cls.method_defaults, **{k: v for k, v in shared.items() if k not in cls.method_defaults}}

    @classmethod
    def checks(cls) -> dict[str, V.Check]:
        return {**COMMON_CHECKS, **cls.method_checks}

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._positions = self._plans = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group, len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise
        if self.layerwise:
            self._register_layerwise_hooks(group)
        self._param_ids = self._current_param_ids()

    def _current_param_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for group in self.param_groups for p in group["params"])

    def _follow_swapped_params(self) -> None:
        """Catch up with parameters replaced behind the optimizer's back: accelerate's FSDP2
        ``prepare`` swaps each for its sharded version in the param groups
        (``fsdp2_switch_optimizer_parameters``).  The new ones are validated as at
        construction (a method that is not shard-aware refuses them), the caches keyed by
        parameter are dropped, and in layer-wise mode the hooks move to them (until then
        their gradients reach no hook, and this step takes them the regular way)."""
        ids = self._current_param_ids()
        if ids == self._param_ids:
            return
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, index)
        self._param_ids = ids
        self._positions = self._plans = None
        if self.layerwise:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()
            for group in self.param_groups:
                self._register_layerwise_hooks(group)

    #: Whether the update uses back(N) at all: APOLLO's scales the raw gradient instead, so
    #: its :meth:`factored_update` returns no N' and :meth:`full_rank_direction` gets None.
    projects_back: ClassVar[bool] = True

    #: Whether the class updates :class:`~lowrank_optim.quant.Int8Linear` weights (uint8
    #: codes with a float gradient beside them); the others refuse them at construction.
    steps_int8_weights: ClassVar[bool] = False

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        owner, where = type(self).__name__, f"param group {index}"
        for key, value in group.items():
            if key not in BOOKKEEPING_KEYS:
                group[key] = V.plain(value)
        V.check_known_keys(owner, group, {*self.defaults, *BOOKKEEPING_KEYS}, f"key in {where}")
        V.check_values(owner, group, self.checks(), where)
        if group["rank"] is not None and group["density"] is not None:
            raise ValueError(
                f"{owner}: rank={group['rank']!r} and density={group['density']!r} both set in {where}: give one"
            )
        projector = None
        if is_projected(group):
            REGISTRY[group["projector"]].validate_options(owner, group.get("projector_args"), where)
            projector = make_projector(group)
        for name, p in zip(param_names(group), group["params"]):
            reason = self._unsupported(p, projector)
            if reason:
                raise ValueError(f"{owner}: parameter {name} (shape {tuple(p.shape)}) in {where} {reason}")
            # Sharded already (fully_shard before the optimizer, as FSDP2 wants): refuse a
            # method that is not shard-aware now rather than at the first step.
            distributed.check_method(self, distributed.shard_layout(p))

    def _unsupported(self, p: torch.Tensor, projector: Projector | None) -> str | None:
        """Why this optimizer cannot train ``p`` in a group with ``projector``, or None."""
        if is_int8_weight(p):
            if self.steps_int8_weights:
                return None if projector is None else _prefixed("cannot be projected: ", projector.validate_shape(p.shape))
            return (
                f"is an INT8 weight (Int8Linear, {p.dtype} codes): {type(self).__name__} would never update it (its "
                "gradient is not .grad); use QGaLoreAdamW8bit, or keep the layer in floating point"
            )
        if not (p.is_floating_point() or p.is_complex()):
            return f"has dtype {p.dtype}: only floating-point (or complex) parameters can be trained"
        if projector is None:
            return None  # dense: AdamW's arithmetic, complex parameters as real pairs (as torch does)
        if p.is_complex():
            return (
                "cannot be projected: it is complex, and a low-rank basis of a complex gradient is not "
                "implemented; put it in a group without rank (dense groups step complex parameters as torch.optim.AdamW)"
            )
        if is_matrix_stack(p, projector):
            if distributed.is_dtensor(p):
                return (
                    "cannot be projected: a sharded stack of matrices (fused expert weights) is not supported; "
                    "put it in a group without rank"
                )
            # Fused expert weights (E x m x n): each of the E matrices is projected on its own.
            return _prefixed("cannot be projected: each of its matrices: ", projector.validate_shape(p.shape[1:]))
        return _prefixed("cannot be projected: ", projector.validate_shape(p.shape))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_swapped_params()
        if self.layerwise and getattr(self, "grad_scale", None) is not None and self._grad_scaler is None:
            # torch.amp.GradScaler.step() sets grad_scale before calling us: the hooks have
            # just stepped on scaled gradients and it would find no inf checks to act on.
            raise RuntimeError(
                f"{type(self).__name__}: layerwise=True with torch.amp.GradScaler needs "
                "optimizer.attach_grad_scaler(scaler) before the first backward, so that each gradient hook "
                "unscales its gradient and skips a non-finite one (docs/guide.md)"
            )
        # In layer-wise mode the gradient hooks step the parameters; a gradient that no hook
        # saw (assigned by hand, or the zeros torch.distributed.checkpoint steps on to create
        # the state it loads into) steps here, unless a window of backward passes is open.
        if not (self.layerwise and self._hooked):
            for index, group in enumerate(self.param_groups):
                projector = self._projector(index)
                params = [p for p in group["params"] if self.gradient(p) is not None]
                fresh = self._batched_bases(params, group, projector)
                bulk, single = [], []
                for p in params:
                    (bulk if self._steps_in_bulk(p, projector) else single).append(p)
                if bulk:
                    self._step_many(bulk, group, projector, fresh)
                for p in single:
                    self._step_param(p, group, projector, fresh.get(id(p)))
        for group in self.param_groups:
            # The group's clock: a schedule all its matrices share (FRUGAL's block rounds),
            # whichever of them had a gradient; saved with the param groups.
            group[CLOCK] = group.get(CLOCK, 0) + 1
        return loss

    # ------------------------------------------------------------------ plans
    def _projector(self, index: int) -> Projector | None:
        """The projector of group ``index``, built once per group configuration (not per
        step, nor per gradient hook in layer-wise mode) and handed the group's clock."""
        group = self.param_groups[index]
        key = _projector_key(group)
        plans = self._plans
        if plans is None or len(plans) != len(self.param_groups):
            plans = self._plans = [(None, None)] * len(self.param_groups)
        if plans[index][0] != key:
            plans[index] = (key, make_projector(group))
        projector = plans[index][1]
        if projector is not None:
            projector.clock = group.get(CLOCK, 0)
        return projector

    @classmethod
    def _template_projection(cls) -> bool:
        """Whether the class keeps every hook of a projected step at the template's
        default (GaLore, DCT, 8-bit GaLore, Adafactor): its projected groups can step all
        their parameters together, and project back straight into the weight."""
        cached = cls.__dict__.get("_template_projection_cached")
        if cached is None:
            cached = all(getattr(cls, h) is getattr(LowRankOptimizer, h) for h in _PROJECTION_HOOKS)
            cls._template_projection_cached = cached
        return cached

    def _steps_in_bulk(self, p: torch.Tensor, projector: Projector | None) -> bool:
        """Whether ``p`` takes the bulk path (:meth:`_step_many`): a plain tensor (a sharded
        one steps on its rows, per parameter) in a dense group (every method's dense groups
        are its moment rule, hooks unused) or a projected group of a template class; an INT8
        weight keeps its own gradient and storage hooks."""
        if self.foreach is False or distributed.is_dtensor(p) or is_int8_weight(p) or is_matrix_stack(p, projector):
            return False
        return projector is None or self._template_projection()

    def _step_many(self, params: list, group: dict, projector: Projector | None, fresh: dict) -> None:
        """The step of several parameters of one group, the moment rule run once per device
        and dtype (``update_many``: foreach kernels, whose fast multi-tensor form needs one
        of each); the same arithmetic as :meth:`_step_param`."""
        buckets: dict[tuple, list] = {}
        for p in params:
            buckets.setdefault((p.device, p.dtype), []).append(p)
        for bucket in buckets.values():
            # In chunks of at most BULK_CHUNK_ELEMENTS parameter entries: the rule's foreach
            # temporaries (R, the denominators, the directions) live for a whole chunk, so a
            # group of large matrices must not hold them for all at once (a step's peak would
            # grow with the model), while many small matrices still share their kernels.
            chunk, size = [], 0
            for p in bucket:
                if chunk and size + p.numel() > BULK_CHUNK_ELEMENTS:
                    self._step_bucket(chunk, group, projector, fresh)
                    chunk, size = [], 0
                chunk.append(p)
                size += p.numel()
            self._step_bucket(chunk, group, projector, fresh)

    def _step_bucket(self, params: list, group: dict, projector: Projector | None, fresh: dict) -> None:
        stepped, grads, lows, states = [], [], [], []
        for param in params:
            state = self.state[param]
            p, grad = self._as_stepped(param)
            self._init_state(p, state, group, projector, None)
            low = self._low_rank_gradient(p, grad, state, group, projector, None, fresh.get(id(p)))
            if low is None:
                continue
            if state["step"] == 0:  # first step, or the moments were reset at a refresh
                self.moment_rule.init(low, state, group)
            state["step"] += 1
            stepped.append(p)
            grads.append(grad)
            lows.append(low)
            states.append(state)
        if not stepped:  # every one skipped (no usable basis this step)
            return
        updates = self.moment_rule.update_many(lows, states, group, stepped)
        if projector is None and self._decay_then_addcdiv(updates, group):
            # torch.optim.AdamW's foreach arithmetic: decay, then p -= step_size m / denom.
            if group["weight_decay"] != 0:
                torch._foreach_mul_(stepped, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_addcdiv_(stepped, [u.numer for u in updates], [u.denom for u in updates],
                                    [-u.step_size for u in updates])
            return
        for p, grad, low, update, state in zip(stepped, grads, lows, updates, states):
            self._apply_update(p, grad, low, update, state, group, projector)

    @staticmethod
    def _decay_then_addcdiv(updates: list, group: dict) -> bool:
        return not group["decay_after_update"] and all(u.denom is not None and u.decay_lr is None for u in updates)

    def _step_param(self, p: torch.Tensor, group: dict, projector: Projector | None, bases: dict | None = None) -> None:
        """One parameter's step; ``bases``: its new basis, when :meth:`_batched_bases`
        already computed it together with other parameters'."""
        state = self.state[p]
        p, grad = self._as_stepped(p)
        if is_matrix_stack(p, projector):
            self._step_stack(p, grad, state, group, projector)
            return
        # A sharded (FSDP2) parameter steps on this rank's rows; see lowrank_optim.distributed.
        with distributed.local_step(p, grad, state) as local:
            self._init_state(p, state, group, projector, local.layout)
            self._step_local(local, state, group, projector, bases)

    def _as_stepped(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor the update applies to, its gradient): a complex parameter (dense
        groups only, validated) as real and imaginary pairs, as torch does."""
        grad = self.gradient(p)
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if p.is_complex():
            return torch.view_as_real(p), torch.view_as_real(grad)
        return p, grad

    def _init_state(
        self, p, state: dict, group: dict, projector: Projector | None, layout, matrix: int | None = None
    ) -> None:
        """Fresh state for ``p``, or for its ``matrix``-th matrix when ``p`` is a stack."""
        if "step" not in state:
            distributed.check_method(self, layout)
            state["step"] = 0
            if projector is not None:
                seed, slot, shape = self._param_seed(p, group), self._group_slot(p, group), p.shape
                if matrix is not None:  # a matrix of a stack: its own seed, so its own random basis
                    seed, shape = seed + (matrix + 1) * STACK_SEED_STRIDE, p.shape[1:]
                state["projector"] = distributed.init_projector_state(
                    type(self).__name__, projector, shape, seed, slot, layout
                )

    def _step_stack(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, projector: Projector) -> None:
        """Fused expert weights (E x m x n): each matrix steps as a parameter of its own, with
        its own basis and moments, in ``state["matrices"]`` (a list of E ordinary states)."""
        matrices = state.setdefault("matrices", [{} for _ in range(p.shape[0])])
        for index, (sub, matrix, matrix_grad) in enumerate(zip(matrices, p, grad)):
            self._init_state(p, sub, group, projector, None, matrix=index)
            self._step_local(distributed.LocalStep(matrix, matrix_grad, None), sub, group, projector, None)

    def _batched_bases(self, params: list, group: dict, projector: Projector | None) -> dict[int, dict]:
        """New bases of every parameter of ``group`` due for a refresh this step, computed
        together (by id), for projectors that batch (``rsvd``: one op call per chunk of
        same-shaped matrices).

        Only where the refresh reads the raw gradient of a whole matrix: a method that
        maps the gradient first (``prepare_gradient``) or a sharded parameter (its refresh
        gathers, see :mod:`lowrank_optim.distributed`) refreshes on its own in the step.
        A failure here is not an error: those parameters refresh one by one, where a
        failed factorisation is handled per parameter.
        """
        if (
            projector is None
            or not projector.batches_refresh
            or type(self).prepare_gradient is not LowRankOptimizer.prepare_gradient
        ):
            return {}
        due, grads, pstates = [], [], []
        for p in params:
            if distributed.is_dtensor(p) or is_matrix_stack(p, projector):
                continue
            state = self.state[p]
            self._init_state(p, state, group, projector, None)
            if projector.should_refresh(state["projector"]):
                due.append(id(p))
                grads.append(self.gradient(p))
                pstates.append(state["projector"])
        if len(due) < 2:
            return {}
        try:
            return dict(zip(due, projector.compute_bases_many(grads, pstates)))
        except (torch.linalg.LinAlgError, RuntimeError):
            return {}

    def _step_local(
        self, local: distributed.LocalStep, state: dict, group: dict, projector: Projector | None, bases: dict | None
    ) -> None:
        p, layout = local.param, local.layout
        grad = self.prepare_gradient(p, local.grad, state, group)
        low = self._low_rank_gradient(p, grad, state, group, projector, layout, bases)
        if low is None:
            return
        low = self.transform_low_rank_grad(low, state, group)
        if state["step"] == 0:  # first step, or the moments were reset at a refresh
            self.moment_rule.init(low, state, group)
        state["step"] += 1
        update = self.moment_rule.update(low, state, group, p)
        weight = self.open_weight(p, state, group)
        self._apply_update(weight, grad, low, update, state, group, projector, layout)
        self.close_weight(p, weight, state, group)

    def _low_rank_gradient(self, p, grad, state, group, projector, layout, bases) -> torch.Tensor | None:
        """R: the gradient itself in a dense group; in a projected one its projection, after
        a refresh when one is due (None: no usable basis this step, skip it)."""
        if projector is None:
            return grad
        pstate = state["projector"]
        if projector.should_refresh(pstate) and not self._refresh(p, grad, group, state, projector, layout, bases):
            return None  # skip rather than corrupt the state
        low = projector.project(grad, pstate)
        # An fp16 low-rank gradient runs its rule in fp32 (fp32 moments, history): its
        # squares underflow and eps=1e-8 rounds to 0 in fp16.  bf16 has fp32's range.
        if low.dtype == torch.float16:
            low = low.float()
        projector.tick(pstate)
        return low

    def _apply_update(self, p, grad, low, update: Update, state, group, projector, layout=None) -> None:
        """Decoupled weight decay and the parameter update, in one place for every method.

        ``p`` is the tensor :meth:`open_weight` handed out: the parameter itself unless a
        method stores its weights in another form (INT8 codes, a weight-normalised pair).
        """
        decay_lr = group["lr"] if update.decay_lr is None else update.decay_lr
        decay = group["weight_decay"] != 0
        into_weight = projector is not None and self._projects_into_weight(group, grad, p, projector)
        # W(1 - lr wd) + alpha back(N) is one addmm_ (beta, alpha) when the decay comes first
        # and its factor is a number (Adafactor's relative lr is a tensor).
        beta = 1.0
        if decay and not group["decay_after_update"]:
            if into_weight and not isinstance(decay_lr, torch.Tensor):
                beta = 1 - decay_lr * group["weight_decay"]
            else:
                p.mul_(1 - decay_lr * group["weight_decay"])
        if projector is None and update.denom is not None:
            p.addcdiv_(update.numer, update.denom, value=-update.step_size)  # torch.optim.AdamW's op
        elif projector is None:
            p.add_(update.direction().to(p.dtype), alpha=-update.step_size)
        else:
            # The basis has the gradient's dtype; fp32 rules (8-bit, Adafactor, fp16) cast down.
            low_direction = update.direction().to(grad.dtype)
            step = ParamStep(p, grad, low.to(grad.dtype), low_direction, state, group, projector, layout)
            if into_weight:
                # No m x n direction: W <- beta W - step_size scale (back(N') + c G), the
                # product straight into the weight and the G term one fused pass.
                low_direction, coefficient = self.factored_update(step)
                alpha = -update.step_size * group["scale"]
                if low_direction is not None:
                    projector.add_back(p, low_direction, state["projector"], alpha=alpha, beta=beta)
                elif beta != 1.0:
                    p.mul_(beta)
                if coefficient is not None:
                    p.addcmul_(grad, coefficient.to(grad.dtype), value=alpha)
            elif low.numel():  # an empty subspace (an inactive FRUGAL block) has no update
                direction = None
                if self.projects_back:
                    direction = projector.project_back(low_direction, state["projector"]).mul_(group["scale"])
                direction = self.full_rank_direction(direction, step)
                p.add_(direction.to(p.dtype), alpha=-update.step_size)
            free = self.state_free_update(step)
            if free is not None:
                p.sub_(free.to(p.dtype))
        if decay and group["decay_after_update"]:
            # The GaLore reference decays after the update: W <- W - lr wd W.
            if isinstance(decay_lr, torch.Tensor):
                p.sub_(p * (decay_lr * group["weight_decay"]))
            else:
                p.add_(p, alpha=-decay_lr * group["weight_decay"])

    def _projects_into_weight(self, group: dict, grad: torch.Tensor, weight: torch.Tensor, projector: Projector) -> bool:
        """Whether the projected-back update goes straight into the weight (``add_back``,
        :meth:`factored_update`): not when the method forms the full-size direction
        (:meth:`materializes_direction`), nor where the arithmetic is pinned to a reference
        package's (``eps_style="hf"`` reproduces ``galore_torch`` to the bit: its order of
        rounding), nor when the weight's dtype differs from the basis's."""
        return (
            not self.materializes_direction(group, projector)
            and group.get("eps_style", "torch") != "hf"
            and weight.dtype == grad.dtype
        )

    def _refresh(self, p, grad, group, state, projector: Projector, layout=None, bases=None) -> bool:
        """New basis, then the moments per ``on_refresh``; False means skip this step."""
        pstate = state["projector"]
        had_basis = projector.has_basis(pstate)
        old = dict(pstate)  # refresh() replaces entries, so this shallow copy is the old state
        try:
            if bases is not None:  # computed in a batch with other parameters'
                projector.refresh(grad, pstate, bases)
            else:
                distributed.refresh(projector, grad, pstate, layout)  # projector.refresh, shard-aware
        except RefreshFailed as err:
            self._warn_once(p, f"subspace refresh skipped, previous basis kept ({err})")
            return had_basis and not err.nonfinite_gradient
        if had_basis and state["step"] > 0:
            if group["on_refresh"] == "reset":
                for key in self.moment_rule.keys:
                    state.pop(key, None)
                state["step"] = 0  # restart bias correction with the moments
                self.after_refresh(state, group, projector, old, grad)
                return True
            if group["on_refresh"] == "project":
                transition = projector.transition(old, pstate, grad)
            else:
                transition = projector.keep_transition(old, pstate, grad)
            if transition is not None:
                self.moment_rule.remap(state, transition)
        if had_basis:
            self.after_refresh(state, group, projector, old, grad)
        return True

    # ------------------------------------------------------------------ hooks
    def gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """Hook: where the gradient of ``p`` is (``p.grad``; an INT8-weight Linear keeps a
        float gradient beside its integer weight)."""
        return p.grad

    def prepare_gradient(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Hook: map the full gradient before projection (e.g. to a reparametrisation's)."""
        return grad

    def open_weight(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Hook: the float tensor the update is applied to (default: ``p`` itself)."""
        return p

    def close_weight(self, p: torch.Tensor, weight: torch.Tensor, state: dict, group: dict) -> None:
        """Hook: write an updated ``open_weight`` tensor back into ``p`` (default: nothing
        to do, the update was in place)."""

    def after_refresh(self, state: dict, group: dict, projector: Projector, old: dict, like: torch.Tensor) -> None:
        """Hook: the basis of a parameter has just changed from ``old`` (its previous
        projector state) to ``state["projector"]``; the moments were already handled per
        ``on_refresh``.  For state a method keeps besides its moments (e.g. a history of
        projected gradients)."""

    def transform_low_rank_grad(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Hook: precondition the (low-rank) gradient before the moment rule."""
        return low

    def full_rank_direction(self, direction: torch.Tensor, step: ParamStep) -> torch.Tensor:
        """Hook: adjust the full-size direction (``scale * project_back(N)``) of a projected
        parameter; the template then subtracts ``step_size * direction``."""
        return direction

    def factored_update(self, step: ParamStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hook: the projected parameter's update D in factored form (N', c), with
        D = scale (back(N') + c ⊙ G) and c broadcastable to G (None: no G term; N' None: no
        back-projection, for a class whose ``projects_back`` is False); the template
        then applies it without forming D: one product into the weight (``add_back``) and
        one fused ``addcmul_``.  Default: (N, None), GaLore's D = scale back(N)."""
        return step.low_direction, None

    def materializes_direction(self, group: dict, projector: Projector) -> bool:
        """Hook: whether ``group``'s update is formed at full size and handed to
        :meth:`full_rank_direction` (True for a method that overrides it, e.g.
        GradNormLoRP's row signs) instead of :meth:`factored_update`."""
        return type(self).full_rank_direction is not LowRankOptimizer.full_rank_direction

    def state_free_update(self, step: ParamStep) -> torch.Tensor | None:
        """Hook: an extra increment for a projected parameter, learning rate included,
        subtracted after the main update (e.g. FRUGAL's signSGD on the complement)."""
        return None

    # ------------------------------------------------------------------ layer-wise mode (layerwise.py)
    def _position(self, p: torch.Tensor) -> tuple[int, int]:
        """(group index, position among all parameters) of ``p`` (or of the parameter it is
        a view of), cached.

        Indices, not group dicts: load_state_dict replaces the dicts but keeps their order.
        """
        return self._position_map()[id(self._parameter_of(p))]

    def _position_map(self) -> dict[int, tuple[int, int]]:
        if self._positions is None:
            params = ((i, q) for i, g in enumerate(self.param_groups) for q in g["params"])
            self._positions = {id(q): (i, pos) for pos, (i, q) in enumerate(params)}
        return self._positions

    def _parameter_of(self, t: torch.Tensor) -> torch.Tensor:
        """The parameter ``t`` is, or a view of: the step hands its hooks views of a
        parameter (one matrix of a stack, a complex parameter's real pairs), and what is
        known per parameter (position, name, seed, warnings) belongs to the parameter."""
        positions = self._position_map()
        while id(t) not in positions and t._base is not None:
            t = t._base
        return t

    # ------------------------------------------------------------------ helpers
    def _group_slot(self, p: torch.Tensor, group: dict) -> tuple[int, int]:
        """(index of ``p`` in its group, group size): for projectors that choose among the
        matrices of a group (FRUGAL's blocks)."""
        p = self._parameter_of(p)
        return next(i for i, q in enumerate(group["params"]) if q is p), len(group["params"])

    def _param_seed(self, p: torch.Tensor, group: dict) -> int:
        """Seed from the parameter's position: identical on every data-parallel rank."""
        return group["seed"] * 1_000_003 + self._position(p)[1]

    def _warn_once(self, p: torch.Tensor, message: str) -> None:
        key = id(self._parameter_of(p))
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"{type(self).__name__}: parameter of shape {tuple(p.shape)}: {message}", RuntimeWarning)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        # torch pickles only defaults, state and groups: the loop options go along, so a
        # deepcopy or torch.save(optimizer) steps like the original.  Caches and hook handles
        # are rebuilt; attachments to other live objects (GradScaler, DDP model, window
        # predicate) are not copied and must be attached again (docs/guide.md#checkpoints).
        return {**super().__getstate__(), **{key: getattr(self, key) for key in LOOP_DEFAULTS}}

    def __setstate__(self, state: dict) -> None:
        loop = {key: state.pop(key) for key in LOOP_DEFAULTS if key in state}
        super().__setstate__(state)
        # Checkpoints pickled by an older release lack newer options: fill their defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if hasattr(self, "_hooks"):  # load_state_dict on a live optimizer: nothing else to restore
            return
        for key, default in LOOP_DEFAULTS.items():
            setattr(self, key, loop.get(key, default))
        self._init_runtime()
        if self.layerwise:  # the hooks live on the (new) parameters, not in the pickle
            for group in self.param_groups:
                self._register_layerwise_hooks(group)

    # ------------------------------------------------------------------ checkpoints
    #: Per-parameter state keys of the method (besides its rule's, ``moment_rule.
    #: param_dtype_keys``) whose dtype follows the low-rank gradient's (the parameter's;
    #: fp32 for an fp16 projected parameter): cast on loading into a model of another
    #: dtype.  Other float state keeps its dtype (fp32 by design: 8-bit block scales,
    #: Adafactor's factors, Fira's norm, GradNormLoRP's magnitude).
    param_dtype_state_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def layout_keys(cls) -> tuple[str, ...]:
        """Group keys that decide the state's layout: :data:`LAYOUT_KEYS` and the rule's."""
        return (*LAYOUT_KEYS, *cls.moment_rule.layout_keys)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus the name of the class that saved it."""
        return {**super().state_dict(), SAVED_BY: type(self).__name__}

    def load_state_dict(self, state_dict: dict[str, Any], *, strict: bool = True) -> None:
        """Load a checkpoint of this optimizer, refusing one that does not fit it.

        Refused with a ``ValueError`` naming the group or parameter: a checkpoint saved by
        another class (``strict=False`` loads it all the same, with its group settings), a
        group key this class does not have (another optimizer's, e.g. ``torch.optim.AdamW``'s
        ``amsgrad``), a group value the constructor would refuse, a group whose rank,
        projector or other layout key differs from this optimizer's (``strict=False``: the
        checkpoint's wins, as in torch), and per-parameter state whose shapes do not fit the
        parameter.  Nothing changes when a check fails.

        Float state follows the parameter's dtype where the method ties it to the
        parameter (bases, Adam moments: resuming an fp32 checkpoint in a bf16 model works),
        and keeps its own otherwise (8-bit codes and their fp32 scales, fp32-by-design
        statistics); every tensor moves to its parameter's device.
        """
        owner = type(self).__name__
        saved_by = state_dict.get(SAVED_BY)
        if strict and saved_by is not None and saved_by != owner:
            raise ValueError(
                f"{owner}: the checkpoint was saved by {saved_by}; load it into {saved_by}, or pass strict=False "
                f"to load it into {owner} with the checkpoint's group settings"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{owner}: the checkpoint has {len(saved_groups)} param group(s), this optimizer {len(self.param_groups)}"
            )
        groups = [self._loaded_group(group, saved, index, strict) for index, (group, saved) in
                  enumerate(zip(self.param_groups, saved_groups))]
        params = {}  # saved id -> (parameter, its name, its loaded group)
        for group, saved in zip(groups, saved_groups):
            params.update(zip(saved["params"], zip(group["params"], param_names(group), [group] * len(saved["params"]))))
        adopted = {}
        for pid, pstate in state_dict["state"].items():
            if pid not in params:
                continue
            p, name, group = params[pid]
            reason = self._state_mismatch(p, pstate, group)
            if reason:
                raise ValueError(
                    f"{owner}: the checkpoint's state of parameter {name} (shape {tuple(p.shape)}) in param group "
                    f"{groups.index(group)} does not fit it: {reason}"
                )
            adopted[p] = self._adopt_state(p, pstate, group)
        # torch loads the groups (and checks the parameter counts); the state, whose dtypes
        # torch would cast wholesale (8-bit codes to floats), is put in place here.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for p, pstate in adopted.items():
            self.state[p] = pstate
        self._positions = self._plans = None
        self._micro_batches = 0

    def _loaded_group(self, group: dict, saved: dict, index: int, strict: bool) -> dict:
        """``saved`` as it will stand in this optimizer once loaded, validated."""
        owner, where = type(self).__name__, f"param group {index} of the checkpoint"
        unknown = sorted(set(saved) - {*self.defaults, *BOOKKEEPING_KEYS})
        if unknown:
            raise ValueError(
                f"{owner}: {where} has keys {owner} does not have ({', '.join(map(repr, unknown))}): it was saved "
                "by another optimizer; load it into the optimizer that saved it"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{owner}: {where} has {len(saved['params'])} parameters, this optimizer's {len(group['params'])}"
            )
        loaded = {**self.defaults, **saved, "params": group["params"]}
        if "param_names" in group and "param_names" not in saved:
            loaded["param_names"] = group["param_names"]
        try:
            self._validate_group(loaded, index)
        except ValueError as err:
            raise ValueError(f"{err} (loading a checkpoint)") from None
        for key in self.layout_keys():
            if strict and loaded[key] != group[key] and not _same_state(key, loaded[key], group[key]):
                raise ValueError(
                    f"{owner}: {where} has {key}={loaded[key]!r}, this optimizer was built with {key}={group[key]!r}; "
                    f"build it with the checkpoint's value, or pass strict=False to take the checkpoint's"
                )
        return loaded

    def _state_mismatch(self, p: torch.Tensor, pstate: dict, group: dict) -> str | None:
        """Why ``pstate`` (a checkpoint's) cannot be ``p``'s state in ``group``, or None."""
        projector = make_projector(group)
        shape = tuple(torch.view_as_real(p).shape) if p.is_complex() else tuple(p.shape)
        if not is_matrix_stack(p, projector):
            if "matrices" in pstate:
                return "it holds one state per matrix of a stack, but the parameter is not a projected stack"
            return self._matrix_state_mismatch(shape, pstate, projector)
        matrices = pstate.get("matrices")
        if matrices is None:
            return "it holds no state per matrix, but the parameter is a projected stack" if pstate else None
        if len(matrices) != shape[0]:
            return f"it holds the state of {len(matrices)} matrices, the stack has {shape[0]}"
        for index, sub in enumerate(matrices):
            reason = self._matrix_state_mismatch(shape[1:], sub, projector)
            if reason:
                return f"matrix {index}: {reason}"
        return None

    def _matrix_state_mismatch(self, shape: tuple, pstate: dict, projector: Projector | None) -> str | None:
        saved_projector = pstate.get("projector")
        if projector is None:
            if saved_projector is not None:
                return "it holds a projector's state but the group is not projected"
            low_shape = shape
        else:
            if saved_projector is None:
                return "it holds no projector state but the group is projected" if "step" in pstate else None
            reason = projector.state_mismatch(saved_projector, torch.Size(shape))
            if reason:
                return reason
            low_shape = projector.low_shape(saved_projector, torch.Size(shape))
        for key in ("exp_avg", "exp_avg_sq"):
            moment = pstate.get(key)
            if low_shape is not None and isinstance(moment, torch.Tensor) and tuple(moment.shape) != tuple(low_shape):
                return f"{key} has shape {tuple(moment.shape)}, expected {tuple(low_shape)}"
        return None

    def upgrade_state(self, pstate: dict) -> dict:
        """A checkpoint's per-parameter state in this release's layout (a shallow copy the
        method may rearrange; :meth:`load_state_dict` calls it before anything else)."""
        pstate.pop("micro_batches", None)  # an older release counted layer-wise micro-batches here
        return pstate

    def _adopt_state(self, p: torch.Tensor, pstate: dict, group: dict) -> dict:
        """A checkpoint's state of ``p`` on its device, in the dtypes the method gives it."""
        projector = make_projector(group)
        if is_matrix_stack(p, projector):
            return {"matrices": [self._adopt_matrix_state(p, sub, projector) for sub in pstate["matrices"]]}
        return self._adopt_matrix_state(p, pstate, projector)

    def _adopt_matrix_state(self, p: torch.Tensor, pstate: dict, projector: Projector | None) -> dict:
        param_dtype = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
        low_dtype = torch.float32 if projector is not None and param_dtype == torch.float16 else param_dtype
        adopted = {}
        for key, value in self.upgrade_state(dict(pstate)).items():
            if key == "projector" and projector is not None:
                value = {k: _moved(v, p, param_dtype if k in projector.param_dtype_keys else None) for k, v in value.items()}
            else:
                follows = key in self.moment_rule.param_dtype_keys or key in self.param_dtype_state_keys
                value = _moved(value, p, low_dtype if follows else None)
            adopted[key] = value
        return adopted

    # ------------------------------------------------------------------ memory
    @classmethod
    def param_state_bytes(
        cls, shape: tuple[int, ...], width: int, group: dict, projector: Projector | None = None, group_size: int = 1
    ) -> float:
        """Bytes ``optimizer.state[p]`` keeps for a parameter of ``shape`` with ``width``-byte
        elements in ``group``, the projector's own tensors aside (``projector.state_bytes``):
        the moment rule's statistics of G (dense group) or of R, plus the method's own
        (:meth:`method_state_bytes`).  ``group_size``: the group's projected matrices (FRUGAL's
        blocks keep moments for a share of them only, so a matrix costs that share on average).

        Declared here, next to the state it describes, so that the memory estimator
        (:mod:`lowrank_optim.memory`) only adds up; tests/test_memory.py checks the sums
        against the state of real runs."""
        shape = tuple(shape)
        if projector is None:
            return cls.moment_rule.state_bytes(shape, width, group)
        low = projector.estimated_low_shape(shape)
        moments = cls.moment_rule.state_bytes(low, width, group)
        fraction = projector.active_fraction(group_size)
        if fraction != 1:
            moments = fraction * moments
        return moments + cls.method_state_bytes(shape, low, width, group)

    @classmethod
    def method_state_bytes(cls, shape: tuple[int, ...], low_shape: tuple[int, ...], width: int, group: dict) -> int:
        """Bytes of what the method keeps for a projected parameter of ``shape`` (R of
        ``low_shape``) besides the rule's moments and the projector's state: none here."""
        return 0


#: Seeds of the matrices of a stack (fused experts): the stack's seed plus multiples of this,
#: far from the seeds of other parameters (which differ by their position, 1 per parameter).
STACK_SEED_STRIDE = 1_000_000_007


def is_matrix_stack(p: torch.Tensor, projector: Projector | None) -> bool:
    """Whether ``p`` is a stack of matrices (E x m x n: fused expert weights) in a projected
    group, each of whose matrices is projected on its own."""
    return projector is not None and p.dim() == 3


#: Parameter entries per chunk of the bulk path (2^22: 16 MiB of fp32 weights): beyond it a
#: matrix's own kernels are large enough that sharing them gains nothing, and the chunk's
#: temporaries stay a fraction of one large matrix.
BULK_CHUNK_ELEMENTS = 1 << 22

#: The hooks of a projected step; a class that keeps them all at the template's default
#: steps its projected groups in bulk (:meth:`LowRankOptimizer._step_many`).
_PROJECTION_HOOKS = (
    "gradient", "prepare_gradient", "transform_low_rank_grad", "full_rank_direction", "factored_update",
    "materializes_direction", "state_free_update", "open_weight", "close_weight",
)


def _projector_key(group: dict) -> tuple:
    """The group values a projector is built from (its clock aside, which changes every step)."""
    if not is_projected(group):
        return (None,)
    return (group["projector"], group["rank"], group.get("density"), group["proj_type"], group["update_proj_gap"],
            group["seed"], repr(group.get("projector_args")))


def _same_state(key: str, saved: Any, built: Any) -> bool:
    """Whether two values of layout key ``key`` keep the same state: projectors of one
    family (a checkpoint trained with ``projector="svd"``, the default before ``"rsvd"``,
    resumes in an optimizer built with the new default and goes on with the checkpoint's)."""
    if key != "projector":
        return False
    family = REGISTRY[saved].state_family
    return family is not None and family == REGISTRY[built].state_family


def param_names(group: dict) -> list[str]:
    """The names of a group's parameters for messages: its ``param_names``, else ``#i``."""
    return group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]


def _prefixed(prefix: str, reason: str | None) -> str | None:
    return None if reason is None else prefix + reason


def _moved(value: Any, like: torch.Tensor, dtype: torch.dtype | None) -> Any:
    """``value`` (a tensor, or a dict of them) on ``like``'s device; floating tensors also
    cast to ``dtype`` when one is given."""
    if isinstance(value, dict):
        return {k: _moved(v, like, dtype) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    if dtype is not None and value.is_floating_point():
        return value.to(device=like.device, dtype=dtype)
    return value.to(like.device)
