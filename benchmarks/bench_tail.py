"""Where a model's F2 is lost against the probe on a planted store, by how often each label was seen in train.

Per band of train positives (images of the train split carrying the label): labels, true test pairs, the
model's and the probe's recall and precision, and the model's mean test average precision (a ranking, no
threshold: low AP says the label was not learned, low recall at fair AP says the decoding was too strict).
Then the same for the tail labels (fewer than imet.metrics.TAIL train positives) of each planted kind, and
test F2 with the tail labels taken from the probe, and the probe's with its tail taken from the model: how
much of the gap the tail holds.

    OMP_NUM_THREADS=1 python benchmarks/bench_tail.py STORE MODEL   (a store written by imet.planted, its
                                                                    .truth.npz beside it; any model
                                                                    file: a head, folds, a blend or a stack)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.metrics import TAIL, average_precision, scores, train_frequency  # noqa: E402
from imet.models import open_model  # noqa: E402
from imet.planted import KINDS, Planted, probe_labels  # noqa: E402
from imet.store import FeatureStore  # noqa: E402

BANDS = ((0, 5), (5, TAIL), (TAIL, 50), (50, 200), (200, None))


def share(hits: int, total: int) -> str:
    return f"{hits / total:.3f}" if total else "-"


def band(cols: np.ndarray, y: np.ndarray, labels: np.ndarray, probe: np.ndarray, ap: np.ndarray) -> dict:
    """The figures of the labels `cols` (C,) bool: test pairs, recall and precision of the model and the probe,
    mean AP over those with a test positive."""
    pairs = int(y[:, cols].sum())
    seen = cols & (y.sum(0) > 0)
    hit, probe_hit = (labels & y)[:, cols].sum(), (probe & y)[:, cols].sum()
    return {"labels": int(cols.sum()), "pairs": pairs, "recall": share(hit, pairs),
            "precision": share(hit, labels[:, cols].sum()), "ap": f"{np.mean(ap[seen]):.3f}" if seen.any() else "-",
            "probe_recall": share(probe_hit, pairs), "probe_precision": share(probe_hit, probe[:, cols].sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("model", type=Path)
    args = p.parse_args()
    if not args.store.with_suffix(".truth.npz").is_file():
        raise SystemExit(f"{args.store}: no {args.store.with_suffix('.truth.npz').name} beside it (a planted store's "
                         "truth, written by imet.planted)")
    store = FeatureStore(args.store)
    truth = Planted.load(args.store.with_suffix(".truth.npz"))
    freq = train_frequency(store)
    images, probs, labels = open_model(args.model).predict_labels(store, "test")
    labels = labels.astype(bool)
    probe_images, probe = probe_labels(truth, store)
    if not np.array_equal(probe_images, images):
        raise SystemExit("the model's test images are not the probe's")
    y = store.targets[images].astype(bool)
    ap = average_precision(y, probs)
    print(f"{args.model.name} on {args.store.name}: {len(images)} test images, {y.shape[1]} labels")
    print("| train positives | labels | test pairs | recall | precision | mean AP | probe recall | probe precision |")
    print("|---|---|---|---|---|---|---|---|")
    for lo, hi in BANDS:
        b = band((freq >= lo) & (freq < (np.inf if hi is None else hi)), y, labels, probe, ap)
        name = f"{lo}+" if hi is None else f"{lo}–{hi - 1}"
        print(f"| {name} | {b['labels']} | {b['pairs']} | {b['recall']} | {b['precision']} | {b['ap']} "
              f"| {b['probe_recall']} | {b['probe_precision']} |")
    tail = freq < TAIL
    print("\n| tail labels of kind | labels | test pairs | recall | mean AP | probe recall |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        b = band(tail & (truth.kinds == kind), y, labels, probe, ap)
        print(f"| {kind} | {b['labels']} | {b['pairs']} | {b['recall']} | {b['ap']} | {b['probe_recall']} |")
    model_f2, probe_f2 = scores(y, labels)["f2"], scores(y, probe)["f2"]
    mixed = labels.copy()
    mixed[:, tail] = probe[:, tail]
    back = probe.copy()
    back[:, tail] = labels[:, tail]
    print(f"\ntail: {tail.sum()} labels with < {TAIL} train positives, "
          f"{y[:, tail].sum() / y.sum():.1%} of the test pairs")
    print(f"test F2: model {model_f2:.3f}, probe {probe_f2:.3f}; model with the probe's tail "
          f"{scores(y, mixed)['f2']:.3f}; probe with the model's tail {scores(y, back)['f2']:.3f}")


if __name__ == "__main__":
    main()
