"""A decoding rule as plain data, and its search per label kind.

A `Rule` turns (N, C) image probabilities into label sets. It holds groups of labels, each decoded on
its own: the labels of the group with p >= threshold, the row then clamped to the group's
[min_labels, max_labels] (as :func:`imet.decode.thresholds.apply_thresholds` does). The global rule
(the paper) is one group of every label; per-class thresholds replace the group's threshold by one per
label; the per-kind rule is one group per label kind (``culture``, ``tag``: the prefix in labels.csv),
each with its own threshold and label counts, as the iMet 2019 winner decoded culture labels (0-3 per
image) apart from tags (1-8). A rule may first undo the class weights its head was trained with
(`weights`, `power`: :func:`imet.decode.thresholds.undo_weights`); every threshold is on those
probabilities. A rule is JSON-able (`to_json` / `from_json`), so model files, probability
files and blend files carry it whole.

`search_rule` is the one search of a rule as a `Decoding` asks (heads, blends and stacks call it): the
global threshold and the power undoing the class weights first, then per-class thresholds or the per-kind
rule from there. `search_per_kind` finds the per-kind rule by coordinate ascent on sample-averaged F-beta:
one kind's (threshold, min, max) at a time, every candidate of that kind scored at once with the other
kinds' predictions held fixed (F-beta is not additive over kinds: a row's counts add up across them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from imet.decode import values
from imet.decode.spec import Decoding
from imet.decode.thresholds import (
    _as_grid,
    _check_same_shape,
    _column_means,
    apply_thresholds,
    grid_counts,
    search_calibrated,
    search_per_class,
    search_power,
    undo_weights,
)
from imet.metrics import as_labels, counts, fbeta_per_sample, scores

ALL = "*"  # the group of every label
MIN_CHOICES = (0, 1, 2, 3)  # labels of a kind per image, at least: candidates of the per-kind search
MAX_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, None)  # and at most (None: no limit)


@dataclass(frozen=True)
class Group:
    """Labels of one kind (or ALL) decoded together: p >= threshold, then [min_labels, max_labels] per row."""

    kind: str
    threshold: float
    min_labels: int = 0
    max_labels: int | None = None


@dataclass(frozen=True)
class Rule:
    """How image probabilities become labels: groups of labels decoded apart, per-class thresholds optional."""

    groups: tuple[Group, ...]
    class_thresholds: np.ndarray | None = None  # (C,): replaces each group's threshold label by label
    weights: np.ndarray | None = None  # (C,) the head's BCE class weights, undone before thresholding
    power: float = 0.0  # p / (p + weights^power (1 - p)); 0: the probabilities as they are

    @classmethod
    def global_(cls, threshold: float, min_labels: int = Decoding.min_labels,
                max_labels: int | None = Decoding.max_labels,
                class_thresholds: np.ndarray | None = None, weights: np.ndarray | None = None,
                power: float = 0.0) -> Rule:
        return cls((Group(ALL, float(threshold), min_labels, max_labels),), class_thresholds, weights, power)

    @property
    def by_kind(self) -> bool:
        """True for a per-kind rule (a group per label kind), False for the global or per-class one."""
        return self.groups[0].kind != ALL

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) what the thresholds compare: the probabilities with the class weights undone."""
        return undo_weights(probs, self.weights, self.power)

    def apply(self, probs: np.ndarray, kinds: tuple[str, ...] | np.ndarray) -> np.ndarray:
        """(N, C) bool labels of (N, C) probabilities; `kinds` (C,) names each label's kind."""
        probs = self.scores(probs)
        pred = np.zeros(probs.shape, bool)
        for g, cols in zip(self.groups, self.columns(kinds), strict=True):
            t = g.threshold if self.class_thresholds is None else np.asarray(self.class_thresholds)[cols]
            pred[:, cols] = apply_thresholds(probs[:, cols], t, min_labels=g.min_labels, max_labels=g.max_labels)
        return pred

    def columns(self, kinds: tuple[str, ...] | np.ndarray) -> list[np.ndarray]:
        """Label indices of each group; a kind the labels do not have is refused (naming what they have)."""
        kinds = np.asarray(kinds, dtype=object)
        out = []
        for g in self.groups:
            cols = np.arange(len(kinds)) if g.kind == ALL else np.flatnonzero(kinds == g.kind)
            if g.kind != ALL and not cols.size:
                raise ValueError(f"the rule decodes kind {g.kind!r}, but the labels are of kinds "
                                 f"{', '.join(sorted(set(kinds)))}")
            out.append(cols)
        covered = np.concatenate(out) if out else np.zeros(0, int)
        if len(covered) != len(kinds) or np.unique(covered).size != len(kinds):
            raise ValueError("the rule's groups must cover every label exactly once")
        return out

    def describe(self) -> str:
        """A few words, for fit and blend to print."""
        def counts_(g: Group) -> str:
            return f"{g.min_labels}+" if g.max_labels is None else f"{g.min_labels}-{g.max_labels}"
        undo = f" (class weights undone, power {self.power:g})" if self.weights is not None and self.power else ""
        if not self.by_kind:
            g = self.groups[0]
            what = "per-class thresholds around" if self.class_thresholds is not None else "threshold"
            return f"{what} {_t(g.threshold)}, labels {counts_(g)}{undo}"
        return "; ".join(f"{g.kind} at {_t(g.threshold)}, labels {counts_(g)}" for g in self.groups) + undo

    def to_json(self) -> dict:
        return {"groups": [{"kind": g.kind, "threshold": g.threshold, "min_labels": g.min_labels,
                            "max_labels": g.max_labels} for g in self.groups],
                "class_thresholds": None if self.class_thresholds is None else
                [float(t) for t in self.class_thresholds],
                "weights": None if self.weights is None else [float(w) for w in self.weights], "power": self.power}

    @classmethod
    def from_json(cls, blob: dict, n_labels: int) -> Rule:
        """The rule written by `to_json`, checked: every value of its type and range (ValueError naming it)."""
        try:
            groups = tuple(_group(g, n_labels) for g in blob["groups"])
            ct = blob.get("class_thresholds")
            ct = None if ct is None else values.reals(ct, "class_thresholds", n_labels)
            w = blob.get("weights")  # absent in files of an older imet: nothing undone
            w = None if w is None else values.reals(w, "weights", n_labels, 0.0, 1e6)
            power = values.real(blob.get("power", 0.0), "power", 0.0, 4.0)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"a malformed decoding rule ({type(e).__name__}: {e})") from None
        if not groups:
            raise ValueError("a malformed decoding rule (no groups)")
        return cls(groups, ct, w, power)


