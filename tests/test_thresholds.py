"""imet.decode.thresholds: hand-worked arrays, slow references and brute force with scikit-learn."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import fbeta_score

from imet.decode.thresholds import (
    DEFAULT_GRID,
    apply_thresholds,
    average_views,
    fit_logistic,
    search_calibrated,
    search_global,
    search_per_class,
)


def sample_f2(y, pred, zero_division=0.0):
    return fbeta_score(y, pred, beta=2.0, average="samples", zero_division=zero_division)


def random_problem(seed, n=None, c=None, ties=False):
    """Probabilities loosely tied to a sparse truth, like a weak multi-label model."""
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(5, 60))
    c = c or int(rng.integers(3, 25))
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.3)).astype(int)
    probs = np.clip(0.35 * rng.random((n, c)) + 0.3 * y * rng.random((n, c)), 0.0, 1.0)
    if ties:
        probs = np.round(probs, 2)  # equal probabilities, some exactly on grid points
    return probs, y


# ---- average_views -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_average_views_matches_loop(seed):
    rng = np.random.default_rng(seed)
    m, c = int(rng.integers(1, 40)), int(rng.integers(1, 6))
    image = rng.choice([3, 7, 8, 20, 41], size=m)
    probs = rng.random((m, c)).astype(np.float32)
    ids, mean = average_views(probs, image)
    want_ids = sorted(set(image.tolist()))
    np.testing.assert_array_equal(ids, want_ids)
    want = np.array([probs[image == i].astype(np.float64).mean(axis=0) for i in want_ids])
    np.testing.assert_allclose(mean, want, rtol=1e-12)


def test_average_views_empty_and_bad_input():
    ids, mean = average_views(np.zeros((0, 4)), np.zeros(0, dtype=int))
    assert ids.shape == (0,) and mean.shape == (0, 4)
    with pytest.raises(ValueError, match="image"):
        average_views(np.zeros((3, 4)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="integers"):
        average_views(np.zeros((2, 4)), np.zeros(2))


# ---- apply_thresholds --------------------------------------------------------------------------

PROBS = np.array(
    [
        [0.9, 0.2, 0.1],
        [0.1, 0.05, 0.3],
        [0.6, 0.7, 0.8],
    ]
)


def test_apply_global_threshold_min_max():
    got = apply_thresholds(PROBS, 0.5, min_labels=1, max_labels=2)
    # row 1 has nothing >= 0.5 -> its best label is added; row 2 has three -> the best two kept
    want = [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    np.testing.assert_array_equal(got, np.array(want, dtype=bool))
    assert apply_thresholds(PROBS, 0.5, min_labels=0)[1].sum() == 0
    assert apply_thresholds(PROBS, 0.5, min_labels=5).all()  # more than C -> every label


def test_apply_per_class_thresholds_rank_by_margin():
    t = np.array([0.5, 0.1, 0.9])
    # margins: row 0 [0.4, 0.1, -0.8], row 1 [-0.4, -0.05, -0.6], row 2 [0.1, 0.6, -0.1]
    got = apply_thresholds(PROBS, t)
    np.testing.assert_array_equal(got, np.array([[1, 1, 0], [0, 1, 0], [1, 1, 0]], dtype=bool))
    # row 1 gains class 1 (best margin), not class 2 (best probability)
    got = apply_thresholds(PROBS, t, max_labels=1)
    np.testing.assert_array_equal(got, np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=bool))


def test_apply_threshold_is_inclusive_and_ties_go_to_lower_class():
    probs = np.array([[0.3, 0.3, 0.3, 0.1]])
    np.testing.assert_array_equal(apply_thresholds(probs, 0.3)[0], [1, 1, 1, 0])
    np.testing.assert_array_equal(apply_thresholds(probs, 0.3, max_labels=2)[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(apply_thresholds(probs, 0.5, min_labels=1)[0], [1, 0, 0, 0])


def test_apply_refuses_bad_arguments():
    with pytest.raises(ValueError, match="min_labels"):
        apply_thresholds(PROBS, 0.5, min_labels=3, max_labels=2)
    with pytest.raises(ValueError, match="one per class"):
        apply_thresholds(PROBS, np.array([0.1, 0.2]))


# ---- search_global -----------------------------------------------------------------------------


def brute_global(probs, y, grid, min_labels, max_labels, zero_division=0.0):
    """Every grid threshold scored by scikit-learn; the smallest of the best."""

    def score(t):
        pred = apply_thresholds(probs, t, min_labels=min_labels, max_labels=max_labels)
        return sample_f2(y, pred, zero_division)

    f = np.array([score(t) for t in grid])
    return float(grid[np.flatnonzero(f >= f.max() - 1e-12)[0]]), float(f.max())


@pytest.mark.parametrize("min_labels, max_labels", [(0, None), (1, None), (1, 3), (2, 2), (3, None), (0, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_search_global_matches_brute_force(seed, min_labels, max_labels):
    probs, y = random_problem(seed, ties=seed % 2 == 1)
    grid = DEFAULT_GRID
    got = search_global(probs, y, min_labels=min_labels, max_labels=max_labels)
    want = brute_global(probs, y, grid, min_labels, max_labels)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-12)


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_search_global_custom_grid_and_zero_division(zero_division):
    probs, y = random_problem(7, n=40, c=6)
    y[:10] = 0  # rows with no truth: with min_labels=0 some predict nothing, so zero_division counts
    grid = np.array([0.45, 0.05, 0.2, 0.3, 0.1])  # unsorted on purpose
    got = search_global(probs, y, grid=grid, min_labels=0, zero_division=zero_division)
    want = brute_global(probs, y, np.sort(grid), 0, None, zero_division)
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-12)


# ---- search_per_class --------------------------------------------------------------------------


@pytest.mark.parametrize("sweeps", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_last_coordinate_step_is_brute_force_optimal(seed, sweeps):
    """The class visited last was tuned with the others at their final values: no grid point beats it."""
    probs, y = random_problem(20 + seed, n=50, c=8, ties=seed % 2 == 1)
    start, _ = search_global(probs, y, min_labels=0)
    t = search_per_class(probs, y, start=start, shrink=0.0, sweeps=sweeps)
    last = probs.shape[1] - 1
    chosen = sample_f2(y, apply_thresholds(probs, t, min_labels=0))
    for g in DEFAULT_GRID:
        other = t.copy()
        other[last] = g
        assert sample_f2(y, apply_thresholds(probs, other, min_labels=0)) <= chosen + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_per_class_never_below_global_on_its_data(seed):
    probs, y = random_problem(40 + seed, ties=seed % 2 == 1)
    start, best = search_global(probs, y, min_labels=0)
    t = search_per_class(probs, y, start=start, shrink=0.0)
    tuned = sample_f2(y, apply_thresholds(probs, t, min_labels=0))
    assert tuned >= best - 1e-12
    assert best == pytest.approx(sample_f2(y, apply_thresholds(probs, start, min_labels=0)))


def test_per_class_start_off_grid_and_shrinkage():
    probs, y = random_problem(3, n=60, c=10)
    y[:, 0] = 0  # a class never seen: its threshold stays at start after shrinkage
    start = 0.237  # not a grid point
    raw = search_per_class(probs, y, start=start, shrink=0.0)
    shrunk = search_per_class(probs, y, start=start, shrink=10.0)
    n = y.sum(axis=0)
    np.testing.assert_allclose(shrunk, (n * raw + 10.0 * start) / (n + 10.0))
    assert shrunk[0] == pytest.approx(start)
    assert np.isin(raw[raw != start], DEFAULT_GRID).all()
    unshrunk = sample_f2(y, apply_thresholds(probs, raw, min_labels=0))
    assert unshrunk >= sample_f2(y, apply_thresholds(probs, start, min_labels=0)) - 1e-12


def test_per_class_zero_sweeps_is_start():
    probs, y = random_problem(5)
    np.testing.assert_array_equal(search_per_class(probs, y, start=0.2, sweeps=0), 0.2)


# ---- fit_logistic and search_calibrated -------------------------------------------------------------------------


def test_fit_logistic_equals_scikit_learns_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1, 3, 0.5] + [0, 2, -1]
    y = (rng.random((400, 3)) < 1 / (1 + np.exp(-(x * [2, -1, 4] + [0.5, 1, 0])))).astype(np.float32)
    a, b = fit_logistic(x, y, l2=1e-6, iters=40)
    for c in range(3):
        ref = LogisticRegression(C=1e6).fit(x[:, [c]], y[:, c])
        assert a[c] == pytest.approx(ref.coef_[0, 0], rel=1e-3) and b[c] == pytest.approx(ref.intercept_[0], abs=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_calibrated_thresholds_decide_as_the_calibrated_probabilities_do(seed):
    """Against a slow reference: each label's Platt map fitted by scikit-learn (the same L2), the global threshold
    tuned by a plain loop over the grid on the mapped probabilities; then p >= t_c must be exactly
    map(p) >= T; a label without positives is never emitted, one on every image always."""

    probs, y = random_problem(seed, n=80, c=12)
    y[:, 0] = 0  # no positives
    y[:, 1] = 1  # a label on every image
    thresholds, t, f = search_calibrated(probs, y, min_labels=0)
    logit = np.log(np.clip(probs, 1e-7, 1 - 1e-7) / (1 - np.clip(probs, 1e-7, 1 - 1e-7)))
    mapped = np.zeros_like(probs)
    for c in range(probs.shape[1]):
        if y[:, c].any() and not y[:, c].all():
            z = (logit[:, c] - logit[:, c].mean()) / (logit[:, c].std() + 1e-6)
            lr = LogisticRegression(C=1 / (1e-3 * len(z)), tol=1e-12, max_iter=1000).fit(z[:, None], y[:, c])
            mapped[:, c] = lr.predict_proba(z[:, None])[:, 1]  # sklearn leaves the intercept unpenalised
    a, b = fit_logistic(logit, y)
    ours = 1 / (1 + np.exp(-(a * logit + b)))
    has = y.any(0) & ~y.all(0)
    np.testing.assert_allclose(ours[:, has], mapped[:, has], atol=0.02)  # the bias' L2 is ours alone
    slow = max((sample_f2(y, ours >= g), -g) for g in DEFAULT_GRID)
    assert (t, f) == pytest.approx((-slow[1], slow[0]), abs=1e-9)
    up = a > 0
    np.testing.assert_array_equal((probs >= thresholds)[:, up], (ours >= t)[:, up])
    flat = ~up  # no slope: every image or none, as the mean recalibrated probability reaches t or not
    np.testing.assert_array_equal((probs >= thresholds)[:, flat], np.broadcast_to(ours[:, flat].mean(0) >= t,
                                                                                   (len(probs), flat.sum())))
    assert thresholds[0] == 1.0 and not up[0] and (probs >= thresholds)[:, 1].all()


def test_calibrated_thresholds_ignore_a_monotone_map_of_each_label():
    """Undoing class weights (or any increasing map per label) moves the thresholds with the probabilities and
    leaves every decision as it was."""
    from imet.decode.thresholds import undo_weights

    probs, y = random_problem(7, n=120, c=9)
    w = np.linspace(1, 10, 9)
    t1, _, _ = search_calibrated(probs, y)
    t2, _, _ = search_calibrated(undo_weights(probs, w, 1.0), y)
    np.testing.assert_array_equal(probs >= t1, undo_weights(probs, w, 1.0) >= t2)
