"""Decode probabilities into label sets: view averaging, thresholds, and threshold search.

Conventions shared by every function here:

- A label is predicted when p >= threshold. Rows are then clamped to [min_labels, max_labels] labels by
  ranking on the margin p - threshold (just p when the threshold is one number); equal margins rank the
  lower class index first, so decode and search agree even on ties.
- Searches score sample-averaged F-beta exactly as :mod:`imet.metrics` does (scikit-learn's convention),
  from per-row counts, so no (grid x N x C) array is ever built, and no row is sorted whole: a row's count
  of p >= t and of true labels among them come from one histogram over the grid; only the rows' top K
  labels (K = the largest min/max labels asked for) are ranked, for the rows that the clamp changes.
- Heads trained with class-weighted BCE (weight w_c = negatives/positives, clipped at 10) give rare labels
  inflated probabilities: p_w = w p / (w p + 1 - p). `undo_weights` maps them back by
  p / (p + w^a (1 - p)) (a = 1: the unweighted probability; a = 0: unchanged) and `search_power` tunes a
  on val with the global threshold.
- Ties between candidate thresholds: ``search_global`` takes the smallest threshold; the per-class
  search keeps a class's current threshold unless another one is strictly better, and otherwise takes
  the best one nearest to the current threshold.
"""

from __future__ import annotations

import numpy as np

from imet.decode.spec import Decoding, check_counts
from imet.metrics import as_labels, counts, fbeta_per_sample

DEFAULT_GRID = np.r_[np.arange(1, 10) / 1000.0, np.arange(1, 50) / 100.0]  # (0, 0.5) as the paper, finer below 0.01
POWERS = (0.0, 0.25, 0.5, 0.75, 1.0)  # candidates of `search_power` (0: the probabilities as trained)


