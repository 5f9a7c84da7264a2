"""imet.decode.rule: decoding per label kind against slow loops and scikit-learn's fbeta_score."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import fbeta_score

from imet.decode.rule import Group, Rule, search_per_kind
from imet.decode.thresholds import apply_thresholds, search_global


def sample_f2(y, pred):
    return fbeta_score(y, pred, beta=2.0, average="samples", zero_division=0.0)


def kind_problem(seed, n=40):
    """Two kinds unlike each other: one culture label per image (well separated), several weak tags."""
    rng = np.random.default_rng(seed)
    n_culture, n_tag = int(rng.integers(2, 5)), int(rng.integers(3, 9))
    kinds = np.array(["culture"] * n_culture + ["tag"] * n_tag, dtype=object)[rng.permutation(n_culture + n_tag)]
    y = np.zeros((n, len(kinds)), int)
    culture, tag = np.flatnonzero(kinds == "culture"), np.flatnonzero(kinds == "tag")
    y[np.arange(n), rng.choice(culture, n)] = 1
    for i in range(n):
        y[i, rng.choice(tag, rng.integers(1, 4), replace=False)] = 1
    probs = np.where(kinds == "culture", 0.5 * rng.random(y.shape) + 0.45 * y,
                     0.25 * rng.random(y.shape) + 0.2 * y * rng.random(y.shape))
    return np.round(probs, 3), y, kinds


def slow_apply(rule, probs, kinds):
    """Row by row, kind by kind: labels over the threshold, then the best ones added or the worst dropped."""
    out = np.zeros(probs.shape, bool)
    for i, row in enumerate(probs):
        for g in rule.groups:
            cols = [c for c in range(len(kinds)) if g.kind in ("*", kinds[c])]
            t = {c: g.threshold if rule.class_thresholds is None else rule.class_thresholds[c] for c in cols}
            ranked = sorted(cols, key=lambda c: (-(row[c] - t[c]) if rule.class_thresholds is not None
                                                 else -row[c], c))
            chosen = [c for c in ranked if row[c] >= t[c]]
            hi = len(cols) if g.max_labels is None else min(g.max_labels, len(cols))
            k = min(max(len(chosen), min(g.min_labels, hi)), hi)
            out[i, ranked[:k]] = True
    return out


@pytest.mark.parametrize("seed", range(4))
def test_apply_matches_a_slow_loop(seed):
    probs, _, kinds = kind_problem(seed, n=15)
    rule = Rule((Group("culture", 0.4, 0, 2), Group("tag", 0.15, 1, 3)))
    np.testing.assert_array_equal(rule.apply(probs, kinds), slow_apply(rule, probs, kinds))
    per_class = Rule.global_(0.2, 1, 4, class_thresholds=np.linspace(0.1, 0.4, len(kinds)))
    np.testing.assert_array_equal(per_class.apply(probs, kinds), slow_apply(per_class, probs, kinds))
    np.testing.assert_array_equal(Rule.global_(0.3, 1, None).apply(probs, kinds), apply_thresholds(probs, 0.3))


def brute_kind_step(rule, probs, y, kinds, k, grid, mins, maxs):
    """The best score of any candidate for kind k, the other kinds as in `rule`, scored by scikit-learn."""
    best = -1.0
    for t, lo, hi in itertools.product(grid, mins, maxs):
        if hi is not None and hi < lo:
            continue
        groups = tuple(Group(k, t, lo, hi) if g.kind == k else g for g in rule.groups)
        best = max(best, sample_f2(y, Rule(groups).apply(probs, kinds)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_per_kind_search_is_a_coordinate_optimum_by_brute_force(seed):
    probs, y, kinds = kind_problem(seed)
    grid, mins, maxs = np.arange(1, 10) / 20, (0, 1, 2), (1, 2, 4, None)
    rule, f2 = search_per_kind(probs, y, kinds, start=0.2, grid=grid, min_choices=mins, max_choices=maxs, sweeps=10)
    assert f2 == pytest.approx(sample_f2(y, rule.apply(probs, kinds)), abs=1e-12)  # the score it reports is true
    for k in ("culture", "tag"):  # no single kind can do better alone
        assert brute_kind_step(rule, probs, y, kinds, k, grid, mins, maxs) <= f2 + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_per_kind_beats_one_global_threshold_when_kinds_differ(seed):
    probs, y, kinds = kind_problem(seed, n=60)
    _, f_global = search_global(probs, y, min_labels=1)
    rule, f_kind = search_per_kind(probs, y, kinds, start=0.2)
    assert f_kind > f_global + 0.02
    assert [g.kind for g in rule.groups] == ["culture", "tag"]


def test_per_kind_search_within_joint_brute_force():
    probs, y, kinds = kind_problem(0, n=30)
    grid, mins, maxs = np.array([0.1, 0.2, 0.3, 0.45]), (0, 1), (1, 3, None)
    _, f2 = search_per_kind(probs, y, kinds, start=0.2, grid=grid, min_choices=mins, max_choices=maxs, sweeps=10)
    cands = [(t, lo, hi) for t, lo, hi in itertools.product(grid, mins, maxs) if hi is None or hi >= lo]
    joint = max(sample_f2(y, Rule((Group("culture", *a), Group("tag", *b))).apply(probs, kinds))
                for a in cands for b in cands)
    assert f2 <= joint + 1e-12 and f2 >= joint - 0.02  # coordinate ascent: near the joint optimum here


def test_json_round_trip_and_refusals():
    rule = Rule((Group("culture", 0.4, 0, 3), Group("tag", 0.1, 1, None)))
    assert Rule.from_json(rule.to_json(), 5) == rule
    per_class = Rule.global_(0.2, class_thresholds=np.array([0.1, 0.2, 0.3]))
    again = Rule.from_json(per_class.to_json(), 3)
    np.testing.assert_array_equal(again.class_thresholds, per_class.class_thresholds)
    with pytest.raises(ValueError, match="class_thresholds must be a list of 4 numbers"):
        Rule.from_json(per_class.to_json(), 4)
    group = {"kind": "tag", "threshold": 0.3, "min_labels": 1, "max_labels": None}
    for key, bad, said in (("threshold", "0.3", "threshold is '0.3', not a finite number"),  # was every label
                           ("threshold", float("nan"), "threshold is nan"), ("threshold", True, "not a finite"),
                           ("min_labels", 2.5, "min_labels is 2.5, not an integer"),
                           ("min_labels", 9, "min_labels is 9, outside 0..3"), ("max_labels", 0, "outside 1..")):
        with pytest.raises(ValueError, match=said):
            Rule.from_json({"groups": [{**group, key: bad}]}, 3)
    with pytest.raises(ValueError, match=r"class_thresholds\[1\] is inf"):
        Rule.from_json({"groups": [group], "class_thresholds": [0.1, float("inf"), 0.2]}, 3)
    with pytest.raises(ValueError, match="malformed"):
        Rule.from_json({"groups": [{"kind": "tag", "threshold": 2.0, "min_labels": 0, "max_labels": None}]}, 3)
    with pytest.raises(ValueError, match="malformed"):
        Rule.from_json({"groups": [{"kind": "tag"}]}, 3)
    with pytest.raises(ValueError, match="kinds culture, tag"):
        Rule((Group("period", 0.1),)).apply(np.zeros((1, 2)), ("culture", "tag"))
