"""Model files are a pure function of weights, parameters and data: a refit with the same seed and data writes
the same bytes, so the blends that pin a model's sha256 accept the refit. Older files (with a fit time) load."""

from __future__ import annotations

import hashlib
import itertools
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import make_store

from imet.cli import cli
from imet.decode.submission import read_submission
from imet.heads import HEADS, base, load_model
from imet.predict import predict
from imet.store import FeatureStore

FITS = {"linear": ["--epochs", "3"], "linear_hog": ["--epochs", "3"], "lgbm": ["--rounds", "5", "--min-leaf", "2"],
        "csra": ["--epochs", "1"], "mldecoder": ["--epochs", "1", "--width", "16", "--heads", "2"],
        "attn_rnn": ["--epochs", "1", "--start-epochs", "1", "--hidden", "8", "--attention-dim", "8",
                     "--pred-dim", "8"]}  # attn_rnn: its csra start's fit time was kept in the file too


def _fit(store, head: str, out, *extra: str) -> bytes:
    result = CliRunner().invoke(cli, ["fit", "--store", str(store), "--head", head, "--out", str(out), *FITS[head],
                                      *extra])
    assert result.exit_code == 0, result.output
    return out.read_bytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bytes") / "s.h5", n_images=40)


def test_every_head_is_refitted():
    assert sorted(FITS) == sorted(HEADS)


@pytest.fixture
def slowing_clock(monkeypatch):
    """A clock whose steps grow: every fit (attn_rnn's csra start, each fold) takes longer than the one before."""
    ticks = itertools.accumulate(itertools.count(1), lambda t, k: t + 10.0 * k)
    monkeypatch.setattr(base, "time", SimpleNamespace(monotonic=lambda: next(ticks)))


@pytest.mark.parametrize("head", sorted(FITS))
def test_a_refit_writes_the_same_bytes(store, tmp_path, head, slowing_clock):
    first = _fit(store, head, tmp_path / "a.pt")
    second = _fit(store, head, tmp_path / "b.pt")
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    assert first == second


def test_a_refit_of_fold_models_writes_the_same_bytes(store, tmp_path, slowing_clock):
    first = _fit(store, "linear", tmp_path / "a.pt", "--folds", "2")
    assert first == _fit(store, "linear", tmp_path / "b.pt", "--folds", "2")


def test_a_blend_accepts_the_refit_of_its_members(store, tmp_path):
    for head in ("linear", "lgbm"):
        _fit(store, head, tmp_path / f"{head}.pt")
    result = CliRunner().invoke(cli, ["blend", "fit", "--store", str(store), "--model", str(tmp_path / "linear.pt"),
                                      "--model", str(tmp_path / "lgbm.pt"), "--out", str(tmp_path / "blend.json")])
    assert result.exit_code == 0, result.output
    predict(store, tmp_path / "blend.json", tmp_path / "before.csv", split="test")
    for head in ("linear", "lgbm"):  # refit in place: the blend pins the first fits' sha256
        _fit(store, head, tmp_path / f"{head}.pt")
    predict(store, tmp_path / "blend.json", tmp_path / "after.csv", split="test")
    assert read_submission(tmp_path / "after.csv") == read_submission(tmp_path / "before.csv")


def test_a_file_with_a_fit_time_still_loads(store, tmp_path):
    _fit(store, "linear", tmp_path / "new.pt")
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    assert "fit_seconds" not in blob["learned"]
    blob["learned"]["fit_seconds"] = 12.5  # what files written before this change hold
    torch.save(blob, tmp_path / "old.pt")
    fs = FeatureStore(store)
    views = fs.views("test")
    old, new = load_model(tmp_path / "old.pt"), load_model(tmp_path / "new.pt")
    assert (old.predict_proba(fs, views) == new.predict_proba(fs, views)).all()
    assert old.threshold_ == new.threshold_
