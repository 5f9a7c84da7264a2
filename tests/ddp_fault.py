"""`imet` under torchrun with a planted failure (tests/test_ddp.py): the rank IMET_FAIL_RANK raises
(IMET_FAIL=raise), kills itself with SIGKILL (IMET_FAIL=kill) or stops (IMET_FAIL=stop: SIGSTOP, a hung rank)
when it reads its third training batch."""

from __future__ import annotations

import os
import signal

from imet.cli import cli
from imet.heads import maps

_map_loader = maps.map_loader


def failing_loader(*args, **kwargs):
    for k, batch in enumerate(_map_loader(*args, **kwargs)):
        if k == 2 and os.environ["RANK"] == os.environ["IMET_FAIL_RANK"]:
            if os.environ["IMET_FAIL"] in ("kill", "stop"):
                os.kill(os.getpid(), signal.SIGKILL if os.environ["IMET_FAIL"] == "kill" else signal.SIGSTOP)
            raise RuntimeError("planted failure")
        yield batch


if __name__ == "__main__":
    maps.map_loader = failing_loader
    cli(prog_name="imet")
