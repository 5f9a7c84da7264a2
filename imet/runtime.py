"""Where torch work runs: the one device choice, and the pass-through collate of the DataLoaders."""

from __future__ import annotations

import torch

from imet.errors import ImetError


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
