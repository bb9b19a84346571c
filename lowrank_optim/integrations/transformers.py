"""Hugging Face ``Trainer`` integration: ``optim="lowrank_<name>"`` and a public factory.

Two ways in:

1. ``register()`` once per process (every torchrun worker may call it; it is idempotent),
   then name an optimizer in the arguments, also from a command line::

       from lowrank_optim.integrations.transformers import register
       register()
       args = TrainingArguments(..., optim="lowrank_galore_adamw",
                                optim_target_modules=["attn", "mlp"],
                                optim_args="rank=64,update_proj_gap=200,scale=0.25")
       # or: python train.py --optim lowrank_galore_adamw --optim_args "rank=64,betas=0.9:0.95"

2. The public route, no patching of transformers at all::

       trainer = Trainer(model, args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
           "galore_adamw", args=args, target_modules=["attn", "mlp"], rank=64))

``optim_args`` syntax: the package's one option syntax (:mod:`lowrank_optim.options`, shared
with ``bench/pretrain.py --opt-arg`` and the memory profiler): ``key=value`` pairs separated
by commas, each value parsed to the type of that keyword's default; tuples as
``betas=0.9:0.95`` or ``betas=(0.9,0.95)``; ``projector_args=distribution:gaussian;oversample:4``.
An unknown key is a ValueError listing the valid ones; a value of the wrong type is a
ValueError naming it; range checks are the optimizer's own (a ValueError when the Trainer
builds it).

From ``TrainingArguments``: ``learning_rate`` -> ``lr``; ``adam_beta1/2`` -> ``betas`` and
``adam_epsilon`` -> ``eps`` for the optimizers that have Adam's betas/eps; ``weight_decay``
for every group except biases and norms (the Trainer's own ``get_decay_parameter_names``
rule, as for its AdamW).  A value given in ``optim_args`` wins over the argument.

Param groups: 2-D ``nn.Linear`` weights of the modules matched by ``optim_target_modules``
(the Trainer's matching: a list of name fragments or full-match regexes, one regex string, or
``"all-linear"``) are projected; everything else gets the optimizer's dense AdamW (or
Adafactor) rule, split into a decayed and a non-decayed group.

Layer-wise mode: ``optim="lowrank_<name>_layerwise"`` (transformers' naming, as its
``galore_adamw_layerwise``) builds the same optimizer with ``layerwise=True``.  Unlike
transformers' own layer-wise optimizers it is one real optimizer, not a dummy in front of
one optimizer per parameter, so the Trainer's scheduler drives its learning rate and its
checkpoints hold the real state (resume is exact).  The Trainer's
``gradient_accumulation_steps`` is honoured: the optimizer steps in the backward pass of
the last micro-batch of each window, where accelerate's ``sync_gradients`` says so (the
short last window of an epoch included; :meth:`LowRankOptimizer.end_window_when`).
``max_grad_norm`` clips each parameter's gradient on its own (a global norm needs every
gradient at once, which this mode never holds), and the Trainer's ``grad_norm`` log reads
0 (it finds no gradients left to measure).  Under several processes with DDP the optimizer
attaches itself to the DDP model at its first forward (``attach_ddp()``); under FSDP2 its
hooks run after each reduce-scatter.  Refused: ``fp16`` (the Trainer's GradScaler would
find no gradients to unscale; use ``bf16``) and DeepSpeed (it owns the step).
The loop options themselves (``layerwise``, ``accumulation_steps``, ``max_grad_norm``)
are not ``optim_args``: the name and ``TrainingArguments`` set them.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from torch import nn

from ..distributed import is_dtensor
from ..factory import announce, available_optimizers, projectable_weights
from ..options import aliases as name_aliases
from ..options import canonical_name, parse_options
from ..optim import OPTIMIZERS, LowRankOptimizer
from ..quant import Int8Linear

#: Prefix of our names in ``TrainingArguments.optim``; keeps them apart from the built-in
#: ``galore_adamw`` & co, which use the galore_torch package.
PREFIX = "lowrank_"
#: Suffix of the layer-wise names (``lowrank_galore_adamw_layerwise``), as transformers names its own.
LAYERWISE_SUFFIX = "_layerwise"

#: transformers versions whose ``OptimizerNames``/``_OPTIMIZER_HANDLERS`` layout this module
#: knows (checked on 5.23 and 5.24).  The handler dict is private, so a major release may move
#: it; the structural check in ``_check_transformers`` catches a minor release that does.
MIN_VERSION = "5.23"
MAX_VERSION_EXCLUSIVE = "6"

#: Loop options of LowRankOptimizer that the Trainer does itself (see the module docstring).
TRAINER_OWNED = {
    "layerwise": "name the layer-wise optimizer instead, e.g. optim='lowrank_galore_adamw_layerwise'",
    "accumulation_steps": "use TrainingArguments(gradient_accumulation_steps=...)",
    "max_grad_norm": "use TrainingArguments(max_grad_norm=...)",
}

_registered: set[str] = set()


# --------------------------------------------------------------------------- optim_args
def _optimizer_class(name: str) -> type[LowRankOptimizer]:
    key = canonical_name(str(name).lower().removesuffix(LAYERWISE_SUFFIX))
    if key is None:
        raise ValueError(f"unknown lowrank_optim optimizer {name!r}; available: {', '.join(available_optimizers())}")
    return OPTIMIZERS[key]


def parse_optim_args(name: str, optim_args: str | dict[str, str] | None) -> dict[str, Any]:
    """Parse ``optim_args`` (``"rank=64,betas=0.9:0.95"`` or an already split dict of strings)
    for optimizer ``name`` into typed keywords: :func:`lowrank_optim.options.parse_options`,
    the package's one syntax, with the loop options the Trainer sets itself refused."""
    cls = _optimizer_class(name)
    owner = f"{PREFIX}{str(name).lower().removeprefix(PREFIX)} ({cls.__name__})"
    refused = {k: f"with the Trainer, {reason}" for k, reason in TRAINER_OWNED.items()}
    return parse_options(canonical_name(str(name).lower().removesuffix(LAYERWISE_SUFFIX)), optim_args, refused,
                         owner, label="optim_args key")


