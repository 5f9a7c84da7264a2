"""The fast decoding searches (grid histograms, a top-K partial sort, undone class weights) against the slow
obvious ones of tests/reference_decode.py on random inputs, including ties, wide rows and label-count clamps."""

import numpy as np
import pytest
import reference_decode as ref
from test_thresholds import random_problem as problem

from imet.decode import thresholds as T
from imet.decode.rule import Group, Rule, _best_for_kind, search_per_kind
from imet.metrics import counts


def test_bins_equal_a_binary_search():
    rng = np.random.default_rng(0)
    for grid in (T.DEFAULT_GRID, np.unique(rng.random(30)), np.array([0.5]), np.array([0.0, 1.0]),
                 np.array([1.0]), np.array([-0.2, 0.3]), np.array([0.1, 0.1 + 1e-7])):
        p = np.r_[rng.random(5000), grid, np.nextafter(grid, -1), np.nextafter(grid, 2), -0.5, 0.0, 1.0, 1.5]
        np.testing.assert_array_equal(T._bins(grid, p), np.searchsorted(grid, p, side="right"))


@pytest.mark.parametrize("seed", range(6))
def test_grid_counts_match_decoding_row_by_row(seed):
    probs, y = problem(seed, c=int(np.random.default_rng(seed).integers(20, 120)), ties=seed % 2 == 1)
    grid = np.array([0.05, 0.1, 0.2, 0.3, 0.45])
    clamps = [(0, None), (1, None), (3, None), (1, 2), (2, 10), (0, 1)]
    for (lo, hi), (k, tp) in zip(clamps, T.grid_counts(probs, y.astype(bool), grid, clamps), strict=True):
        for g, t in enumerate(grid):
            pred = ref.decode(probs, t, lo, hi)
            np.testing.assert_array_equal(k[:, g], pred.sum(1))
            np.testing.assert_array_equal(tp[:, g], (pred & (y == 1)).sum(1))


@pytest.mark.parametrize("min_labels, max_labels", [(0, None), (1, None), (1, 3), (4, 4), (2, None)])
@pytest.mark.parametrize("seed", range(3))
def test_search_global_equals_the_slow_search(seed, min_labels, max_labels):
    probs, y = problem(100 + seed, ties=seed == 1)
    grid = np.array([0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.49])
    got = T.search_global(probs, y, grid=grid, min_labels=min_labels, max_labels=max_labels)
    want = ref.search_global(probs, y, grid, min_labels, max_labels)
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_undo_weights_and_search_power_equal_the_slow_ones(seed):
    probs, y = problem(200 + seed)
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 10.0, probs.shape[1])
    np.testing.assert_allclose(T.undo_weights(probs, weights, 0.5), ref.undo_weights(probs, weights, 0.5),
                               rtol=1e-12)
    np.testing.assert_array_equal(T.undo_weights(probs, None, 1.0), probs)
    grid = np.array([0.02, 0.05, 0.1, 0.2, 0.3, 0.45])
    got = T.search_power(probs, y, weights, powers=(0.0, 0.5, 1.0), grid=grid)
    want = ref.search_power(probs, y, weights, (0.0, 0.5, 1.0), grid)
    assert got[:2] == want[:2] and got[2] == pytest.approx(want[2], abs=1e-12)


def test_undoing_the_weights_of_a_weighted_calibrated_model_gives_the_unweighted_probability():
    q = np.array([[0.01, 0.2, 0.5]])  # unweighted probabilities
    w = np.array([10.0, 3.0, 1.0])
    weighted = w * q / (w * q + 1 - q)  # what BCE with pos_weight w converges to
    np.testing.assert_allclose(T.undo_weights(weighted, w, 1.0), q)


@pytest.mark.parametrize("seed", range(4))
def test_best_candidate_of_a_kind_equals_the_slow_search(seed):
    probs, y = problem(300 + seed, c=30, ties=seed % 2 == 0)
    kinds = np.array(["culture"] * 10 + ["tag"] * 20)
    fixed = np.zeros(probs.shape, bool)
    fixed[:, 10:] = probs[:, 10:] >= 0.3  # the tags decoded some way, held fixed
    yb = y.astype(bool)
    y_other = yb.copy()
    y_other[:, :10] = False
    tp, fp, fn = counts(y_other, fixed)
    grid = np.array([0.05, 0.1, 0.2, 0.3, 0.45])
    pairs = [(0, None), (1, 1), (1, 3), (2, None)]
    got = _best_for_kind(probs[:, :10], yb[:, :10], tp, fp, fn, grid, pairs, 2.0, 0.0)
    want = ref.kind_candidates(probs, y, kinds, "culture", fixed, grid, pairs)
    assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-12)


def test_a_rule_with_weights_decodes_the_undone_probabilities_and_round_trips():
    probs, y = problem(9, n=30, c=12)
    kinds = np.array(["culture"] * 4 + ["tag"] * 8)
    w = np.linspace(1.0, 10.0, 12)
    rule, f = search_per_kind(probs, y, kinds, start=0.1, weights=w, power=0.5)
    assert rule.power == 0.5 and rule.weights is not None
    plain = Rule(rule.groups)  # the same groups on probabilities undone by hand
    np.testing.assert_array_equal(rule.apply(probs, kinds), plain.apply(ref.undo_weights(probs, w, 0.5), kinds))
    assert f == pytest.approx(ref.f2(y, rule.apply(probs, kinds)), abs=1e-12)
    again = Rule.from_json(rule.to_json(), 12)
    np.testing.assert_array_equal(again.apply(probs, kinds), rule.apply(probs, kinds))
    old = rule.to_json()
    del old["weights"], old["power"]  # a rule written by an older imet: nothing undone
    assert Rule.from_json(old, 12).power == 0.0
    for bad in ({"weights": ["2"] * 12}, {"weights": [1.0] * 11}, {"power": float("nan")}, {"power": -1}):
        with pytest.raises(ValueError, match="malformed decoding rule"):
            Rule.from_json({**rule.to_json(), **bad}, 12)
    g = Rule.global_(0.2, 1, None, None, w, 1.0)
    assert "class weights undone" in g.describe() and Group("*", 0.2, 1, None) == g.groups[0]


@pytest.mark.parametrize("shrink", [0.0, 10.0])
@pytest.mark.parametrize("seed", range(3))
def test_search_per_class_equals_the_slow_coordinate_ascent(seed, shrink):
    probs, y = problem(400 + seed, n=25, c=6)
    grid = np.array([0.05, 0.1, 0.2, 0.3, 0.45])
    got = T.search_per_class(probs, y, start=0.237, grid=grid, shrink=shrink)
    want = ref.search_per_class(probs, y, 0.237, grid, shrink=shrink)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
