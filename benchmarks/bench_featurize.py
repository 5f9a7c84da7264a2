"""Featurize and store-read throughput, measured side by side in one run.

1. HOG per 224 px view: torch (a batch at a time, this process's threads and one thread) vs scikit-image
   (view by view) on the same rendered views, with the largest absolute difference. Target >= 3x, <= 1e-4.
2. the bare two-branch backbone with channels_last vs contiguous tensors and weights (interleaved runs).
3. featurize end to end (decode + views + HOG + both layer4s + HDF5 write) vs the bare two-branch
   backbone on already-prepared tensors, same batch size, 224 px, HOG on, in pairs; the median of the
   ratios over --runs pairs. Target >= 0.9. Also against the bare backbone run in featurize's kept heap
   (imet.runtime.kept_heap), which leaves only the costs outside the forward. `--heap glibc` measures
   featurize as it was before it kept its heap.
4. random 256-row minibatches of `pooled` and of `maps` through FeatureStore.read vs raw np.memmap
   fancy indexing on the same file. Target >= 0.8.
5. peak RSS of `imet store verify`, which reads every view of a store larger than 2 GB through the reader.
   Target < 1 GB.

    python benchmarks/bench_featurize.py [--images 80] [--runs 5] [--parts hog,layout,e2e,reads] [--work DIR]
        [--backbone NAME] [--heap kept|glibc]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imet import store
from imet.data import load_dataset, plan_views
from imet.featurize import pipeline
from imet.featurize.backbone import build_backbone, load_weights
from imet.featurize.hog import HogParams, TorchHog, hog_skimage
from imet.featurize.pipeline import Options, featurize
from imet.featurize.views import load_rgb, render
from imet.labels import Vocabulary
from imet.synth import write_synthetic

sys.path.insert(0, str(Path(__file__).parent))
from peak_rss import peak_rss_mib  # noqa: E402


def rendered_views(data: Path, n: int, size: int = 224) -> np.ndarray:
    """The first n planned views of a data dir, rendered as the featurizer renders them: (n, S, S, 3) uint8."""
    ds = load_dataset(data)
    v = plan_views(ds, seed=0)
    out = [render(load_rgb(ds.image_path(v.image[i])), size, v.crop[i], v.offset[i], v.flip[i], v.jitter[i])[0]
           for i in range(min(n, len(v.image)))]
    return np.stack(out)


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_hog(data: Path, batch: int) -> None:
    views = rendered_views(data, batch)
    params = TorchHog(HogParams())
    x = torch.from_numpy(views)
    with torch.inference_mode():
        params(x)  # tables built once per process
        threads = torch.get_num_threads()
        t_torch = _best_of(lambda: params(x)) / len(x)
        torch.set_num_threads(1)
        t_torch1 = _best_of(lambda: params(x)) / len(x)
        torch.set_num_threads(threads)
        diff = np.abs(params(x).numpy() - hog_skimage(HogParams(), views)).max()
    t_sk = _best_of(lambda: hog_skimage(HogParams(), views)) / len(x)
    print(f"HOG per 224 px view ({len(x)} rendered views): scikit-image {t_sk * 1e3:.2f} ms, "
          f"torch {t_torch * 1e3:.2f} ms ({threads} threads), {t_torch1 * 1e3:.2f} ms (1 thread)")
    print(f"  speed-up {t_sk / t_torch:.1f}x ({threads} threads), {t_sk / t_torch1:.1f}x (1 thread), "
          f"max |torch - scikit-image| = {diff:.1e}  (target >= 3x, <= 1e-4)")


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers), user + system."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _bare(model: torch.nn.Module, x: torch.Tensor, n_batches: int) -> tuple[float, float]:
    """views/s of the two-branch backbone on a ready batch after one warm-up batch, by wall and CPU time."""
    with torch.inference_mode():
        model(x)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for _ in range(n_batches):
            model(x)
        n = n_batches * len(x)
        return n / (time.perf_counter() - t0), n / (_cpu_seconds() - c0)


def bench_layout(batch: int, runs: int) -> None:
    state = load_weights("random")[0]
    contiguous = build_backbone("resnet50", state)
    channels_last = build_backbone("resnet50", state).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    rates = {"contiguous": [], "channels_last": []}
    for _ in range(runs):  # interleaved, so that a busy moment of a shared machine hits both
        rates["contiguous"].append(_bare(contiguous, x, 2)[0])
        rates["channels_last"].append(_bare(channels_last, x_cl, 2)[0])
    cont, cl = (statistics.median(rates[k]) for k in ("contiguous", "channels_last"))
    print(f"bare two-branch backbone, batch {batch}, 224 px, {torch.get_num_threads()} threads, median of {runs}: "
          f"channels_last {cl:.2f} vs contiguous {cont:.2f} views/s, ratio {cl / cont:.2f}")


def bench_featurize(work: Path, data: Path, batch: int, runs: int, workers: int | None, hog_impl: str,
                    backbone: str = "resnet50") -> None:
    state = load_weights("random", backbone=backbone)[0]
    model = build_backbone(backbone, state).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    ratios, cpu_ratios, kept_ratios = [], [], []
    for run in range(runs):
        out = work / f"e2e-{run}.h5"
        opts = Options(backbone=backbone, weights="random", batch_size=batch, hog_impl=hog_impl)
        c0 = _cpu_seconds()
        report = featurize(data, out, opts, device="cpu", workers=workers, progress=False)
        e2e_cpu = report.computed / (_cpu_seconds() - c0)
        out.unlink()
        e2e = report.computed / report.seconds
        bare, bare_cpu = _bare(model, x, max(2, report.computed // batch // 2))
        with pipeline.kept_heap():  # the same forward with featurize's allocator setting (none with --heap glibc)
            kept = _bare(model, x, max(2, report.computed // batch // 2))[0]
        ratios.append(e2e / bare)
        cpu_ratios.append(e2e_cpu / bare_cpu)
        kept_ratios.append(e2e / kept)
        print(f"run {run + 1}: featurize end to end {e2e:6.2f} views/s ({report.computed} views, batch {batch}, "
              f"224 px, {backbone}, HOG {hog_impl}, workers {'auto' if workers is None else workers}), "
              f"bare backbone {bare:6.2f} views/s, ratio {e2e / bare:.2f}; "
              f"per CPU second {e2e_cpu:.2f} vs {bare_cpu:.2f} views, ratio {e2e_cpu / bare_cpu:.2f}; "
              f"bare in featurize's heap {kept:6.2f} views/s, ratio {e2e / kept:.2f}")
    print(f"ratio end-to-end / bare: median {statistics.median(ratios):.2f} of {runs} "
          f"({', '.join(f'{r:.2f}' for r in ratios)})  (target >= 0.9)")
    print(f"the same per CPU second (what a busy shared machine cannot blur): median "
          f"{statistics.median(cpu_ratios):.2f} ({', '.join(f'{r:.2f}' for r in cpu_ratios)})")
    print(f"against the bare backbone in featurize's heap (the costs outside the forward alone): median "
          f"{statistics.median(kept_ratios):.2f} ({', '.join(f'{r:.2f}' for r in kept_ratios)})")


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

    def chunks():
        for lo in range(0, views, 256):
            n = min(256, views - lo)
            values = {"pooled": rng.normal(size=(n, 2048)).astype(np.float32)}
            if maps:
                values["maps"] = rng.normal(size=(n, 14, 14, 2048)).astype(np.float16)
            yield lo, values

    return store.write_arrays(path, plan, shapes, chunks())


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
    parser.add_argument("--images", type=int, default=80, help="synthetic images for the end-to-end runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="end-to-end / bare pairs (and layout pairs)")
    parser.add_argument("--workers", type=int, default=None, help="featurize --workers [default: its own choice]")
    parser.add_argument("--hog-impl", default="torch", choices=["torch", "skimage"])
    parser.add_argument("--backbone", default="resnet50", help="e2e: the backbone (imet.featurize.options.BACKBONES)")
    parser.add_argument("--parts", default="hog,layout,e2e,reads", help="which of hog,layout,e2e,reads to run")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir)")
    parser.add_argument("--heap", default="kept", choices=["kept", "glibc"],
                        help="e2e: featurize's kept heap (imet.runtime.kept_heap), or glibc's defaults as before it")
    args = parser.parse_args()
    if args.heap == "glibc":
        pipeline.kept_heap = contextlib.nullcontext
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        data = work / "data"
        if parts & {"hog", "e2e"}:
            write_synthetic(data, images=args.images, seed=0, test_images=0)
        if "hog" in parts:
            bench_hog(data, args.batch_size)
        if "layout" in parts:
            bench_layout(args.batch_size, args.runs)
        if "e2e" in parts:
            bench_featurize(work, data, args.batch_size, args.runs, args.workers, args.hog_impl, args.backbone)
        if "reads" in parts:
            big = big_store(work / "big.h5", 2800, maps=True)  # 2800 x 802,816 B of maps = 2.2 GB
            os.sync()  # no write-back of the new file competing with the reads
            bench_reads(big)
            bench_rss(big)


if __name__ == "__main__":
    main()
