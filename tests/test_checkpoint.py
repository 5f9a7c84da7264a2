"""`imet fit --metrics/--tensorboard/--checkpoint`: one row per epoch run, written as training goes; a fit killed
with SIGKILL mid-epoch and run again with the same command writes the bytes of an uninterrupted fit."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import make_store

from imet.cli import cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
KILLED = Path(__file__).parent / "fit_killed.py"
COLUMNS = ["head", "epoch", "loss", "val_f2", "lr", "seconds", "views_per_s"]
SMALL = {"attn_rnn": ["--start-epochs", "2", "--hidden", "8", "--attention-dim", "8", "--pred-dim", "8"],
         "mldecoder": ["--width", "16", "--heads", "2"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("ckpt") / "s.h5", n_images=40)


def fit(store: Path, out: Path, head: str, *extra: str, code: int = 0):
    """`imet fit` in this process on one thread, as the killed subprocess runs (ENV): float sums over two threads
    differ in their last bits, so fits on other thread counts need not write the same bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(cli, ["fit", "--store", str(store), "--head", head, "--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == code, result.output
    return result


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == COLUMNS
            return list(reader)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_csv_has_a_finite_row_per_epoch(store, tmp_path):
    fit(store, tmp_path / "m.pt", "linear", "--epochs", "3", "--batch-size", "16", "--metrics", str(tmp_path / "m.csv"))
    rows = read_rows(tmp_path / "m.csv")
    assert [(r["head"], r["epoch"]) for r in rows] == [("linear", "1"), ("linear", "2"), ("linear", "3")]
    for r in rows:
        values = [float(r[k]) for k in COLUMNS[2:]]
        assert all(math.isfinite(v) for v in values), r
        assert 0 <= float(r["val_f2"]) <= 1 and float(r["views_per_s"]) > 0
    lrs = [float(r["lr"]) for r in rows]
    assert 0 < lrs[2] < lrs[1] < lrs[0] <= 1e-3  # cosine annealing from --lr's default


def test_metrics_jsonl_stops_with_early_stopping(store, tmp_path):
    result = fit(store, tmp_path / "m.pt", "csra", "--epochs", "30", "--patience", "1", "--lr", "0.3",
                 "--metrics", str(tmp_path / "m.jsonl"))
    rows = read_rows(tmp_path / "m.jsonl")
    run = re.findall(r"csra epoch (\d+)/30: loss ([\d.]+), val F2 ([\d.]+)", result.output)
    assert 1 < len(rows) < 30 and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert [(str(r["epoch"]), f"{r['loss']:.4f}", f"{r['val_f2']:.4f}") for r in rows] == run


def test_start_phases_and_lgbm_get_their_rows(store, tmp_path):
    fit(store, tmp_path / "a.pt", "attn_rnn", "--epochs", "1", *SMALL["attn_rnn"], "--metrics", str(tmp_path / "a.csv"))
    assert [(r["head"], r["epoch"]) for r in read_rows(tmp_path / "a.csv")] == [("csra", "1"), ("csra", "2"),
                                                                               ("attn_rnn", "1")]
    fit(store, tmp_path / "g.pt", "lgbm", "--rounds", "3", "--min-leaf", "2", "--metrics", str(tmp_path / "g.jsonl"))
    (row,) = read_rows(tmp_path / "g.jsonl")
    assert row["head"] == "lgbm" and row["epoch"] is None and row["loss"] is None and 0 <= row["val_f2"] <= 1


def test_recording_does_not_change_the_model(store, tmp_path):
    fit(store, tmp_path / "a.pt", "csra", "--epochs", "2")
    fit(store, tmp_path / "b.pt", "csra", "--epochs", "2", "--metrics", str(tmp_path / "m.csv"),
        "--checkpoint", str(tmp_path / "ck"))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


@pytest.mark.parametrize("name, message", [("m.txt", "m.txt: --metrics writes .csv or .jsonl"),
                                           ("no/m.csv", "no")])
def test_a_bad_metrics_path_is_refused_before_work(store, tmp_path, name, message):
    result = fit(store, tmp_path / "m.pt", "linear", "--metrics", str(tmp_path / name), code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_tensorboard_is_optional(store, tmp_path, monkeypatch):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        result = fit(store, tmp_path / "m.pt", "linear", "--tensorboard", str(tmp_path / "tb"), code=2)
        assert "--tensorboard needs the optional tensorboard package" in result.output
        assert not (tmp_path / "m.pt").exists()
    scalars = []

    class Writer:  # stands for torch's SummaryWriter: what the rows hand it
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    fit(store, tmp_path / "m.pt", "linear", "--epochs", "2", "--tensorboard", str(tmp_path / "tb"))
    assert [(tag, step) for tag, step, _ in scalars] == [(f"linear/{k}", e) for e in (1, 2)
                                                          for k in ("loss", "val_f2", "lr", "views_per_s")]


RESUMED = {  # kill at phase:epoch; csra stops early after the resume, keeping an epoch from before the kill
    "csra": ("0:3", ["--epochs", "8", "--patience", "3"]), "linear": ("0:2", ["--epochs", "4"]),
    "attn_rnn": ("1:1", ["--epochs", "3", *SMALL["attn_rnn"]]),  # killed after its csra start (phase 0)
    "mldecoder": ("1:1", ["--epochs", "2", *SMALL["mldecoder"]])}  # its csra start runs as many epochs: 2


@pytest.mark.parametrize("head", sorted(RESUMED))
def test_a_fit_killed_mid_epoch_resumes_to_the_same_bytes(store, tmp_path, head):
    kill_at, params = RESUMED[head]
    args = ["--store", str(store), "--head", head, "--batch-size", "8", *params]
    fit(store, tmp_path / "whole.pt", head, *args[4:])
    ck, metrics, out = tmp_path / "ck", tmp_path / "m.csv", tmp_path / "resumed.pt"
    recorded = ["--out", str(out), "--checkpoint", str(ck), "--metrics", str(metrics)]
    killed = subprocess.run([sys.executable, str(KILLED), kill_at, *args, *recorded], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    phase, epochs = (int(x) for x in kill_at.split(":"))
    before = read_rows(metrics)
    assert len(before) == epochs + phase * 2  # attn_rnn: its csra start's 2 epochs came first
    result = fit(store, out, head, *args[4:], *recorded[2:])
    assert "resuming after epoch" in result.output
    if "--patience" in params:
        assert re.search(r"no better val F2 for 3 epochs; keeping epoch [1-3]\n", result.output), result.output
    assert out.read_bytes() == (tmp_path / "whole.pt").read_bytes()
    after = read_rows(metrics)
    assert after[:len(before)] == before and [r["epoch"] for r in after[len(before):]] == [
        str(e) for e in range(epochs + 1, len(after) - phase * 2 + 1)]


@pytest.mark.parametrize("head, where, suffix", [("linear", "0:2:row", ".csv"), ("attn_rnn", "1:1:row", ".jsonl"),
                                                  ("linear", "0:1:half", ".jsonl"), ("attn_rnn", "0:1:half", ".csv")])
def test_a_resumed_log_holds_each_epoch_once(store, tmp_path, head, where, suffix):
    """Killed after writing an epoch's row but before saving its checkpoint (`row`), or half-way through the row
    (`half`), the fit runs that epoch again when resumed: the log drops what the checkpoint does not hold, so it
    ends as the uninterrupted fit's, row for row."""
    args = ["--head", head, "--batch-size", "8", *RESUMED[head][1]]
    whole = tmp_path / f"whole{suffix}"
    fit(store, tmp_path / "whole.pt", head, *args[2:], "--metrics", str(whole))
    metrics, out = tmp_path / f"m{suffix}", tmp_path / "resumed.pt"
    recorded = ["--checkpoint", str(tmp_path / "ck"), "--metrics", str(metrics)]
    killed = subprocess.run([sys.executable, str(KILLED), where, "--store", str(store), *args, "--out", str(out),
                             *recorded], env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    lines = metrics.read_text().splitlines(keepends=True)
    epoch = int(where.split(":")[1])
    if where.endswith("row"):  # the row of the epoch after the checkpoint's, which the resumed fit runs again
        last = read_rows(metrics)[-1]
        assert (last["head"], str(last["epoch"])) == (head, str(epoch + 1))
    else:
        assert not lines[-1].endswith("\n")
    fit(store, out, head, *args[2:], *recorded)
    assert out.read_bytes() == (tmp_path / "whole.pt").read_bytes()
    same = ("head", "epoch", "loss", "val_f2", "lr")  # not the seconds
    assert [[r[k] for k in same] for r in read_rows(metrics)] == [[r[k] for k in same] for r in read_rows(whole)]


def test_a_checkpoint_of_another_fit_is_refused(store, tmp_path):
    ck = str(tmp_path / "ck")
    fit(store, tmp_path / "m.pt", "linear", "--epochs", "2", "--checkpoint", ck)
    result = fit(store, tmp_path / "m.pt", "linear", "--epochs", "3", "--checkpoint", ck, code=2)
    assert "this checkpoint is of another fit (epochs 2 there, 3 here)" in result.output
    other = make_store(tmp_path / "other.h5", n_images=40, seed=1)
    result = fit(other, tmp_path / "m.pt", "linear", "--epochs", "2", "--checkpoint", ck, code=2)
    assert "store fingerprint" in result.output and len(result.output.strip().splitlines()) == 1
    result = fit(store, tmp_path / "m.pt", "csra", "--epochs", "2", "--checkpoint", ck, code=2)
    assert "head linear there, csra here" in result.output


def test_folds_and_lgbm_take_no_checkpoint(store, tmp_path):
    result = fit(store, tmp_path / "m.pt", "linear", "--folds", "2", "--checkpoint", str(tmp_path / "ck"), code=2)
    assert "--checkpoint records one fit" in result.output
    result = fit(store, tmp_path / "m.pt", "lgbm", "--checkpoint", str(tmp_path / "ck"), code=2)
    assert "--checkpoint: lgbm does not train in epochs" in result.output
    assert not (tmp_path / "ck").exists() and not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_two_ranks_killed_mid_epoch_resume_to_the_same_bytes(tmp_path):
    """Under torchrun, rank 0 alone writes the checkpoint and the rows; every rank resumes from it."""
    from imet.planted import write_planted_store

    store = tmp_path / "p.h5"
    write_planted_store(store, n_images=80, channels=16, grid=4, hog=16, views=(1, 3))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = ["--store", str(store), "--head", "csra", "--epochs", "3", "--batch-size", "7", "--workers", "0"]
    recorded = ["--checkpoint", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.csv")]
    whole, out = tmp_path / "whole.pt", tmp_path / "resumed.pt"
    for command in ([*torchrun, "-m", "imet", "fit", *args, "--out", str(whole)],
                    [*torchrun, str(KILLED), "0:1", *args, "--out", str(out), *recorded],
                    [*torchrun, "-m", "imet", "fit", *args, "--out", str(out), *recorded]):
        done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
        assert (done.returncode != 0) == (str(KILLED) in command), done.stderr
        if str(KILLED) in command:
            assert not out.exists() and [r["epoch"] for r in read_rows(tmp_path / "m.csv")] == ["1"]
    assert out.read_bytes() == whole.read_bytes()
    assert [r["epoch"] for r in read_rows(tmp_path / "m.csv")] == ["1", "2", "3"]


def test_temp_files_of_a_run_killed_while_saving_are_removed(store, tmp_path):
    from imet.files import temp_name

    ck = tmp_path / "ck"
    fit(store, tmp_path / "m.pt", "linear", "--epochs", "2", "--checkpoint", str(ck))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = temp_name(ck / "phase-1.pt").name.replace(f"-{os.getpid()}.", f"-{dead.stdout.strip()}.")
    live = temp_name(ck / "phase-0.pt")  # this process's: still being written, kept
    (ck / stale).write_bytes(b"half a checkpoint")
    live.write_bytes(b"in progress")
    fit(store, tmp_path / "m.pt", "linear", "--epochs", "2", "--checkpoint", str(ck))
    assert not (ck / stale).exists() and live.exists()
