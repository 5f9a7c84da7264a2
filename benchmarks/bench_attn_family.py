"""attn_rnn with its defaults against linear_hog and csra on a few planted family members (imet.planted.family).

Per member (a store of its own): test F2, recall of one-cell labels (`recall_by_kind`, kind "cell"), labels per
image (truth beside it), tuned γ and fit seconds, per head; then per head the mean and the worst over the
members, and attn_rnn's gap to linear_hog (issue 21's target: +0.1 on average, one-cell recall >= 0.8).
Rows are heads with their `imet fit` options (attn_rnn's epochs from --epochs), as bench_map_family.py reads them.

    python benchmarks/bench_attn_family.py [--members 3] [--images 300] [--channels 64] [--epochs 10] [--labels 32,128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_map_family import parse_row  # noqa: E402

from imet.heads import make_head  # noqa: E402
from imet.metrics import scores  # noqa: E402
from imet.planted import family, probe_labels, recall_by_kind, write_planted_store  # noqa: E402
from imet.store import FeatureStore  # noqa: E402


def quiet(_: str) -> None:
    pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10,
                   help="attn_rnn's epochs (other heads and attn_rnn's csra start: their defaults)")
    p.add_argument("--labels", default="32,128", help="range of the label count (the family's: 32,128)")
    p.add_argument("--rows", default="linear_hog,csra,attn_rnn,attn_rnn --no-attention")
    args = p.parse_args()
    rows = args.rows.split(",")
    designs = family(args.members, args.seed, n_images=args.images, channels=(args.channels,),
                      labels=tuple(int(x) for x in args.labels.split(",")))
    results: dict[str, list[tuple[float, float]]] = {r: [] for r in ["probe", *rows]}
    print(f"{args.members} family members (seed {args.seed}), {args.images} images, {args.channels} channels, "
          f"{args.epochs} epochs; timings on a shared, loaded machine")
    print("| member | head | test F2 | one-cell recall | labels/image (truth) | gamma | fit s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for m, design in enumerate(designs):
            path = Path(tmp) / f"m{m}.h5"
            truth = write_planted_store(path, design)
            store = FeatureStore(path)
            member = (f"{m}: {design.n_labels} labels, grid {design.grid}, strength {design.cell_strength}, "
                      f"object {design.object_size}, views {design.views}")
            images, labels = probe_labels(truth, store)
            y = store.targets[images].astype(bool)
            results["probe"].append((scores(y, labels)["f2"], recall_by_kind(truth, y, labels).get("cell", np.nan)))
            print(f"| {member} | probe | {results['probe'][-1][0]:.3f} | {results['probe'][-1][1]:.2f} | "
                  f"{labels.sum(1).mean():.1f} ({y.sum(1).mean():.1f}) | | |", flush=True)
            for name in rows:
                head_name, params = parse_row(name)
                extra = {"workers": 0} if head_name != "linear_hog" else {}
                extra |= {"epochs": args.epochs} if head_name == "attn_rnn" else {}
                t0 = time.monotonic()
                head = make_head(head_name, **extra, **params).fit(store, log=quiet)
                seconds = time.monotonic() - t0
                images, _, labels = head.predict_labels(store, "test")
                y = store.targets[images].astype(bool)
                f2 = scores(y, labels)["f2"]
                cell = recall_by_kind(truth, y, labels).get("cell", float("nan"))
                results[name].append((f2, cell))
                gamma = f"{head.gamma_:.3g}" if hasattr(head, "gamma_") else ""
                print(f"| {member} | {name} | {f2:.3f} | {cell:.2f} | {labels.sum(1).mean():.1f} "
                      f"({y.sum(1).mean():.1f}) | {gamma} | {seconds:.0f} |", flush=True)
    print("\n| head | test F2 mean | worst | one-cell recall mean | worst |")
    print("|---|---|---|---|---|")
    for name, got in results.items():
        f2, cell = np.array(got).T
        print(f"| {name} | {f2.mean():.3f} | {f2.min():.3f} | {np.nanmean(cell):.2f} | {np.nanmin(cell):.2f} |")
    if "attn_rnn" in results and "linear_hog" in results:
        gap = np.array([a[0] - b[0] for a, b in zip(results["attn_rnn"], results["linear_hog"], strict=True)])
        print(f"\nattn_rnn - linear_hog, test F2: mean {gap.mean():+.3f}, worst {gap.min():+.3f} (target +0.1)")


if __name__ == "__main__":
    main()
