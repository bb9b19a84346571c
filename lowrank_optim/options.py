"""One name table and one option syntax for every way in: ``create_optimizer``, the Hugging
Face Trainer (``optim=``/``optim_args=``), ``bench/pretrain.py`` (``--optimizers``/``--opt-arg``)
and the memory profiler.

**Names.** Ours as :func:`lowrank_optim.available_optimizers` lists them, in any case, with
or without the Trainer's ``lowrank_`` prefix, and with transformers' spelling of the 8-bit
ones (``galore_adamw_8bit`` for ``galore_adamw8bit``); and the peers the tools compare
against (:data:`PEERS`: ``adamw``, ``adamw8bit``, ``sgd``).

**Options**: ``key=value`` items separated by commas, each value parsed to the type of that
keyword's default:

* ``true/false/1/0/yes/no/on/off`` for booleans, ints, floats, strings, ``none``;
* tuples as ``0.9:0.95`` or ``(0.9,0.95)`` (Adafactor's ``eps=1e-30:1e-3``);
* ``projector_args`` as ``key:value`` items separated by ``;``
  (``projector_args=distribution:gaussian;oversample:4``).

An unknown key is a ``ValueError`` listing the valid ones, a value of the wrong type one
naming it; range checks are the optimizer's own, when it is built.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

import torch

#: The optimizers the tools measure ours against: what each name builds.
PEERS: dict[str, str] = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "sgd": "torch.optim.SGD with momentum",
}

#: Types of keywords whose default is None (the default cannot tell).
NONE_DEFAULT_TYPES: dict[str, type] = {
    "rank": int, "density": float, "lr": float, "beta1": float, "projector_args": dict, "foreach": bool,
    "max_grad_norm": float,
}

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# --------------------------------------------------------------------------- names
def ours() -> dict[str, type]:
    from .optim import OPTIMIZERS

    return OPTIMIZERS


def aliases() -> dict[str, str]:
    """Other spellings of our names: transformers writes its 8-bit optimizers ``..._8bit``
    (``galore_adamw_8bit``), this package ``...8bit``."""
    return {name[: -len("8bit")] + "_8bit": name for name in ours() if name.endswith("8bit")}


def canonical_name(name: str, peers: bool = False) -> str | None:
    """The name ``name`` spells (case, the ``lowrank_`` prefix and the ``_8bit`` alias
    aside): one of ours, or with ``peers=True`` one of :data:`PEERS`; None if neither."""
    key = str(name).strip().lower()
    if peers and key in PEERS:
        return key
    key = key.removeprefix("lowrank_")
    key = aliases().get(key, key)
    return key if key in ours() else None


def _peer_class(key: str) -> type:
    if key == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise ImportError("adamw8bit is bitsandbytes' AdamW8bit: pip install bitsandbytes") from err
        return bitsandbytes.optim.AdamW8bit
    return {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[key]


#: What a peer is built with unless told otherwise: SGD is compared *with momentum*.
PEER_DEFAULTS: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9}}


def hyperparameter_defaults(name: str) -> dict[str, Any]:
    """Every keyword optimizer ``name`` takes, with its default (a peer's from its signature)."""
    key = canonical_name(name, peers=True)
    if key is None:
        raise ValueError(f"unknown optimizer {name!r}")
    if key in ours():
        return ours()[key].hyperparameter_defaults()
    signature = inspect.signature(_peer_class(key))
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **PEER_DEFAULTS.get(key, {})}


def build_peer(name: str, params, **kwargs: Any) -> torch.optim.Optimizer:
    """One of :data:`PEERS` over ``params`` (keywords as :func:`hyperparameter_defaults`)."""
    key = canonical_name(name, peers=True)
    if key not in PEERS:
        raise ValueError(f"{name!r} is not one of the peers {', '.join(PEERS)}")
    return _peer_class(key)(params, **{**PEER_DEFAULTS.get(key, {}), **kwargs})


# --------------------------------------------------------------------------- values
def parse_scalar(text: str, kind: type | None, where: str) -> Any:
    """One value parsed to ``kind`` (None: the most specific literal that fits)."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if kind is bool:
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{where}={text!r} is not a boolean (true/false)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where}={text!r} is not an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}={text!r} is not a number") from None
    if kind is str:
        return text.strip()
    for convert in (int, float):  # untyped (projector_args values): the literal's own type
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(low, text.strip())


def parse_value(key: str, text: str, default: Any, where: str) -> Any:
    """``text`` as the value of keyword ``key`` whose default is ``default``."""
    kind = NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
    stripped = text.strip()
    if kind is dict:
        if stripped.lower() in ("none", "null", ""):
            return None
        value = {}
        for entry in filter(None, (e.strip() for e in stripped.split(";"))):
            sub, sep, subtext = entry.partition(":")
            if not sep:
                raise ValueError(f"{where}={text!r}: item {entry!r} is not key:value (items separated by ';')")
            value[sub.strip()] = parse_scalar(subtext, None, f"{where}[{sub.strip()}]")
        return value
    if kind is tuple:
        if stripped.lower() in ("none", "null"):
            return None
        inner = stripped[1:-1] if stripped.startswith("(") and stripped.endswith(")") else stripped
        items = re.split(r"[:,]", inner)
        if len(items) != len(default):
            example = ":".join(str(d) for d in default)
            raise ValueError(f"{where}={text!r} needs {len(default)} values, e.g. {example} or ({example.replace(':', ',')})")
        return tuple(parse_scalar(t, type(d), where) for t, d in zip(items, default))
    return parse_scalar(text, kind, where)


def split_items(text: str) -> list[tuple[str, str]]:
    """``"a=1,betas=(0.9,0.95),c=x"`` as (key, text) pairs: commas inside parentheses, and
    commas not followed by a new ``key=``, stay inside the value."""
    pairs = []
    for item in re.split(r",(?![^()]*\))(?=\s*\w+\s*=)", text):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"item {item.strip()!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_options(
    name: str,
    text: str | dict[str, str] | None,
    refused: dict[str, str] | None = None,
    owner: str | None = None,
    label: str = "option",
) -> dict[str, Any]:
    """Options for optimizer ``name`` from ``"rank=64,betas=0.9:0.95"`` (or a dict of
    strings) into typed keywords (module docstring).  ``refused``: keys the caller sets
    itself, each with the reason given when one appears; ``owner`` and ``label`` word the
    errors (``"lowrank_galore_adamw (GaLoreAdamW): unknown optim_args key ..."``)."""
    defaults = hyperparameter_defaults(name)
    owner = owner or str(name)
    refused = refused or {}
    if not text:
        return {}
    try:
        pairs = split_items(text) if isinstance(text, str) else [(str(k).strip(), str(v)) for k, v in text.items()]
    except ValueError as error:
        raise ValueError(f"{owner}: {error}") from None
    valid = [k for k in defaults if k not in refused]
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in refused:
            raise ValueError(f"{owner}: {label} {key!r} is not available here: {refused[key]}")
        if key not in defaults:
            raise ValueError(f"{owner}: unknown {label} {key!r}; valid keys are: {', '.join(valid)}")
        out[key] = parse_value(key, value, defaults[key], f"{owner}: {label} {key}")
    return out


__all__ = ["NONE_DEFAULT_TYPES", "PEERS", "aliases", "build_peer", "canonical_name", "hyperparameter_defaults",
           "parse_options", "parse_scalar", "parse_value", "split_items"]
