"""What checking every feature read against its crc32 costs (`FeatureStore.read`, on by default).

Fits the same head on the same store with the check on and off, alternating (after one untimed warm-up fit),
side by side in one process, and prints the median CPU seconds of this process for each arm and their ratio
(CPU time, not wall time: other processes on a shared machine do not count; run it with OMP_NUM_THREADS=1):

1. `linear` and `linear_hog` on a demo-size store (1,998 views: 333 images x 6 views, pooled 2,048 float32,
   HOG 10,368 float32, the paper's sizes; make demo's default epochs). Target: <= 5% slower.
2. `csra` on paper-size maps (14 x 14 x 2,048 float16, 802,816 bytes a view; --map-views of them, one epoch,
   DataLoader workers 0 so the reads are timed in this process), and plain batched map reads.

    OMP_NUM_THREADS=1 python benchmarks/bench_checksum.py [--repeats 4] [--map-views 300] [--work DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from imet import store
from imet.heads import make_head
from imet.planted import write_planted_store


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of fn() with the check on and off, after a warm-up run; the arms alternate, each
    going first in turn."""
    fn()
    on, off = [], []
    for k in range(repeats):
        for arm in ((True, False) if k % 2 == 0 else (False, True)):
            store.FeatureStore.VERIFY_READS = arm
            t0 = time.process_time()
            fn()
            (on if arm else off).append(time.process_time() - t0)
    store.FeatureStore.VERIFY_READS = True
    return statistics.median(on), statistics.median(off)


def demo_store(path: Path) -> store.FeatureStore:
    """1,998 views with the paper's pooled and HOG widths (maps of one cell: the linear heads never read them)."""
    write_planted_store(path, n_images=333, views=6, grid=1, channels=2048, hog=10368, seed=0)
    return store.FeatureStore(path)


def maps_store(path: Path, views: int) -> store.FeatureStore:
    write_planted_store(path, n_images=max(10, views // 6), views=6, grid=14, channels=2048, hog=16, seed=1)
    return store.FeatureStore(path)


def report(name: str, on: float, off: float, per: str = "") -> None:
    print(f"{name:<40} checked {on:8.3f} CPU s   unchecked {off:8.3f} CPU s   ratio {on / off:.3f}{per}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--map-views", type=int, default=300)
    parser.add_argument("--work", type=Path, default=None, help="Where the stores go [a temp dir].")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        fs = demo_store(work / "demo.h5")
        print(f"demo-size store: {len(fs.view_image)} views, pooled {fs.shape('pooled')}, hog {fs.shape('hog')}")
        for head in ("linear", "linear_hog"):
            on, off = timed(lambda h=head: make_head(h).fit(fs, log=lambda _: None), args.repeats)
            report(f"fit {head} (its default epochs)", on, off)
        fs = maps_store(work / "maps.h5", args.map_views)
        views = fs.views()
        print(f"maps store: {len(views)} views of {fs.shape('maps')} float16 "
              f"({fs.bytes_per_view()['maps']:,} bytes a view)")

        def read_all() -> None:
            for lo in range(0, len(views), 32):
                fs.read("maps", views[lo:lo + 32])
            fs.release()

        on, off = timed(read_all, args.repeats)
        rate = f"   ({len(views) / on:.0f} vs {len(views) / off:.0f} views/s)"
        report("read every map, batches of 32", on, off, rate)
        on, off = timed(lambda: make_head("csra", epochs=1, workers=0).fit(fs, log=lambda _: None), args.repeats)
        report("fit csra, 1 epoch, workers 0", on, off)


if __name__ == "__main__":
    main()