def average_views(probs: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct image indices (sorted) and the mean probability of each image's views.

    Views of one image are rows of ``probs`` (M, C) sharing a value of ``image`` (M,); the paper
    averages them before thresholding.
    """
    probs = np.asarray(probs)
    image = np.asarray(image)
    if probs.ndim != 2 or image.shape != probs.shape[:1]:
        raise ValueError(f"need probs (M, C) and image (M,), got {probs.shape} and {image.shape}")
    if image.size and not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"image indices must be integers, got dtype {image.dtype}")
    ids, inverse, n_views = np.unique(image, return_inverse=True, return_counts=True)
    if not ids.size:
        return ids.astype(np.int64), np.zeros((0, probs.shape[1]))
    order = np.argsort(inverse, kind="stable")  # views grouped by image
    starts = np.concatenate(([0], np.cumsum(n_views)[:-1]))
    sums = np.add.reduceat(probs[order].astype(np.float64), starts, axis=0)  # (n_images, C)
    return ids, sums / n_views[:, None]


def apply_thresholds(
    probs: np.ndarray,
    thresholds: float | np.ndarray,
    *,
    min_labels: int = Decoding.min_labels,
    max_labels: int | None = Decoding.max_labels,
) -> np.ndarray:
    """(N, C) bool: labels with p >= threshold, each row clamped to [min_labels, max_labels] labels.

    A row short of ``min_labels`` gets its top labels by margin p - threshold added; a row over
    ``max_labels`` keeps the ``max_labels`` with the largest margin.
    """
    probs = _as_probs(probs)
    key = _rank_key(probs, thresholds)
    pred = probs >= thresholds
    n = pred.sum(axis=1)
    k = _clamp(n, min_labels, max_labels, probs.shape[1])
    fix = np.flatnonzero(k != n)
    if fix.size:
        order = np.argsort(-key[fix], axis=1, kind="stable")  # best margin first, ties by class index
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(probs.shape[1])[None, :], axis=1)
        pred[fix] = rank < k[fix, None]
    return pred


def search_global(
    probs: np.ndarray,
    y_true: np.ndarray,
    *,
    grid: np.ndarray | None = None,
    beta: float = 2.0,
    min_labels: int = Decoding.min_labels,
    max_labels: int | None = Decoding.max_labels,
    zero_division: float = 0.0,
) -> tuple[float, float]:
    """The single threshold of ``grid`` maximising sample-averaged F-beta after decode, and that score.

    Scores every grid point at once from (N, G) counts (`grid_counts`). Ties go to the smallest threshold.
    """
    probs = _as_probs(probs)
    y = as_labels(y_true, "y_true")
    _check_same_shape(probs, y)
    grid = _as_grid(grid)
    mean_f = _column_means(grid_scores(probs, y, grid, min_labels, max_labels, beta, zero_division))
    best = int(np.nanargmax(mean_f)) if not np.isnan(mean_f).all() else 0
    return float(grid[best]), float(mean_f[best])


def grid_scores(probs: np.ndarray, y: np.ndarray, grid: np.ndarray, min_labels: int, max_labels: int | None,
                beta: float, zero_division: float) -> np.ndarray:
    """(N, G) F-beta of each row decoded at each grid threshold, clamped to [min_labels, max_labels]."""
    k, tp = grid_counts(probs, y, grid, [(min_labels, max_labels)])[0]
    return fbeta_per_sample(tp, k - tp, y.sum(axis=1)[:, None] - tp, beta, zero_division)


def grid_counts(probs: np.ndarray, y: np.ndarray, grid: np.ndarray,
                clamps: list[tuple[int, int | None]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per clamp (min, max labels): (N, G) labels kept and true labels among them at each grid threshold.

    Unclamped, a row keeps exactly its labels with p >= t: both counts are histograms over the grid (no
    sort). Where the clamp changes the count k, the row keeps its top k labels (k <= K, the largest bound
    of any clamp): only those top K are ranked, as `apply_thresholds` ranks them.
    """
    n, c = probs.shape
    at_least = _count_at_least(probs, grid).astype(np.int32)  # (N, G); int32 halves the traffic below
    rows, cols = np.nonzero(y)
    true_at_least = _count_at_least_sparse(rows, probs[rows, cols], grid, n).astype(np.int32)  # (N, G)
    top = min(c, max(max(lo, 0 if hi is None else hi) for lo, hi in clamps))
    hits = _top_hits(probs, y, top).astype(np.int32)  # (N, top + 1): true labels among each row's first k
    out = []
    for lo, hi in clamps:
        _clamp(np.zeros(1, np.int64), lo, hi, c)  # checks the bounds
        low, high = min(lo, c if hi is None else min(hi, c)), c if hi is None else min(hi, c)
        k = np.minimum(np.maximum(at_least, low), high)
        tp = np.where(k == at_least, true_at_least, np.take_along_axis(hits, np.minimum(k, top), axis=1))
        out.append((k, tp))
    return out


def _top_hits(probs: np.ndarray, y: np.ndarray, top: int) -> np.ndarray:
    """(N, top + 1): true labels among each row's first k labels by p (ties: lower class index), k = 0..top.

    Ranks only the candidates with p >= the row's top-th largest value (np.partition), not the whole row.
    """
    n, c = probs.shape
    hits = np.zeros((n, top + 1), dtype=np.int64)
    if top == 0 or n == 0:
        return hits
    kth = probs.max(axis=1) if top == 1 else -np.partition(-probs, top - 1, axis=1)[:, top - 1]  # (N,) top-th largest
    rows, cols = np.nonzero(probs >= kth[:, None])  # at least `top` per row (more on ties)
    order = np.lexsort((cols, -probs[rows, cols], rows))  # by row, then p descending, then class index
    rows, cols = rows[order], cols[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within its row
    keep = rank < top
    hits[rows[keep], rank[keep] + 1] = y[rows[keep], cols[keep]]
    return np.cumsum(hits, axis=1)


def undo_weights(probs: np.ndarray, weights: np.ndarray | None, power: float) -> np.ndarray:
    """p / (p + w^power (1 - p)) per label: probabilities of a class-weighted BCE mapped toward unweighted
    ones (power 1: exactly, for a calibrated model; 0 or no weights: unchanged)."""
    probs = _as_probs(probs)
    if weights is None or power == 0:
        return probs
    v = np.asarray(weights, dtype=np.float64) ** power  # (C,)
    return probs / np.maximum(probs + v * (1.0 - probs), 1e-300)


def search_power(
    probs: np.ndarray,
    y_true: np.ndarray,
    weights: np.ndarray | None,
    *,
    powers: tuple[float, ...] = POWERS,
    **search,
) -> tuple[float, float, float]:
    """(power, threshold, F-beta): the power of `undo_weights` and the global threshold maximising F-beta
    (keywords go to `search_global`); ties go to the first power listed. No weights: power 0."""
    best = None
    for a in (powers if weights is not None else (0.0,)):
        t, f = search_global(undo_weights(probs, weights, a), y_true, **search)
        if best is None or f > best[2] + 1e-12:
            best = (float(a), t, f)
    return best


def fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 20, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Per column c, (a_c, b_c) of P(y_c) = sigmoid(a_c x_c + b_c): every column's 1-D logistic regression by
    Newton steps at once ((n, C) in, two (C,) out; a small L2 keeps labels without positives finite)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = ((x - mu) / sd).astype(np.float32)
    y = np.asarray(y, np.float32)
    a, b = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    n = len(x)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(a * z + b).astype(np.float32)))
        r, w = p - y, p * (1 - p)
        wz = w * z
        ga, gb = (r * z).sum(0, np.float64) + l2 * n * a, r.sum(0, np.float64) + l2 * n * b
        haa, hab, hbb = (wz * z).sum(0, np.float64) + l2 * n, wz.sum(0, np.float64), w.sum(0, np.float64) + l2 * n
        det = haa * hbb - hab * hab
        a -= (hbb * ga - hab * gb) / det
        b -= (haa * gb - hab * ga) / det
    return a / sd, b - a * mu / sd


