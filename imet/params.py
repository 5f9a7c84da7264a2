"""Parameters declared once: a constraint and one line of help per name (`Param`), the default kept in one
place (a constructor's signature or a dataclass field). Heads declare theirs (heads/params.py re-exports these
types), featurize and the codec theirs; the CLI makes its options from the declarations, and `check_values`
refuses a value naming the parameter, never a command-line flag.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imet.errors import ImetError, ParamError

__all__ = ["LABELS", "SEED", "WORKERS", "Bool", "Bound", "Choice", "Float", "Int", "Param", "ParamError", "Text",
           "check_values"]


@dataclass(frozen=True)
class Bound:
    """An upper bound known only when a value is checked: from the data (`labels`: the store's label count;
    `channels`: the backbone's) or the machine (`workers`: runtime.max_workers()). Unknown: not checked."""

    name: str
    what: str  # for messages, given the value, e.g. "the {} labels"

    def value(self, bounds: dict[str, int | None]) -> int | None:
        return bounds.get(self.name)


LABELS = Bound("labels", "the {} labels")
WORKERS = Bound("workers", "{} workers: 4 per core")
SEED = 2**32 - 1  # seeds are 0..2**32-1 (numpy's and torch's range in common)
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Int:
    """An integer in [low, high] (None: unbounded; a Bound: known when checked)."""

    low: int | None = None
    high: int | Bound | None = None

    def accepts(self, v, bounds: dict[str, int | None] | None = None) -> bool:
        high = self.high.value(bounds or {}) if isinstance(self.high, Bound) else self.high
        return (isinstance(v, numbers.Integral) and not isinstance(v, bool) and (self.low is None or v >= self.low)
                and (high is None or v <= high))

    def describe(self, bounds: dict[str, int | None] | None = None) -> str:
        high = self.high.value(bounds or {}) if isinstance(self.high, Bound) else self.high
        if high is None:
            return "an integer" + ("" if self.low is None else f" >= {self.low}")
        what = f" (at most {self.high.what.format(high)})" if isinstance(self.high, Bound) else ""
        return f"an integer in {self.low}..{high}{what}"


@dataclass(frozen=True)
class Float:
    """A finite real number between low and high, each bound open or closed (None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def accepts(self, v, bounds: dict | None = None) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not abs(v) <= FLOAT32_MAX:
            return False  # NaN, inf, or beyond float32 (the tensors' dtype: 1e308 overflowed inside Adam)
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        below = self.high is None or (v < self.high if self.high_open else v <= self.high)
        return above and below

    def describe(self, bounds: dict | None = None) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a number" + (" " + " and ".join(parts) if parts else "") + (
            " (and at most float32's largest, 3.4e38)" if self.high is None else "")


@dataclass(frozen=True)
class Bool:
    def accepts(self, v, bounds: dict | None = None) -> bool:
        return isinstance(v, bool)

    def describe(self, bounds: dict | None = None) -> str:
        return "True or False"


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def accepts(self, v, bounds: dict | None = None) -> bool:
        return isinstance(v, str) and v in self.values

    def describe(self, bounds: dict | None = None) -> str:
        return "one of " + ", ".join(self.values)


@dataclass(frozen=True)
class Text:
    """A string, checked by `parse` when given (it raises ValueError or ImetError when it refuses)."""

    what: str = "a string"
    parse: Callable[[str], Any] | None = None
    path: bool = False  # a file name (the CLI checks it exists)

    def accepts(self, v, bounds: dict | None = None) -> bool:
        if not isinstance(v, str):
            return False
        if self.parse is not None:
            try:
                self.parse(v)
            except (ValueError, ImetError):
                return False
        return True

    def describe(self, bounds: dict | None = None) -> str:
        return self.what


Constraint = Int | Float | Bool | Choice | Text


@dataclass(frozen=True)
class Param:
    """One parameter: the values it takes and one line of help (its default is kept where it is declared)."""

    check: Constraint
    help: str
    none: str | None = None  # what None means, when None is allowed (e.g. "no limit")

    def accepts(self, value, bounds: dict | None = None) -> bool:
        return (value is None and self.none is not None) or self.check.accepts(value, bounds)

    def describe(self, bounds: dict | None = None) -> str:
        return self.check.describe(bounds) + (f", or None ({self.none})" if self.none is not None else "")


def check_values(owner: str, specs: dict[str, Param], values: dict[str, object],
                 bounds: dict[str, int | None] | None = None) -> None:
    """Refuse the first value outside its parameter's constraint, naming the owner (a head, featurize), the
    parameter and the value; `bounds` gives the Bounds known now (labels, workers, channels)."""
    for name, spec in specs.items():
        value = values[name]
        if not spec.accepts(value, bounds):
            raise ParamError(f"{owner}: {name} must be {spec.describe(bounds)}, not {value!r}", [name])
