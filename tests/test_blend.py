"""imet.blend: weights and decoding tuned on val probability files, applied to test files and through a store."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_store
from sklearn.metrics import average_precision_score, fbeta_score

from imet.blend import LABEL_STEPS, fit_blend, read_blend, search_label_weights, search_weights
from imet.cli import cli
from imet.decode.rule import Rule
from imet.decode.submission import read_submission
from imet.decode.thresholds import DEFAULT_GRID, apply_thresholds, search_global
from imet.predict import evaluate, predict
from imet.probfiles import read_probs, write_probs
from imet.store import FeatureStore


def sample_f2(y, pred):
    return fbeta_score(y, pred, beta=2.0, average="samples", zero_division=0.0)


def two_models(seed, n=50, c=6):
    """Two weak models, each seeing a different half of the labels, and the truth."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[np.arange(n), rng.integers(0, c, n)] = 1
    half = np.arange(c) < c // 2
    a = np.clip(0.4 * rng.random((n, c)) + np.where(half, 0.5, 0.1) * y, 0, 1)
    b = np.clip(0.4 * rng.random((n, c)) + np.where(half, 0.1, 0.5) * y, 0, 1)
    return [a, b], y


@pytest.mark.parametrize("seed", range(3))
def test_two_model_weights_are_the_best_of_the_grid_by_brute_force(seed):
    probs, y = two_models(seed)
    weights, f = search_weights(probs, lambda p: search_global(p, y)[1])

    def brute(w):  # every threshold of the grid, decoded and scored by scikit-learn
        mean = w * probs[0] + (1 - w) * probs[1]
        return max(sample_f2(y, apply_thresholds(mean, t)) for t in DEFAULT_GRID)

    want = max(brute(w) for w in np.arange(0, 21) / 20)
    assert f == pytest.approx(want, abs=1e-12) and brute(weights[0]) == pytest.approx(f, abs=1e-12)
    assert weights.sum() == pytest.approx(1.0) and f > max(brute(1.0), brute(0.0))


@pytest.mark.parametrize("seed", range(3))
def test_label_weights_of_two_models_are_each_labels_best_of_the_grid_by_brute_force(seed):
    probs, y = two_models(seed, n=40, c=12)
    start = np.array([0.85, 0.15])  # off the grid: a label keeps it unless a step ranks its images strictly better
    enough = int(np.median(y.sum(axis=0))) + 1  # about half the labels have fewer positives: they keep `start`
    got = search_label_weights(np.stack(probs), y, start, min_positives=enough)
    assert 0 < (y.sum(axis=0) < enough).sum() < y.shape[1]
    for c in range(y.shape[1]):
        if y[:, c].sum() < enough:
            np.testing.assert_array_equal(got[:, c], start)
            continue
        best_w, best = start[0], average_precision_score(y[:, c], start[0] * probs[0][:, c] + start[1] * probs[1][:, c])
        for w in LABEL_STEPS:  # the first of the best, by scikit-learn's average precision
            ap = average_precision_score(y[:, c], w * probs[0][:, c] + (1 - w) * probs[1][:, c])
            if ap > best + 1e-9:
                best_w, best = w, ap
        np.testing.assert_allclose(got[:, c], [best_w, 1 - best_w], atol=1e-12)
    assert (got != start[:, None]).any()  # some label chose its own


def test_label_weights_of_three_models_rank_each_label_at_least_as_well_as_the_global_ones():
    rng = np.random.default_rng(5)
    (a, b), y = two_models(5, n=60, c=10)
    probs, start = [a, b, rng.random(a.shape)], np.array([0.5, 0.3, 0.2])
    got = search_label_weights(np.stack(probs), y, start, min_positives=3)
    assert got.shape == (3, 10) and (got >= 0).all()
    np.testing.assert_allclose(got.sum(axis=0), 1.0)
    for c in range(10):
        before = average_precision_score(y[:, c], sum(w * p[:, c] for w, p in zip(start, probs, strict=True)))
        after = average_precision_score(y[:, c], sum(w * p[:, c] for w, p in zip(got[:, c], probs, strict=True)))
        assert after >= before - 1e-12
    assert got[2].mean() < start[2]  # the model that knows nothing loses weight


