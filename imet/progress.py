"""Progress of long steps: one tqdm bar (rate and ETA) on a terminal, a logged line per interval elsewhere.

Every step that can take more than a few seconds (featurize, fit epochs, boosters, beam decoding, predict,
evaluate, report) counts its work through `progress`. On a terminal the bar redraws on stderr; when stderr
is a file or a pipe (CI, nohup, a Kaggle kernel log) the bar's line is logged at INFO every `LINE_SECONDS`
and at the end, so logs stay readable. A step shorter than `DELAY_SECONDS` shows nothing, and nothing
shows when the `imet` logger is quieter than INFO (`imet -q`).
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterable

from tqdm import tqdm

log = logging.getLogger("imet.progress")
LINE_SECONDS = 30.0  # seconds between two logged progress lines when stderr is not a terminal
DELAY_SECONDS = 3.0  # a step shows progress only once it has run this long


class _LoggedLines(tqdm):
    """tqdm whose every display is one logged line instead of a redrawn bar."""

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        log.info("%s", (msg if msg is not None else self.__str__()).strip())


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "views",
             enabled: bool = True, leave: bool = True) -> tqdm:
    """A tqdm over `iterable` (or to `update` by hand up to `total`) that shows rate and ETA, as the module says.

    Use it as a context manager (or close it) so that the final count is shown. `leave=False`: a terminal
    bar is cleared when done (for steps inside a bigger one, such as the val predictions of each epoch).
    """
    disable = not enabled or not log.isEnabledFor(logging.INFO)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                    dynamic_ncols=True, delay=DELAY_SECONDS, leave=leave)
    return _LoggedLines(iterable, total=total, desc=desc, unit=unit, disable=disable, mininterval=LINE_SECONDS,
                        delay=DELAY_SECONDS,
                        file=io.StringIO(),  # the lines go to the log; tqdm's own writes go nowhere
                        bar_format="{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), "
                                              "{rate_fmt}, {elapsed} elapsed, ETA {remaining}")
