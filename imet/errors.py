"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations

from collections.abc import Sequence


class ImetError(Exception):
    """Bad input or a refused operation. The message names the file at fault and the problem."""

    exit_code = 2  # the CLI's exit status for it


class WeightsUnavailable(ImetError):
    """The ImageNet weights are neither in the torch cache nor downloadable. Its own exit status, so a script
    (the Makefile's demo) can fall back to other weights on this failure and on no other."""

    exit_code = 3


class ParamError(ImetError, ValueError):
    """A head parameter out of its range, of the wrong type, or contradicting another. `names` lists the
    parameters at fault (the CLI shows them as its options)."""

    def __init__(self, message: str, names: Sequence[str]):
        super().__init__(message)
        self.names = tuple(names)


def where(path, row: int | None = None) -> str:
    """`path` or `path, line N` for error messages (the file's line number; the header is line 1)."""
    return f"{path}, line {row}" if row is not None else str(path)


def one_line(message: str) -> str:
    """An error message as one line: a DataLoader worker's error comes back as "Caught ImetError in
    DataLoader worker process 0.\nOriginal Traceback ...", whose last line holds the original message."""
    if "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return message
