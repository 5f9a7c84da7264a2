"""Head parameters declared once, with the head: the default in its constructor's signature (as in
scikit-learn), the constraint and one line of help in its `params` (name -> Param, merged along the
class hierarchy, a subclass overriding a parent's entry).

From these come `get_params`/`set_params`, the checks of `Head.validate` (errors name the parameter,
never a command-line flag) and the options of `imet fit`, help and defaults included.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imet.errors import ImetError, ParamError

__all__ = ["Bool", "Choice", "Float", "Int", "Param", "ParamError", "Text", "check_values"]


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (None: unbounded)."""

    low: int | None = None
    high: int | None = None

    def accepts(self, v) -> bool:
        return (isinstance(v, numbers.Integral) and not isinstance(v, bool) and (self.low is None or v >= self.low)
                and (self.high is None or v <= self.high))

    def describe(self) -> str:
        if self.high is None:
            return "an integer" + ("" if self.low is None else f" >= {self.low}")
        return f"an integer in {self.low}..{self.high}"


@dataclass(frozen=True)
class Float:
    """A finite real number between low and high, each bound open or closed (None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            return False
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a number" + (" " + " and ".join(parts) if parts else "")


@dataclass(frozen=True)
class Bool:
    def accepts(self, v) -> bool:
        return isinstance(v, bool)

    def describe(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def accepts(self, v) -> bool:
        return v in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class Text:
    """A string, checked by `parse` when given (it raises ValueError or ImetError when it refuses)."""

    what: str = "a string"
    parse: Callable[[str], Any] | None = None
    path: bool = False  # a file name (the CLI checks it exists)

    def accepts(self, v) -> bool:
        if not isinstance(v, str):
            return False
        if self.parse is not None:
            try:
                self.parse(v)
            except (ValueError, ImetError):
                return False
        return True

    def describe(self) -> str:
        return self.what


Constraint = Int | Float | Bool | Choice | Text


@dataclass(frozen=True)
class Param:
    """One head parameter: the values it takes and one line of help (its default is in the signature)."""

    check: Constraint
    help: str
    none: str | None = None  # what None means, when None is allowed (e.g. "no limit")

    def accepts(self, value) -> bool:
        return (value is None and self.none is not None) or self.check.accepts(value)

    def describe(self) -> str:
        return self.check.describe() + (f", or None ({self.none})" if self.none is not None else "")


def check_values(head: str, specs: dict[str, Param], values: dict[str, object]) -> None:
    """Refuse the first value outside its parameter's constraint, naming the head, parameter and value."""
    for name, spec in specs.items():
        value = values[name]
        if not spec.accepts(value):
            raise ParamError(f"{head}: {name} must be {spec.describe()}, not {value!r}", [name])
