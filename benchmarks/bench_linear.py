"""`linear` head vs scikit-learn's OneVsRestClassifier(LogisticRegression), and fit's peak memory.

1. The same synthetic store (default 50,000 views x 2,048 features x 500 labels, 2 views per image, labels
   from a noisy linear model with a long tail of frequencies) trains both; both are decoded the same way
   (views averaged, one global threshold tuned on val, F2 on test). Target: imet >= 10x faster, F2 no lower.
2. Peak RSS of `imet fit --head linear` (a separate process) on a store whose pooled array is > 2 GB.
   Target < 1 GB.

    python benchmarks/bench_linear.py [--views 50000 --labels 500] [--skip-sklearn] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from imet import store
from imet.decode.thresholds import apply_thresholds, average_views, search_global
from imet.heads import make_head
from imet.labels import Vocabulary
from imet.metrics import scores

sys.path.insert(0, str(Path(__file__).parent))
from peak_rss import peak_rss_mib  # noqa: E402

SPLITS = np.array(["train"] * 8 + ["val", "test"], dtype=object)


def synthetic_store(path: Path, views: int, dim: int, labels: int, seed: int = 0) -> Path:
    """Features shaped like ResNet pooled vectors, 2 views per image, labels from a noisy linear model.

    Each image has a latent vector z (64-d); its views are relu(z A + noise) with a log-normal scale per
    feature (non-negative, correlated, of very different scales, as pooled CNN features are). Label c is
    on where z w_c + b_c + noise > 0, with b_c set for a long tail of frequencies (20% down to 0.5%).
    """
    rng = np.random.default_rng(seed)
    n_images, k = views // 2, 64
    mix = rng.normal(size=(k, dim)).astype(np.float32) / np.sqrt(k)
    scale = rng.lognormal(0.0, 1.0, dim).astype(np.float32)
    w = rng.normal(size=(k, labels)).astype(np.float32) / np.sqrt(k)
    freq = np.geomspace(0.2, 0.005, labels)
    sample = np.sort(rng.normal(size=(4096, k)).astype(np.float32) @ w, axis=0)  # (4096, labels)
    bias = -sample[((1 - freq) * (len(sample) - 1)).astype(int), np.arange(labels)]  # label c on for freq[c]
    vocab = Vocabulary(np.arange(labels) * 2, tuple(f"tag::t{i}" for i in range(labels)), ("tag",) * labels)
    z = rng.normal(size=(n_images, k)).astype(np.float32)
    targets = (z @ w + bias + rng.normal(scale=0.3, size=(n_images, labels)) > 0).astype(np.uint8)
    plan = store.Plan(vocab, np.array([f"i{i}" for i in range(n_images)], dtype=object),
                      SPLITS[np.arange(n_images) % 10], targets, {"image": np.repeat(np.arange(n_images), 2)},
                      {"bench": "linear"})

    def chunks():
        for lo in range(0, n_images, 2048):
            zz = np.repeat(z[lo:lo + 2048], 2, axis=0)
            x = np.maximum(zz @ mix + rng.normal(scale=0.5, size=(len(zz), dim)).astype(np.float32), 0) * scale
            yield 2 * lo, {"pooled": x.astype(np.float32)}

    return store.write_arrays(path, plan, {"pooled": (dim,)}, chunks())


def decode_f2(fs: store.FeatureStore, predict) -> float:
    """Views averaged, global threshold tuned on val, sample F2 on test."""
    out = {}
    for split in ("val", "test"):
        views = fs.views(split)
        out[split] = average_views(predict(views), fs.view_image[views])
    images, probs = out["val"]
    t, _ = search_global(probs, fs.targets[images])
    images, probs = out["test"]
    return scores(fs.targets[images], apply_thresholds(probs, t))["f2"]


def bench_speed(path: Path, epochs: int, batch_size: int, skip_sklearn: bool) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    fs = store.FeatureStore(path)
    train = fs.views("train")
    t0 = time.monotonic()
    head = make_head("linear", epochs=epochs, batch_size=batch_size).fit(fs, log=lambda _: None)
    t_imet = time.monotonic() - t0
    f2_imet = decode_f2(fs, lambda v: head.predict_proba(fs, v))
    print(f"imet linear      : fit {t_imet:8.1f} s ({epochs} epochs, batch {batch_size}), test F2 {f2_imet:.4f}")
    if skip_sklearn:
        return
    x, y = fs.read("pooled", train), fs.view_targets(train).astype(np.uint8)
    t0 = time.monotonic()
    with warnings.catch_warnings():  # lbfgs stops at scikit-learn's default max_iter, as a user would see
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = OneVsRestClassifier(LogisticRegression(), n_jobs=-1).fit(x, y)
    t_sk = time.monotonic() - t0
    f2_sk = decode_f2(fs, lambda v: clf.predict_proba(fs.read("pooled", v)).astype(np.float32))
    print(f"sklearn OvR LR   : fit {t_sk:8.1f} s, test F2 {f2_sk:.4f}")
    print(f"speed-up {t_sk / t_imet:.1f}x (target >= 10), F2 difference imet - sklearn {f2_imet - f2_sk:+.4f} "
          "(target >= 0)")


def bench_rss(work: Path) -> None:
    path = synthetic_store(work / "big.h5", views=270_000, dim=2048, labels=20, seed=1)  # 2.2 GB of pooled
    t0 = time.monotonic()
    peak = peak_rss_mib("fit", "--store", str(path), "--head", "linear", "--out", str(work / "big.pt"), "--epochs", "1")
    print(f"peak RSS of imet fit on a {path.stat().st_size / 2**30:.2f} GB store: {peak:.0f} MiB "
          f"(target < 1024 MiB; {time.monotonic() - t0:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--labels", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-sklearn", action="store_true", help="only time imet (sklearn takes long)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = synthetic_store(work / "bench.h5", args.views, args.dim, args.labels)
        print(f"store: {args.views} views x {args.dim} features x {args.labels} labels")
        bench_speed(path, args.epochs, args.batch_size, args.skip_sklearn)
        if not args.skip_rss:
            bench_rss(work)


if __name__ == "__main__":
    main()