def _t(threshold: float) -> str:
    """A threshold in two decimals, three below 0.01 (the grid's fine end)."""
    return f"{threshold:.3f}" if 0 < threshold < 0.01 else f"{threshold:.2f}"


def _group(g: dict, n_labels: int) -> Group:
    """One group of a rule read from JSON: a kind name, a threshold in [0, 1], label counts in 0..n_labels."""
    if not isinstance(g.get("kind"), str):
        raise ValueError(f"kind is {g.get('kind')!r}, not a name")
    low = values.count(g["min_labels"], f"group {g['kind']}: min_labels", 0, n_labels)
    high = None if g["max_labels"] is None else values.count(g["max_labels"], f"group {g['kind']}: max_labels", low)
    return Group(g["kind"], values.real(g["threshold"], f"group {g['kind']}: threshold"), low, high)


class Searched(NamedTuple):
    """What `search_rule` found."""

    rule: Rule  # the rule kept
    f2: float  # its sample-averaged F2 on the tuning images
    threshold: float  # the global threshold (where the per-class and per-kind searches start)
    power: float  # the power undoing the class weights (0: the probabilities as they are)
    global_f2: float  # the F2 of the global threshold alone


def search_rule(probs: np.ndarray, truth: np.ndarray, kinds: tuple[str, ...] | np.ndarray, decoding: Decoding, *,
                weights: np.ndarray | None = None) -> Searched:
    """The rule `decoding` asks for, tuned on (N, C) image probabilities and their truth, scoring F2.

    First the global threshold and the power undoing the class `weights` (`search_power`; no weights: none
    undone), with decoding's min/max labels; then, for per-class, thresholds shrunk toward the global one;
    for per-kind, the per-kind rule, kept only when it beats the global threshold; for calibrated, per-class
    thresholds from a per-label calibration (`search_calibrated`) on the probabilities as they are.
    """
    lo, hi = decoding.min_labels, decoding.max_labels
    power, t, global_f2 = search_power(probs, truth, weights, min_labels=lo, max_labels=hi)
    weights = weights if power else None  # nothing undone: the rule carries no weights
    if decoding.thresholds == "per-class":
        ct = search_per_class(undo_weights(probs, weights, power), truth, start=t, shrink=decoding.shrink)
        rule = Rule.global_(t, lo, hi, ct, weights, power)
        return Searched(rule, scores(truth, rule.apply(probs, kinds))["f2"], t, power, global_f2)
    if decoding.thresholds == "calibrated":  # a monotone map per label: the class weights need no undoing
        ct, _, _ = search_calibrated(probs, truth, min_labels=lo, max_labels=hi)
        middle = float(np.median(ct[ct < 1])) if (ct < 1).any() else 1.0
        rule = Rule.global_(middle, lo, hi, ct)
        return Searched(rule, scores(truth, rule.apply(probs, kinds))["f2"], middle, 0.0, global_f2)
    if decoding.thresholds == "per-kind":
        rule, f_kind = search_per_kind(probs, truth, kinds, start=t, weights=weights, power=power)
        if f_kind > global_f2:
            return Searched(rule, f_kind, t, power, global_f2)
    return Searched(Rule.global_(t, lo, hi, None, weights, power), global_f2, t, power, global_f2)


