"""Compact maps (channel PCA to K dims, int8): sizes, F2 of the maps heads, reader and attn_rnn throughput,
featurize cost, full float16 2048-channel maps against `--maps-dim 256 --maps-dtype int8`, side by side.

1. sizes: bytes per view of every array at 224 px, and at full iMet (700,080 views). Target maps >= 16x smaller.
2. F2 on test of csra, mldecoder and attn_rnn fitted on a store and on its compaction (`imet store compact`),
   on planted stores with 2048-channel maps (isotropic noise: the worst case for a PCA; and CNN-shaped maps of
   rank 192, see imet.planted) and on the demo store (--demo; random-weight ResNet50 features). Few epochs:
   the comparison is full vs compact under the same budget. Target |difference| <= 0.01.
3. reader: views/s of random 32-view batches of maps as float32 tensors (MapBatches) from the demo store and
   its compaction, both in the page cache, interleaved. Target >= 8x.
4. attn_rnn: training (loss forward + backward) and beam-search decoding views/s at D = 256 vs 2048, the
   paper's sizes otherwise, interleaved. Target >= 3x.
5. featurize: one batch through the backbone step with and without the codec's projection (interleaved), and
   the one-off cost of fitting the codec. Target >= 0.95.

    python benchmarks/bench_compact.py [--parts sizes,f2,reader,attn,featurize] [--demo /work/demo_ref/store.h5]
        [--work DIR] [--epochs 4] [--rnn-epochs 2] [--repeats 5] [--stores isotropic,rank,demo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet import codec, store  # noqa: E402
from imet.decode.beam import beam_search  # noqa: E402
from imet.featurize import pipeline  # noqa: E402
from imet.featurize.backbone import build_backbone, load_weights  # noqa: E402
from imet.featurize.compact import compact_store  # noqa: E402
from imet.heads import make_head  # noqa: E402
from imet.heads.attn_model import AttnRNN  # noqa: E402
from imet.heads.maps import MapBatches  # noqa: E402
from imet.labels import FULL_IMET_VIEWS  # noqa: E402
from imet.metrics import scores  # noqa: E402
from imet.planted import write_planted_store  # noqa: E402

K, DTYPE = 256, "int8"
HEADS = ("csra", "mldecoder", "attn_rnn")
PLANTED_LABELS = {"global": 4, "cell": 8, "hog": 0, "tied": 4}  # maps heads: no HOG-only labels


def quiet(_: str) -> None:
    pass


def sizes() -> None:
    full = pipeline.feature_shapes(pipeline.Options())
    small = pipeline.feature_shapes(pipeline.Options(maps_dim=K, maps_dtype=DTYPE, hog_dim=K))
    a = store.array_sizes(full)
    b = store.array_sizes(small, {"maps_dtype": DTYPE})
    print(f"\n1. bytes per view at 224 px, and at full iMet ({FULL_IMET_VIEWS:,} views)")
    for key in a:
        print(f"  {key:<16} {a[key][2]:>9,} B  {store.human_bytes(a[key][2] * FULL_IMET_VIEWS):>9}   "
              f"{b[key][2]:>9,} B  {store.human_bytes(b[key][2] * FULL_IMET_VIEWS):>9}   "
              f"{a[key][2] / b[key][2]:6.1f}x")
    ta, tb = (sum(x[2] for x in s.values()) for s in (a, b))
    print(f"  {'total':<16} {ta:>9,} B  {store.human_bytes(ta * FULL_IMET_VIEWS):>9}   {tb:>9,} B  "
          f"{store.human_bytes(tb * FULL_IMET_VIEWS):>9}   {ta / tb:6.1f}x")
    ratio = a["features/maps"][2] / b["features/maps"][2]
    print(f"  maps: {ratio:.1f}x smaller (target >= 16x: {'met' if ratio >= 16 else 'MISSED'})")


def fit_f2(name: str, path: Path, epochs: int, rnn_epochs: int) -> tuple[float, float]:
    """(test F2, fit seconds) of a head with few epochs on the CPU (mldecoder at make demo's width 128)."""
    fs = store.FeatureStore(path)
    params = {"epochs": rnn_epochs if name == "attn_rnn" else epochs, "device": "cpu", "workers": 0,
              **({"width": 128} if name == "mldecoder" else {})}
    t0 = time.perf_counter()
    head = make_head(name, **params).fit(fs, log=quiet)
    seconds = time.perf_counter() - t0
    images, _, labels = head.predict_labels(fs, "test")
    return scores(fs.targets[images], labels)["f2"], seconds


def f2(work: Path, demo: Path | None, epochs: int, rnn_epochs: int, which: set[str]) -> None:
    stores = []
    for key, label, kwargs in (("isotropic", "planted, isotropic 2048", {}),
                               ("rank", "planted, rank 192 of 2048", {"rank": 192})):
        path = work / f"planted-{key}.h5"
        if key in which and not path.exists():
            write_planted_store(path, n_images=300, labels=PLANTED_LABELS, grid=7, channels=2048, hog=8, seed=0,
                                **kwargs)
        if key in which:
            stores.append((label, path))
    if demo is not None and "demo" in which:
        stores.append(("demo store", demo))
    print(f"\n2. test F2, full float16 maps vs --maps-dim {K} --maps-dtype {DTYPE} (csra and mldecoder {epochs} "
          f"epochs, attn_rnn {rnn_epochs}; CPU)")
    print(f"  {'store':<26} {'head':<10} {'full':>6} {'compact':>8} {'diff':>7}   fit s full / compact")
    for label, path in stores:
        small = work / f"{path.stem}-compact.h5"
        if not small.exists():
            t0 = time.perf_counter()
            done = compact_store(path, small, maps_dim=K, maps_dtype=DTYPE)
            print(f"  {label}: {done['bytes_before']:,} -> {done['bytes_after']:,} bytes per view "
                  f"({time.perf_counter() - t0:.0f} s)")
        for name in HEADS:
            (a, ta), (b, tb) = fit_f2(name, path, epochs, rnn_epochs), fit_f2(name, small, epochs, rnn_epochs)
            flag = "" if abs(b - a) <= 0.01 else "  (beyond 0.01)"
            print(f"  {label:<26} {name:<10} {a:6.3f} {b:8.3f} {b - a:+7.3f}   {ta:5.0f} / {tb:5.0f}{flag}", flush=True)


def reader(work: Path, demo: Path, repeats: int) -> None:
    small = work / f"{demo.stem}-compact.h5"
    if not small.exists():
        compact_store(demo, small, maps_dim=K, maps_dtype=DTYPE)
    stores = {"float16 2048": store.FeatureStore(demo), f"{DTYPE} {K}": store.FeatureStore(small)}
    rng = np.random.default_rng(0)
    views = stores["float16 2048"].views()
    for fs in stores.values():  # warm the page cache: both stores are read from memory
        for lo in range(0, len(views), 256):
            fs.read("maps", views[lo:lo + 256])
    rates: dict[str, list[float]] = {k: [] for k in stores}
    for _ in range(repeats):
        batches = [np.sort(rng.choice(views, 32, replace=False)) for _ in range(8)]
        for name, fs in stores.items():
            t0 = time.perf_counter()
            for b in batches:
                MapBatches(fs, (), [b])[0]
            rates[name].append(32 * len(batches) / (time.perf_counter() - t0))
    a, b = (statistics.median(r) for r in rates.values())
    print(f"\n3. reader (MapBatches, random 32-view batches, page cache): float16 2048 {a:,.0f} views/s, "
          f"{DTYPE} {K} {b:,.0f} views/s: {b / a:.1f}x (target >= 8x: {'met' if b / a >= 8 else 'MISSED'})")


def attn(repeats: int, labels: int = 300) -> None:
    torch.manual_seed(0)
    models, batches = {}, {}
    for d in (2048, K):
        models[d] = AttnRNN(n_labels=labels, map_channels=d, fr_dim=2048)
        maps = torch.relu(torch.randn(32, 196, d) * 0.5 + torch.randn(32, 1, d))
        targets = (torch.rand(32, labels) < 4.5 / labels).float()
        batches[d] = (maps, torch.randn(32, 2048), targets, torch.full((labels,), 10.0))
    log_thr = torch.full((labels,), float(np.log(0.05)))
    train: dict[int, list[float]] = {d: [] for d in models}
    decode: dict[int, list[float]] = {d: [] for d in models}
    for _ in range(repeats):
        for d, model in models.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model.loss(*batches[d], steps=10).backward()
            train[d].append(32 / (time.perf_counter() - t0))
            with torch.inference_mode():
                t0 = time.perf_counter()
                beam_search(model.eval(), batches[d][0], batches[d][1], beam=5, steps=10, log_threshold=log_thr)
                decode[d].append(32 / (time.perf_counter() - t0))
            model.train()
    print(f"\n4. attn_rnn on the CPU ({torch.get_num_threads()} threads, C={labels}, H=A=P=512, T=10, beam 5, "
          "batch 32, 196 cells)")
    for what, r in (("training", train), ("decoding", decode)):
        a, b = statistics.median(r[2048]), statistics.median(r[K])
        print(f"  {what}: D=2048 {a:6.1f} views/s, D={K} {b:6.1f} views/s: {b / a:.1f}x "
              f"(target >= 3x: {'met' if b / a >= 3 else 'MISSED'})")


def featurize_cost(repeats: int, demo: Path | None) -> None:
    state, _ = load_weights("random", 0)
    settings = {"maps": True, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    rng = np.random.default_rng(0)
    sample = rng.normal(size=(2000, 2048)).astype(np.float32)
    c = codec.fit(sample, K, DTYPE)
    model = build_backbone("resnet50", state)
    steps = {"plain": pipeline.Step(model, settings, torch.device("cpu"), None),
             "codec": pipeline.Step(model, settings, torch.device("cpu"), None, {"maps": c})}
    item = {"ok": np.ones(16, bool), "box": np.zeros((16, 4), np.float32), "error": np.zeros(16, "S160"),
            "pixels": torch.from_numpy(rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8))}
    times: dict[str, list[float]] = {k: [] for k in steps}
    with torch.inference_mode():
        for step in steps.values():
            step.fetch(item, step(item))  # warm up
        for _ in range(repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step.fetch(item, step(item))
                times[name].append(time.perf_counter() - t0)
    a, b = statistics.median(times["plain"]), statistics.median(times["codec"])
    encoder, maps = c.encoder(), torch.randn(16, 14, 14, 2048).relu()
    alone = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoder.encode(maps)
        alone.append(time.perf_counter() - t0)
    e = statistics.median(alone)
    print(f"\n5. featurize step (backbone + maps out, batch 16 at 224 px, {torch.get_num_threads()} threads): "
          f"{16 / a:.1f} views/s plain, {16 / b:.1f} with the {K}-dim int8 codec: {a / b:.3f} of plain "
          f"(target >= 0.95: {'met' if a / b >= 0.95 else 'MISSED'}); the encoding alone takes {e * 1000:.0f} ms "
          f"a batch, {a / (a + e):.3f} of the plain step's rate")
    if demo is not None:
        fs = store.FeatureStore(demo)
        pick = codec.sample_views(fs.views("train"), 0)
        t0 = time.perf_counter()
        rows = fs.read("maps", pick).reshape(-1, 2048)
        codec.fit(rows, K, DTYPE)
        print(f"  fitting the codec on {len(pick)} views' {len(rows):,} cells (read + fit, no backbone): "
              f"{time.perf_counter() - t0:.1f} s, once per store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="sizes,f2,reader,attn,featurize")
    parser.add_argument("--demo", type=Path, default=Path("/work/demo_ref/store.h5"),
                        help="a featurized store at 224 px (the demo's); parts 2, 3 use it when it exists")
    parser.add_argument("--work", type=Path, default=None, help="where the planted and compact stores go [temp]")
    parser.add_argument("--epochs", type=int, default=4, help="csra and mldecoder epochs")
    parser.add_argument("--rnn-epochs", type=int, default=2, help="attn_rnn epochs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stores", default="isotropic,rank,demo", help="stores of part 2")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    demo = args.demo if args.demo.exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"bench_compact: {torch.get_num_threads()} torch threads; figures are medians of interleaved runs")
        if "sizes" in parts:
            sizes()
        if "f2" in parts:
            f2(work, demo, args.epochs, args.rnn_epochs, set(args.stores.split(",")))
        if "reader" in parts and demo is not None:
            reader(work, demo, args.repeats)
        if "attn" in parts:
            attn(args.repeats)
        if "featurize" in parts:
            featurize_cost(args.repeats, demo)


if __name__ == "__main__":
    main()
