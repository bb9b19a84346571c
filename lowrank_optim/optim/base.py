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
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch.optim import Optimizer

from .. import _validate as V
from .. import distributed
from ..projectors import REGISTRY, Projector, RefreshFailed, make_projector
from ..projectors.base import CLOCK
from .argdocs import complete_args, own_args
from .bulk import BulkStepMixin
from .checkpoint import CheckpointMixin
from .groups import (
    ADAM_CHECKS,
    COMMON_CHECKS,
    LOOP_CHECKS,
    LOOP_DEFAULTS,
    LOW_RANK_DEFAULTS,
    STACK_SEED_STRIDE,
    TORCH_OPTIM_KEYWORDS,
    is_matrix_stack,
    projector_key,
)
from .hooks import MethodHooks, ParamStep, low_rank_dtype
from .layerwise import LayerwiseMixin
from .rules import Adam, MomentRule, Update
from .validation import GroupValidationMixin


class LowRankOptimizer(LayerwiseMixin, BulkStepMixin, GroupValidationMixin, CheckpointMixin, MethodHooks, Optimizer):
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
        self._plans: list | None = None  # per group: (configuration, projector, path), see _projector
        # The parameters the groups held when last checked (see _follow_swapped_params).
        self._param_ids = self._current_param_ids() if hasattr(self, "param_groups") else ()

    #: None: the constructor takes :meth:`hyperparameter_defaults` as keyword-only arguments
    #: (signature generated, ``Args:`` completed from the shared descriptions).  A dict: the
    #: constructor is another package's, its keywords in its order with its defaults,
    #: positional as there; the class binds and documents them itself (lowrank_optim.compat).
    constructor_keywords: ClassVar[dict[str, Any] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each method declares its hyperparameters once, as data (``method_defaults``);
        # the constructor's signature is generated from that table plus the shared
        # low-rank options, so ``help()``, ``inspect.signature`` and the Trainer
        # integration see every keyword without a 20-argument block per class.
        super().__init_subclass__(**kwargs)
        params = inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if cls.constructor_keywords is not None:
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            cls.__signature__ = inspect.Signature(
                [params] + [inspect.Parameter(k, kind, default=v) for k, v in cls.constructor_keywords.items()]
            )
            return
        keyword = inspect.Parameter.KEYWORD_ONLY
        cls.__signature__ = inspect.Signature(
            [params] + [inspect.Parameter(k, keyword, default=v) for k, v in cls.hyperparameter_defaults().items()]
        )
        # The same for ``help()``: a class describes only its own keywords under ``Args:``,
        # the shared descriptions are filled in from one table (optim/argdocs.py).
        if "__doc__" in vars(cls):
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

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._follow_swapped_params()
        if not self._accept_grad_scale():
            return loss  # a gradient is not finite: skip the step, as torch.amp.GradScaler does
        # In layer-wise mode the gradient hooks step the parameters; a gradient that no hook
        # saw (assigned by hand, or the zeros torch.distributed.checkpoint steps on to create
        # the state it loads into) steps here, unless a window of backward passes is open.
        if not (self.layerwise and self._hooked):
            for index, group in enumerate(self.param_groups):
                projector = self._projector(index)
                params = [p for p in group["params"] if self.gradient(p) is not None]
                fresh = self._batched_bases(params, group, projector)
                bulk, single = self._partition(index, params, projector)
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
        key = projector_key(group)
        plans = self._plans
        if plans is None or len(plans) != len(self.param_groups):
            plans = self._plans = [(None, None, {})] * len(self.param_groups)
        if plans[index][0] != key:
            plans[index] = (key, make_projector(group), {})
        projector = plans[index][1]
        if projector is not None:
            projector.clock = group.get(CLOCK, 0)
        return projector

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
        low = low.to(low_rank_dtype(low.dtype))  # fp16: the rule runs in fp32
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
            low_direction = _in_dtype(update.direction(), grad.dtype)
            step = ParamStep(p, grad, _in_dtype(low, grad.dtype), low_direction, state, group, projector, layout)
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


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatcher round trip when it is one already: the bulk path
    of many small matrices calls this twice per matrix and step."""
    return t if t.dtype == dtype else t.to(dtype)
