"""Pickling and checkpoints of a LowRankOptimizer: what survives ``copy.deepcopy`` and
``torch.save(optimizer)``, and what ``load_state_dict`` accepts (validated like the
constructor's input; state cast to the dtypes the method gives it; docs/guide.md#checkpoints).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..projectors import REGISTRY, Projector, is_projected, make_projector
from .groups import BOOKKEEPING_KEYS, LAYOUT_KEYS, LOOP_DEFAULTS, is_matrix_stack, param_names
from .hooks import low_rank_dtype

#: The top-level key of ``state_dict()`` naming the class that saved it.
SAVED_BY = "saved_by"


class CheckpointMixin:
    """``state_dict``/``load_state_dict`` and pickling (mixed into LowRankOptimizer)."""

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
        # torch's __setstate__ adds defaults["differentiable"], which is no option of ours
        # (the constructor takes only False and keeps nothing): it must not reach the groups.
        if "differentiable" not in type(self).hyperparameter_defaults():
            self.defaults.pop("differentiable", None)
        # Checkpoints pickled by an older release lack newer options: fill their defaults,
        # and read their projector options as they were meant then (Projector.saved_options).
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if is_projected(group) and group["projector"] in REGISTRY:
                group["projector_args"] = REGISTRY[group["projector"]].saved_options(group.get("projector_args"))
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
        # The projector options as the checkpoint meant them (Projector.saved_options).
        saved_groups = [{**saved, "projector_args": group["projector_args"]} for saved, group in zip(saved_groups, groups)]
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
        if is_projected(loaded) and loaded["projector"] in REGISTRY:  # an unknown one is refused below
            loaded["projector_args"] = REGISTRY[loaded["projector"]].saved_options(loaded.get("projector_args"))
        if "param_names" in group and "param_names" not in saved:
            loaded["param_names"] = group["param_names"]
        try:
            self._validate_group(loaded, index)
        except ValueError as err:
            raise ValueError(f"{err} (loading a checkpoint)") from None
        for key in self.layout_keys():
            if strict and loaded[key] != group[key] and not same_state(key, loaded, group):
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
        low_dtype = low_rank_dtype(param_dtype) if projector is not None else param_dtype
        adopted = {}
        for key, value in self.upgrade_state(dict(pstate)).items():
            if key == "projector" and projector is not None:
                value = {k: moved(v, p, param_dtype if k in projector.param_dtype_keys else None) for k, v in value.items()}
            else:
                follows = key in self.moment_rule.param_dtype_keys or key in self.param_dtype_state_keys
                value = moved(value, p, low_dtype if follows else None)
            adopted[key] = value
        return adopted


def same_state(key: str, saved: dict, built: dict) -> bool:
    """Whether a checkpoint's group (``saved``) and the optimizer's (``built``), which differ
    in layout key ``key``, keep the same state: projectors of one family (a checkpoint
    trained with ``projector="svd"``, the default before ``"rsvd"``, resumes in an optimizer
    built with the new default and goes on with the checkpoint's), or projector options
    that differ only where the projector says the state is the same (int4's inner SVD)."""
    if key == "projector":
        family = REGISTRY[saved["projector"]].state_family
        return family is not None and family == REGISTRY[built["projector"]].state_family
    if key == "projector_args" and saved["projector"] == built["projector"]:
        return REGISTRY[saved["projector"]].same_state_options(saved["projector_args"], built["projector_args"])
    return False


def moved(value: Any, like: torch.Tensor, dtype: torch.dtype | None) -> Any:
    """``value`` (a tensor, or a dict of them) on ``like``'s device; floating tensors also
    cast to ``dtype`` when one is given."""
    if isinstance(value, dict):
        return {k: moved(v, like, dtype) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    if dtype is not None and value.is_floating_point():
        return value.to(device=like.device, dtype=dtype)
    return value.to(like.device)
