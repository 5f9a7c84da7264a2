"""Shared fixtures: a tiny Kaggle-layout data dir and a store featurized from it with random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_data_dir

from imet.featurize.pipeline import Options, featurize

TINY = dict(weights="random", image_size=64, batch_size=16)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data") / "imet")


@pytest.fixture(scope="session")
def tiny_store(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "store.h5"
    featurize(data_dir, out, Options(**TINY), device="cpu", workers=0, progress=False)
    return out
