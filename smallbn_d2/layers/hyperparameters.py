"""Allowed ranges of the layers' hyperparameters: the one place where each range is written.

A layer's ``HYPERPARAMETERS`` table (argument name -> :class:`Range`) checks its constructor's
arguments, and ``smallbn_d2.config.validate_smallbn_config`` the config keys that feed them.
See docs/ARCHITECTURE.md, "One config key, from YAML to the layer".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

__all__ = ["Range", "INT_AT_LEAST_0", "INT_AT_LEAST_1", "POSITIVE", "UNIT_INTERVAL", "FINITE_AT_LEAST_1",
           "BOOLEAN", "one_of", "optional"]


@dataclass(frozen=True)
class Range:
    """An allowed range: ``allowed`` in words for errors (e.g. ``"an integer >= 1"``), a ``test``
    returning True for an allowed value, and a ``convert`` applied to it (e.g. ``float``)."""

    allowed: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda v: v

    def check(self, value: Any, name: str) -> Any:
        """Return ``convert(value)`` if ``value`` is allowed; ``name`` (an argument name or a config
        key) is for the message.

        Raises:
            ValueError: ``"<name> = <value> is invalid; allowed: <allowed>"``.
        """
        if not self.test(value):
            raise ValueError(f"{name} = {value!r} is invalid; allowed: {self.allowed}")
        return self.convert(value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


INT_AT_LEAST_0 = Range("an integer >= 0 (iterations)", lambda v: _is_int(v) and v >= 0, int)
INT_AT_LEAST_1 = Range("an integer >= 1", lambda v: _is_int(v) and v >= 1, int)
POSITIVE = Range("a number > 0", lambda v: _is_number(v) and v > 0, float)
UNIT_INTERVAL = Range("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1, float)
FINITE_AT_LEAST_1 = Range("a finite number >= 1", lambda v: _is_number(v) and v >= 1, float)
BOOLEAN = Range("True or False", lambda v: isinstance(v, bool))


def one_of(choices: Iterable[str]) -> Range:
    """A :class:`Range` allowing exactly the given strings."""
    choices = tuple(choices)
    return Range(" or ".join(repr(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


def optional(inner: Range, none_means: str) -> Range:
    """``inner`` or None; ``none_means`` says what None stands for (shown in errors)."""

    return Range(f"None ({none_means}) or {inner.allowed}", lambda v: v is None or inner.test(v),
                 lambda v: None if v is None else inner.convert(v))