# --------------------------------------------------------------------------- param groups
def _decay_parameter_names(model: nn.Module) -> set[str]:
    """The Trainer's own rule for which parameters get weight decay (not biases, not norms)."""
    from transformers import Trainer

    try:
        # An instance method that does not use ``self`` in 5.x: calling it unbound keeps the
        # rule identical to the one the Trainer applies to its AdamW.
        return set(Trainer.get_decay_parameter_names(None, model))
    except Exception:  # pragma: no cover - a future version that needs the instance
        from transformers.trainer_pt_utils import get_parameter_names

        patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
        return set(get_parameter_names(model, [nn.LayerNorm], patterns))


def _matches(target_modules: str | Iterable[str], module_name: str) -> bool:
    if isinstance(target_modules, str):
        if target_modules.replace("_", "-") == "all-linear":
            return True
        return re.fullmatch(target_modules, module_name) is not None
    try:
        from transformers.trainer_utils import check_target_module_exists

        return bool(check_target_module_exists(list(target_modules), module_name))
    except ImportError:  # pragma: no cover
        return any(t in module_name or re.fullmatch(t, module_name) for t in target_modules)


def trainer_param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str],
    weight_decay: float | None,
    low_rank: dict[str, Any],
    owner: str = "lowrank_optim",
) -> list[dict[str, Any]]:
    """Projected (target 2-D Linear weights, with ``low_rank`` keys) / dense with decay /
    dense without decay; each carries ``param_names``.  ``weight_decay=None`` leaves the
    optimizer's default on the decayed groups."""
    if target_modules is None or (not isinstance(target_modules, str) and not list(target_modules)):
        raise ValueError(f"{owner}: needs optim_target_modules (name fragments, a regex or 'all-linear')")
    decay = _decay_parameter_names(model)
    low_ids, int8_ids = set(), set()
    for module_name, module in model.named_modules():
        if isinstance(module, Int8Linear):  # integer codes cannot require grad, yet are trained
            int8_ids.add(id(module.weight))
        # nn.Linear, GPT-2's Conv1D, the stacked matrices of fused experts
        if _matches(target_modules, module_name):
            low_ids.update(id(w) for w in projectable_weights(module))
    buckets: dict[tuple[bool, bool], tuple[list, list]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad and id(p) not in int8_ids:
            continue
        buckets.setdefault((id(p) in low_ids, name in decay), ([], []))
        buckets[(id(p) in low_ids, name in decay)][0].append(name)
        buckets[(id(p) in low_ids, name in decay)][1].append(p)
    if not any(projected for projected, _ in buckets):
        raise ValueError(
            f"{owner}: no nn.Linear (or Conv1D) module matches optim_target_modules={target_modules!r}; "
            "check the names with [n for n, _ in model.named_modules()]"
        )
    groups = []
    for projected, decayed in [(True, True), (True, False), (False, True), (False, False)]:
        if (projected, decayed) not in buckets:
            continue
        names, params = buckets[(projected, decayed)]
        group: dict[str, Any] = {"params": params, "param_names": names}
        if projected:
            group.update(low_rank)
        if not decayed:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def _split(cls: type[LowRankOptimizer], kw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Low-rank size keys go to the projected group only (a dense group must not get a rank)."""
    low = {k: kw.pop(k) for k in ("rank", "density") if k in kw}
    if low.get("density") is not None:
        low.setdefault("rank", None)
    return low, kw


def _from_training_args(cls: type[LowRankOptimizer], args: Any) -> dict[str, Any]:
    """lr, betas and eps from TrainingArguments, for the optimizers that have them."""
    defaults = cls.hyperparameter_defaults()
    out: dict[str, Any] = {"lr": float(args.learning_rate)}
    if isinstance(defaults.get("betas"), tuple):
        out["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
    if isinstance(defaults.get("eps"), float):
        out["eps"] = float(args.adam_epsilon)
    if "relative_step" in defaults:
        # Adafactor: an explicit lr (the scheduler multiplies it), as the Trainer's own
        # ``optim="adafactor"`` does.
        out.update(relative_step=False, scale_parameter=False)
    return out


def _build_kwargs(name: str, model: nn.Module, target_modules, base: dict[str, Any], explicit: dict[str, Any]):
    cls = _optimizer_class(name)
    owner = f"{PREFIX}{name.lower().removeprefix(PREFIX)}"
    kw = {**base, **explicit}
    if kw.get("rank") is None and kw.get("density") is None and getattr(cls, "preset_rank", None) is not None:
        kw["rank"] = cls.preset_rank  # a preset (APOLLO-Mini: rank 1)
    if kw.get("rank") is None and kw.get("density") is None:
        raise ValueError(f"{owner}: needs rank=... (or density=...) in optim_args, e.g. optim_args='rank=64'")
    weight_decay = kw.pop("weight_decay", None)
    low, rest = _split(cls, kw)
    groups = trainer_param_groups(model, target_modules, weight_decay, low, owner)
    announce(groups)
    return cls, groups, rest


# --------------------------------------------------------------------------- Trainer handler
def _make_handler(name: str, layerwise: bool = False):
    optim = f"{PREFIX}{name}{LAYERWISE_SUFFIX if layerwise else ''}"

    def handler(ctx) -> tuple[Any, dict[str, Any]]:
        args, model = ctx.args, ctx.model
        if model is None:
            raise ValueError(f"{optim}: the Trainer must pass the model to build the param groups")
        cls = _optimizer_class(name)
        base = {**_from_training_args(cls, args), "weight_decay": float(args.weight_decay)}
        # Our parser, not the Trainer's already split ``ctx.optim_args`` strings: same syntax,
        # but typed values and errors that list the valid keys.
        explicit = parse_optim_args(name, args.optim_args)
        if layerwise:
            # The factory route: the optimizer needs a word after it is built (its window
            # predicate, DDP), and the Trainer calls a factory with the model.
            return LowRankTrainerFactory, {
                "name": name, "target_modules": args.optim_target_modules,
                "hyperparameters": {**base, **explicit}, "layerwise": _layerwise_options(optim, args),
            }
        cls, groups, rest = _build_kwargs(name, model, args.optim_target_modules, base, explicit)
        # ``params`` replaces the Trainer's own two groups (it pops it before calling cls).
        return cls, {"params": groups, **rest}

    handler.__name__ = handler.__qualname__ = f"_get_{optim}_optimizer"
    return handler


def _layerwise_options(optim: str, args: Any) -> dict[str, Any]:
    """The loop options of a layer-wise optimizer under the Trainer, from its arguments;
    the combinations it cannot honour are refused here, before any training."""
    if getattr(args, "fp16", False):
        raise ValueError(
            f"{optim}: fp16=True is not supported in layer-wise mode: the Trainer's GradScaler unscales and "
            "checks gradients after backward, when this mode has already stepped and freed them; use bf16=True"
        )
    if getattr(args, "deepspeed", None):
        raise ValueError(f"{optim}: DeepSpeed runs its own optimizer step; layer-wise mode cannot run under it")
    clip = getattr(args, "max_grad_norm", None)
    return {"max_grad_norm": float(clip) if clip else None}


def _sync_gradients() -> bool:
    """accelerate's word on whether this micro-batch ends the Trainer's accumulation window
    (``GradientState`` is shared by every instance: the Trainer's accelerator sets it)."""
    from accelerate.state import GradientState

    return GradientState().sync_gradients


def _check_transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "lowrank_optim.integrations.transformers.register() needs transformers "
            f">={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE} (and accelerate): pip install 'lowrank_optim[transformers]'"
        ) from err
    from packaging.version import Version

    version = Version(transformers.__version__)
    if not (Version(MIN_VERSION) <= version < Version(MAX_VERSION_EXCLUSIVE)):
        raise RuntimeError(
            f"lowrank_optim: transformers {transformers.__version__} is outside the versions whose optimizer "
            f"registry this integration can patch safely (>={MIN_VERSION},<{MAX_VERSION_EXCLUSIVE}); use "
            "Trainer(optimizer_cls_and_kwargs=lowrank_optim.integrations.transformers.optimizer_cls_and_kwargs(...)) "
            "instead, which needs no patching"
        )
    from transformers import trainer_optimizer, training_args

    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    names = getattr(training_args, "OptimizerNames", None)
    if not isinstance(handlers, dict) or names is None or not hasattr(names, "_value2member_map_"):
        raise RuntimeError(
            f"lowrank_optim: transformers {transformers.__version__} no longer has the optimizer registry "
            "(training_args.OptimizerNames, trainer_optimizer._OPTIMIZER_HANDLERS) this integration patches; "
            "use Trainer(optimizer_cls_and_kwargs=...) instead"
        )
    return names, handlers


def _add_member(enum_cls, member_name: str, value: str):
    """Add ``member_name = value`` to a (str, Enum) class in place.

    Enums are closed by design, but ``TrainingArguments.__post_init__`` validates ``optim``
    with ``OptimizerNames(value)`` and ``HfArgumentParser`` builds ``--optim``'s choices from
    iterating the class, so the member must exist in the class itself: a subclass or a
    ``_missing_`` hook would satisfy neither.  We fill the three lookup tables the Enum
    machinery reads (by name, by value, in order), the same way ``EnumType`` fills them
    when it creates a class, and touch nothing else.
    """
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, value)
    member._name_ = member_name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, member_name, member)  # EnumType.__setattr__ refuses members
    enum_cls._member_map_[member_name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member_name)
    return member


