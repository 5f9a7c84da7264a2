"""K fitted models of one head (`imet fit --folds K`, see imet.folds) as one model, and their file format.

View probabilities are the mean of the K models'; the decoding rule is the one tuned on the out-of-fold
probabilities. The file (`imet-folds`) holds each fold model's own model-file contents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imet.decode import values
from imet.decode.rule import Rule
from imet.errors import ImetError
from imet.heads.base import Head, head_from_blob
from imet.loader import register_format
from imet.store import FeatureStore

FORMAT, FORMAT_VERSION = "imet-folds", 1


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

    def describe(self) -> dict:
        """The head's description (`Head.describe`), scored out of fold, with each fold model as a member: its
        held-out images and its F2 there (the fold models live inside this file: no path, no sha256)."""
        out = super().describe()
        out["scores"] = {"oof_f2": float(self.val_f2_)}
        out["params"] = {**out["params"], "folds": len(self.heads_), "fold_seed": self.fold_seed_}
        out["members"] = [{"fold": j + 1, "head": h.name, "held_out_images": len(ids), "val_f2": float(h.val_f2_)}
                          for j, (h, ids) in enumerate(zip(self.heads_, self.fold_ids_, strict=True))]
        return out

    def get_params(self, deep: bool = True) -> dict:
        """The parameters the K models were fitted with (the head's): a folded model tunes nothing of its own."""
        return self.heads_[0].get_params(deep)

    def set_params(self, **params) -> FoldedModel:
        raise ImetError(f"a folded model's parameters are those of its {len(self.heads_)} fitted models; fit again "
                        "with other parameters")

    def to_blob(self) -> dict:
        rule = self.rule()
        return {"format": FORMAT, "version": FORMAT_VERSION, "head": self.name,
                "folds": [h.to_blob() for h in self.heads_], "fold_ids": json.dumps(self.fold_ids_),
                "fold_seed": self.fold_seed_, "threshold": self.threshold_, "oof_f2": self.val_f2_,
                "class_thresholds": None if self.class_thresholds_ is None else self.class_thresholds_.tolist(),
                "kind_rule": None if self.kind_rule_ is None else rule.to_json()}


def read_folds(blob: dict, path: Path) -> FoldedModel:
    """The FoldedModel of a file written by `FoldedModel.save` (the `imet-folds` reader of `imet.loader`)."""
    if blob.get("version") != FORMAT_VERSION:
        raise ImetError(f"{path}: folds format version {blob.get('version')} is not supported")
    try:
        heads = [head_from_blob(b) for b in blob["folds"]]
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


register_format(FORMAT, "torch", read_folds)
