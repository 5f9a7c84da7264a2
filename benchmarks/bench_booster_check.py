"""What the structural check of LightGBM model text (`imet.booster_text`) costs beside LightGBM's own load.

Trains one booster like an `lgbm` head's (binary, 15 leaves, max_bin 63, --trees rounds, on pooled-width
rows), then, for --copies copies of its text, times `check_booster_text` and `lightgbm.Booster(model_str=...)`
alternately in one process and prints the median CPU seconds of each and their ratio (an `lgbm` model of
1,103 labels loads 1,103 such texts).

    OMP_NUM_THREADS=1 python benchmarks/bench_booster_check.py [--trees 100] [--features 2048] [--copies 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightgbm as lgb
import numpy as np

from imet.booster_text import check_booster_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--copies", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, args.features)).astype(np.float32)
    y = (x[:, :5].sum(1) + rng.normal(size=len(x)) > 0).astype(np.float32)
    params = {"objective": "binary", "num_leaves": 15, "max_bin": 63, "feature_fraction": 0.5, "verbosity": -1,
              "num_threads": 1, "seed": 0}
    text = lgb.train(params, lgb.Dataset(x, y), num_boost_round=args.trees).model_to_string()
    texts = [text] * args.copies
    print(f"{args.copies} boosters of {args.trees} trees on {args.features} features, {len(text):,} bytes each")
    check, load = [], []
    for _ in range(args.repeats):
        t0 = time.process_time()
        for t in texts:
            check_booster_text(t, args.features, "bench")
        t1 = time.process_time()
        for t in texts:
            lgb.Booster(model_str=t)
        t2 = time.process_time()
        check.append(t1 - t0)
        load.append(t2 - t1)
    c, m = statistics.median(check), statistics.median(load)
    print(f"check {c:.3f} CPU s   LightGBM load {m:.3f} CPU s   ratio {c / m:.2f}   "
          f"({c / args.copies * 1e3:.1f} ms a booster)")


if __name__ == "__main__":
    main()
