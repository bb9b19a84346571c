r"""Layer-wise mode: each parameter steps as soon as its gradient is final, which is then freed.

A gradient is *final* when nothing will be added to it before the update:

* one process: when autograd has accumulated it (``register_post_accumulate_grad_hook``);
* DDP: when its bucket's all-reduce has finished.  :meth:`LayerwiseMixin.attach_ddp`
  registers a DDP communication hook that runs DDP's own all-reduce (or the hook the user
  chose), waits for it and steps the bucket's parameters on the averaged gradient.  The
  local post-accumulate hook of such a parameter does nothing: it fires before the
  all-reduce, on this rank's gradient alone.  This is torch's own optimizer-in-backward
  design for DDP (``_apply_optim_in_backward_hook``), which cannot be used as it is
  because it needs an accelerator stream and one optimizer object per parameter;
* FSDP2 (``fully_shard``): when the reduce-scatter has finished.  FSDP2 runs the sharded
  parameter's post-accumulate-grad hooks right after it assigns the reduced shard to
  ``.grad``, so the ordinary hook already fires at the right time, on the local shard; the
  step then runs as any sharded step does (refresh by gather-to-owner,
  :mod:`lowrank_optim.distributed`).

The *accumulation window* is counted in backward passes whose gradients are final: a
``no_sync()`` (DDP) or ``set_requires_gradient_sync(False)`` (FSDP2) micro-batch reduces
nothing, fires no hook, and so neither steps nor counts; its gradient reaches the next
synchronised pass by the framework's own accumulation.  ``accumulation_steps=k`` therefore
means k synchronised backward passes per optimizer step (in one process: k backward
passes).  A caller that knows where its windows end (the Hugging Face Trainer, whose last
window of an epoch may be short) hands the optimizer a predicate instead
(:meth:`LayerwiseMixin.end_window_when`).

See docs/guide.md ("Layer-wise mode") and docs/distributed.md ("Layer-wise mode under DDP
and FSDP2").
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import distributed
from ..quant.int8_linear import is_int8_weight
from .groups import param_names


class LayerwiseMixin:
    """The layer-wise machinery of :class:`~lowrank_optim.optim.base.LowRankOptimizer`:
    gradient hooks, the accumulation window, DDP's communication hook and GradScaler."""

    layerwise: bool
    accumulation_steps: int
    max_grad_norm: float | None

    def _init_layerwise_runtime(self) -> None:
        self._hooks: list = []
        self._micro_batches = 0  # final-gradient backward passes completed in this window
        self._hooked = False  # a gradient hook fired since the last window ended (see step)
        self._in_backward = False  # the end-of-backward callback is queued
        self._window_ends = False  # decided at the first final gradient of a backward pass
        self._end_window: Callable[[], bool] | None = None  # see end_window_when
        self._grad_scaler = None
        self._ddp_params: set[int] = set()  # ids of parameters stepped from DDP's comm hook
        self._used_locally: set[int] = set()  # of those, the ones this rank's backward reached
        self._ddp_search = None  # attach_ddp(None): the global forward pre-hook looking for the model
        self._reduced: dict[int, torch.Tensor] = {}  # DDP: averaged gradients of the window so far

    # ------------------------------------------------------------------ hooks
    def _register_layerwise_hooks(self, group: dict) -> None:
        for p in group["params"]:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    @torch.no_grad()
    def _layerwise_hook(self, p: torch.Tensor) -> None:
        self._hooked = True
        if id(p) in self._ddp_params:
            self._used_locally.add(id(p))
            return  # this rank's gradient only: the DDP comm hook steps it once averaged
        if not distributed.is_dtensor(p) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"{type(self).__name__}: layerwise=True got the gradient of a parameter of shape {tuple(p.shape)} "
                f"that no data-parallel wrapper reduces (world size {dist.get_world_size()}): stepping it on this "
                "rank's gradient would make the replicas diverge. Wrap the model in DistributedDataParallel and call "
                "optimizer.attach_ddp(ddp_model) before the first backward, or shard it with fully_shard before "
                "building the optimizer (docs/distributed.md)"
            )
        self._gradient_ready(p)

    def _gradient_ready(self, p: torch.Tensor, reduced: torch.Tensor | None = None) -> None:
        """``p``'s gradient of this backward pass is final (``reduced``: DDP's average of it,
        a view into DDP's bucket; otherwise ``p.grad``): step it if this pass ends the
        accumulation window, else keep it for the next pass."""
        if not self._in_backward:
            # The first final gradient of this pass: decide once whether the pass ends the
            # window, so every hook of the pass agrees, and count the pass when it ends.
            self._in_backward = True
            if self._end_window is not None:
                self._window_ends = bool(self._end_window())
            else:
                self._window_ends = self._micro_batches + 1 >= self.accumulation_steps
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if reduced is None:
            if self._window_ends:
                self._step_layerwise(p)
            return  # else: autograd (or FSDP2) keeps adding into p.grad
        # DDP frees nothing into .grad for us: the window's sum is kept here between passes.
        kept = self._reduced.pop(id(p), None)
        total = reduced if kept is None else kept.add_(reduced)
        if self._window_ends:
            p.grad = total
            self._step_layerwise(p)
        else:
            self._reduced[id(p)] = total.clone() if kept is None else total  # the bucket is reused
            p.grad = None  # this rank's gradient is in the average now

    @torch.no_grad()
    def _end_of_backward(self) -> None:
        self._in_backward = False
        if not self._window_ends:
            self._micro_batches += 1
            return
        self._micro_batches = 0
        self._hooked = False
        # A parameter with gradients from earlier passes of the window but none from the
        # last one has not stepped: step it now, on the window's sum, so nothing leaks into
        # the next window.
        for group in self.param_groups:
            for p in group["params"]:
                kept = self._reduced.pop(id(p), None)
                if kept is not None:
                    p.grad = kept
                    self._step_layerwise(p)
                elif p.grad is not None and p.requires_grad and id(p) not in self._ddp_params:
                    self._step_layerwise(p)

    def _step_layerwise(self, p: torch.Tensor) -> None:
        if self._grad_scaler is not None and not self._unscale(p.grad):
            p.grad = None  # overflow: skip this parameter's step, as GradScaler skips a step
            return
        if self.max_grad_norm is not None:
            # Per parameter: a global norm would need every gradient at once, which is what
            # this mode avoids.  On a sharded parameter the norm is the whole matrix's.
            norm = p.grad.norm()
            p.grad.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
        index = self._position(p)[0]
        self._step_param(p, self.param_groups[index], self._projector(index))
        p.grad = None  # the point of layer-wise mode: free the full gradient now

    def end_window_when(self, predicate: Callable[[], bool] | None) -> None:
        """Let ``predicate()`` decide where accumulation windows end, instead of counting
        ``accumulation_steps``: it is read at the first final gradient of each backward
        pass, and a pass for which it is True steps every parameter.  For a training loop
        that knows it better than a counter (the Hugging Face Trainer's
        ``accelerator.sync_gradients``: its last window of an epoch may be short).
        ``None`` restores the counter."""
        self._require_layerwise("end_window_when")
        if predicate is not None and not callable(predicate):
            raise ValueError(f"{type(self).__name__}: end_window_when needs a callable or None, got {predicate!r}")
        self._end_window = predicate
        self._micro_batches = 0

    def _require_layerwise(self, what: str, instead: str = "") -> None:
        if not self.layerwise:
            raise ValueError(
                f"{type(self).__name__}: {what} is for layerwise=True; this optimizer has layerwise=False{instead}"
            )

    # ------------------------------------------------------------------ DDP
    def attach_ddp(
        self, model: torch.nn.Module | None = None, comm_hook: Callable | None = None, comm_state: Any = None
    ) -> None:
        """Step this optimizer's parameters inside ``model``'s backward (a
        ``DistributedDataParallel``), each on its averaged gradient as soon as the
        all-reduce of its bucket has finished; call it once, before the first backward.

        ``model=None``: attach to the ``DistributedDataParallel`` that wraps these
        parameters when it runs its first forward, for code that wraps the model out of
        your reach (the Hugging Face Trainer, accelerate).  Until then a global forward
        pre-hook looks at every module call; it is removed as soon as the model is found.

        ``comm_hook``/``comm_state``: a DDP communication hook and its state (default:
        DDP's own all-reduce, ``default_hooks.allreduce_hook`` on the model's process
        group; e.g. ``fp16_compress_hook`` to compress); its result is waited for and
        the step runs on it.  DDP allows one hook per model, so this one replaces
        ``model.register_comm_hook``.  Under ``model.no_sync()`` nothing is reduced and
        nothing steps; gradients accumulate locally as usual.
        """

        self._require_layerwise("attach_ddp")
        owner = type(self).__name__
        if self._ddp_params or self._ddp_search is not None:
            raise ValueError(f"{owner}: attach_ddp was already called; a layer-wise optimizer follows one DDP model")
        if model is None:
            self._ddp_search = torch.nn.modules.module.register_module_forward_pre_hook(
                _FindDDP(self, comm_hook, comm_state)
            )
            return
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"{owner}: attach_ddp needs a DistributedDataParallel model, got {type(model).__name__}")
        managed = {id(p) for p in model._module_parameters}  # not the parameters DDP ignores
        for group in self.param_groups:
            for name, p in zip(param_names(group), group["params"]):
                if p.requires_grad and id(p) not in managed:
                    raise ValueError(
                        f"{owner}: parameter {name} (shape {tuple(p.shape)}) is not reduced by this "
                        "DistributedDataParallel model (not among its parameters, or ignored): it would never step"
                    )
        if comm_hook is None:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            comm_hook, comm_state = default_hooks.allreduce_hook, model.process_group
        self._ddp_params = {id(p) for group in self.param_groups for p in group["params"] if p.requires_grad}
        model.register_comm_hook(comm_state, _StepAfterReduce(self, comm_hook, model))
        # DDP would otherwise copy the averaged bucket back into .grad after the backward,
        # re-creating every gradient this mode has just freed (torch's optimizer-in-backward
        # sets the same flag).
        model.reducer._set_optimizer_in_backward()

    # ------------------------------------------------------------------ GradScaler
    @property
    def _step_supports_amp_scaling(self) -> bool:
        # Read by torch.amp.GradScaler.step, which then leaves the unscaling to the step.
        # In layer-wise mode the gradients are gone by then (the hooks have unscaled them);
        # INT8 weights keep theirs beside .grad, where the scaler would never unscale them.
        return self.layerwise or self._keeps_gradients_beside_grad()

    def _keeps_gradients_beside_grad(self) -> bool:
        """Whether some parameter's gradient is not ``.grad`` (INT8 weights)."""
        return any(is_int8_weight(p) for group in self.param_groups for p in group["params"])

    def attach_grad_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """Use ``scaler`` (``torch.amp.GradScaler``) in layer-wise mode, or with INT8 weights.

        Layer-wise: each gradient hook unscales its gradient and checks it for inf/NaN,
        recording the result where ``scaler.step``/``scaler.update`` read it; a parameter
        whose gradient is not finite skips its step (one host sync per parameter and step to
        decide it).  Unlike a regular step, parameters whose gradients came earlier in the
        same backward have already stepped: the skip is per parameter, not for the whole model.

        INT8 weights (``Int8Linear``, whose float gradient is not ``.grad``, so that
        ``scaler.unscale_`` would leave it scaled): ``scaler.step(optimizer)`` hands the
        scale to the step, which unscales every gradient, INT8 ones included, and skips the
        whole step when one is not finite, as the scaler does (one host sync per step).
        """
        if not self._keeps_gradients_beside_grad():
            self._require_layerwise("attach_grad_scaler", ": use scaler.step(optimizer) as with any torch optimizer")
        if not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"{type(self).__name__}: attach_grad_scaler needs a torch.amp.GradScaler, got {scaler!r}")
        self._grad_scaler = scaler

    def _accept_grad_scale(self) -> bool:
        """Act on what ``torch.amp.GradScaler.step`` handed this step (``grad_scale`` and
        ``found_inf``, set when ``_step_supports_amp_scaling``); False: skip the step.

        Layer-wise, the hooks have unscaled and stepped already: only a scaler that was never
        attached is refused (its first backward has stepped on scaled gradients).  With INT8
        weights the step unscales every gradient by the scale it was handed, the INT8
        weights' too, and skips on a non-finite one (recorded for ``scaler.update``).
        Refused before anything is stepped: no attached scaler, another scaler than the
        attached one (its overflows would reach the wrong ``update``), and
        ``scaler.unscale_`` first (it leaves the INT8 gradients scaled).
        """
        if getattr(self, "found_inf", None) is None:  # no scaler, or one that unscaled .grad itself
            return True
        owner, handed = type(self).__name__, getattr(self, "grad_scale", None)
        try:
            if self.layerwise:
                if handed is not None and self._grad_scaler is None:
                    raise RuntimeError(
                        f"{owner}: layerwise=True with torch.amp.GradScaler needs optimizer.attach_grad_scaler(scaler) "
                        "before the first backward, so that each gradient hook unscales its gradient and skips a "
                        "non-finite one (docs/guide.md)"
                    )
                return True
            if handed is None:
                raise RuntimeError(
                    f"{owner}: scaler.unscale_(optimizer) leaves the gradients of INT8 weights scaled (they are not "
                    ".grad); with INT8 weights call scaler.step(optimizer) without unscale_, which lets the step "
                    "unscale every gradient (docs/guide.md)"
                )
            if self._grad_scaler is None:
                raise RuntimeError(
                    f"{owner}: torch.amp.GradScaler with INT8 weights needs optimizer.attach_grad_scaler(scaler) "
                    "before the first step: their gradients are not .grad, so scaler.unscale_ would leave them "
                    "scaled (docs/guide.md)"
                )
            attached = self._grad_scaler._scale
            if attached is None or not torch.equal(attached.to(handed.device), handed):
                raise RuntimeError(
                    f"{owner}: scaler.step(optimizer) was called by a GradScaler other than the attached one; "
                    "attach the scaler that steps it (optimizer.attach_grad_scaler(scaler))"
                )
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    grad = self.gradient(p)
                    if grad is not None:
                        by_device.setdefault(grad.device, []).append(grad)
            return all([self._unscale(*grads, scale=handed) for grads in by_device.values()])
        except RuntimeError:
            # torch deletes these after a step that returns; a refused one must not leave
            # them to the next step (which would multiply the next scale by them).
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _unscale(self, *grads: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
        """Unscale ``grads`` (on one device) in place by ``scale`` (default: the attached
        GradScaler's), record a non-finite one in the scaler's bookkeeping for this
        optimizer; True when all are finite."""
        from torch.amp.grad_scaler import OptState

        scaler = self._grad_scaler
        if not scaler.is_enabled():
            return True
        if scaler._scale is None:
            raise RuntimeError(
                f"{type(self).__name__}: the attached GradScaler has not scaled a loss yet: "
                "use scaler.scale(loss).backward()"
            )
        record = scaler._per_optimizer_states[id(self)]
        device = grads[0].device
        inv_scale = (scaler._scale if scale is None else scale).double().reciprocal().float().to(device)
        found = torch.zeros((), dtype=torch.float32, device=device)  # as GradScaler keeps its own
        torch._amp_foreach_non_finite_check_and_unscale_(list(grads), found, inv_scale)
        seen = record["found_inf_per_device"]
        seen[device] = seen[device].add_(found) if device in seen else found
        record["stage"] = OptState.UNSCALED  # scaler.step must not unscale (nothing is left to)
        return not bool(found)

    def remove_hooks(self) -> None:
        """Detach the layer-wise gradient hooks (e.g. before handing the model elsewhere).
        A DDP communication hook cannot be removed from its model (DDP allows none)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        if self._ddp_search is not None:
            self._ddp_search.remove()
            self._ddp_search = None


class _FindDDP:
    """The global forward pre-hook of ``attach_ddp(None)``: the first
    ``DistributedDataParallel`` to run a forward over the optimizer's parameters is the one."""

    def __init__(self, optimizer: LayerwiseMixin, comm_hook: Callable | None, comm_state: Any):
        self.optimizer, self.comm_hook, self.comm_state = optimizer, comm_hook, comm_state

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if not isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return
        optimizer = self.optimizer
        ours = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in ours for p in module._module_parameters):
            return
        optimizer._ddp_search.remove()
        optimizer._ddp_search = None
        optimizer.attach_ddp(module, self.comm_hook, self.comm_state)