def search_calibrated(
    probs: np.ndarray,
    y_true: np.ndarray,
    *,
    l2: float = 1e-3,
    **search,
) -> tuple[np.ndarray, float, float]:
    """Per-class thresholds from a per-label calibration: (C,) thresholds, the global threshold on the calibrated
    probabilities and its F-beta (keywords go to `search_global`).

    Each label's probabilities are recalibrated by a 1-D logistic regression of its truth on their logit
    (Platt scaling, `fit_logistic`; its small L2 keeps labels with few or no positives finite), one global
    threshold T is tuned on the recalibrated probabilities, and each label's threshold on its own probability
    is where its recalibrated one reaches T: p >= t_c exactly when sigmoid(a_c logit(p) + b_c) >= T (a_c > 0).
    A label whose fitted slope is not positive (no positives, a label on every image, or positives scored below
    the rest) is emitted on every image or on none: threshold 0 when its mean recalibrated probability reaches
    T, else 1, the top of the scale. An increasing map per label (the class weights' undoing among them)
    changes nothing here.
    """
    probs = _as_probs(probs)
    y = as_labels(y_true, "y_true")
    _check_same_shape(probs, y)
    logit = _logit(probs)
    a, b = fit_logistic(logit, y, l2=l2)
    calibrated = 1.0 / (1.0 + np.exp(-(a * logit + b)))
    t, f = search_global(calibrated, y, **search)
    up = a > 0
    at = np.where(up, (np.log(t / (1.0 - t)) - b) / np.where(up, a, 1.0), 0.0)  # logit of each t_c
    flat = np.where(calibrated.mean(0) >= t, 0.0, 1.0)  # no slope: every image or none, by the mean
    return np.where(up, 1.0 / (1.0 + np.exp(-np.clip(at, -700, 700))), flat), t, f


