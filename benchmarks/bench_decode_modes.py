"""Decoding modes at iMet's 1,103 labels on a planted store: labels per image and test F2 of each rule.

Writes a 1,103-label planted store (`imet.planted.imet_design`), fits each head once, then tunes every
decoding mode on val (global, per-class, per-kind; class weights undone or not) and decodes test with it;
the probe (the evidence-aware ceiling, `imet.planted.probe_labels`) is the reference.

    OMP_NUM_THREADS=1 python benchmarks/bench_decode_modes.py [--images 1500] [--channels 32]
        [--heads linear,linear_hog,csra:epochs=2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet import planted  # noqa: E402
from imet.decode.thresholds import average_views  # noqa: E402
from imet.heads import make_head  # noqa: E402
from imet.metrics import scores  # noqa: E402
from imet.store import FeatureStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--heads", default="linear,linear_hog,csra:epochs=2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.h5"
        design = planted.imet_design(args.images, channels=args.channels, pooled_dim=args.channels, hog=64)
        truth = planted.write_planted_store(path, design)
        st = FeatureStore(path)
        ids, probe = planted.probe_labels(truth, st)
        y = st.targets[ids]
        print(f"{args.images} images, {len(st.vocab)} labels, {args.channels} channels: test truth "
              f"{y.sum(1).mean():.2f} labels/image; probe {probe.sum(1).mean():.2f} labels/image, "
              f"F2 {scores(y, probe)['f2']:.3f}")
        print("| head | thresholds | undo weights (power) | labels/image | test F2 | tune s |")
        print("|---|---|---|---|---|---|")
        for spec in args.heads.split(","):
            name, *kw = spec.split(":")
            head = make_head(name, **{k: int(v) for k, v in (x.split("=") for x in kw)}).fit(st, log=lambda _: None)
            p = {}
            for s in ("val", "test"):
                v = st.views(s)
                p[s] = average_views(head.predict_proba(st, v), st.view_image[v])
            for undo in ("off", "tune"):
                for mode in ("global", "per-class", "per-kind"):
                    head.set_params(thresholds=mode, undo_weights=undo)
                    t = time.perf_counter()
                    head.tune_on(p["val"][1], st.targets[p["val"][0]], st.vocab.kinds)
                    t = time.perf_counter() - t
                    labels = head.label_sets(p["test"][1])
                    f2 = scores(st.targets[p["test"][0]], labels)["f2"]
                    print(f"| {spec} | {mode} | {undo} ({head.power_:g}) | {labels.sum(1).mean():.2f} | {f2:.3f} "
                          f"| {t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
