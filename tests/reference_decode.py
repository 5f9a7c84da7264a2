"""Slow, obvious decoding: Python loops over rows and thresholds, scored by scikit-learn. The fast searches in
imet.decode are tested against these on random inputs (tests/test_decode_scale.py)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import fbeta_score


def f2(y, pred, zero_division=0.0) -> float:
    return float(fbeta_score(y, pred, beta=2.0, average="samples", zero_division=zero_division))


def decode_row(p, t, min_labels, max_labels):
    """One row's labels: p >= t, clamped to [min, max] by rank of p - t (ties: lower class index)."""
    c = len(p)
    t = np.broadcast_to(t, (c,))
    ranked = sorted(range(c), key=lambda j: (-(p[j] - t[j]), j))
    n = sum(p[j] >= t[j] for j in range(c))
    hi = c if max_labels is None else min(max_labels, c)
    k = min(max(n, min(min_labels, hi)), hi)
    if k == n:
        return [j for j in range(c) if p[j] >= t[j]]
    return ranked[:k]


def decode(probs, t, min_labels=1, max_labels=None):
    out = np.zeros(probs.shape, bool)
    for i, row in enumerate(probs):
        out[i, decode_row(row, t, min_labels, max_labels)] = True
    return out


def search_global(probs, y, grid, min_labels=1, max_labels=None):
    """(threshold, F2): every grid point decoded and scored; the smallest of the best."""
    best = (None, -1.0)
    for t in sorted(grid):
        f = f2(y, decode(probs, t, min_labels, max_labels))
        if f > best[1] + 1e-12:
            best = (float(t), f)
    return best


def undo_weights(probs, weights, power):
    """p / (p + w^power (1 - p)), element by element."""
    out = np.array(probs, dtype=np.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            v = weights[j] ** power
            out[i, j] = out[i, j] / (out[i, j] + v * (1 - out[i, j]))
    return out


def search_power(probs, y, weights, powers, grid, min_labels=1, max_labels=None):
    """(power, threshold, F2): the global search at each power; the first of the best."""
    best = (None, None, -1.0)
    for a in powers:
        t, f = search_global(undo_weights(probs, weights, a), y, grid, min_labels, max_labels)
        if f > best[2] + 1e-12:
            best = (float(a), t, f)
    return best


def kind_candidates(probs, y, kinds, kind, fixed, grid, pairs):
    """Best (threshold, min, max) for `kind`'s columns with the other columns decoded as `fixed` (N, C) bool."""
    cols = np.flatnonzero(np.asarray(kinds) == kind)
    best = (None, -1.0)
    for lo, hi in pairs:
        for t in sorted(grid):
            pred = fixed.copy()
            pred[:, cols] = decode(probs[:, cols], t, lo, hi)
            f = f2(y, pred)
            if f > best[1] + 1e-12:
                best = ((float(t), lo, hi), f)
    return best


def search_per_class(probs, y, start, grid, shrink=10.0, sweeps=2):
    """Per-class thresholds by coordinate ascent: each class in turn tries every grid threshold with the
    others fixed (decoded with no label-count clamp), keeps its own unless strictly better, ties to the
    nearest; then t_c = start + n_c / (n_c + shrink) (t_c - start)."""
    n, c = probs.shape
    t = np.full(c, float(start))

    def total(ts):
        return n * f2(y, probs >= ts)

    for _ in range(sweeps):
        for j in range(c):
            current = total(t)
            scored = []
            for g in sorted(grid):
                trial = t.copy()
                trial[j] = g
                scored.append((total(trial), float(g)))
            best = max(s for s, _ in scored)
            if best > current + 1e-9:
                tied = [g for s, g in scored if s == best]
                t[j] = min(tied, key=lambda g: abs(g - t[j]))
    n_pos = y.sum(axis=0)
    return start + n_pos / (n_pos + shrink) * (t - start) if shrink else t