def halves(seed, n, c=8):
    """Two models, each seeing its own half of the labels and blind to the other: no one weight serves both."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.25).astype(int)
    y[np.arange(n), rng.integers(0, c, n)] = 1
    half = np.arange(c) < c // 2
    return [(0.8 * rng.random((n, c)) + np.where(h, 0.5, 0.0) * y) / 1.3 for h in (half, ~half)], y


@pytest.mark.parametrize("seed", range(3))
def test_per_label_weights_beat_one_weight_per_model_on_unseen_images(seed, tmp_path):
    ids = [f"i{k}" for k in range(300)]
    for split, k in (("val", seed), ("test", seed + 100)):
        (a, b), y = halves(k, 300)
        _probs_file(tmp_path / f"a_{split}.h5", ids, a, y, "a" * 64)
        _probs_file(tmp_path / f"b_{split}.h5", ids, b, y, "b" * 64)
    f2 = {}
    for weights in ("global", "per-label"):
        out = tmp_path / f"{weights}.json"
        result = CliRunner().invoke(cli, ["blend", "fit", str(tmp_path / "a_val.h5"), str(tmp_path / "b_val.h5"),
                                          "--weights", weights, "--out", str(out)])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(cli, ["blend", "apply", "--blend", str(out), str(tmp_path / "a_test.h5"),
                                          str(tmp_path / "b_test.h5"), "--out", str(tmp_path / f"{weights}.csv")])
        assert result.exit_code == 0, result.output
        sub = read_submission(tmp_path / f"{weights}.csv")
        f2[weights] = sample_f2(y, np.array([[2 * c + 1 in sub[i] for c in range(y.shape[1])] for i in ids]))
    blend = read_blend(tmp_path / "per-label.json")
    assert json.loads((tmp_path / "per-label.json").read_text())["version"] == 2
    (a, b), yv = halves(seed, 300)  # the F2 the file records on val is that of its weights and rule there
    mean = blend.label_weights[0] * a + blend.label_weights[1] * b
    assert blend.val_f2 == pytest.approx(sample_f2(yv, blend.rule.apply(mean, blend.vocab.kinds)), abs=1e-9)
    assert (blend.label_weights[0, :4] >= 0.75).all() and (blend.label_weights[1, 4:] >= 0.75).all()
    assert f2["per-label"] > f2["global"] + 0.04


def _probs_file(path, ids, probs, y, sha, head="linear", kinds=None):
    kinds = kinds or tuple("culture" if c < 2 else "tag" for c in range(probs.shape[1]))
    write_probs(path, ids, probs, np.arange(probs.shape[1]) * 2 + 1, kinds=kinds, targets=y, head=head,
                probabilistic=True, threshold=0.2, rule=json.dumps(Rule.global_(0.2).to_json()),
                model=f"/nowhere/{sha}.pt", model_sha256=sha, split="val")


def test_fit_reports_the_true_f2_of_its_rule_and_apply_reproduces_it(tmp_path):
    probs, y = two_models(0)
    ids = [f"i{k}" for k in range(len(y))]
    _probs_file(tmp_path / "a.h5", ids, probs[0], y, "a" * 64)
    order = np.random.default_rng(1).permutation(len(ids))  # the second file lists the images in another order
    _probs_file(tmp_path / "b.h5", [ids[k] for k in order], probs[1][order], y[order], "b" * 64)
    text = fit_blend([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "blend.json", weights="global")
    blend = read_blend(tmp_path / "blend.json")
    mean = blend.weights[0] * probs[0] + blend.weights[1] * probs[1]
    assert blend.val_f2 == pytest.approx(sample_f2(y, blend.rule.apply(mean, blend.vocab.kinds)), abs=1e-12)
    assert blend.val_f2 >= max(m["val_f2"] for m in json.loads((tmp_path / "blend.json").read_text())["members"])
    assert "weights:" in text and "decoding:" in text
    result = CliRunner().invoke(cli, ["blend", "apply", "--blend", str(tmp_path / "blend.json"), str(tmp_path / "b.h5"),
                                      str(tmp_path / "a.h5"), "--out", str(tmp_path / "s.csv"), "--probs",
                                      str(tmp_path / "m.h5")])
    assert result.exit_code == 0, result.output
    sub = read_submission(tmp_path / "s.csv")
    pred = np.array([[2 * c + 1 in sub[i] for c in range(y.shape[1])] for i in ids])
    assert sample_f2(y, pred) == pytest.approx(blend.val_f2, abs=1e-12)
    got_ids, blended, _, meta = read_probs(tmp_path / "m.h5")  # in the order of the first file given (b.h5)
    assert got_ids == [ids[k] for k in order]
    np.testing.assert_allclose(blended, mean[order], atol=1e-6)
    assert meta["head"] == "blend"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two heads on a small random store, their probability files on val and test, and a blend."""
    d = tmp_path_factory.mktemp("blend")
    make_store(d / "s.h5", n_images=60)
    runner = CliRunner()
    for head, extra in (("linear", ["--epochs", "3"]), ("lgbm", ["--rounds", "5", "--min-leaf", "2"])):
        result = runner.invoke(cli, ["fit", "--store", str(d / "s.h5"), "--head", head, "--out", str(d / f"{head}.pt"),
                                     *extra])
        assert result.exit_code == 0, result.output
        for split in ("val", "test"):
            predict(d / "s.h5", d / f"{head}.pt", d / f"{head}_{split}.csv", split=split,
                    probs_path=d / f"{head}_{split}.h5")
    result = runner.invoke(cli, ["blend", "fit", str(d / "linear_val.h5"), str(d / "lgbm_val.h5"), "--out",
                                 str(d / "blend.json")])
    assert result.exit_code == 0, result.output
    return d


