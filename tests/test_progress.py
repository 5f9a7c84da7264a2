"""Progress and logging: logged lines with rate and ETA off a terminal, -q/-v, library code never prints."""

from __future__ import annotations

import logging

import numpy as np
from click.testing import CliRunner

from imet import progress as progress_module
from imet.cli import cli
from imet.heads import make_head
from imet.progress import progress
from imet.store import ArrayStore


def test_off_a_terminal_progress_is_logged_lines_with_rate_and_eta(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "LINE_SECONDS", 0.0)
    monkeypatch.setattr(progress_module, "DELAY_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="imet"), progress(total=3, desc="work", unit="views") as bar:
        for _ in range(3):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "imet.progress"]
    assert lines and all("\r" not in line and "\n" not in line for line in lines)
    assert lines[-1].startswith("work: 3/3 views (100%), ") and "views/s" in lines[-1] and "ETA" in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imet"), progress(total=3, desc="quiet") as bar:
        bar.update(3)
    assert not caplog.records  # -q: no progress


def test_short_steps_show_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="imet"), progress(total=2, desc="short") as bar:
        bar.update(2)  # well under DELAY_SECONDS
    assert not caplog.records


def test_library_code_never_prints(capsys, caplog):
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 3)) < 0.4).astype(np.uint8)
    store = ArrayStore(pooled=rng.normal(size=(40, 4)).astype(np.float32), targets=targets,
                       split=["train"] * 30 + ["val"] * 10)
    with caplog.at_level(logging.INFO, logger="imet"):
        make_head("linear", epochs=2).fit(store)
    assert capsys.readouterr() == ("", "")
    epochs = [r.getMessage() for r in caplog.records if r.name == "imet.heads.linear"]
    assert len(epochs) == 2 and epochs[0].startswith("linear epoch 1/2: loss ")


def test_cli_quiet_and_verbose(tiny_store, tmp_path):
    runner = CliRunner()
    args = ["fit", "--store", str(tiny_store), "--head", "linear", "--epochs", "1", "--out", str(tmp_path / "m.pt")]
    loud = runner.invoke(cli, args)
    assert loud.exit_code == 0 and "linear epoch 1/1: loss" in loud.output
    quiet = runner.invoke(cli, ["-q", *args])
    assert quiet.exit_code == 0 and "epoch" not in quiet.output and "wrote" in quiet.output
    verbose = runner.invoke(cli, ["-v", *args])
    assert verbose.exit_code == 0 and "INFO imet.heads.linear: linear epoch 1/1" in verbose.output