class _StepAfterReduce:
    """The DDP communication hook of :meth:`LayerwiseMixin.attach_ddp`: the reduction the
    user chose (DDP's all-reduce by default), then the step of the bucket's parameters.

    The reduction is waited for inside the hook, on autograd's thread, as torch's own
    optimizer-in-backward hook does: a ``Future.then`` callback could run on the backend's
    thread, outside the backward pass whose end the window logic hooks into.  On a GPU the
    wait only orders the step after the reduction on the current stream.
    """

    def __init__(self, optimizer: LayerwiseMixin, reduce: Callable, model: torch.nn.Module):
        self.optimizer, self.reduce = optimizer, reduce
        # With find_unused_parameters DDP reduces zeros for a parameter no rank used and then
        # leaves its .grad alone, so a regular step skips it; the bucket cannot tell those
        # zeros from a gradient, so the ranks first agree on who used which parameter.
        self.find_unused = model.find_unused_parameters
        self.process_group = model.process_group
        # DDP logs the hook by name.
        self.__name__ = self.__qualname__ = f"step_after_{getattr(reduce, '__name__', 'reduce')}"

    # No annotations: DDP compares them to its own types and this module's are strings.
    def __call__(self, state, bucket):
        buffer = bucket.buffer()
        reduced = self.reduce(state, bucket).wait()
        if isinstance(reduced, (list, tuple)):
            reduced = reduced[0]
        if reduced.data_ptr() != buffer.data_ptr():  # e.g. a compressing hook: a new tensor
            buffer.copy_(reduced)
        optimizer = self.optimizer
        params = bucket.parameters()
        used = [True] * len(params)
        if self.find_unused:
            counts = torch.tensor([id(p) in optimizer._used_locally for p in params], dtype=torch.int32,
                                  device=buffer.device)
            dist.all_reduce(counts, group=self.process_group)
            used = counts.tolist()
        with torch.no_grad():
            for p, grad, anyone in zip(params, bucket.gradients(), used):
                optimizer._used_locally.discard(id(p))
                if id(p) not in optimizer._ddp_params:
                    continue
                if anyone:
                    optimizer._gradient_ready(p, reduced=grad)
                else:
                    p.grad = None  # no rank used it: no gradient, as DDP leaves it
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done

