"""The lgbm head: boosters saved as model text (no pickle), the prior fallback, class weights, HOG PCA."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_store
from sklearn.metrics import roc_auc_score

from imet.cli import cli
from imet.heads import load_model, make_head
from imet.heads.lgbm import fit_hog_pca
from imet.metrics import scores
from imet.store import FeatureStore

QUIET = {"log": lambda _: None}


def separable_store(path, n: int = 300, c: int = 6, dim: int = 12, seed: int = 1) -> FeatureStore:
    """Label c is the sign of feature c (with a margin), 2 noisy views per image, random HOG."""
    rng = np.random.default_rng(seed)
    image_x = rng.normal(size=(n, dim)).astype(np.float32)
    targets = (rng.random((n, c)) < 0.3).astype(np.uint8)
    targets[targets.sum(1) == 0, 0] = 1
    image_x[:, :c] = np.where(targets, 1, -1) * rng.uniform(0.5, 1.5, (n, c))
    views = np.repeat(image_x, 2, axis=0) + rng.normal(scale=0.05, size=(2 * n, dim)).astype(np.float32)
    hog = rng.random((2 * n, 9)).astype(np.float32)
    return FeatureStore(make_store(path, targets=targets, features={"pooled": views, "hog": hog}))


def fit_peak(head, s: FeatureStore) -> int:
    """The Python-side peak (bytes; tracemalloc sees numpy's buffers, not LightGBM's) of fitting `head` on the
    train and val views of `s`."""
    import tracemalloc

    tracemalloc.start()
    try:
        head._fit(s, s.views("train"), s.views("val"), lambda _: None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return separable_store(tmp_path_factory.mktemp("lgbm") / "sep.h5")


def test_lgbm_learns_separable_labels(store):
    head = make_head("lgbm", rounds=60).fit(store, **QUIET)
    assert len(head.labels_) == len(store.vocab)
    images, _, labels = head.predict_labels(store, "test")
    assert scores(store.targets[images], labels)["f2"] > 0.95


def test_a_refitted_head_scores_with_its_new_boosters(store):
    """The forest and LightGBM's boosters are parsed once per set of texts: fitting the same head object again
    must not score with the first fit's (a stale parse would be a silent wrong answer)."""
    head, views = make_head("lgbm", rounds=2), store.views("test")
    head.fit(store, **QUIET).predict_proba(store, views)
    _ = head.boosters_
    head.rounds = 40
    head.fit(store, **QUIET)
    fresh = make_head("lgbm", rounds=40).fit(store, **QUIET)
    np.testing.assert_array_equal(head.predict_proba(store, views), fresh.predict_proba(store, views))
    assert [b.current_iteration() for b in head.boosters_] == [b.current_iteration() for b in fresh.boosters_]


def test_boosters_round_trip_as_model_text_without_pickle(store, tmp_path):
    head = make_head("lgbm", rounds=20, hog_pca=3).fit(store, **QUIET)
    head.save(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)  # refuses any pickled object
    texts = blob["learned"]["boosters"]
    assert len(texts) == len(head.labels_) and all(isinstance(t, str) and t.startswith("tree") for t in texts)
    assert blob["learned"]["booster_labels"] == head.labels_.tolist()
    assert blob["state_dict"]["components"].shape == (9, 3)  # the HOG PCA, as tensors
    again = load_model(tmp_path / "m.pt")
    views = store.views("test")
    np.testing.assert_array_equal(again.predict_proba(store, views), head.predict_proba(store, views))
    # the forest scores them: neither the fit nor the load holds LightGBM's parsed boosters (170-400 MB at
    # 1,103 labels; each of the K models of fit --folds), which are parsed only for LightGBM's own predict
    assert "_boosters" not in head.__dict__ and "_boosters" not in again.__dict__
    assert [b.current_iteration() for b in again.boosters_] == [t.count("\nTree=") for t in texts]


def test_labels_with_too_few_positives_predict_their_prior(tmp_path):
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 4)) < 0.4).astype(np.uint8)
    targets[:, 2] = 0
    targets[[0, 1], 2] = 1  # images 0 and 1 are train images: 4 positive train views, below min_positives=5
    targets[:, 3] = 1  # positive everywhere: no negatives to learn from
    s = FeatureStore(make_store(tmp_path / "s.h5", targets=targets))
    head = make_head("lgbm", rounds=5, min_positives=5).fit(s, **QUIET)
    assert head.labels_.tolist() == [0, 1]
    train = s.views("train")
    prior = s.view_targets(train).mean(0)
    assert prior[2] == pytest.approx(4 / len(train)) and prior[3] == 1
    probs = head.predict_proba(s, s.views("val"))
    np.testing.assert_allclose(probs[:, 2:], np.broadcast_to(prior[2:], (len(probs), 2)), rtol=1e-6)


