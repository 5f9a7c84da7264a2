"""Featurize and store-read throughput, measured side by side in one run.

1. featurize end to end (decode + views + HOG + both layer4s + HDF5 write) vs the bare two-branch
   backbone on already-prepared tensors, same batch size, 224 px, HOG on. Target >= 0.85.
2. random 256-row minibatches of `pooled` and of `maps` through FeatureStore.read vs raw np.memmap
   fancy indexing on the same file. Target >= 0.8.
3. peak RSS of `imet store verify`, which reads every view of a store larger than 2 GB through the reader.
   Target < 1 GB.

    python benchmarks/bench_featurize.py [--images 150] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imet import store
from imet.data import Vocabulary
from imet.featurize.backbone import TwoBranchResNet50, load_weights
from imet.featurize.pipeline import Options, featurize
from imet.synth import write_synthetic

sys.path.insert(0, str(Path(__file__).parent))
from peak_rss import peak_rss_mib  # noqa: E402


def bench_featurize(work: Path, images: int, batch: int) -> None:
    data = work / "data"
    write_synthetic(data, images=images, seed=0, test_images=0)
    out = work / "e2e.h5"
    opts = Options(weights="random", batch_size=batch)
    report = featurize(data, out, opts, device="cpu", progress=False)
    e2e = report.computed / report.seconds
    model = TwoBranchResNet50(load_weights("random")[0]).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    n_batches = max(2, report.computed // batch // 2)
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.monotonic()
        for _ in range(n_batches):
            model(x)
        bare = n_batches * batch / (time.monotonic() - t0)
    print(f"featurize end to end : {e2e:7.2f} views/s ({report.computed} views, batch {batch}, 224 px, HOG on)")
    print(f"bare backbone forward: {bare:7.2f} views/s ({n_batches * batch} views)")
    print(f"ratio end-to-end / bare = {e2e / bare:.2f}  (target >= 0.85)")


def big_store(path: Path, views: int, maps: bool) -> Path:
    """A finished store of random features and labels (4 labels, one view per image, split 8:1:1):
    (views, 2048) pooled, and (views, 14, 14, 2048) maps if asked."""
    rng = np.random.default_rng(0)
    n_images = views
    vocab = Vocabulary(np.arange(4), ("culture::a", "tag::b", "tag::c", "tag::d"), ("culture", "tag", "tag", "tag"))
    split = np.array(["train"] * 8 + ["val", "test"], dtype=object)[np.arange(n_images) % 10]  # 8:1:1
    targets = (rng.random((n_images, 4)) < 0.4).astype(np.uint8)
    targets[np.arange(n_images), rng.integers(0, 4, n_images)] = 1
    plan = store.Plan(vocab, np.array([f"i{i}" for i in range(n_images)], dtype=object), split, targets,
                      {"image": np.arange(views)}, {"bench": True})
    shapes = {"pooled": (2048,), **({"maps": (14, 14, 2048)} if maps else {})}
    store.create(path, plan, shapes)
    writer = store.Writer(path)
    for lo in range(0, views, 256):
        n = min(256, views - lo)
        values = {"pooled": rng.normal(size=(n, 2048)).astype(np.float32), "status": np.ones(n, np.uint8)}
        if maps:
            values["maps"] = rng.normal(size=(n, 14, 14, 2048)).astype(np.float16)
        writer.write(lo, values)
    writer.close()
    return path


def _time(read, idx_batches) -> float:
    t0 = time.monotonic()
    for idx in idx_batches:
        read(idx)
    return (time.monotonic() - t0) / len(idx_batches) * 1000


def bench_reads(path: Path) -> None:
    fs = store.FeatureStore(path)
    rng = np.random.default_rng(1)
    for key, n_batches in (("pooled", 400), ("maps", 20)):
        arr = fs.array(key)
        raw = np.memmap(path, dtype=arr.dtype, mode="r", offset=fs.specs[f"features/{key}"][0], shape=arr.shape)
        batches = [rng.choice(len(arr), 256, replace=False) for _ in range(n_batches)]
        def read_raw(i, raw=raw):
            return raw[i]  # the same rows in the same order as the reader gives

        def read_store(i, key=key):
            return fs.read(key, i)

        _time(read_raw, batches[:2])  # warm the page cache for both
        t_raw = _time(read_raw, batches)
        t_reader = _time(read_store, batches)
        print(f"random 256-row batches of {key:<6}: reader {t_reader:7.2f} ms, raw memmap {t_raw:7.2f} ms, "
              f"ratio raw/reader = {t_raw / t_reader:.2f}  (target >= 0.8)")


def bench_rss(path: Path) -> None:
    size = path.stat().st_size / 2**30
    peak = peak_rss_mib("store", "verify", str(path))  # reads every view of every array
    print(f"peak RSS of `imet store verify` (reads every view) on a {size:.2f} GB store: {peak:.0f} MiB  "
          "(target < 1024 MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=150, help="synthetic images for the end-to-end run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        bench_featurize(work, args.images, args.batch_size)
        big = big_store(work / "big.h5", 2800, maps=True)  # 2800 x 802,816 B of maps = 2.2 GB
        os.sync()  # no write-back of the new file competing with the reads
        bench_reads(big)
        bench_rss(big)


if __name__ == "__main__":
    main()
