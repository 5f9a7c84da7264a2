"""`imet stack`: a second-stage LightGBM over the first stage's out-of-fold probabilities, decoded per kind.

One binary LightGBM scores every (image, label) pair from `features`: each model's probability of the
label, the model's rank of the label in the image, the image's largest and mean probability under each
model (per-image statistics), the label's prior (its frequency in the tuning images) and its kind: 4M + 2
features for M models. So
the second stage learns how much to trust each model where, and how a label's probability compares with
the image's other labels, as the iMet 2019 winner's second stage did.

Fitting takes labelled probability files of several models on the same images, best the out-of-fold
files of `imet fit --folds K --oof` (same --fold-seed for every model). The decoding rule is tuned on
the stacker's own out-of-fold probabilities: the images are folded again (iterative stratification,
`STACK_FOLDS`), a stacker per fold predicts its held-out images, the rule (per-kind by default) is
searched on those, then the final stacker is fitted on every image. A stack file (JSON, the booster as
LightGBM's text) is used like a blend file: `imet blend apply --blend stack.json` on other probability
files of the same models, or as a --model of evaluate, report and predict --store.

Cost: one row per (image, label): 100k images x 1,077 labels is 10^8 rows (a GPU or a big machine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet.blend import Blend, labelled_inputs, search_rule
from imet.booster_text import check_booster_text
from imet.decode import values
from imet.decode.rule import Rule
from imet.errors import ImetError
from imet.files import atomic_path
from imet.folds import iterative_stratification
from imet.labels import Vocabulary

FORMAT, FORMAT_VERSION = "imet-stack", 1
STACK_FOLDS = 4
PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
          "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
          "verbose": -1, "deterministic": True, "num_threads": 0}
ROUNDS = 150


def features(probs: list[np.ndarray], prior: np.ndarray, kind_code: np.ndarray) -> np.ndarray:
    """(N * C, 4M + 2) float32 rows, image-major, of M models' (N, C) probabilities (see the module doc)."""
    n, c = probs[0].shape
    cols = []
    for p in probs:
        rank = np.argsort(np.argsort(-p, axis=1, kind="stable"), axis=1) / max(c - 1, 1)  # 0: the image's best
        cols += [p, rank, np.broadcast_to(p.max(1, keepdims=True), (n, c)),
                 np.broadcast_to(p.mean(1, keepdims=True), (n, c))]
    cols += [np.broadcast_to(prior, (n, c)), np.broadcast_to(kind_code, (n, c))]
    return np.stack([np.asarray(x, np.float32).reshape(-1) for x in cols], axis=1)


def _train(x: np.ndarray, y: np.ndarray, seed: int):
    import lightgbm as lgb

    return lgb.train({**PARAMS, "seed": seed}, lgb.Dataset(x, y.reshape(-1).astype(np.float32)),
                     num_boost_round=ROUNDS)


def fit_stack(prob_paths: list[Path], out: Path, *, thresholds: str = "per-kind", seed: int = 0) -> str:
    """Fit the second stage on labelled probability files (one per model), tune its rule out of fold, write it."""
    ids, probs, attribute_ids, truth, kinds, members, split = labelled_inputs(prob_paths)
    truth, kinds = truth.astype(bool), tuple(kinds)
    if len(ids) < 2 * STACK_FOLDS:
        raise ImetError(f"{prob_paths[0]}: {len(ids)} images are too few to stack (need {2 * STACK_FOLDS})")
    names = sorted(set(kinds))
    prior, code = truth.mean(0), np.array([names.index(k) for k in kinds], np.float32)
    x = features(probs, prior, code)
    fold = iterative_stratification(truth, STACK_FOLDS, seed)
    oof = np.zeros(truth.shape)
    for j in range(STACK_FOLDS):
        inside = np.repeat(fold != j, truth.shape[1])  # rows are image-major
        booster = _train(x[inside], truth[fold != j], seed)
        oof[fold == j] = booster.predict(x[~inside]).reshape(-1, truth.shape[1])
    rule, f2 = search_rule(oof, truth, kinds, thresholds)
    singles = [search_rule(p, truth, kinds, thresholds)[1] for p in probs]
    booster = _train(x, truth, seed)
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "split": split, "images": len(ids),
            "val_f2": f2, "attribute_ids": attribute_ids.tolist(), "kinds": list(kinds), "kind_names": names,
            "prior": prior.tolist(), "members": [{"model": m.model, "sha256": m.sha256, "head": m.head, "val_f2": s}
                                                 for m, s in zip(members, singles, strict=True)],
            "rule": rule.to_json(), "booster": booster.model_to_string(), "seed": seed}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(blob))
    return (f"wrote {out}: LightGBM stack of {len(members)} models on {len(ids)} images of {blob['split']}; "
            f"its out-of-fold F2 there {f2:.4f} (each model alone: "
            + ", ".join(f"{m.head} {s:.4f}" for m, s in zip(members, singles, strict=True))
            + f")\ndecoding: {rule.describe()}")


@dataclass
class StackFile:
    path: Path
    members: list[dict]
    rule: Rule
    vocab: Vocabulary
    prior: np.ndarray
    code: np.ndarray
    booster: object
    val_f2: float


def read_stack(path: Path) -> StackFile:
    """A stack file written by `fit_stack`, checked; one-line errors name the file."""
    import lightgbm as lgb

    path = Path(path)
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        if blob.get("version") != FORMAT_VERSION:
            raise ImetError(f"{path}: stack format version {blob.get('version')} is not supported")
        attr = np.array(blob["attribute_ids"], dtype=np.int64)
        kinds = tuple(str(k) for k in blob["kinds"])
        names = [str(k) for k in blob["kind_names"]]
        code = np.array([names.index(k) for k in kinds], np.float32)
        prior = values.reals(blob["prior"], "prior", len(attr))
        members = [{"model": str(m["model"]), "sha256": str(m["sha256"]), "head": str(m["head"])}
                   for m in blob["members"]]
        rule = Rule.from_json(blob["rule"], len(attr))
        rule.columns(kinds)
        check_booster_text(blob["booster"], 4 * len(members) + 2, f"{path}: damaged stack file, booster")
        booster = lgb.Booster(model_str=blob["booster"])
        val_f2 = values.real(blob["val_f2"], "val_f2")
    except ImetError:
        raise
    except Exception as e:  # missing keys, wrong types, junk booster text
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e).strip()[:120]}"
        raise ImetError(f"{path}: damaged stack file ({what.splitlines()[0]})") from None
    if prior.shape != attr.shape or len(kinds) != len(attr) or not members:
        raise ImetError(f"{path}: damaged stack file (labels, prior or members inconsistent)")
    if booster.num_feature() != 4 * len(members) + 2:
        raise ImetError(f"{path}: damaged stack file (its booster takes {booster.num_feature()} features, "
                        f"{len(members)} models give {4 * len(members) + 2})")
    return StackFile(path, members, rule, Vocabulary(attr, kinds, kinds), prior, code, booster, val_f2)


class Stack(Blend):
    """A stack file read as a model: its members' probabilities through the second-stage LightGBM."""

    name = "stack"
    read = staticmethod(read_stack)

    def combine(self, probs: list[np.ndarray]) -> np.ndarray:
        n, c = probs[0].shape
        x = features(probs, self.file.prior, self.file.code)
        return self.file.booster.predict(x).reshape(n, c)
