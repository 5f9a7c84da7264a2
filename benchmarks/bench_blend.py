"""Test F2 of single heads (global and per-kind decoding), blends tuned on val or out of fold, and a stack.

    python benchmarks/bench_blend.py --store /work/demo_ref/store.h5 --work /tmp/bb_demo
    python benchmarks/bench_blend.py --planted --work /tmp/bb_planted

Per head: fit on train, decoding tuned on val, by one global threshold and per kind; then the heads'
val probabilities blended (`imet blend fit`), and the same heads fitted with --folds K, whose out-of-fold
probabilities are blended and stacked (`imet stack`). Every row is scored on the test split, which no
fit, fold or search has seen. Prints one table; the targets: blend >= best single + 0.01, stack >= blend,
per-kind >= global.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from imet.blend import fit_blend
from imet.decode.submission import read_submission
from imet.folds import fit_and_save_folds
from imet.heads import make_head
from imet.metrics import evaluate_head, scores
from imet.planted import write_planted_store
from imet.predict import apply_blend, predict
from imet.stack import fit_stack
from imet.store import FeatureStore

DEMO_HEADS = {"linear": {}, "linear_hog": {}, "lgbm": {}}
PLANTED_HEADS = {"linear": {}, "linear_hog": {}, "lgbm": {"hog_pca": 32}, "csra": {"hog": True, "epochs": 8}}


def quiet(_: str) -> None:
    pass


def submission_f2(store: FeatureStore, path: Path) -> float:
    sub = read_submission(path)
    images = [i for i in np.flatnonzero(store.split == "test") if store.image_ids[i] in sub]
    pred = np.array([[a in sub[store.image_ids[i]] for a in store.vocab.attribute_ids] for i in images])
    return scores(store.targets[images], pred)["f2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path)
    ap.add_argument("--planted", action="store_true", help="write and use a planted store (imet.planted)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--heads", help="comma-separated subset of the heads (default: all of the store's list)")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    if args.planted:
        args.store = w / "planted.h5"
        if not args.store.exists():
            write_planted_store(args.store, n_images=800)
    heads = PLANTED_HEADS if args.planted else DEMO_HEADS
    if args.heads:
        heads = {h: heads[h] for h in args.heads.split(",")}
    store = FeatureStore(args.store)
    rows, val_files, test_files, oof_files, fold_test = [], [], [], [], []
    for name, params in heads.items():
        for thresholds in ("global", "per-kind"):
            t0 = time.monotonic()
            model = make_head(name, thresholds=thresholds, **params).fit(store, log=quiet)
            f2 = evaluate_head(model, store, "test")["f2"]
            rows.append((f"{name} {thresholds}", f2, time.monotonic() - t0))
            print(*rows[-1], flush=True)
        path = w / f"{name}.pt"
        model.save(path)
        for split, files in (("val", val_files), ("test", test_files)):
            files.append(w / f"{name}_{split}.h5")
            predict(args.store, path, w / "x.csv", split=split, probs_path=files[-1])
        t0 = time.monotonic()
        fit_and_save_folds(args.store, name, {**params, "thresholds": "per-kind"}, args.folds, w / f"{name}_k.pt",
                           w / f"{name}_oof.h5", log=quiet)
        oof_files.append(w / f"{name}_oof.h5")
        fold_test.append(w / f"{name}_k_test.h5")
        predict(args.store, w / f"{name}_k.pt", w / "x.csv", split="test", probs_path=fold_test[-1])
        rows.append((f"{name} {args.folds} folds per-kind", submission_f2(store, w / "x.csv"), time.monotonic() - t0))
        print(*rows[-1], flush=True)
    for label, tuning, applied, fit in (("blend on val", val_files, test_files, fit_blend),
                                        ("blend out of fold", oof_files, fold_test, fit_blend),
                                        ("stack out of fold", oof_files, fold_test, fit_stack)):
        t0 = time.monotonic()
        fit(tuning, w / "combined.json")
        apply_blend(w / "combined.json", applied, w / "combined.csv")
        rows.append((label, submission_f2(store, w / "combined.csv"), time.monotonic() - t0))
        print(*rows[-1], flush=True)
    print(f"store {args.store}: test F2 of {int((store.split == 'test').sum())} images")
    for label, f2, seconds in rows:
        print(f"  {label:<32} {f2:.4f}   ({seconds:.0f} s)")
    singles = [f2 for label, f2, _ in rows if label.split()[0] in heads and "folds" not in label]
    best = max(singles)
    get = dict((label, f2) for label, f2, _ in rows)
    print(f"best single head {best:.4f}; blend on val - best single {get['blend on val'] - best:+.4f}; "
          f"stack - blend out of fold {get['stack out of fold'] - get['blend out of fold']:+.4f}")
    for name in heads:
        print(f"  {name}: per-kind - global {get[f'{name} per-kind'] - get[f'{name} global']:+.4f}")


if __name__ == "__main__":
    main()
