"""The lgbm head's prediction: LightGBM's `booster.predict` against `imet.forest.Forest`, side by side.

Loads a fitted lgbm model (read only), scores the same random float32 rows (|normal|: pooled features are
non-negative) with every booster both ways on one thread, checks the raw scores are equal, and prints ms
per view of each and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_lgbm_predict.py /work/bench/scale/32000-1103-1t/lgbm.pt [--rows 1024]

With --store, the rows are the store's first test views (the model's features: pooled ⊕ HOG PCA) instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import imet  # noqa: E402
from imet.forest import Forest  # noqa: E402
from imet.heads.lgbm import design_matrix  # noqa: E402
from imet.store import FeatureStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--store", help="score this store's first --rows test views instead of random rows")
    args = ap.parse_args()
    head = imet.open_model(args.model)
    width = head.boosters_[0].num_feature()
    if args.store:
        store = FeatureStore(args.store)
        x = design_matrix(store, store.views("test")[:args.rows], head.pca_)
    else:
        x = np.abs(np.random.default_rng(0).normal(size=(args.rows, width))).astype(np.float32)
    args.rows, kind = len(x), "test views" if args.store else "random rows"
    t0 = time.perf_counter()
    forest = Forest(head.texts_, width)
    parse = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = forest.raw(x)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = np.stack([b.predict(x, raw_score=True, num_threads=1) for b in head.boosters_], 1)
    theirs_s = time.perf_counter() - t0
    trees = len(forest.tree_booster)
    print(f"{len(head.boosters_)} boosters, {trees} trees ({trees / len(head.boosters_):.0f} per booster), "
          f"{int((forest.cut != forest.cut.max()).sum())} split nodes, {width} features, {args.rows} {kind}, 1 thread")
    print(f"max |difference| of raw scores: {np.abs(ours - theirs).max():.3g}; "
          f"bit-equal: {(ours == theirs).mean():.4%}")
    print(f"LightGBM predict: {1000 * theirs_s / args.rows:.3f} ms per view")
    print(f"Forest:           {1000 * ours_s / args.rows:.3f} ms per view (texts parsed once in {parse:.1f} s)")
    print(f"ratio: {theirs_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