def register() -> list[str]:
    """Make ``TrainingArguments(optim="lowrank_<name>")`` work for every name in
    :func:`lowrank_optim.available_optimizers`, with its ``_layerwise`` variant and, for the
    8-bit ones, transformers' spelling (``lowrank_galore_adamw_8bit``); returns the names.
    A script that does not call it runs unchanged under ``python -m lowrank_optim.hf``.

    Call it before ``TrainingArguments`` or ``HfArgumentParser`` is built (the parser reads
    the choices when it is constructed).  Idempotent and process-local, so every torchrun
    worker can call it.  Raises ImportError/RuntimeError naming the version if transformers
    is missing or has a layout this module does not know.
    """
    enum_cls, handlers = _check_transformers()
    names = []
    spellings = [(name, name) for name in available_optimizers()] + sorted(name_aliases().items())
    for spelling, name in spellings:
        for layerwise in (False, True):
            value = PREFIX + spelling + (LAYERWISE_SUFFIX if layerwise else "")
            member = _add_member(enum_cls, value.upper(), value)
            # Only our own keys: never replace a built-in handler.
            if value not in _registered or member not in handlers:
                handlers[member] = _make_handler(name, layerwise)
                _registered.add(value)
            names.append(value)
    return names


# --------------------------------------------------------------------------- public factory
class LowRankTrainerFactory:
    """What ``Trainer(optimizer_cls_and_kwargs=(LowRankTrainerFactory, kwargs))`` needs.

    The Trainer treats a first element that is not an ``Optimizer`` subclass as a factory
    and calls ``factory()(model, **kwargs)`` (transformers 5.x ``create_optimizer``), so
    the instance builds the optimizer from the model.  Use :func:`optimizer_cls_and_kwargs`.
    """

    def __call__(
        self,
        model: nn.Module,
        *,
        name: str,
        target_modules: str | Iterable[str],
        hyperparameters: dict[str, Any],
        layerwise: dict[str, Any] | None = None,
    ) -> LowRankOptimizer:
        cls, groups, rest = _build_kwargs(name, model, target_modules, {}, dict(hyperparameters))
        if layerwise is None:
            return cls(groups, **rest)
        optimizer = cls(groups, layerwise=True, **layerwise, **rest)
        optimizer.end_window_when(_sync_gradients)
        import torch.distributed as dist

        plain = any(not is_dtensor(p) for g in optimizer.param_groups for p in g["params"])
        if plain and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            optimizer.attach_ddp()  # accelerate wraps the model in DDP after this: attach at its first forward
        return optimizer


