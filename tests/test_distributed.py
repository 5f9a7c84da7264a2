"""Distributed featurization: torchrun ranks (gloo on CPU) and `--shard I/N` + `imet store merge` give the
bytes of a single process; merge refuses bad shard sets; a killed rank resumes.

Feature bytes match when every process uses the same number of intra-op threads: torchrun sets
OMP_NUM_THREADS=1 per rank, so the single-process reference here runs with it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imet import store
from imet.cli import cli

pytestmark = pytest.mark.slow
ARGS = ["--weights", "random", "--image-size", "64", "--batch-size", "4", "--workers", "0", "--limit", "3", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def featurize_cmd(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "imet", "featurize", str(data_dir), "--out", str(out), *ARGS, *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def feature_bytes(path: Path) -> dict[str, bytes]:
    fs = store.FeatureStore(path)
    return {k: np.asarray(fs.array(k)).tobytes() for k in (*fs.features, "status", "box", "error")}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "single.h5"
    run([sys.executable, *featurize_cmd(data_dir, out)])
    return out


def test_torchrun_two_ranks_equal_a_single_process(data_dir, reference, tmp_path):
    out = tmp_path / "store.h5"
    result = run([*TORCHRUN, *featurize_cmd(data_dir, out)])
    assert "merged 2 shards" in result.stdout
    assert feature_bytes(out) == feature_bytes(reference)
    assert store.read_header(out)["fingerprint"] == store.read_header(reference)["fingerprint"]
    assert out.read_bytes() == reference.read_bytes()  # the README's promise, at file level
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.h5"]  # shards removed after the merge


def test_shards_and_merge_equal_a_single_process(data_dir, reference, tmp_path):
    out = tmp_path / "store.h5"
    for i in range(3):
        run([sys.executable, *featurize_cmd(data_dir, out, "--shard", f"{i}/3")])
    shards = sorted(tmp_path.glob("store.shard-*-of-3.h5"))
    assert len(shards) == 3 and not out.exists()
    result = CliRunner().invoke(cli, ["store", "merge", *map(str, shards), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert feature_bytes(out) == feature_bytes(reference)
    assert all(p.exists() for p in shards)  # merge keeps its inputs
    assert out.read_bytes() == reference.read_bytes()


def test_merge_refuses_bad_shard_sets(data_dir, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run([sys.executable, *featurize_cmd(data_dir, a, "--shard", "0/2")])
    run([sys.executable, *featurize_cmd(data_dir, a, "--shard", "1/3")])
    run([sys.executable, *featurize_cmd(data_dir, b, "--shard", "1/2", "--view-seed", "1")])
    first, overlapping = tmp_path / "a.shard-0-of-2.h5", tmp_path / "a.shard-1-of-3.h5"
    other_seed = tmp_path / "b.shard-1-of-2.h5"
    cases = [
        ([first], "are in no shard"),
        ([first, overlapping], "overlap another shard"),
        ([first, other_seed], "settings differ"),
    ]
    for shards, message in cases:
        out = tmp_path / "merged.h5"
        result = CliRunner().invoke(cli, ["store", "merge", *map(str, shards), "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists() and not list(tmp_path.glob(".merged.h5*"))


def _rank_pid(rank: str, tag: str) -> int | None:
    """The pid of the torchrun worker with RANK=rank started by this test (its environment holds `tag`)."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and tag.encode() in env:
            return int(entry.name)
    return None


def test_a_killed_rank_resumes_and_merges(data_dir, reference, tmp_path):
    out = tmp_path / "store.h5"
    shard1 = tmp_path / "store.shard-1-of-2.h5"
    tag = f"IMET_TEST_RUN={os.getpid()}-{time.time_ns()}"
    env = {**ENV, tag.split("=")[0]: tag.split("=")[1]}
    proc = subprocess.Popen([*TORCHRUN, *featurize_cmd(data_dir, out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shard1.exists():
            status = store.FeatureStore(shard1, allow_incomplete=True).status
            pid = _rank_pid("1", tag)
            if (status != store.PENDING).sum() >= 4 and (status == store.PENDING).any() and pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    proc.wait(timeout=120)
    assert killed, "rank 1 finished before it could be killed"
    assert not out.exists() and shard1.exists()
    assert (store.FeatureStore(shard1, allow_incomplete=True).status == store.PENDING).any()
    result = run([*TORCHRUN, *featurize_cmd(data_dir, out)])
    assert "merged 2 shards" in result.stdout
    assert feature_bytes(out) == feature_bytes(reference)
