"""imet.metrics against scikit-learn and a hand-worked example."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, fbeta_score, precision_score, recall_score, roc_auc_score

from imet.metrics import average_precision, fbeta_per_sample, roc_auc, scores

ZERO_DIVISIONS = [0.0, 1.0, np.nan]


def random_labels(rng, n, c, density):
    """Random (n, c) 0/1 truth and prediction, with forced empty rows of every kind."""
    y_true = (rng.random((n, c)) < density).astype(int)
    y_pred = (rng.random((n, c)) < density).astype(int)
    y_pred[: n // 4] |= y_true[: n // 4]  # some rows overlap a lot
    kinds = rng.integers(0, 4, size=n)  # 0: keep, 1: no prediction, 2: no truth, 3: neither
    y_pred[(kinds == 1) | (kinds == 3)] = 0
    y_true[(kinds == 2) | (kinds == 3)] = 0
    return y_true, y_pred


def sklearn_scores(y_true, y_pred, beta, zero_division):
    kw = dict(average="samples", zero_division=zero_division)
    return {
        f"f{beta:g}": fbeta_score(y_true, y_pred, beta=beta, **kw),
        "f1": f1_score(y_true, y_pred, **kw),
        "precision": precision_score(y_true, y_pred, **kw),
        "recall": recall_score(y_true, y_pred, **kw),
    }


@pytest.mark.parametrize("zero_division", ZERO_DIVISIONS)
@pytest.mark.parametrize("seed", range(12))
def test_scores_match_sklearn(seed, zero_division):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), int(rng.integers(2, 40))
    y_true, y_pred = random_labels(rng, n, c, density=rng.choice([0.02, 0.1, 0.5]))
    beta = [2.0, 1.0, 0.5][seed % 3]
    got = scores(y_true, y_pred.astype(bool), beta=beta, zero_division=zero_division)
    want = sklearn_scores(y_true, y_pred, beta, zero_division)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("zero_division", ZERO_DIVISIONS)
@pytest.mark.parametrize("which", ["truth", "prediction", "both"])
def test_scores_all_empty(which, zero_division):
    y_true = np.zeros((5, 4), dtype=int) if which != "prediction" else np.eye(5, 4, dtype=int)
    y_pred = np.zeros((5, 4), dtype=int) if which != "truth" else np.eye(5, 4, dtype=int)
    got = scores(y_true, y_pred, zero_division=zero_division)
    want = sklearn_scores(y_true, y_pred, 2.0, zero_division)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_scores_hand_worked(zero_division):
    z = zero_division
    y_true = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    y_pred = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    # row 0: tp=1 fp=2 fn=1 -> P=1/3, R=1/2, F2=5/(5+4+2), F1=2/(2+1+2)
    # row 1: nothing true, nothing predicted -> z everywhere
    # row 2: missed its only label -> P=z (no prediction), R=0, F=0
    # row 3: predicted with nothing true -> P=0, R=z, F=0
    got = scores(y_true, y_pred, zero_division=z)
    assert got == pytest.approx(
        {
            "f2": (5 / 11 + z) / 4,
            "f1": (2 / 5 + z) / 4,
            "precision": (1 / 3 + z + z) / 4,
            "recall": (1 / 2 + z + z) / 4,
        }
    )


def test_fbeta_per_sample_counts():
    f = fbeta_per_sample(np.array([1, 0, 0, 2]), np.array([2, 0, 1, 0]), np.array([1, 0, 0, 0]), 2.0, 1.0)
    np.testing.assert_allclose(f, [5 / 11, 1.0, 0.0, 1.0])
    # broadcasting: one row of counts against several candidate columns
    g = fbeta_per_sample(np.array([[1], [2]]), np.array([[0, 1]]), np.array([[1], [0]]))
    assert g.shape == (2, 2)


def test_scores_refuses_bad_input():
    with pytest.raises(ValueError, match="shape"):
        scores(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0 and 1"):
        scores(np.full((2, 3), 2), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="beta"):
        scores(np.zeros((2, 3)), np.zeros((2, 3)), beta=0.0)


@pytest.mark.parametrize("seed", range(10))
def test_roc_auc_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    n, c = int(rng.integers(2, 80)), int(rng.integers(1, 30))
    y = (rng.random((n, c)) < rng.choice([0.05, 0.3, 0.7])).astype(int)
    s = rng.random((n, c))
    if seed % 2:
        s = np.round(s, 1)  # many ties
    per_class, micro = roc_auc(y, s)
    for j in range(c):
        if len(np.unique(y[:, j])) < 2:
            assert np.isnan(per_class[j])
        else:
            assert per_class[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]), abs=1e-12)
    if len(np.unique(y)) == 2:
        assert micro == pytest.approx(roc_auc_score(y, s, average="micro"), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_average_precision_matches_sklearn_per_column(seed):
    rng = np.random.default_rng(200 + seed)
    n, c = int(rng.integers(1, 80)), int(rng.integers(1, 30))
    y = (rng.random((n, c)) < rng.choice([0.05, 0.3, 0.7])).astype(int)
    s = rng.random((n, c))
    if seed % 2:
        s = np.round(s, int(rng.integers(0, 2)))  # many ties, or two values only: tied scores are one threshold
    got = average_precision(y, s)
    for j in range(c):
        if y[:, j].any():
            assert got[j] == pytest.approx(average_precision_score(y[:, j], s[:, j]), abs=1e-12)
        else:
            assert np.isnan(got[j])  # no positive: scikit-learn warns and returns a meaningless 0


def test_roc_auc_hand_worked():
    y = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    s = np.array([[0.1, 0.5, 0.2], [0.4, 0.5, 0.3], [0.35, 0.2, 0.1], [0.8, 0.9, 0.0]])
    per_class, micro = roc_auc(y, s)
    # class 0: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs won
    # class 1: positives 0.5, 0.9 vs negatives 0.5, 0.2 -> 3 won, 1 tie -> 3.5 / 4
    np.testing.assert_allclose(per_class[:2], [0.75, 0.875])
    assert np.isnan(per_class[2])  # only positives
    assert micro == pytest.approx(roc_auc_score(y, s, average="micro"))


def test_roc_auc_one_class_everywhere_is_nan():
    per_class, micro = roc_auc(np.ones((3, 2)), np.random.default_rng(0).random((3, 2)))
    assert np.isnan(per_class).all() and np.isnan(micro)
