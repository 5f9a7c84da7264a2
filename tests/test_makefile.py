"""The Makefile's demo recipe: random weights only when featurize says the ImageNet weights are missing (exit
status 3); any other featurize failure stops the demo. The recipe runs with a fake `imet` that logs its calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from imet.cli import cli

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"

FAKE_IMET = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$*" in
  "featurize "*"--weights imagenet"*) echo "featurize: fake failure" >&2; exit "$FAKE_FEATURIZE_STATUS" ;;
esac
"""


def _demo(tmp_path: Path, featurize_status: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "imet").write_text(FAKE_IMET)
    (bin_dir / "imet").chmod(0o755)
    log = tmp_path / "calls.log"
    # -o: the venv stamp counts as up to date (nothing is installed); BIN points at the fake imet.
    run = subprocess.run(
        ["make", "-f", str(MAKEFILE), "-o", ".venv/.installed", "demo", f"BIN={bin_dir}", "DEMO=demo"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_FEATURIZE_STATUS": str(featurize_status)})
    return run, log.read_text().splitlines()


def _printed(run: subprocess.CompletedProcess) -> list[str]:
    """The lines the recipe printed (make also echoes each command, which holds the same text after `echo`)."""
    return [line for line in run.stdout.splitlines() if line.startswith("!!!")]


pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def test_demo_falls_back_to_random_weights_only_when_imagenet_is_missing(tmp_path):
    run, calls = _demo(tmp_path, 3)
    assert run.returncode == 0, run.stdout + run.stderr
    featurize = [c for c in calls if c.startswith("featurize ")]
    assert featurize == ["featurize demo/data --out demo/store.h5 --maps-dim 256 --maps-dtype int8 --weights imagenet",
                         "featurize demo/data --out demo/store.h5 --maps-dim 256 --maps-dtype int8 --weights random"]
    assert "!!! ImageNet weights are not available offline: featurizing with --weights random instead." in _printed(run)
    assert calls[-1].startswith("report ")  # the demo ran to its end


@pytest.mark.parametrize("status", [1, 2])
def test_demo_stops_on_any_other_featurize_failure(tmp_path, status):
    run, calls = _demo(tmp_path, status)
    assert run.returncode != 0
    assert calls == ["synth demo/data --images 300 --seed 0 --corrupt 5", "summary demo/data",
                     "featurize demo/data --out demo/store.h5 --maps-dim 256 --maps-dtype int8 --weights imagenet"]
    assert f"!!! featurize failed (exit status {status}; its message is above): the demo stops." in _printed(run)
    assert "featurize: fake failure" in run.stderr
    assert not any("not available offline" in line for line in _printed(run))


def test_featurize_exit_status_tells_missing_weights_from_bad_data(monkeypatch, tmp_path, data_dir):
    """The contract the Makefile relies on: 3 for missing ImageNet weights, 2 for any other refusal."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    missing = CliRunner().invoke(cli, ["featurize", str(data_dir), "--out", str(tmp_path / "a.h5"),
                                       "--weights", "imagenet", "--quiet", "--workers", "0"])
    assert missing.exit_code == 3, missing.output
    assert "ImageNet weights are not in the torch cache" in missing.output
    assert "Traceback" not in missing.output
    bad_data = CliRunner().invoke(cli, ["featurize", str(tmp_path / "nodata"), "--out", str(tmp_path / "b.h5"),
                                        "--weights", "imagenet", "--quiet", "--workers", "0"])
    assert bad_data.exit_code == 2, bad_data.output