def test_a_blend_file_is_a_model_for_predict_and_evaluate(fitted):
    d = fitted
    result = CliRunner().invoke(cli, ["blend", "apply", "--blend", str(d / "blend.json"), str(d / "linear_test.h5"),
                                      str(d / "lgbm_test.h5"), "--out", str(d / "from_files.csv")])
    assert result.exit_code == 0, result.output
    predict(d / "s.h5", d / "blend.json", d / "from_store.csv", split="test")
    assert read_submission(d / "from_files.csv") == read_submission(d / "from_store.csv")
    row = evaluate(d / "s.h5", [d / "blend.json"], "test")[0]
    store = FeatureStore(d / "s.h5")
    sub = read_submission(d / "from_store.csv")
    ids = [str(i) for i in store.image_ids[store.split == "test"]]
    pred = np.array([[a in sub[i] for a in store.vocab.attribute_ids] for i in ids])
    assert row["head"] == "blend" and row["f2"] == pytest.approx(sample_f2(store.targets[store.split == "test"], pred))


def test_a_per_label_blend_file_is_a_model_too(fitted, tmp_path):
    d, runner = fitted, CliRunner()
    result = runner.invoke(cli, ["blend", "fit", str(d / "linear_val.h5"), str(d / "lgbm_val.h5"), "--weights",
                                 "per-label", "--min-positives", "1", "--out", str(tmp_path / "pl.json")])
    assert result.exit_code == 0, result.output
    blend = read_blend(tmp_path / "pl.json")
    assert blend.label_weights is not None and "weights per label" in result.output
    result = runner.invoke(cli, ["blend", "apply", "--blend", str(tmp_path / "pl.json"), str(d / "linear_test.h5"),
                                 str(d / "lgbm_test.h5"), "--out", str(tmp_path / "files.csv"), "--probs",
                                 str(tmp_path / "m.h5")])
    assert result.exit_code == 0, result.output
    predict(d / "s.h5", tmp_path / "pl.json", tmp_path / "store.csv", split="test")
    assert read_submission(tmp_path / "files.csv") == read_submission(tmp_path / "store.csv")
    ids, a, _, _ = read_probs(d / "linear_test.h5")
    _, b, _, _ = read_probs(d / "lgbm_test.h5")  # one store, one image order
    np.testing.assert_allclose(read_probs(tmp_path / "m.h5")[1],
                               blend.label_weights[0] * a + blend.label_weights[1] * b, atol=1e-6)


def test_probability_files_carry_the_whole_rule_and_the_truth(fitted):
    with h5py.File(fitted / "linear_val.h5") as f:
        rule, n_labels = json.loads(f.attrs["rule"]), f["probs"].shape[1]
        assert f.attrs["probabilistic"] and len(f.attrs["model_sha256"]) == 64
        assert f["targets"].shape == f["probs"].shape and len(f["kinds"]) == n_labels
    assert Rule.from_json(rule, n_labels).groups[0].kind == "*"
    with h5py.File(fitted / "linear_test.h5") as f:
        assert "targets" in f


def test_test_files_of_another_model_are_refused(fitted, tmp_path):
    result = CliRunner().invoke(cli, ["blend", "apply", "--blend", str(fitted / "blend.json"),
                                      str(fitted / "linear_test.h5"), str(fitted / "linear_val.h5"),
                                      "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "holds other images" in result.output
    result = CliRunner().invoke(cli, ["blend", "apply", "--blend", str(fitted / "blend.json"),
                                      str(fitted / "linear_test.h5"), "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "no input comes from its model" in result.output
    assert not (tmp_path / "s.csv").exists()


def test_blend_fit_from_models_on_a_store(fitted, tmp_path):
    d, runner = fitted, CliRunner()
    models = ["--model", str(d / "linear.pt"), "--model", str(d / "lgbm.pt")]
    out = ["--out", str(tmp_path / "b.json")]
    result = runner.invoke(cli, ["blend", "fit", "--store", str(d / "s.h5"), *models, *out])
    assert result.exit_code == 0, result.output
    from_files = read_blend(d / "blend.json")
    from_store = read_blend(tmp_path / "b.json")
    assert [m["sha256"] for m in from_store.members] == [m["sha256"] for m in from_files.members]
    assert from_store.val_f2 == pytest.approx(from_files.val_f2, abs=0.02)  # float32 files vs float64 here
    result = runner.invoke(cli, ["blend", "fit", str(d / "linear_val.h5"), "--store", str(d / "s.h5"), *models,
                                 "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 2 and "not both" in result.output
