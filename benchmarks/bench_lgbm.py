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
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.heads import make_head  # noqa: E402
from imet.predict import evaluate_head  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing store (default: build the demo one)")
    parser.add_argument("--images", type=int, default=300, help="synthetic images when building the store")
    parser.add_argument("--hog-pca", type=int, default=32, help="HOG components of the last lgbm row")
    parser.add_argument("--configs", nargs="+", help="lgbm parameter sets to compare (needs --store)")
    args = parser.parse_args()
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