def test_scale_pos_weight_is_negatives_over_positives_clipped_at_10(tmp_path):
    rng = np.random.default_rng(0)
    targets = np.zeros((100, 3), np.uint8)
    targets[:, 0] = rng.random(100) < 0.5
    targets[:, 1] = np.arange(100) % 4 == 0
    targets[[0, 10], 2] = 1  # both train images (rows 10k..10k+5 are): 4 of 120 train views, weight clipped
    s = FeatureStore(make_store(tmp_path / "s.h5", targets=targets))
    head = make_head("lgbm", rounds=3, min_positives=2, min_leaf=2).fit(s, **QUIET)
    y = s.view_targets(s.views("train"))
    pos, neg = y.sum(0), len(y) - y.sum(0)
    assert neg[2] / pos[2] > 10 and 2 in head.labels_  # the clipped case is covered
    for c, text in zip(head.labels_, head.texts_, strict=True):
        weight = float(re.search(r"\[scale_pos_weight: ([0-9.e+-]+)\]", text).group(1))
        assert weight == pytest.approx(min(neg[c] / pos[c], 10.0), rel=1e-5)  # the text keeps 6 digits


def test_threads_do_not_change_the_model(store):
    one = make_head("lgbm", rounds=10, n_jobs=1).fit(store, **QUIET)
    two = make_head("lgbm", rounds=10, n_jobs=2).fit(store, **QUIET)
    views = store.views("val")
    assert one.texts_ == two.texts_
    np.testing.assert_array_equal(one.predict_proba(store, views), two.predict_proba(store, views))


def test_hog_pca_matches_the_principal_directions(store):
    from sklearn.decomposition import PCA

    train = store.views("train")
    hog = store.read("hog", train).astype(np.float64)
    pca = fit_hog_pca(store, train, 4, chunk=7)  # many chunks
    ref = PCA(4, svd_solver="full").fit(hog)
    ours = pca.components.double().numpy().T  # (k, D)
    np.testing.assert_allclose(np.abs(ours @ ref.components_.T), np.eye(4), atol=1e-4)  # same axes, up to sign
    np.testing.assert_allclose(pca.mean.numpy(), hog.mean(0), rtol=1e-5)
    assert fit_hog_pca(store, train, 50).components.shape == (9, 9)  # capped at the HOG width


def test_fit_cli_takes_lgbm_options_and_refuses_others(tmp_path):
    path = make_store(tmp_path / "s.h5")
    runner = CliRunner()
    base = ["fit", "--store", str(path), "--head", "lgbm", "--out", str(tmp_path / "m.pt")]
    result = runner.invoke(cli, [*base, "--rounds", "5", "--num-leaves", "4", "--hog-pca", "2", "--n-jobs", "1"])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "m.pt").get_params()["hog_pca"] == 2
    result = runner.invoke(cli, [*base, "--epochs", "3"])
    assert result.exit_code == 2 and "--epochs does not apply to head lgbm" in result.output


