"""Streaming predict (`imet predict --data`, no store) vs `imet featurize` on the same test images.

Both are run as the commands a user types, each in a fresh process (start-up included on both sides), on the
kaggle-test images of a synthetic data dir, random weights, the same image size and batch size:

1. throughput: views/s of `predict --data` with an attn_rnn model (maps + pooled, beam search, the paper's
   sizes) and with a linear model (pooled only), vs `featurize --splits kaggle-test`. Target >= 0.9.
2. peak RSS of `predict --data` (attn_rnn) on two numbers of test images. Target < 2 GiB and about the same
   at both sizes.

    python benchmarks/bench_stream_predict.py [--images 40] [--small 25] [--image-size 224] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from imet.featurize.pipeline import Options, featurize
from imet.heads import make_head
from imet.store import FeatureStore
from imet.synth import write_synthetic

sys.path.insert(0, str(Path(__file__).parent))
from peak_rss import peak_rss_mib  # noqa: E402


def timed(*args: str) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of `imet ARGS...` in a fresh process."""
    t0 = time.monotonic()
    peak = peak_rss_mib(*args)
    return time.monotonic() - t0, peak


def fit_models(data: Path, work: Path, size: int, batch: int) -> dict[str, Path]:
    """linear and attn_rnn (paper sizes, one epoch) fitted on a small train/val store of the same settings."""
    train = work / "train.h5"
    featurize(data, train, Options(weights="random", image_size=size, batch_size=batch, limit=8,
                                   splits=("train", "val")), device="cpu", progress=False)
    fs = FeatureStore(train)
    models = {}
    for name, params in (("attn_rnn", {"epochs": 1, "workers": 0}), ("linear", {"epochs": 1})):
        models[name] = work / f"{name}.pt"
        make_head(name, **params).fit(fs, log=lambda _: None).save(models[name])
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="test images of the throughput runs")
    parser.add_argument("--small", type=int, default=25, help="test images of the second memory run (> one chunk)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.image_size} px, "
              f"batch {args.batch_size}, random weights")
        big, small = work / "big", work / "small"
        write_synthetic(big, images=60, test_images=args.images, seed=0)
        write_synthetic(small, images=60, test_images=args.small, seed=0)
        models = fit_models(big, work, args.image_size, args.batch_size)
        common = ["--weights", "random", "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
        views = 6 * args.images
        seconds, feat_rss = timed("featurize", str(big), "--out", str(work / "test.h5"), "--splits", "kaggle-test",
                                  "--quiet", "--device", "cpu", *common)
        feat = views / seconds
        print(f"featurize --splits kaggle-test : {feat:6.2f} views/s ({views} views, {seconds:.1f} s, "
              f"peak RSS {feat_rss:.0f} MiB, maps {FeatureStore(work / 'test.h5').maps.nbytes / 2**20:.0f} MiB "
              "on disk)")
        peaks = {}
        for name, path in models.items():
            seconds, peak = timed("predict", "--data", str(big), "--model", str(path), "--out",
                                  str(work / f"{name}.csv"), "--quiet", "--device", "cpu")
            peaks[name] = peak
            print(f"predict --data, {name:<8}     : {views / seconds:6.2f} views/s ({seconds:.1f} s, peak RSS "
                  f"{peak:.0f} MiB), ratio to featurize = {views / seconds / feat:.2f}  (target >= 0.9)")
        _, peak_small = timed("predict", "--data", str(small), "--model", str(models["attn_rnn"]), "--out",
                              str(work / "small.csv"), "--quiet", "--device", "cpu")
        print(f"peak RSS of predict --data (attn_rnn): {peak_small:.0f} MiB at {args.small} images, "
              f"{peaks['attn_rnn']:.0f} MiB at {args.images} images  (target < 2048 MiB, flat)")
        print("maps written to disk by predict --data: 0 bytes (no store)")


if __name__ == "__main__":
    main()
