"""One map head trained across processes: `torchrun ... -m imet fit --head csra|mldecoder|attn_rnn`.

torch's DistributedDataParallel (NCCL on GPUs, gloo on the CPU) over the one memory-mapped store, with the
single-process step kept exactly:
- Every rank draws the same shuffled global batches (the head's seed) and reads only its contiguous share
  of each (`Ranks.share`), so the global batch is the single process's.
- Each rank's mean loss is scaled by world x its share / the global batch before DDP averages the
  gradients, so a step's gradient is the global batch's mean gradient even when the last batch does not
  split evenly. A rank whose share of a short last batch is empty computes on one view with weight 0: no
  view is counted twice.
- Only rank 0 scores val (early stopping; the score is broadcast so every rank stops at the same epoch),
  tunes decoding and writes the model (atomically); the other ranks return quietly once training is done.
- A rank that raises or dies makes the others fail at their next collective (gloo at once; a rank that
  hangs after IMET_DIST_TIMEOUT seconds, 1800 by default) or be stopped by torchrun's SIGTERM; each prints
  one line and nothing is written.
- linear, linear_hog and lgbm are refused under torchrun (one line): linear heads read pooled vectors and
  train in one process, lgbm uses a machine's cores through its own threads (n_jobs), and a rank-0-only run
  would hold the other ranks' GPUs idle without saying so.

Dropout draws differ per rank, so heads with dropout equal single-process training in distribution only;
without dropout the weights agree to float rounding (tests/test_ddp.py).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from imet.errors import ImetError, one_line

if TYPE_CHECKING:
    from imet.store import FeatureStore

DDP_HEADS = ("attn_rnn", "csra", "mldecoder")  # heads trained by train_epochs over the maps
TIMEOUT_ENV, TIMEOUT_SECONDS = "IMET_DIST_TIMEOUT", 1800  # longest wait at a collective (rank 0 scoring val)
log = logging.getLogger("imet.heads.ddp")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1: a plain single-process fit)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (np.array_split's: the first n % world get one
        more)."""
        q, r = divmod(n, self.world)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def share(self, batch: np.ndarray) -> np.ndarray:
        """This rank's views of a global batch; one view of it (weighted 0 by `weight`) when the share is empty."""
        lo, hi = self.bounds(len(batch))
        return batch[lo:hi] if hi > lo else batch[-1:]

    def count(self, n_global: int) -> int:
        """Views of a global batch of n_global that this rank counts (0 for a padding view)."""
        lo, hi = self.bounds(n_global)
        return hi - lo

    def step_views(self, step: int, batch_size: int, n_train: int, local: int) -> int:
        """Views of global batch `step` of `minibatches(n_train, batch_size)` on all ranks, given this rank's
        batch of `local` views (checked against its share: a head batching otherwise cannot run here)."""
        if self.world == 1:
            return local
        n_global = min(batch_size, n_train - step * batch_size)
        if n_global < 1 or local != max(self.count(n_global), 1):
            raise ImetError(f"rank {self.rank}: batch {step} has {local} views, not its share of "
                            f"minibatches({n_train}, {batch_size}); this head cannot train across processes")
        return n_global

    def weight(self, n_global: int) -> float:
        """Factor on this rank's mean loss so that DDP's average of the gradients is the global mean's."""
        return self.world * self.count(n_global) / n_global

    def wrap(self, net: nn.Module, batch_loss: Callable, device: torch.device | None = None) -> Callable:
        """`batch_loss` run through DistributedDataParallel over `net` (itself in one process). From here on
        each rank draws its own dropout masks (seeded by the head's seed and the rank)."""
        if self.world == 1:
            return batch_loss
        torch.manual_seed(torch.initial_seed() + self.rank)
        cuda = device is not None and device.type == "cuda"
        return nn.parallel.DistributedDataParallel(_Loss(net, batch_loss), device_ids=[device] if cuda else None)

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks (every rank gets it)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return float(t.item())

    def from_main(self, compute: Callable[[], float]) -> float:
        """`compute()` run on rank 0 only, its value given to every rank (val scores for early stopping)."""
        if self.world == 1:
            return compute()
        t = torch.tensor([compute() if self.main else 0.0], dtype=torch.float64, device=_collective_device())
        dist.broadcast(t, 0)
        return float(t.item())


class _Loss(nn.Module):
    """A module whose forward is the head's batch loss, so DDP sees the whole step (attn_rnn's loss is a method,
    not `forward`) and reduces the gradients of `net`'s parameters."""

    def __init__(self, net: nn.Module, batch_loss: Callable):
        super().__init__()
        self.net, self.batch_loss = net, batch_loss

    def forward(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.batch_loss(batch)


_current = Ranks()


def current() -> Ranks:
    """The ranks of the fit in progress (rank 0 of 1 outside `ranks_for_fit`)."""
    return _current


@contextlib.contextmanager
def ranks_for_fit(ranks: Ranks) -> Iterator[Ranks]:
    global _current
    _current = ranks
    try:
        yield ranks
    finally:
        _current = Ranks()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def timeout() -> datetime.timedelta:
    value = os.environ.get(TIMEOUT_ENV, str(TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ImetError(f"{TIMEOUT_ENV}={value!r}: give the longest wait at a collective in seconds (> 0)")
    return datetime.timedelta(seconds=seconds)


class Fittable(Protocol):
    """What `fit_distributed` needs of a head (imet.heads.base imports this module: no import of it here)."""

    name: str
    device: str

    def fit(self, store: FeatureStore) -> object: ...


def fit_distributed(model: Fittable, store: FeatureStore, world: int) -> bool:
    """Fit `model` on every torchrun rank: True on rank 0, which holds the tuned model for the caller to write;
    False on the others. Any failure on any rank: one line (ImetError) on each rank still alive."""
    from imet.runtime import start_ranks

    if model.name not in DDP_HEADS:
        raise ImetError(f"head {model.name} trains in one process (torchrun trains {', '.join(DDP_HEADS)}); "
                        "run `imet fit` without torchrun")
    wait = timeout()
    ranks = Ranks(int(os.environ["RANK"]), world)
    where = f"rank {ranks.rank} of {world}"
    if not ranks.main:
        logging.getLogger("imet").setLevel(logging.WARNING)  # one voice: rank 0's epoch lines and progress
    start_ranks(model.device, model.name, wait)
    default = signal.signal(signal.SIGTERM, _terminated)  # torchrun stops the others when one rank fails
    try:
        with ranks_for_fit(ranks):
            model.fit(store)
    except ImetError as e:
        raise ImetError(f"{where}: {one_line(str(e))}; no model written") from None
    except Exception as e:  # a peer gone (gloo: connection closed), a timeout, an error of this rank
        log.debug("%s failed", where, exc_info=True)
        raise ImetError(f"{where}: training stopped ({type(e).__name__}: {_reason(e)}); a rank failed, hung or "
                        "was killed: no model written") from None
    finally:
        signal.signal(signal.SIGTERM, default)
        dist.destroy_process_group()
    return ranks.main


def _terminated(signum, frame) -> None:
    raise ImetError("stopped by SIGTERM (torchrun stops every rank when one fails)")


def _reason(e: BaseException) -> str:
    """The gist of an error for one line: gloo's "[.../pair.cc:561] Connection closed by peer [addr]:port. This
    is typically ..." becomes "Connection closed by peer [addr]:port"."""
    text = one_line(str(e)).strip()
    text = text.splitlines()[0] if text else ""
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ", 1)[0][:200]
