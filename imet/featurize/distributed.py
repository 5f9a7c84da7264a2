"""Featurizing on many processes: torchrun ranks or scheduler-launched `--shard I/N` jobs.

Each rank (or shard job) writes the contiguous run of whole batches that is its share into its own
shard file next to the output; under torchrun, rank 0 merges the shards after a barrier and removes
them. A killed rank leaves a resumable shard: rerunning the same command finishes it and merges.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from imet import store
from imet.errors import ImetError
from imet.featurize.pipeline import Options, featurize, shard_path
from imet.runtime import pick_device


def run_featurize(data_dir: Path, out: Path, opts: Options, *, device: str = "auto", workers: int | None = None,
                  shard: tuple[int, int] | None = None, progress: bool = True) -> str:
    """One process, a `--shard I/N` job, or a torchrun rank, decided by the arguments and environment."""
    world = torchrun_world(shard)
    if world > 1:
        return _torchrun(Path(data_dir), Path(out), opts, device, workers, progress)
    if shard is not None:
        report = featurize(data_dir, out, opts, device=device, workers=workers, shard=shard, progress=progress)
        return f"{report}\nshard {shard[0]}/{shard[1]} written; assemble all shards with `imet store merge`"
    return str(featurize(data_dir, out, opts, device=device, workers=workers, progress=progress))


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_world(shard: tuple[int, int] | None) -> int:
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
                        "or unset WORLD_SIZE (use --shard I/N for scheduler jobs)")
    if shard is not None:
        raise ImetError(f"--shard {shard[0]}/{shard[1]} and torchrun (WORLD_SIZE={world}) both split the work; "
                        "use one of them")
    return world


def _torchrun(data_dir: Path, out: Path, opts: Options, device: str, workers: int | None, progress: bool) -> str:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = pick_device(device, "featurize").type == "cuda"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(days=7))
    try:
        if out.exists():  # a finished (or single-process) store: rank 0 checks or resumes it alone
            text = str(featurize(data_dir, out, opts, device=device, workers=workers, progress=progress)) \
                if rank == 0 else ""
            dist.barrier()
            return text
        report = str(featurize(data_dir, out, opts, device=device, workers=workers, shard=(rank, world),
                               progress=progress and rank == 0))
        dist.barrier()
        if rank != 0:
            return f"rank {rank}: {report}"
        shards = [shard_path(out, i, world) for i in range(world)]
        store.merge(shards, out)
        for path in shards:
            path.unlink()
        return f"rank 0: {report}\nmerged {world} shards into {out} ({out.stat().st_blocks * 512 / 2**20:.1f} MiB)"
    finally:
        dist.destroy_process_group()