def rare_label_store(path, n: int = 3000, seed: int = 3) -> FeatureStore:
    """One view per image; label 0 is rare (~4%) with P(y | x) = sigmoid(2 x0 - 4.5), label 1 a coin flip."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    p = 1 / (1 + np.exp(-(2 * x[:, 0] - 4.5)))
    targets = np.stack([rng.random(n) < p, rng.random(n) < 0.5], axis=1).astype(np.uint8)
    return FeatureStore(make_store(path, targets=targets, views_per_image=1, features={"pooled": x}))


def test_sampled_negatives_keep_the_probabilities_of_a_fit_on_every_row(tmp_path):
    s = rare_label_store(tmp_path / "rare.h5")
    common = {"rounds": 40, "early_stopping_rounds": 0, "n_jobs": 1, "min_leaf": 10, "colsample": 0.5}  # as written
    full = make_head("lgbm", negatives=0, **common).fit(s, **QUIET)
    sampled = make_head("lgbm", negatives=3, min_negatives=100, **common).fit(s, **QUIET)
    y = s.view_targets(s.views("train"))
    pos, neg = y[:, 0].sum(), len(y) - y[:, 0].sum()
    assert sampled.offsets_[0] == pytest.approx(np.log(3 * pos / neg)) and sampled.offsets_[1] == 0  # label 1: all
    assert (full.offsets_ == 0).all()
    views = np.concatenate([s.views("val"), s.views("test")])
    pf, ps = full.predict_proba(s, views)[:, 0], sampled.predict_proba(s, views)[:, 0]
    assert 0.8 < ps.mean() / pf.mean() < 1.25  # calibrated like the full fit, on average
    for lo, hi in [(0, 0.05), (0.05, 0.3), (0.3, 1)]:  # and where the full fit is low, middling and high
        band = (pf >= lo) & (pf < hi)
        assert band.sum() > 20 and abs(ps[band].mean() - pf[band].mean()) < 0.35 * max(pf[band].mean(), 0.02)
    sampled.offsets_ = np.zeros_like(sampled.offsets_)  # without the correction: the sampled odds, far too high
    assert sampled.predict_proba(s, views)[:, 0].mean() / pf.mean() > 2


def test_models_of_the_previous_format_load_and_later_ones_are_refused(store, tmp_path):
    head = make_head("lgbm", rounds=10, negatives=0).fit(store, **QUIET)
    head.save(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    for key in ("lgbm_format", "offsets"):  # a model file as imet wrote it before negatives were sampled
        del blob["learned"][key]
    for key in ("negatives", "min_negatives", "subsample"):
        del blob["params"][key]
    torch.save(blob, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert old.get_params()["negatives"] == 0 and old.get_params()["subsample"] == 1.0
    views = store.views("test")
    np.testing.assert_allclose(old.predict_proba(store, views), head.predict_proba(store, views), rtol=1e-6)
    blob["learned"]["lgbm_format"] = 3
    torch.save(blob, tmp_path / "new.pt")
    result = CliRunner().invoke(cli, ["evaluate", "--store", str(store.path), "--model", str(tmp_path / "new.pt")])
    assert result.exit_code == 2 and "lgbm model format 3 is not supported" in result.output
    assert "refit" in result.output and len(result.output.strip().splitlines()) == 1


def test_each_tree_samples_tree_features_by_default(store, tmp_path):
    """colsample None: each tree may split on TREE_FEATURES features (all when fewer), as LightGBM's own
    saved parameters say; a colsample given is kept."""
    from imet.heads.lgbm import TREE_FEATURES

    wide = separable_store(tmp_path / "wide.h5", n=120, c=2, dim=4 * TREE_FEATURES)

    def fraction(head) -> float:
        return float(re.search(r"\[feature_fraction: ([0-9.e-]+)\]", head.texts_[0]).group(1))

    assert fraction(make_head("lgbm", rounds=3).fit(wide, **QUIET)) == pytest.approx(0.25)
    assert fraction(make_head("lgbm", rounds=3).fit(store, **QUIET)) == 1.0
    assert fraction(make_head("lgbm", rounds=3, colsample=0.3).fit(wide, **QUIET)) == pytest.approx(0.3)


def edge_rows(forest_texts, n_features: int, rows: int, seed: int) -> np.ndarray:
    """Rows whose every split feature sits on one of its thresholds: the float32 nearest it or one step
    either side (where `<=` against `<`, or a threshold rounded the wrong way, changes the leaf)."""
    from imet.forest import parse_trees

    rng = np.random.default_rng(seed)
    pairs = [(f, t) for text in forest_texts for tree in parse_trees(text)
             for f, t in zip(tree["split_feature"], tree["threshold"], strict=True)]
    x = rng.normal(size=(rows, n_features)).astype(np.float32)
    for r in range(rows):
        for i in rng.permutation(len(pairs)):
            f, t = pairs[i]
            near = np.float32(t)
            x[r, f] = (near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf)))[r % 3]
    x[0, ::2] = 0
    x[1, ::3] = 1e-36  # LightGBM reads values within 1e-35 of 0 as 0
    x[2, ::5] = np.nan  # ... and NaN as 0 (missing type None)
    return x


def test_forest_gives_lightgbms_raw_scores_on_random_real_and_edge_rows(store):
    from imet.forest import Forest
    from imet.heads.lgbm import design_matrix

    head = make_head("lgbm", rounds=40, hog_pca=3, min_leaf=3).fit(store, **QUIET)
    width = head.boosters_[0].num_feature()
    forest = Forest(head.texts_, width)
    rng = np.random.default_rng(0)
    real = design_matrix(store, store.views("test"), head.pca_)
    for x in (rng.normal(size=(300, width)).astype(np.float32), real, edge_rows(head.texts_, width, 60, 1)):
        want = np.stack([b.predict(x, raw_score=True, num_threads=1) for b in head.boosters_], 1)
        np.testing.assert_allclose(forest.raw(x), want, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(forest.raw(x), want)  # trees added in LightGBM's order: the same bits
    assert sum(len(x) for x in head.texts_) > 0 and len(forest.tree_booster) > 3 * len(head.boosters_)


def test_predict_proba_scores_with_the_forest_as_lightgbm_would(store):
    head = make_head("lgbm", rounds=30, n_jobs=1).fit(store, **QUIET)
    views = store.views("test")
    fast = head.predict_proba(store, views)
    assert head.forest() is not None
    head.n_jobs = 3  # rows split among threads: the same scores
    np.testing.assert_array_equal(fast, head.predict_proba(store, views))
    head.__dict__["_forest"] = (head.texts_, None)  # LightGBM's own predict
    np.testing.assert_array_equal(fast, head.predict_proba(store, views))


def test_fit_holds_the_targets_as_positive_rows_not_a_float_matrix(tmp_path):
    """At full iMet a float32 (train views, labels) target matrix is 2.9 GB: the fit keeps each label's positive
    rows instead. Here that matrix would be ~31 MiB beside 1 MiB of features, and the fit's Python-side peak
    (tracemalloc sees numpy's buffers) stays under a third of it."""
    import lightgbm  # noqa: F401  imported before tracing: its modules are not the fit's

    n, dim, c = 16_000, 16, 1000
    rng = np.random.default_rng(0)
    targets = np.zeros((n, c), np.uint8)
    targets[:, :2] = rng.random((n, 2)) < 0.3  # these and label 2 get boosters, the other 997 their prior
    targets[targets.sum(1) == 0, 2] = 1
    s = FeatureStore(make_store(tmp_path / "tall.h5", targets=targets, views_per_image=1,
                                features={"pooled": rng.normal(size=(n, dim)).astype(np.float32)}))
    head = make_head("lgbm", rounds=2, n_jobs=1)
    train = s.views("train")
    matrix = 4 * len(train) * c
    peak = fit_peak(head, s)
    assert len(head.labels_) == 3
    np.testing.assert_array_equal(head.priors_, s.view_targets(train).mean(0))
    assert peak < matrix / 3, f"fit peak {peak / 2**20:.1f} MiB, the float32 targets are {matrix / 2**20:.1f} MiB"


def test_streamed_binned_set_equals_lightgbms_from_the_whole_matrix(store):
    """With every train view in the bin sample, the binned set filled from the store in chunks is LightGBM's
    own from the float matrix: boosters trained on each are the same model."""
    import lightgbm as lgb

    from imet.heads import lgbm as module

    head = make_head("lgbm", hog_pca=4)
    train = store.views("train")
    pca = fit_hog_pca(store, train, 4)
    x = module.design_matrix(store, train, pca)
    params = head.booster_params(1.0, threads=1, n_features=x.shape[1])
    y = store.view_targets(train)[:, 0].astype(np.float32)
    ours = module.binned(store, train, pca, params, seed=0)
    ours.set_label(y)
    theirs = lgb.Dataset(x, y, params=params).construct()
    models = [lgb.train(params, d, num_boost_round=5).model_to_string() for d in (ours, theirs)]
    assert models[0] == models[1]


def test_fit_bins_the_store_in_chunks_not_from_the_float_matrix(tmp_path, monkeypatch):
    """At full iMet the float32 (train views, features) matrix is 5.4 GB, and LightGBM's 200k-row sample of it
    as doubles 4.9 GB: the fit takes its bin edges from BIN_ROWS views and fills the binned set from the store
    in chunks. Here the matrix would be ~23 MiB, and the fit's Python-side peak stays under a third of it."""
    import lightgbm  # noqa: F401  imported before tracing: its modules are not the fit's

    from imet.heads import lgbm as module

    monkeypatch.setattr(module, "BIN_ROWS", 1000)
    n, dim = 20_000, 512
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    targets = np.zeros((n, 3), np.uint8)
    targets[:, 0] = x[:, 0] > 0.5
    targets[:, 1] = x[:, 1] > 0.5
    targets[targets.sum(1) == 0, 2] = 1
    s = FeatureStore(make_store(tmp_path / "wide.h5", targets=targets, views_per_image=1, features={"pooled": x}))
    head = make_head("lgbm", rounds=20, n_jobs=1)
    matrix = 4 * len(s.views("train")) * dim
    peak = fit_peak(head, s)
    assert peak < matrix / 3, f"fit peak {peak / 2**20:.1f} MiB, the float32 features are {matrix / 2**20:.1f} MiB"
    test = s.views("test")
    x = module.design_matrix(s, test, None)  # the boosters learnt the planted labels from the binned set
    auc = [roc_auc_score(s.view_targets(test)[:, c], head.boosters_[list(head.labels_).index(c)].predict(x))
           for c in (0, 1)]
    assert min(auc) > 0.95, auc
