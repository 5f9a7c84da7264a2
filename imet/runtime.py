"""Where torch work runs: the one device choice, torchrun's ranks, and the pass-through collate of the
DataLoaders."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import os

import torch
import torch.distributed as dist

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


def autocast(device: torch.device, amp: str = "bf16") -> torch.autocast:
    """bf16 autocast on CUDA unless `amp` is none; the CPU always computes in float32 (bf16 there is slower and
    gains nothing)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and amp == "bf16")


# glibc's mallopt parameters (malloc.h) and the defaults that kept_heap puts back
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def kept_heap():
    """Inside: freed memory stays in this process for the next allocation (glibc; elsewhere nothing changes).

    By default glibc serves each large block (a batch's activations) with a fresh mmap and returns it on
    free, so every CPU forward faults its pages in again: ~17,000 page faults per view inside featurize
    against ~7,000 for the same forward run back to back, 5-15 % of its time (docs/backbones.md). Here no
    block is mmapped and the heap's top is not trimmed; on leaving, glibc's defaults come back and the
    free memory is returned. Threads' arenas and forked workers inherit the setting while it holds.
    """
    global _kept
    libc = _libc()
    if libc is None:
        yield
        return
    if not _kept:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    _kept += 1
    try:
        yield
    finally:
        _kept -= 1
        if not _kept:  # the outermost one puts glibc's defaults back (val scoring inside training is nested)
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


_kept = 0  # kept_heap contexts open now


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (mallopt and malloc_trim), else None (looked up once)."""
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return None
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def identity(x):
    """The DataLoader collate of datasets whose items are already whole batches."""
    return x


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_world(shard: tuple[int, int] | None = None) -> int:
    """WORLD_SIZE when this process is a torchrun rank (1 otherwise); refuses a partial or mixed setup."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ImetError(f"WORLD_SIZE={value!r} is not a number; unset it or run under torchrun") from None
    if world <= 1:
        return 1
    missing = [k for k in TORCHRUN_VARS if k not in os.environ]
    if missing:
        raise ImetError(f"WORLD_SIZE={world} is set but {', '.join(missing)} are not: launch with torchrun, "
                        "or unset WORLD_SIZE (featurize --shard I/N splits work among scheduler jobs)")
    if shard is not None:
        raise ImetError(f"--shard {shard[0]}/{shard[1]} and torchrun (WORLD_SIZE={world}) both split the work; "
                        "use one of them")
    return world


def start_ranks(device: str, who: str, timeout: datetime.timedelta) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) and return this rank's device: on CUDA
    the GPU LOCAL_RANK, made the current one so that "cuda" means it. A collective that waits longer than
    `timeout` (a rank hung or gone) raises instead of blocking for ever."""
    picked = pick_device(device, who)
    if picked.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ImetError(f"{who}: LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA device(s) here: give "
                            "torchrun --nproc-per-node at most the GPU count")
        picked = torch.device("cuda", local)
        torch.cuda.set_device(picked)
    dist.init_process_group("nccl" if picked.type == "cuda" else "gloo", timeout=timeout)
    return picked
