"""Sample-averaged F-beta, precision and recall, ROC AUC and per-class average precision, in plain numpy.

The competition scores sample-averaged F2: every image gets its own F2 and the images are averaged.
These functions give the same numbers as scikit-learn's ``fbeta_score``, ``f1_score``,
``precision_score`` and ``recall_score`` with ``average='samples'`` (checked against scikit-learn 1.9),
but work from count arrays so that threshold search can reuse them without building label matrices.

Zero-division convention (the one scikit-learn follows, per row, with tp, fp, fn the row's counts):

- precision = tp / (tp + fp); a row with no predicted label gets ``zero_division``,
  even when it has true labels.
- recall = tp / (tp + fn); a row with no true label gets ``zero_division``, even when it predicts labels.
- F-beta = (1 + b²) tp / ((1 + b²) tp + b² fn + fp), computed from the counts, not from P and R.
  Its denominator is zero only when tp + fp + fn == 0 (no true and no predicted label), and only that
  row gets ``zero_division``. A row with true labels but no prediction, or predictions but no true
  label, scores F = 0 whatever ``zero_division`` is.

So with ``zero_division=1`` a row predicting nothing has precision 1 but F 0 unless it is also empty
in the truth. ``zero_division=nan`` drops such rows from the average (NaN when every row is dropped),
again as scikit-learn does.
"""

from __future__ import annotations

import numpy as np

from imet.errors import ImetError


def fbeta_per_sample(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, beta: float = 2.0, zero_division: float = 0.0
) -> np.ndarray:
    """F-beta of each sample from its counts; ``zero_division`` where tp + fp + fn == 0.

    Arrays broadcast, so a threshold search can score many candidate count arrays at once.
    """
    _check_beta(beta)
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    b2 = beta * beta
    # same arrangement as scikit-learn: (1 + b²) tp / (b² · true + predicted)
    return _divide((1.0 + b2) * tp, b2 * (tp + fn) + (tp + fp), zero_division)


def scores(
    y_true: np.ndarray, y_pred: np.ndarray, *, beta: float = 2.0, zero_division: float = 0.0
) -> dict[str, float]:
    """Sample-averaged F-beta (key ``f{beta:g}``), F1, precision and recall of (N, C) 0/1 label arrays."""
    tp, fp, fn = counts(y_true, y_pred)
    return {
        f"f{beta:g}": _mean(fbeta_per_sample(tp, fp, fn, beta, zero_division)),
        "f1": _mean(fbeta_per_sample(tp, fp, fn, 1.0, zero_division)),
        "precision": _mean(_divide(tp, tp + fp, zero_division)),
        "recall": _mean(_divide(tp, tp + fn, zero_division)),
    }


def counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample true positives, false positives and false negatives of (N, C) 0/1 label arrays."""
    t = as_labels(y_true, "y_true")
    p = as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}")
    if t.shape[0] == 0:
        raise ValueError("no samples: scores of an empty set are undefined")
    tp = np.count_nonzero(t & p, axis=1)
    return tp, np.count_nonzero(p, axis=1) - tp, np.count_nonzero(t, axis=1) - tp


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class ROC AUC and micro AUC (over all flattened pairs), from ranks with ties averaged.

    AUC is the Mann-Whitney statistic: the chance that a random positive outranks a random negative,
    counting ties as one half. A class whose column holds only one value of y_true gets NaN, and so does
    the micro AUC when the whole array does (scikit-learn raises there).
    """
    t = as_labels(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != t.shape:
        raise ValueError(f"y_true has shape {t.shape} but scores has shape {s.shape}")
    per_class = _rank_auc(t, s)
    micro = _rank_auc(t.reshape(-1, 1), s.reshape(-1, 1))[0]
    return per_class, float(micro)


def _rank_auc(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUC of every column of (N, C) labels ``t`` and scores ``s``; NaN where a column is one-class."""
    from scipy.stats import rankdata  # imported where used: scipy.stats costs 60 MB of memory

    ranks = rankdata(s, axis=0)  # (N, C), ties get the mean rank
    n_pos = np.count_nonzero(t, axis=0).astype(np.float64)
    n_neg = t.shape[0] - n_pos
    rank_sum = np.where(t, ranks, 0.0).sum(axis=0)
    u = rank_sum - n_pos * (n_pos + 1.0) / 2.0  # pairs (positive, negative) won, ties count half
    pairs = n_pos * n_neg
    return np.divide(u, pairs, out=np.full(u.shape, np.nan), where=pairs > 0)


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(C,) average precision of every column of (N, C) labels and scores, as scikit-learn's
    ``average_precision_score`` of each column: the precision at each distinct score, weighted by the recall it
    adds (tied scores are one threshold). NaN where a column has no positive (scikit-learn warns there)."""
    t = as_labels(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"y_true has shape {t.shape} but scores has shape {s.shape}")
    n = len(s)
    order = np.argsort(-s, axis=0, kind="stable")
    ranked = np.take_along_axis(s, order, axis=0)
    hits = np.take_along_axis(t, order, axis=0).astype(np.float64)
    precision = np.cumsum(hits, axis=0) / np.arange(1, n + 1)[:, None]
    # each position counts at the precision of the last position of its run of tied scores
    last = np.ones(s.shape, dtype=bool)
    last[:-1] = ranked[:-1] != ranked[1:]
    end = np.where(last, np.arange(n)[:, None], n - 1)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    positives = hits.sum(axis=0)
    total = (hits * np.take_along_axis(precision, end, axis=0)).sum(axis=0)
    return np.divide(total, positives, out=np.full(positives.shape, np.nan), where=positives > 0)


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    """num / den, with ``zero_division`` where den == 0."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.full(num.shape, float(zero_division))
    return np.divide(num, den, out=out, where=den != 0)


def _mean(values: np.ndarray) -> float:
    """Mean that skips NaN (rows dropped by zero_division=nan); NaN when nothing is left."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def as_labels(y: np.ndarray, name: str = "labels") -> np.ndarray:
    """(N, C) boolean view of a 0/1 or boolean label array; refuses other values, naming ``name``."""
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, labels) array, got shape {y.shape}")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (or booleans)")
    return y.astype(bool, copy=False)


def _check_beta(beta: float) -> None:
    if not (np.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta}")


# -- Table 1 of the paper: a model's scores on a labelled split ----------------------------------------
TAIL = 20  # a label carried by fewer train images than this is a tail label (iMet has hundreds of them)


def evaluate_head(model, store, split: str) -> dict:
    """Table 1's row of a model (any `imet.loader.Predictor`) on a labelled split of a store."""
    if split == "kaggle-test":
        raise ImetError("kaggle-test images have no labels to evaluate against; use --split val or test")
    images, probs, labels = model.predict_labels(store, split)
    return score_row(split, store.targets[images], probs, labels, model.probabilistic,
                     tail=train_frequency(store) < TAIL)


def train_frequency(store) -> np.ndarray:
    """(C,) images of the train split carrying each label."""
    return store.targets[store.split == "train"].sum(0)


def score_row(split: str, truth: np.ndarray, probs: np.ndarray, labels: np.ndarray, probabilistic: bool,
              tail: np.ndarray | None = None) -> dict:
    """One row of Table 1 from predictions made: F2, F1, precision, recall (and micro AUC from probabilities);
    with a (C,) mask of the tail labels, `tail_recall`: the share of the split's true (image, label) pairs of
    tail labels that were predicted (absent when the split has none)."""
    row = {"split": split, "images": len(truth), **scores(truth, labels)}
    if probabilistic:
        row["auc_micro"] = roc_auc(truth, probs)[1]
    if tail is not None:
        true = as_labels(truth, "y_true")[:, tail]
        if true.any():
            row["tail_recall"] = float(np.count_nonzero(true & as_labels(labels, "y_pred")[:, tail]) /
                                       np.count_nonzero(true))
    return row


COLUMNS = ("f2", "f1", "precision", "recall", "auc_micro", "tail_recall")


def table(rows: list[dict]) -> str:
    """Rows as a fixed-width text table like the paper's Table 1."""
    width = max(len(r["model"]) for r in rows)
    head = f"{'model':<{width}}  {'head':<10} " + " ".join(f"{c:>9}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r[c]:>9.4f}" if c in r else f"{'-':>9}" for c in COLUMNS)
        lines.append(f"{r['model']:<{width}}  {r['head']:<10} {cells}")
    return "\n".join(lines)
