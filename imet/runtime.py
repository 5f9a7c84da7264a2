"""Where torch work runs: the one device choice, and the pass-through collate of the DataLoaders."""

from __future__ import annotations

import os

import torch

from imet.errors import ImetError, ParamError

WORKERS_PER_CORE = 4  # DataLoader workers at most: each holds a decoder, a batch and its own memory


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def max_workers(n_cores: int | None = None) -> int:
    """The most DataLoader workers a command starts: WORKERS_PER_CORE per core."""
    return WORKERS_PER_CORE * (n_cores or cores())


def check_workers(workers: int | None, n_cores: int | None = None) -> None:
    """Refuse more workers than the machine's bound (a typo such as 100000 forked 130+ processes and 10 GB)."""
    if workers is not None and workers > max_workers(n_cores):
        raise ParamError(f"workers {workers} is more than {max_workers(n_cores)} ({WORKERS_PER_CORE} per core, "
                         f"{n_cores or cores()} cores here)", ["workers"])


def pick_device(name: str, who: str = "") -> torch.device:
    """auto: CUDA when present, else the CPU; cuda (or cuda:N) without a CUDA device is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ImetError(f"{who + ': ' if who else ''}device {name}: no CUDA device is available here "
                        "(use cpu or auto)")
    return torch.device(name)


def identity(x):
    """The DataLoader collate of datasets whose items are already whole batches."""
    return x