def search_per_kind(probs: np.ndarray, y_true: np.ndarray, kinds: tuple[str, ...] | np.ndarray, *,
                    start: float, grid: np.ndarray | None = None, beta: float = 2.0,
                    min_choices: tuple[int, ...] = MIN_CHOICES, max_choices: tuple[int | None, ...] = MAX_CHOICES,
                    sweeps: int = 3, zero_division: float = 0.0, weights: np.ndarray | None = None,
                    power: float = 0.0) -> tuple[Rule, float]:
    """The per-kind rule maximising sample-averaged F-beta by coordinate ascent, and its score.

    The thresholds are on `undo_weights(probs, weights, power)`; the rule carries both.
    Every kind starts at (``start``, 0, None). In turn, each kind takes the best (threshold, min, max) of
    grid x min_choices x max_choices (min <= max) with the other kinds' labels fixed; a kind's current
    choice is kept unless strictly beaten; stops after ``sweeps`` passes or a pass that changes nothing.
    Ties between candidates go to the smallest threshold, then min, then max (in the order given).
    """
    probs = undo_weights(probs, weights, power)
    y = as_labels(y_true, "y_true")
    _check_same_shape(probs, y)
    kinds = np.asarray(kinds, dtype=object)
    if kinds.shape != (probs.shape[1],):
        raise ValueError(f"need one kind per label ({probs.shape[1]}), got {kinds.shape}")
    grid = _as_grid(grid)
    names = sorted(set(kinds.tolist()))
    groups = {k: Group(k, float(start)) for k in names}
    pairs = [(lo, hi) for lo in min_choices for hi in max_choices if hi is None or hi >= lo]
    for _ in range(sweeps):
        changed = False
        for k in names:
            rule = Rule(tuple(groups[n] for n in names))
            cols = kinds == k
            pred = rule.apply(probs, kinds)
            pred[:, cols] = False
            y_other = y.copy()
            y_other[:, cols] = False
            tp, fp, fn = counts(y_other, pred)  # other kinds' counts per row
            cand, f = _best_for_kind(probs[:, cols], y[:, cols], tp, fp, fn, grid, pairs, beta, zero_division)
            current = _score_group(probs[:, cols], y[:, cols], tp, fp, fn, groups[k], beta, zero_division)
            if f > current + 1e-12:
                groups[k], changed = Group(k, *cand), True
        if not changed:
            break
    rule = Rule(tuple(groups[n] for n in names))
    tp, fp, fn = counts(y, rule.apply(probs, kinds))
    rule = Rule(rule.groups, None, None if weights is None else np.asarray(weights, np.float64), float(power))
    return rule, float(_column_means(fbeta_per_sample(tp, fp, fn, beta, zero_division)[:, None])[0])


def _best_for_kind(probs: np.ndarray, y: np.ndarray, tp0, fp0, fn0, grid: np.ndarray,
                   pairs: list[tuple[int, int | None]], beta: float, zero_division: float):
    """((threshold, min, max), mean F-beta) of the best candidate for one kind's columns, the rest fixed.

    A row keeps its first k labels by probability (k = count of p >= t, clamped): `grid_counts` gives
    (k, tp) of every (threshold, min, max) from one histogram and one partial sort.
    """
    tp0, fp0, fn0 = (np.asarray(a)[:, None] for a in (tp0, fp0, fn0))
    n_true = y.sum(axis=1)[:, None]
    best, best_f = (float(grid[0]), *pairs[0]), -np.inf
    for (lo, hi), (k, tp) in zip(pairs, grid_counts(probs, y, grid, pairs), strict=True):
        f = _column_means(fbeta_per_sample(tp0 + tp, fp0 + k - tp, fn0 + n_true - tp, beta, zero_division))
        g = int(np.nanargmax(f)) if not np.isnan(f).all() else 0
        if f[g] > best_f + 1e-12:
            best, best_f = (float(grid[g]), lo, hi), float(f[g])
    return best, best_f


def _score_group(probs: np.ndarray, y: np.ndarray, tp0, fp0, fn0, g: Group, beta: float, zero_division: float):
    """Mean F-beta with one kind decoded by group `g`, the other kinds' counts given."""
    pred = apply_thresholds(probs, g.threshold, min_labels=g.min_labels, max_labels=g.max_labels)
    tp = (pred & y).sum(1)
    f = fbeta_per_sample(tp0 + tp, fp0 + pred.sum(1) - tp, fn0 + y.sum(1) - tp, beta, zero_division)
    return float(_column_means(f[:, None])[0])
