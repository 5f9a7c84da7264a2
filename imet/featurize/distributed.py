"""Featurizing on many processes: torchrun ranks or scheduler-launched `--shard I/N` jobs.

Each rank (or shard job) writes the contiguous run of whole batches that is its share into its own
shard file next to the output; under torchrun, rank 0 merges the shards after a barrier and removes
them. A killed rank leaves a resumable shard: rerunning the same command finishes it and merges.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch.distributed as dist

from imet import store
from imet.featurize.pipeline import Options, featurize, shard_path
from imet.runtime import start_ranks, torchrun_world


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


def _torchrun(data_dir: Path, out: Path, opts: Options, device: str, workers: int | None, progress: bool) -> str:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    picked = start_ranks(device, "featurize", datetime.timedelta(days=7))  # the merge waits for the slowest shard
    device = str(picked) if picked.type == "cuda" else device
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
