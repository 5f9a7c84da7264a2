"""iMet's label count through the CLI: a 1,103-label planted store of a few hundred views (tiny features), fit
linear and linear_hog, evaluate, predict a Kaggle CSV, the three threshold modes, blend fit, report.

At this shape a global threshold on class-weighted probabilities emits hundreds of labels per image (the
weights inflate every rare label); the default decoding (class weights undone, per-class thresholds) must
stay near the true label count and well above that F2."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from imet import planted
from imet.cli import cli
from imet.store import FeatureStore

FLOOR = 0.08  # test F2 of the default decoding here: 0.09-0.14; the paper's global rule: 0.02 (650 labels/image)
DESIGN = dict(n_images=240, channels=8, pooled_dim=8, hog=16, global_strength=0.6)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    planted.write_planted_store(root / "store.h5", planted.imet_design(**DESIGN), views=(1, 2))
    return root


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def f2_of(root, model, split="test"):
    run("evaluate", "--store", root / "store.h5", "--model", model, "--split", split, "--json", root / "e.json")
    return json.loads((root / "e.json").read_text())[0]["f2"]


def labels_per_image(path):
    with open(path) as f:
        return np.mean([len(row["attribute_ids"].split()) for row in csv.DictReader(f)])


@pytest.fixture(scope="module")
def fitted(wide):
    store = wide / "store.h5"
    for head in ("linear", "linear_hog"):
        run("fit", "--store", store, "--head", head, "--out", wide / f"{head}.pt", "--epochs", 10)
    return wide


def test_default_decoding_holds_at_1103_labels(fitted):
    store = FeatureStore(fitted / "store.h5")
    assert len(store.vocab) == 1103
    truth = store.targets[np.unique(store.view_image[store.views("test")])].sum(1).mean()
    for head in ("linear", "linear_hog"):
        run("predict", "--store", fitted / "store.h5", "--model", fitted / f"{head}.pt", "--split", "test",
            "--out", fitted / f"{head}.csv")
        emitted = labels_per_image(fitted / f"{head}.csv")
        assert truth / 3 <= emitted <= 3 * truth, (head, emitted, truth)
        assert f2_of(fitted, fitted / f"{head}.pt") > FLOOR


@pytest.mark.parametrize("mode", ["global", "per-class", "per-kind"])
def test_each_threshold_mode_decodes_near_the_truth(fitted, mode):
    out = fitted / f"{mode}.pt"
    run("fit", "--store", fitted / "store.h5", "--head", "linear", "--out", out, "--epochs", 10, "--thresholds", mode)
    run("predict", "--store", fitted / "store.h5", "--model", out, "--split", "test", "--out", fitted / "m.csv")
    store = FeatureStore(fitted / "store.h5")
    truth = store.targets[np.unique(store.view_image[store.views("test")])].sum(1).mean()
    assert truth / 3 <= labels_per_image(fitted / "m.csv") <= 3 * truth
    assert f2_of(fitted, out) > FLOOR


def test_the_papers_rule_is_still_there_and_overemits(fitted):
    out = fitted / "paper.pt"
    run("fit", "--store", fitted / "store.h5", "--head", "linear", "--out", out, "--epochs", 10,
        "--thresholds", "global", "--undo-weights", "off")
    run("predict", "--store", fitted / "store.h5", "--model", out, "--split", "test", "--out", fitted / "p.csv")
    assert labels_per_image(fitted / "p.csv") > 100 and f2_of(fitted, out) < FLOOR  # why it is not the default


def test_blend_and_report_at_1103_labels(fitted):
    run("blend", "fit", "--store", fitted / "store.h5", "--model", fitted / "linear.pt", "--model",
        fitted / "linear_hog.pt", "--out", fitted / "blend.json")
    assert f2_of(fitted, fitted / "blend.json") > FLOOR
    run("report", "--store", fitted / "store.h5", "--model", fitted / "linear_hog.pt", "--split", "test",
        "--out", fitted / "report")
    html = (fitted / "report" / "index.html").read_text()
    assert "1103 labels" in html
    assert html.count("<tr>") < 200  # a page a person reads: 3 tables of 30 labels, not 1,103 rows
    with open(fitted / "report" / "labels_0.csv") as f:
        assert len(list(csv.DictReader(f))) == 1103


def test_the_1103_label_report_renders_in_a_browser(fitted, tmp_path):
    """Every figure of the 1,103-label page decodes in headless Chromium (skipped, saying why, without it)."""
    from test_report import loaded_widths, refs

    out = tmp_path / "report"
    run("report", "--store", fitted / "store.h5", "--model", fitted / "linear.pt", fitted / "linear_hog.pt",
        "--split", "test", "--out", out)
    page = out / "index.html"
    widths = loaded_widths(page, tmp_path / "profile")
    assert sorted(widths) == sorted(refs(page).images) and widths and all(w > 0 for w in widths.values()), widths
