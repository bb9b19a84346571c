"""One place and one message format for bad hyperparameters.

Every optimizer declares its hyperparameters as a table ``name -> Check``; the base class
runs the table on the constructor defaults and on every group passed to
``add_param_group``.  A failed check raises ``ValueError`` whose message names the class,
the hyperparameter (or parameter) and the offending value, e.g.::

    GaLoreAdamW: invalid rank=-3 in param group 0: must be an integer >= 1
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping


@dataclass(frozen=True)
class Check:
    """A predicate plus the phrase that describes what a valid value looks like."""

    ok: Callable[[Any], bool]
    expected: str
    optional: bool = False  # ``None`` is accepted

    def __call__(self, value: Any) -> bool:
        if value is None:
            return self.optional
        try:
            return bool(self.ok(value))
        except (TypeError, ValueError):
            return False


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    # numbers.Integral: a rank read from a NumPy array (np.int64) is as good as an int.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def plain(value: Any) -> Any:
    """``value`` with NumPy (or other ``numbers``) scalars turned into Python ``int``/``float``,
    inside tuples and lists too: groups are saved in checkpoints, and
    ``torch.load(weights_only=True)`` refuses a NumPy scalar."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    return value


def nonneg_float(optional: bool = False) -> Check:
    return Check(lambda x: _is_real(x) and x >= 0, "a finite number >= 0", optional)


def pos_float(optional: bool = False) -> Check:
    return Check(lambda x: _is_real(x) and x > 0, "a finite number > 0", optional)


def real(optional: bool = False) -> Check:
    return Check(_is_real, "a finite number", optional)


def int_at_least(low: int, optional: bool = False) -> Check:
    return Check(lambda x: _is_int(x) and x >= low, f"an integer >= {low}", optional)


def unit_interval(optional: bool = False) -> Check:
    """For betas: 0 <= beta < 1."""
    return Check(lambda x: _is_real(x) and 0 <= x < 1, "a number in [0, 1)", optional)


def choice(*options: Any, optional: bool = False) -> Check:
    return Check(lambda x: x in options, "one of " + ", ".join(map(repr, options)), optional)


def boolean() -> Check:
    return Check(lambda x: isinstance(x, bool), "True or False")


def betas() -> Check:
    return Check(
        lambda b: len(b) == 2 and all(_is_real(x) and 0 <= x < 1 for x in b),
        "a pair (beta1, beta2) with each in [0, 1)",
    )


def pair_of(inner: Check) -> Check:
    return Check(lambda b: len(b) == 2 and all(inner(x) for x in b), f"a pair, each {inner.expected}")


def fail(owner: str, name: str, value: Any, where: str, expected: str) -> ValueError:
    """Build the one error format used everywhere."""
    return ValueError(f"{owner}: invalid {name}={value!r} in {where}: must be {expected}")


def check_values(owner: str, values: Mapping[str, Any], checks: Mapping[str, Check], where: str) -> None:
    for name, check in checks.items():
        if name in values and not check(values[name]):
            raise fail(owner, name, values[name], where, check.expected)


def negative_float() -> Check:
    return Check(lambda x: _is_real(x) and x < 0, "a finite number < 0")


def check_known_keys(owner: str, given: Iterable[str], known: Iterable[str], what: str) -> None:
    """Reject misspelt options instead of silently ignoring them."""
    known = sorted(known)
    for key in given:
        if key not in known:
            raise ValueError(f"{owner}: unknown {what} {key!r}; valid ones are: {', '.join(known)}")
