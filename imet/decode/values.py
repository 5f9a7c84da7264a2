"""Decoding values read from files (model, blend, stack and probability files), checked by type and range.

JSON and torch files hand back whatever was written: a threshold stored as the string "0.3" compared above
every probability (every label on), NaN below none (one label). Each value a decoder uses goes through one of
these, which refuse what is not a plain number of the kind and range the format says (ValueError naming it).
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def real(value, what: str, low: float = 0.0, high: float = 1.0) -> float:
    """A real number (not a bool, not a string), finite, in [low, high]."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    if not low <= value <= high:
        raise ValueError(f"{what} is {value!r}, outside [{low:g}, {high:g}]")
    return float(value)


def count(value, what: str, low: int = 0, high: int | None = None) -> int:
    """An integer (not a bool, not a float, not a string) in [low, high]."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} is {value!r}, not an integer")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{what} is {value!r}, outside {low}..{'' if high is None else high}")
    return int(value)


def reals(values, what: str, n: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(n,) float64 from a list of n real numbers in [low, high]."""
    if not isinstance(values, list | tuple | np.ndarray) or len(values) != n:
        raise ValueError(f"{what} must be a list of {n} numbers, not {type(values).__name__} of "
                         f"{len(values) if hasattr(values, '__len__') else 'no'} values")
    return np.array([real(v, f"{what}[{i}]", low, high) for i, v in enumerate(values)], dtype=np.float64)