def _logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p kept 1e-7 inside (0, 1)."""
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1.0 - 1e-7)
    return np.log(p / (1.0 - p))


def search_per_class(
    probs: np.ndarray,
    y_true: np.ndarray,
    *,
    start: float,
    beta: float = 2.0,
    shrink: float = Decoding.shrink,
    sweeps: int = 2,
    grid: np.ndarray | None = None,
    zero_division: float = 0.0,
) -> np.ndarray:
    """(C,) per-class thresholds by coordinate ascent on sample-averaged F-beta, shrunk toward ``start``.

    All classes start at ``start``; each class in turn takes the grid threshold that maximises the mean
    F-beta with every other column's predictions fixed. min/max labels are ignored here (decode applies
    them). Then t_c = (n_c t_c + shrink * start) / (n_c + shrink), n_c the positives of class c, so that
    rare classes, whose thresholds overfit most, stay near the global threshold.
    """
    probs = _as_probs(probs)
    y = as_labels(y_true, "y_true")
    _check_same_shape(probs, y)
    if shrink < 0 or sweeps < 0:
        raise ValueError(f"shrink and sweeps must be >= 0, got {shrink} and {sweeps}")
    if np.isnan(zero_division):
        raise ValueError("search_per_class needs zero_division 0 or 1: NaN rows make F non-additive")
    grid = _as_grid(grid)
    thresholds = np.full(probs.shape[1], float(start))
    tp, fp, fn = counts(y, probs >= thresholds)
    # column-major copies (C, N): the loop reads and writes one class at a time
    probs_t, y_t = np.ascontiguousarray(probs.T), np.ascontiguousarray(y.T)
    pred_t = probs_t >= start
    bins_t = np.searchsorted(grid, probs_t, side="right")  # p >= grid[g] exactly for g < bins
    for _ in range(sweeps):
        for c in range(probs.shape[1]):
            delta = _gain_per_row(tp, fp, fn, pred_t[c], y_t[c], beta, zero_division)
            t = _best_threshold(delta, pred_t[c], bins_t[c], grid, thresholds[c])
            new = probs_t[c] >= t
            tp, fp, fn = _update_counts(tp, fp, fn, pred_t[c], new, y_t[c])
            pred_t[c], thresholds[c] = new, t
    if shrink == 0:
        return thresholds
    n_pos = y.sum(axis=0)
    return start + n_pos / (n_pos + shrink) * (thresholds - start)  # unmoved classes stay exactly at start


def _gain_per_row(tp, fp, fn, pred_c: np.ndarray, y_c: np.ndarray, beta: float, zero_division: float):
    """(N,) change of each row's F-beta from predicting class c, the other columns held fixed.

    Removing column c's current contribution gives each row's counts (tp0, fp0, fn0) without it.
    """
    tp0 = tp - (pred_c & y_c)
    fp0 = fp - (pred_c & ~y_c)
    fn0 = fn - (~pred_c & y_c)
    f_on = fbeta_per_sample(tp0 + y_c, fp0 + ~y_c, fn0, beta, zero_division)
    f_off = fbeta_per_sample(tp0, fp0, fn0 + y_c, beta, zero_division)
    return f_on - f_off


def _best_threshold(
    delta: np.ndarray, pred_c: np.ndarray, bins_c: np.ndarray, grid: np.ndarray, current: float
) -> float:
    """The grid threshold whose predicted rows (p >= t) have the largest total gain ``delta``.

    The rows a threshold predicts are a suffix of the grid bins, so one bincount and one reversed cumsum
    score every grid point. ``current`` is kept unless strictly beaten; among tied grid points the one
    nearest ``current`` wins.
    """
    per_bin = np.bincount(bins_c, weights=delta, minlength=grid.size + 1)
    gains = np.cumsum(per_bin[::-1])[::-1][1:]  # gains[g]: rows with p >= grid[g]
    best = gains.max()
    if not best > delta[pred_c].sum() + 1e-9:
        return current
    tied = np.flatnonzero(gains == best)
    return float(grid[tied[np.argmin(np.abs(grid[tied] - current))]])


def _update_counts(tp, fp, fn, old: np.ndarray, new: np.ndarray, y_c: np.ndarray):
    """Row counts after column c's predictions change from ``old`` to ``new``."""
    d = new.astype(np.int64) - old
    return tp + d * y_c, fp + d * ~y_c, fn - d * y_c


