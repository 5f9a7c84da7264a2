"""imet.folds: iterative stratification against scikit-learn's KFold, out-of-fold fitting, the K-model file."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_store
from sklearn.metrics import fbeta_score
from sklearn.model_selection import KFold

from imet.cli import cli
from imet.decode.thresholds import average_views
from imet.errors import ParamError
from imet.folds import FOLD_SPLITS, assign_folds, fit_folds
from imet.heads import load_model
from imet.heads.base import Head
from imet.probfiles import read_probs
from imet.store import FeatureStore


def label_deviation(y, fold, k):
    """Mean over labels and folds of |positives in the fold - positives / k|."""
    got = np.stack([y[fold == j].sum(0) for j in range(k)])
    return float(np.mean(np.abs(got - y.sum(0) / k)))


def sparse_targets(seed, n=300, c=40):
    rng = np.random.default_rng(seed)
    freq = rng.pareto(1.5, c) + 0.02
    y = rng.random((n, c)) < np.minimum(freq / freq.sum() * 3, 0.5)
    y[rng.integers(0, n, 5)] = False  # a few images with no label
    return y


@pytest.mark.parametrize("seed", range(3))
def test_folds_are_balanced_and_better_stratified_than_kfold(seed):
    y, k = sparse_targets(seed), 5
    fold = assign_folds(y, k, seed)
    assert fold.min() == 0 and fold.max() == k - 1
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 0.1 * len(y)
    for c in np.flatnonzero(y.sum(0) >= k):  # a label on k images or more is in every fold
        assert len(set(fold[y[:, c]])) == k
    kfold = np.empty(len(y), int)
    for j, (_, held) in enumerate(KFold(k, shuffle=True, random_state=seed).split(y)):
        kfold[held] = j
    assert label_deviation(y, fold, k) < 0.5 * label_deviation(y, kfold, k)
    np.testing.assert_array_equal(assign_folds(y, k, seed), fold)  # seeded
    assert not np.array_equal(assign_folds(y, k, seed + 1), fold)


def test_too_many_folds_refused():
    with pytest.raises(ParamError, match=r"^folds must be 2 \.\. the 5 labelled images, not 9$"):
        assign_folds(np.ones((5, 2)), 9)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return FeatureStore(make_store(tmp_path_factory.mktemp("folds") / "s.h5", n_images=60))


def test_out_of_fold_probabilities_come_from_the_model_that_did_not_see_the_image(store, monkeypatch, tmp_path):
    seen = []
    fit = Head.fit

    def spy(self, st, *, log=None, views=None):
        seen.append(views)
        return fit(self, st, log=lambda _: None, views=views)
    monkeypatch.setattr(Head, "fit", spy)
    model, images, oof = fit_folds(store, "linear", {"epochs": 2, "thresholds": "per-kind"}, 3, fold_seed=1,
                                   log=lambda _: None)
    labelled = np.flatnonzero(np.isin(store.split, FOLD_SPLITS))
    np.testing.assert_array_equal(images, labelled)  # every train and val image once, no test image
    held = [set(store.view_image[v].tolist()) for _, v in seen]
    for j, (train, val) in enumerate(seen):
        trained = set(store.view_image[train].tolist())
        assert not trained & held[j] and trained | held[j] == set(labelled.tolist())
        ids, p = average_views(model.heads_[j].predict_proba(store, val), store.view_image[val])
        np.testing.assert_allclose(oof[np.searchsorted(images, ids)], p, rtol=1e-6)
        assert sorted(model.fold_ids_[j]) == sorted(str(store.image_ids[i]) for i in held[j])
    f2 = fbeta_score(store.targets[images], model.rule().apply(oof, store.vocab.kinds), beta=2, average="samples",
                     zero_division=0)
    assert model.val_f2_ == pytest.approx(f2, abs=1e-12)  # decoding tuned on the out-of-fold probabilities
    views = store.views("test")
    mean = np.mean([h.predict_proba(store, views) for h in model.heads_], axis=0)
    np.testing.assert_allclose(model.predict_proba(store, views), mean, rtol=1e-6)
    model.save(tmp_path / "f.pt")
    again = load_model(tmp_path / "f.pt")
    assert again.rule() == model.rule() and again.fold_seed_ == 1 and len(again.heads_) == 3
    np.testing.assert_array_equal(again.predict_labels(store, "test")[2], model.predict_labels(store, "test")[2])


def test_fit_folds_cli_writes_model_and_oof_together(store, tmp_path):
    runner = CliRunner()
    args = ["fit", "--store", str(store.path), "--head", "linear", "--epochs", "2", "--out", str(tmp_path / "f.pt")]
    result = runner.invoke(cli, [*args, "--folds", "3", "--oof", str(tmp_path / "oof.h5")])
    assert result.exit_code == 0, result.output
    assert "out-of-fold F2" in result.output and "held out of every fold" in result.output
    ids, probs, _, meta = read_probs(tmp_path / "oof.h5")
    assert meta["split"] == "oof" and meta["targets"].shape == probs.shape and len(ids) == 48
    result = runner.invoke(cli, ["blend", "fit", str(tmp_path / "oof.h5"), "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["evaluate", "--store", str(store.path), "--model", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, [*args, "--oof", str(tmp_path / "o2.h5")])
    assert result.exit_code == 2 and "--oof needs --folds" in result.output
    result = runner.invoke(cli, [*args[:4], "attn_rnn", *args[5:], "--folds", "2"])
    assert result.exit_code == 2 and "0/1 votes" in result.output


def test_too_many_folds_named_as_the_option_on_the_command_line(store, tmp_path):
    result = CliRunner().invoke(cli, ["fit", "--store", str(store.path), "--head", "linear", "--folds", "999",
                                      "--out", str(tmp_path / "m.pt")])
    labelled = int(np.isin(store.split, FOLD_SPLITS).sum())
    assert result.exit_code == 2 and not (tmp_path / "m.pt").exists()
    assert result.output.strip() == f"Error: --folds must be 2 .. the {labelled} labelled images, not 999"
