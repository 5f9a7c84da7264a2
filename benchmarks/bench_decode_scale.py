"""Decoding and the report's numbers at iMet's 1,103 labels, on growing rows of random probabilities.

Per size (image rows x 1,103 labels, ~4.4 true labels per row, class-weighted-looking probabilities), the
seconds of: the global threshold search as it was (one full sort per row) and as it is (grid histograms and
a top-K partial sort), side by side; the class-weight power search (5 global searches); per-class and per-kind
searches; one blend weight candidate; the report's micro AUC (one sort) and per-label rows. Then the fitted
exponent of each in rows (time ~ rows^k). Timings are wall seconds on whatever else the machine runs: read the
ratios of one run, not the absolute figures.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_scale.py [--rows 2000 8000 32000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.decode.rule import search_per_kind  # noqa: E402
from imet.decode.thresholds import (  # noqa: E402
    DEFAULT_GRID,
    _clamp,
    _column_means,
    _count_at_least,
    search_global,
    search_per_class,
    search_power,
    undo_weights,
)
from imet.metrics import fbeta_per_sample  # noqa: E402
from imet.report import Run, label_rows, table_row  # noqa: E402

LABELS, CULTURES = 1103, 398


def problem(n: int, seed: int = 0):
    """(probs, truth, class weights): a long tail of label frequencies, weighted-BCE-like inflated scores."""
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, LABELS + 1) ** 1.1
    freq *= 4.4 / freq.sum()
    y = rng.random((n, LABELS)) < freq
    w = np.minimum((1 - freq) / freq, 10.0)
    q = np.clip(freq * np.exp(rng.normal(0, 1.0, (n, LABELS))) + 0.5 * y * rng.random((n, LABELS)), 1e-6, 1 - 1e-6)
    p = w * q / (w * q + 1 - q)  # what weighted BCE inflates q to
    return p.astype(np.float32), y, w


def old_search_global(probs, y, grid=DEFAULT_GRID, min_labels=1, max_labels=None):
    """The search as it was before: a full stable sort of every row."""
    probs = np.asarray(probs, np.float64)
    n, c = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")
    hits = np.zeros((n, c + 1), dtype=np.int64)
    np.cumsum(np.take_along_axis(y, order, axis=1), axis=1, out=hits[:, 1:])
    k = _clamp(_count_at_least(probs, grid), min_labels, max_labels, c)
    tp = np.take_along_axis(hits, k, axis=1)
    f = _column_means(fbeta_per_sample(tp, k - tp, hits[:, -1:] - tp, 2.0, 0.0))
    best = int(np.nanargmax(f))
    return float(grid[best]), float(f[best])


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


def blend_candidate(p, y, w, a):
    """What `blend fit` scores per weight candidate: the mean of two members, weights undone, one global search."""
    return search_global(undo_weights(0.5 * p + 0.5 * p, w, a), y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 8000, 32000])
    args = ap.parse_args()
    kinds = np.array(["culture"] * CULTURES + ["tag"] * (LABELS - CULTURES))
    names = tuple(f"l{c}" for c in range(LABELS))
    table: dict[str, list[float]] = {}
    for n in args.rows:
        p, y, w = problem(n)
        row = {}
        row["global, full sort (before)"], old = timed(old_search_global, p, y)
        row["global, histograms (now)"], new = timed(search_global, p, y)
        assert old[0] == new[0] and abs(old[1] - new[1]) < 1e-12, (old, new)
        row["power search (5 globals)"], (a, t, f) = timed(search_power, p, y, w)
        s = undo_weights(p, w, a)
        row["per-class (2 sweeps)"], _ = timed(search_per_class, s, y, start=t)
        row["per-kind"], _ = timed(search_per_kind, p, y, kinds, start=t, weights=w, power=a)
        row["blend: one weight candidate"], _ = timed(blend_candidate, p, y, w, a)
        run = Run("m", SimpleNamespace(probabilistic=True), np.arange(n), p, s >= t, y)
        row["report: Table 1 row (micro AUC, 1 sort)"], _ = timed(table_row, run, "val")
        row["report: per-label rows"], _ = timed(label_rows, run, names, tuple(kinds), np.arange(LABELS))
        print(f"{n} rows x {LABELS} labels: power {a}, threshold {t}, F2 {f:.3f}; "
              f"full sort / histograms {row['global, full sort (before)'] / row['global, histograms (now)']:.1f}x",
              flush=True)
        for k, v in row.items():
            table.setdefault(k, []).append(v)
    print(f"\n| step | {' | '.join(f'{n} rows' for n in args.rows)} | exponent |")
    print(f"|---|{'---|' * len(args.rows)}---|")
    for k, v in table.items():
        slope = np.polyfit(np.log(args.rows), np.log(v), 1)[0] if len(v) > 1 else float("nan")
        print(f"| {k} | {' | '.join(f'{x:.2f} s' for x in v)} | {slope:.2f} |")


if __name__ == "__main__":
    main()
