"""`lgbm` against `linear` on one store, fitted in the same run: fit seconds and val/test F2.

Without --store it writes the synthetic demo data (`imet synth`, 300 images) and featurizes it with
random ResNet50 weights at 64 px into a temp dir (`imet featurize`, 1-2 minutes on 2 cores). Rows: linear
(defaults), lgbm on every core, lgbm on one thread (the speed-up of the label pool), lgbm with --hog-pca.
Shared cloud cores do not always run in parallel: the script first measures how much faster two busy
processes finish than one after the other (2.0 on two free cores), to read the thread speed-up against.

    python benchmarks/bench_lgbm.py [--store S.h5] [--images 300] [--hog-pca 32]

With --configs, only lgbm rows: one per parameter set ("colsample=0.1,learning_rate=0.2"; "" for the
defaults), fitted one after the other in the same run, with CPU seconds beside wall seconds (a loaded
machine's wall time says little):

    python benchmarks/bench_lgbm.py --store S.h5 --configs "colsample=0.5" "colsample=0.1"

With --profile N, CPU seconds of each stage of the first N boosters, trained as the head trains them
(one thread; with --configs' first parameter set): where a fit's time goes.

    python benchmarks/bench_lgbm.py --store S.h5 --profile 20 --configs "colsample=0.5"
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.heads import make_head  # noqa: E402
from imet.metrics import evaluate_head  # noqa: E402
from imet.runtime import cores as available_cores  # noqa: E402
from imet.store import FeatureStore  # noqa: E402


def demo_store(root: Path, images: int) -> Path:
    """The synthetic demo data featurized with random weights at 64 px, by the imet command."""
    imet = [sys.executable, "-m", "imet"]
    subprocess.run([*imet, "synth", str(root / "data"), "--images", str(images)], check=True, stdout=subprocess.DEVNULL)
    out = root / "store.h5"
    subprocess.run([*imet, "featurize", str(root / "data"), "--out", str(out), "--weights", "random",
                    "--image-size", "64", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return out


def _busy(n: int) -> None:
    while n:
        n -= 1


def parallelism(n: int = 3_000_000) -> float:
    """How many times faster two busy processes finish side by side than one after the other."""
    t0 = time.monotonic()
    _busy(n)
    one = time.monotonic() - t0
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_busy, [1, 1]))  # start the workers first
        t0 = time.monotonic()
        list(pool.map(_busy, [n, n]))
    return 2 * one / (time.monotonic() - t0)


def run(store: FeatureStore, label: str, head: str, **params) -> dict:
    model = make_head(head, **params)
    t0, c0 = time.monotonic(), time.process_time()
    model.fit(store, log=lambda _: None)
    seconds, cpu = time.monotonic() - t0, time.process_time() - c0
    return {"model": label, "fit_s": seconds, "cpu_s": cpu, "val": evaluate_head(model, store, "val")["f2"],
            "test": evaluate_head(model, store, "test")["f2"]}


def parse_config(text: str) -> dict:
    """"a=1,b=0.5" -> {"a": 1, "b": 0.5} (ints, then floats, else strings)."""
    params = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        for kind in (int, float, str):
            try:
                params[key] = kind(value)
                break
            except ValueError:
                continue
    return params


def compare(store: FeatureStore, configs: list[str]) -> None:
    """lgbm fitted once per parameter set, side by side: wall and CPU seconds, val and test F2."""
    rows = [run(store, c or "defaults", "lgbm", **parse_config(c)) for c in configs]
    print(f"{'lgbm parameters':<40} {'fit s':>7} {'CPU s':>7} {'x first':>8} {'val F2':>7} {'test F2':>8}")
    for r in rows:
        print(f"{r['model']:<40} {r['fit_s']:>7.1f} {r['cpu_s']:>7.1f} {rows[0]['cpu_s'] / r['cpu_s']:>7.1f}x "
              f"{r['val']:>7.4f} {r['test']:>8.4f}", flush=True)


def profile(store: FeatureStore, n: int, params: dict) -> None:
    """CPU seconds per stage of the first `n` boosted labels' boosters (lgbm's `_train_one`, unrolled)."""
    import lightgbm as lgb

    from imet.heads.lgbm import boosted_labels, design_matrix, sample_rows
    from imet.heads.train import class_weights

    head, clock = make_head("lgbm", n_jobs=1, **params), time.process_time
    spent = dict.fromkeys(["read", "bins", "subsets", "booster init", "rounds", "val loss", "model text"], 0.0)
    t = clock()
    train, val = store.views("train"), store.views("val")
    x, y, xv, yv = (design_matrix(store, train, None), store.view_targets(train), design_matrix(store, val, None),
                    store.view_targets(val))
    spent["read"], t = clock() - t, clock()
    labels = boosted_labels(y.sum(0), len(y), head.min_positives)
    width, weights = x.shape[1], class_weights(y.sum(0), len(y))
    base = head.booster_params(1.0, 1, width)
    whole = lgb.Dataset(x, np.zeros(len(x), np.float32), params=base).construct()
    whole_val = lgb.Dataset(xv, np.zeros(len(xv), np.float32), reference=whole, params=base).construct()
    spent["bins"], rounds = clock() - t, []
    for c in labels[:n]:
        params, t = head.booster_params(float(weights[c]), 1, width), clock()
        rows, offset = sample_rows(y[:, c], head.negatives, head.min_negatives, head.seed, c)
        tr = whole.subset(rows, params=params).construct()
        tr.set_label(y[rows, c].astype(np.float32))
        vrows, voff = sample_rows(yv[:, c], head.negatives, head.min_negatives, head.seed + 1, c)
        va = whole_val.subset(vrows, params=params).construct()
        va.set_label(yv[vrows, c].astype(np.float32))
        va.set_weight(np.where(yv[vrows, c] > 0, 1.0, np.exp(-voff)).astype(np.float32))
        va.set_init_score(np.full(len(vrows), offset))
        spent["subsets"], t = spent["subsets"] + clock() - t, clock()
        booster = lgb.Booster(params, tr)
        booster.add_valid(va, "val")
        spent["booster init"] += clock() - t
        best, best_round = np.inf, 0
        for r in range(1, head.rounds + 1):
            t = clock()
            finished = booster.update()
            spent["rounds"], t = spent["rounds"] + clock() - t, clock()
            loss = booster.eval_valid()[0][2]
            spent["val loss"] += clock() - t
            best, best_round = (loss, r) if loss < best else (best, best_round)
            if finished or r - best_round >= head.early_stopping_rounds:
                break
        rounds.append(r)
        t = clock()
        lgb.Booster(model_str=booster.model_to_string(num_iteration=best_round)).model_to_string()
        spent["model text"] += clock() - t
    print(f"{len(labels)} boosted labels, {width} features ({head.feature_fraction(width):.3f} per tree), "
          f"{len(train)} train views; first {len(rounds)} boosters: {np.mean(rounds):.0f} rounds on average")
    print("CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items())
          + f"; per round {1000 * spent['rounds'] / sum(rounds):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing store (default: build the demo one)")
    parser.add_argument("--images", type=int, default=300, help="synthetic images when building the store")
    parser.add_argument("--hog-pca", type=int, default=32, help="HOG components of the last lgbm row")
    parser.add_argument("--configs", nargs="+", help="lgbm parameter sets to compare (needs --store)")
    parser.add_argument("--profile", type=int, help="time each stage of this many boosters (needs --store)")
    args = parser.parse_args()
    if args.profile:
        profile(FeatureStore(args.store), args.profile, parse_config((args.configs or [""])[0]))
        return
    if args.configs:
        store = FeatureStore(args.store)
        print(f"store: {len(store.views('train'))} train views, {len(store.views('test'))} test views, "
              f"{len(store.vocab)} labels, pooled {store.shape('pooled')}")
        compare(store, args.configs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store
        if path is None:
            t0 = time.monotonic()
            path = demo_store(Path(tmp), args.images)
            print(f"built {path.name} in {time.monotonic() - t0:.0f} s")
        store = FeatureStore(path)
        train = store.views("train")
        print(f"store: {len(train)} train views, {len(store.vocab)} labels, pooled {store.shape('pooled')}, "
              f"{available_cores()} cores (2 busy processes run {parallelism():.2f}x faster side by side)")
        rows = [run(store, "linear", "linear"),
                run(store, "lgbm", "lgbm"),
                run(store, "lgbm n_jobs=1", "lgbm", n_jobs=1)]
        if "hog" in store.features and args.hog_pca:
            rows.append(run(store, f"lgbm hog_pca={args.hog_pca}", "lgbm", hog_pca=args.hog_pca))
    print(f"{'model':<18} {'fit s':>7} {'x linear':>9} {'val F2':>7} {'test F2':>8}")
    for r in rows:
        print(f"{r['model']:<18} {r['fit_s']:>7.1f} {r['fit_s'] / rows[0]['fit_s']:>9.1f} "
              f"{r['val']:>7.4f} {r['test']:>8.4f}")
    print(f"lgbm label pool on {available_cores()} cores: {rows[2]['fit_s'] / rows[1]['fit_s']:.2f}x "
          f"faster than one thread (2 busy processes now: {parallelism():.2f}x)")


if __name__ == "__main__":
    main()
