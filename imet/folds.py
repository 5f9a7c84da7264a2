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
(global, per-class or per-kind, as the head's --thresholds asks). At predict time the K models' view
probabilities are averaged, then decoded by that rule.

Early stopping on fold j's views lets fold j's labels choose the epoch (or trees) of fold j's model, so
the out-of-fold scores are slightly optimistic, as they are for val in a plain fit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from imet.data import iterative_stratification
from imet.decode import values
from imet.decode.rule import Rule
from imet.decode.thresholds import average_views
from imet.errors import ImetError, ParamError
from imet.heads.base import Head, _from_blob, make_head
from imet.store import FeatureStore

FORMAT, FORMAT_VERSION = "imet-folds", 1
FOLD_SPLITS = ("train", "val")


def assign_folds(targets: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(N,) fold 0..k-1 of each row of (N, C) 0/1 targets: `data.iterative_stratification` into k equal parts."""
    n = len(targets)
    if not 2 <= k <= n:
        raise ParamError(f"folds must be 2 .. the {n} labelled images, not {k}", ["folds"])
    return iterative_stratification(targets, (1.0,) * k, seed)


class FoldedModel(Head):
    """K fitted models of one head: view probabilities are their mean, decoded by the rule tuned out of fold."""

    def __init__(self, heads: list[Head], fold_ids: list[list[str]], fold_seed: int):
        first = heads[0]
        self.heads_, self.fold_ids_, self.fold_seed_ = heads, fold_ids, fold_seed
        self.name, self.needs, self.probabilistic = first.name, first.needs, first.probabilistic
        for key in ("thresholds", "min_labels", "max_labels", "shrink", "seed", "vocab_", "layout_",
                    "fingerprint_", "store_settings_", "codecs_"):  # codecs_: predict --data encodes with them
            setattr(self, key, getattr(first, key))
        self.fit_seconds_ = sum(h.fit_seconds_ for h in heads)

    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        """(n, C) float32: the mean of the K models' view probabilities."""
        self.check_fitted()
        total = None
        for head in self.heads_:
            p = head._finite_probs(head.predict_proba(store, views)).astype(np.float64)
            total = p if total is None else total + p
        return (total / len(self.heads_)).astype(np.float32)

    def decoding(self) -> str:
        return f"mean of {len(self.heads_)} fold models; out of fold: {super().decoding()}"

    def get_params(self) -> dict:
        return self.heads_[0].get_params()

    def to_blob(self) -> dict:
        rule = self.rule()
        return {"format": FORMAT, "version": FORMAT_VERSION, "head": self.name,
                "folds": [h.to_blob() for h in self.heads_], "fold_ids": json.dumps(self.fold_ids_),
                "fold_seed": self.fold_seed_, "threshold": self.threshold_, "oof_f2": self.val_f2_,
                "class_thresholds": None if self.class_thresholds_ is None else self.class_thresholds_.tolist(),
                "kind_rule": None if self.kind_rule_ is None else rule.to_json()}


def folds_from_blob(blob: dict, path: Path) -> FoldedModel:
    """The FoldedModel of a file written by `FoldedModel.save` (errors name the file)."""
    if blob.get("version") != FORMAT_VERSION:
        raise ImetError(f"{path}: folds format version {blob.get('version')} is not supported")
    try:
        heads = [_from_blob(b) for b in blob["folds"]]
        model = FoldedModel(heads, json.loads(blob["fold_ids"]), int(blob["fold_seed"]))
        model.threshold_ = values.real(blob["threshold"], "threshold")
        model.val_f2_ = values.real(blob["oof_f2"], "oof_f2")
        ct = blob["class_thresholds"]
        model.class_thresholds_ = None if ct is None else values.reals(ct, "class_thresholds", len(model.vocab_))
        kr = blob["kind_rule"]
        model.kind_rule_ = None if kr is None else Rule.from_json(kr, len(model.vocab_))
    except ImetError as e:
        raise ImetError(f"{path}: {e}") from None
    except Exception as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e).strip()[:160]}"
        raise ImetError(f"{path}: damaged imet folds file ({what.splitlines()[0]}); refit the model") from None
    if any(h.name != model.name for h in heads) or not heads:
        raise ImetError(f"{path}: damaged imet folds file (its fold models are of different heads)")
    return model


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
    from imet.files import atomic_paths
    from imet.predict import evaluate_head, probs_meta, table, write_probs

    if k is None:
        raise ImetError("--oof needs --folds K (out-of-fold probabilities come from K-fold fitting)")
    store = FeatureStore(store_path)
    model, images, probs = fit_folds(store, head, params, k, fold_seed=fold_seed, log=log)
    with atomic_paths(out, oof_path) as (out_tmp, oof_tmp):  # both or neither
        model.save(out_tmp)
        if oof_tmp is not None:
            # the model file's sha256 as it will be once renamed to --out, and its path there
            meta = {**probs_meta(model, out_tmp), "model": str(Path(out).resolve())}
            write_probs(oof_tmp, [str(store.image_ids[i]) for i in images], probs, store.vocab.attribute_ids,
                        kinds=store.vocab.kinds, targets=store.targets[images], split="oof", fold_seed=fold_seed,
                        **meta)
    lines = [f"wrote {out}: {k} {head} models ({model.fit_seconds_:.1f} s to fit); {model.decoding()}",
             f"out-of-fold F2 {model.val_f2_:.4f} over {len(images)} train and val images"]
    if oof_path is not None:
        lines.append(f"wrote {oof_path}: out-of-fold probabilities")
    if (store.split == "test").any():
        lines += ["test (held out of every fold):", table([{"model": str(out), "head": head,
                                                            **evaluate_head(model, store, "test")}])]
    return "\n".join(lines)