def _count_at_least(probs: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(N, G) number of labels with p >= grid[g] in each row, without sorting per threshold."""
    n, g = probs.shape[0], grid.size
    flat = _bins(grid, probs) + np.arange(n, dtype=np.int64)[:, None] * (g + 1)  # p >= grid[j] for j < bin
    hist = np.bincount(flat.ravel(), minlength=n * (g + 1)).reshape(n, g + 1)
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _count_at_least_sparse(rows: np.ndarray, p: np.ndarray, grid: np.ndarray, n: int) -> np.ndarray:
    """(n, G) number of the given entries (row, p) with p >= grid[g] in each row: `_count_at_least` of a
    sparse subset (the true labels)."""
    g = grid.size
    flat = rows * (g + 1) + _bins(grid, p)
    hist = np.bincount(flat, minlength=n * (g + 1)).reshape(n, g + 1)
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _bins(grid: np.ndarray, p: np.ndarray) -> np.ndarray:
    """np.searchsorted(grid, p, side="right"): the number of grid points <= p, by a lookup table when the
    grid lies in (0, 1] (p * 2^k is exact, so the table cell of p is exact; each cell holds at most one grid
    point, compared with p), about 5x faster than a binary search over millions of probabilities."""
    gaps = np.diff(grid)
    if grid[0] <= 0 or grid[-1] > 1 or (gaps.size and gaps.min() < 2.0 ** -18):
        return np.searchsorted(grid, p, side="right")
    res = 2 ** int(np.clip(np.ceil(np.log2(2.0 / gaps.min())) if gaps.size else 1, 1, 20))
    edges = np.arange(res + 1) / res  # cell i is [edges[i], edges[i + 1]); the last holds p == 1 only
    below = np.searchsorted(grid, edges, side="right").astype(np.int32)  # grid points <= each left edge
    nxt = np.append(grid, np.inf)[below]  # the first grid point above each left edge
    cell = np.clip(p * res, 0, res).astype(np.int32)  # exact: res is a power of two (finite p only)
    out = below[cell]
    out += p >= nxt[cell]
    return out


def _rank_key(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """Margin p - threshold, or p itself for one threshold (same order, no rounding ties)."""
    if np.ndim(thresholds) == 0:
        return probs
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != probs.shape[1:]:
        raise ValueError(f"need one threshold or one per class ({probs.shape[1]}), got shape {t.shape}")
    return probs - t


def _clamp(n: np.ndarray, min_labels: int, max_labels: int | None, n_classes: int) -> np.ndarray:
    """Label counts clamped to [min_labels, max_labels], both capped at the number of classes."""
    hi = n_classes if max_labels is None else min(max_labels, n_classes)
    if min_labels < 0:
        raise ValueError(f"min_labels must be >= 0, got {min_labels}")
    check_counts("decode", min_labels, max_labels)
    return np.clip(n, min(min_labels, hi), hi)


def _column_means(f: np.ndarray) -> np.ndarray:
    """Mean over rows per column, skipping NaN as :func:`imet.metrics.scores` does."""
    kept = ~np.isnan(f)
    total = np.where(kept, f, 0.0).sum(axis=0)
    n = kept.sum(axis=0)
    return np.divide(total, n, out=np.full(total.shape, np.nan), where=n > 0)


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-D (samples, labels) array, got shape {probs.shape}")
    return probs


def _as_grid(grid: np.ndarray | None) -> np.ndarray:
    grid = DEFAULT_GRID if grid is None else np.unique(np.asarray(grid, dtype=np.float64))
    if grid.ndim != 1 or not grid.size or not np.isfinite(grid).all():
        raise ValueError("the threshold grid must be a non-empty 1-D array of finite numbers")
    return grid


def _check_same_shape(probs: np.ndarray, y: np.ndarray) -> None:
    if probs.shape != y.shape:
        raise ValueError(f"probs has shape {probs.shape} but y_true has shape {y.shape}")
