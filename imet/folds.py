"""`imet fit --folds K`: K models of one head on K folds of the labelled images, out-of-fold probabilities.

Which images are folded: those of the store's train and val splits (`FOLD_SPLITS`). The test split stays
held out, so Table 1 on test still scores images no model of any fold has seen. Folds are drawn by
iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011), seeded (`--fold-seed`, recorded), so
every head folded with the same seed on the same store gets the same folds, and their out-of-fold
probabilities can be blended or stacked without leaking.

Fold j's model trains on every finished view of the images of the other folds and stops early (where the
head does) on fold j's views. Views keep what featurize made of them: the views of a train-split image
are augmented (flip, colour jitter, culture-only crops of images with culture and tag labels), those of
a val-split image are not (1 resize + 5 crops). So a val image in a training fold trains on its plain
views, and a train image's out-of-fold probability is the mean over its augmented views (a little
noisier than over plain ones). The out-of-fold probabilities of all folded images tune the decoding rule
(global, per-class, per-kind or calibrated, as the head's --thresholds asks). At predict time the K models' view
probabilities are averaged, then decoded by that rule.

Early stopping on fold j's views lets fold j's labels choose the epoch (or trees) of fold j's model, so
the out-of-fold scores are slightly optimistic, as they are for val in a plain fit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imet.data import iterative_stratification
from imet.decode.thresholds import average_views
from imet.errors import ImetError, ParamError
from imet.files import atomic_paths
from imet.heads import make_head
from imet.heads.folds import FoldedModel
from imet.metrics import evaluate_head, table
from imet.probfiles import write_model_probs
from imet.store import FeatureStore

FOLD_SPLITS = ("train", "val")


def assign_folds(targets: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N,) fold 0..k-1 of each row of (N, C) 0/1 targets: `data.iterative_stratification` into k equal parts."""
    n = len(targets)
    if not 2 <= k <= n:
        raise ParamError(f"folds must be 2 .. the {n} labelled images, not {k}", ["folds"])
    return iterative_stratification(targets, (1.0,) * k, seed)


def fit_folds(store: FeatureStore, head: str, params: dict, k: int, *, fold_seed: int = 0,
              log: Callable[[str], None] | None = None) -> tuple[FoldedModel, np.ndarray, np.ndarray]:
    """(the K-fold model, folded image indices, (n, C) out-of-fold probabilities of those images)."""
    make_head(head, **params).check_store(store, fitted=False)  # refuse bad parameters before any work
    if not make_head(head, **params).probabilistic:
        raise ImetError(f"--folds: {head} gives 0/1 votes, not probabilities; fold a probabilistic head")
    labelled = np.flatnonzero(np.isin(store.split, FOLD_SPLITS))
    fold_of = np.full(len(store.split), -1)
    fold_of[labelled] = assign_folds(store.targets[labelled], k, fold_seed)
    log = log or logging.getLogger(f"imet.heads.{head}").info
    done = store.views()
    view_fold = fold_of[store.view_image[done]]
    heads, images, probs = [], [], []
    t0 = time.monotonic()
    for j in range(k):
        train, val = done[(view_fold >= 0) & (view_fold != j)], done[view_fold == j]
        log(f"fold {j + 1}/{k}: {len(train)} train views, {len(val)} held-out views "
            f"({time.monotonic() - t0:.0f} s so far)")
        model = make_head(head, **params).fit(store, views=(train, val), log=log)
        these, p = average_views(model._finite_probs(model.predict_proba(store, val)), store.view_image[val])
        heads.append(model)
        images.append(these)
        probs.append(p)
    folded = FoldedModel(heads, [[str(store.image_ids[i]) for i in labelled[fold_of[labelled] == j]]
                                 for j in range(k)], fold_seed)
    images, probs = np.concatenate(images), np.concatenate(probs)
    order = np.argsort(images)
    images, probs = images[order], probs[order]
    folded.tune_on(probs, store.targets[images], store.vocab.kinds)
    return folded, images, probs


def fit_and_save_folds(store_path: Path, head: str, params: dict, k: int | None, out: Path,
                       oof_path: Path | None = None, *, fold_seed: int = 0,
                       log: Callable[[str], None] | None = None) -> str:
    """`imet fit --folds K`: fit, write the model (and the out-of-fold probabilities) together; a report."""
    if k is None:
        raise ImetError("--oof needs --folds K (out-of-fold probabilities come from K-fold fitting)")
    store = FeatureStore(store_path)
    model, images, probs = fit_folds(store, head, params, k, fold_seed=fold_seed, log=log)
    with atomic_paths(out, oof_path) as (out_tmp, oof_tmp):  # both or neither
        model.save(out_tmp)
        if oof_tmp is not None:  # the model file's sha256 as it will be once renamed to --out, and its path there
            write_model_probs(oof_tmp, store, "oof", model, out_tmp, predicted=(images, probs),
                              model=str(Path(out).resolve()), fold_seed=fold_seed)
    lines = [f"wrote {out}: {k} {head} models ({model.fit_seconds_:.1f} s to fit); {model.decoding()}",
             f"out-of-fold F2 {model.val_f2_:.4f} over {len(images)} train and val images"]
    if oof_path is not None:
        lines.append(f"wrote {oof_path}: out-of-fold probabilities")
    if (store.split == "test").any():
        lines += ["test (held out of every fold):", table([{"model": str(out), "head": head,
                                                            **evaluate_head(model, store, "test")}])]
    return "\n".join(lines)