def optimizer_cls_and_kwargs(
    name: str,
    *,
    target_modules: str | Iterable[str] = ("attn", "mlp"),
    args: Any = None,
    **hyperparameters: Any,
) -> tuple[type, dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``; no patching needed.

    ``name``: one of :func:`lowrank_optim.available_optimizers` (``lowrank_`` prefix allowed).
    ``target_modules``: as ``optim_target_modules``.  ``args``: the ``TrainingArguments``
    whose ``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` to use
    (the Trainer does not hand them to this route); without ``args``, ``lr`` is required
    and the optimizer's defaults apply to the rest.  Other keywords are the optimizer's hyperparameters (``rank`` is required),
    checked now: an unknown one is a ValueError listing the valid ones.  Biases and norms
    get no weight decay.  A ``..._layerwise`` name builds the layer-wise optimizer, clipped
    per parameter by ``args.max_grad_norm`` (module docstring).
    """
    cls = _optimizer_class(name)
    valid = [k for k in cls.hyperparameter_defaults() if k not in TRAINER_OWNED]
    for key in set(hyperparameters) & set(TRAINER_OWNED):
        raise ValueError(f"{cls.__name__}: {key!r} is not available with the Trainer: {TRAINER_OWNED[key]}")
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {unknown}; valid ones are: {', '.join(valid)}")
    if hyperparameters.get("rank") is None and hyperparameters.get("density") is None:
        raise ValueError(f"{cls.__name__}: optimizer_cls_and_kwargs needs rank=... (or density=...)")
    if args is None and "lr" not in hyperparameters:
        # The Trainer does not hand its arguments to this route: without them its
        # learning_rate would be silently replaced by the optimizer's default.
        raise ValueError(
            f"{cls.__name__}: optimizer_cls_and_kwargs needs args=training_args (its learning_rate, weight_decay, "
            "adam_beta1/2 and adam_epsilon then apply) or an explicit lr=... (the optimizer's defaults then apply "
            "to the rest)"
        )
    base = {}
    if args is not None:
        base = {**_from_training_args(cls, args), "weight_decay": float(args.weight_decay)}
    if isinstance(target_modules, (list, tuple)):
        target_modules = list(target_modules)
    kwargs = {"name": name, "target_modules": target_modules, "hyperparameters": {**base, **hyperparameters}}
    if str(name).lower().endswith(LAYERWISE_SUFFIX):
        kwargs["layerwise"] = _layerwise_options(name, args) if args is not None else {"max_grad_norm": None}
    return LowRankTrainerFactory, kwargs


__all__ = [
    "LowRankTrainerFactory",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "register",
    "trainer_param_groups",
]
