"""`imet stack`: a second-stage LightGBM over the first stage's out-of-fold probabilities, decoded per kind.

One binary LightGBM scores (image, label) pairs from `features`: each model's probability of the label, the
model's rank of the label in the image, the image's largest and mean probability under each model
(per-image statistics), the label's prior (its frequency in the tuning images) and its kind: 4M + 2
features for M models. So the second stage learns how much to trust each model where, and how a label's
probability compares with the image's other labels, as the iMet 2019 winner's second stage did.

Only each image's top-K candidate labels under the models' mean get a row: K is the fewest that hold
RECALL (99%) of the true labels of the fitting images (at most MAX_K), stored in the file. The other
labels keep the models' mean, scaled below the image's least candidate score. At full iMet (110k images,
1,103 labels, ~4.4 labels per image) that is N x K rows instead of 120 million. Version-1 files (a row
for every label) read as K = C.

Fitting takes labelled probability files of several models on the same images, best the out-of-fold
files of `imet fit --folds K --oof` (same --fold-seed for every model). The decoding rule is tuned on
the stacker's own out-of-fold probabilities: the images are folded again (iterative stratification,
`STACK_FOLDS`), a stacker per fold predicts its held-out images, the rule (calibrated by default) is
searched on those, then the final stacker is fitted on every image. A stack file (JSON, the booster as
LightGBM's text) is used like a blend file: `imet blend apply --blend stack.json` on other probability
files of the same models, or as a --model of evaluate, report and predict --store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet.blend import Blend, labelled_inputs, member_entry
from imet.booster_text import check_booster_text
from imet.decode import values
from imet.decode.rule import Rule, search_rule
from imet.decode.spec import ENSEMBLE, Decoding
from imet.errors import ImetError
from imet.files import atomic_path
from imet.folds import assign_folds
from imet.labels import Vocabulary
from imet.loader import open_model, register_format

FORMAT, FORMAT_VERSION = "imet-stack", 2  # 2: rows for each image's top-K candidate labels (1: every label)
STACK_FOLDS = 4
PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 20,
          "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
          "verbose": -1, "deterministic": True, "num_threads": 0}
ROUNDS = 150
RECALL = 0.99  # share of the true (image, label) pairs that the top-K candidates must hold, on the fitting images
MAX_K = 100  # candidates per image at most (images carry ~4.4 labels on iMet; 1-16 on the planted stores)
CHUNK_ROWS = 1 << 20  # (image, label) cells handled at once: bounds the (N, C) temporaries


def blend(probs: list[np.ndarray]) -> np.ndarray:
    """(N, C) mean of the models' probabilities: what candidates are chosen by, and the rest scored by."""
    return sum(np.asarray(p, np.float64) for p in probs) / len(probs)


def candidates(mean: np.ndarray, k: int) -> np.ndarray:
    """(N, k) label indices, ascending, of each image's k most probable labels under `mean` (ties: lower index)."""
    if k >= mean.shape[1]:
        return np.broadcast_to(np.arange(mean.shape[1]), mean.shape)
    top = np.argsort(-mean, axis=1, kind="stable")[:, :k]
    return np.sort(top, axis=1)


def _ranks(p: np.ndarray) -> np.ndarray:
    """(n, C) rank of each label in its image under p (0: the image's best; ties: lower index first)."""
    rank = np.empty(p.shape, np.int64)
    rank[np.arange(len(p))[:, None], np.argsort(-p, axis=1, kind="stable")] = np.arange(p.shape[1])
    return rank


def _image_chunks(n: int, c: int):
    """Image ranges of about CHUNK_ROWS (image, label) cells each."""
    step = max(1, CHUNK_ROWS // max(c, 1))
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def choose_k(mean: np.ndarray, truth: np.ndarray) -> int:
    """The fewest candidates per image whose top-K holds RECALL of the true pairs (at most MAX_K, at least 1)."""
    truth = np.asarray(truth, bool)
    ranks = np.sort(np.concatenate([_ranks(mean[lo:hi])[truth[lo:hi]] for lo, hi in _image_chunks(*mean.shape)]))
    if not len(ranks):
        return 1
    need = int(ranks[int(np.ceil(RECALL * len(ranks))) - 1]) + 1
    return int(min(need, MAX_K, mean.shape[1]))


def features(probs: list[np.ndarray], prior: np.ndarray, kind_code: np.ndarray,
             cand: np.ndarray | None = None) -> np.ndarray:
    """(N * K, 4M + 2) float32 rows, image-major, of M models' (N, C) probabilities at each image's (N, K)
    candidate labels `cand` (None: every label, K = C; see the module doc). Ranks are among all C labels."""
    n, c = probs[0].shape
    cand = np.broadcast_to(np.arange(c), (n, c)) if cand is None else cand
    k = cand.shape[1]
    out = np.empty((n * k, 4 * len(probs) + 2), np.float32)
    for lo, hi in _image_chunks(n, c):
        rows, at = np.arange(hi - lo)[:, None], cand[lo:hi]  # (b, 1), (b, K)
        cols = []
        for p in probs:
            p = p[lo:hi]
            cols += [p[rows, at], _ranks(p)[rows, at] / max(c - 1, 1),
                     np.broadcast_to(p.max(1, keepdims=True), at.shape),
                     np.broadcast_to(p.mean(1, keepdims=True), at.shape)]
        cols += [prior[at], kind_code[at]]
        out[lo * k:hi * k] = np.stack([np.asarray(x, np.float32).reshape(-1) for x in cols], axis=1)
    return out


def stacked(booster, probs: list[np.ndarray], prior: np.ndarray, kind_code: np.ndarray, k: int) -> np.ndarray:
    """(N, C) probabilities: the booster's at each image's top-k candidates; the other labels keep the
    models' mean, scaled so that none passes the image's least candidate (their order kept among them)."""
    n, c = probs[0].shape
    out = np.empty((n, c))
    for lo, hi in _image_chunks(n, c):
        part = [p[lo:hi] for p in probs]
        mean = blend(part)
        cand = candidates(mean, k)
        rows = np.arange(hi - lo)[:, None]
        scores = booster.predict(features(part, prior, kind_code, cand)).reshape(hi - lo, -1)  # (b, K)
        if k < c:
            kth = mean[rows, cand].min(1, keepdims=True)  # no other label has a larger mean
            out[lo:hi] = mean / np.maximum(kth, 1e-12) * scores.min(1, keepdims=True)
        out[lo + rows, cand] = scores
    return out


def _train(x: np.ndarray, y: np.ndarray, seed: int):
    import lightgbm as lgb

    return lgb.train({**PARAMS, "seed": seed}, lgb.Dataset(x, y.reshape(-1).astype(np.float32)),
                     num_boost_round=ROUNDS)


def fit_stack(prob_paths: list[Path], out: Path, *, decoding: Decoding = ENSEMBLE, seed: int = 0) -> str:
    """Fit the second stage on labelled probability files (one per model), tune the rule `decoding` asks for out
    of fold, write it."""
    decoding.check("stack")
    ids, probs, attribute_ids, truth, kinds, members, split = labelled_inputs(prob_paths)
    decoding.check("stack", len(attribute_ids))
    truth, kinds = truth.astype(bool), tuple(kinds)
    if len(ids) < 2 * STACK_FOLDS:
        raise ImetError(f"{prob_paths[0]}: {len(ids)} images are too few to stack (need {2 * STACK_FOLDS})")
    names = sorted(set(kinds))
    prior, code = truth.mean(0), np.array([names.index(k) for k in kinds], np.float32)
    mean = blend(probs)
    k = choose_k(mean, truth)
    cand = candidates(mean, k)  # (N, K)
    x, y = features(probs, prior, code, cand), truth[np.arange(len(ids))[:, None], cand]  # (N * K, F), (N, K)
    fold = assign_folds(truth, STACK_FOLDS, seed)
    oof = np.zeros(truth.shape)
    for j in range(STACK_FOLDS):
        inside = np.repeat(fold != j, k)  # rows are image-major
        booster = _train(x[inside], y[fold != j], seed)
        oof[fold == j] = stacked(booster, [p[fold == j] for p in probs], prior, code, k)
    found = search_rule(oof, truth, kinds, decoding)
    rule, f2 = found.rule, found.f2
    singles = [search_rule(p, truth, kinds, decoding).f2 for p in probs]
    booster = _train(x, y, seed)
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "split": split, "images": len(ids),
            "val_f2": f2, "attribute_ids": attribute_ids.tolist(), "kinds": list(kinds), "kind_names": names,
            "prior": prior.tolist(), "members": [{"model": m.model, "sha256": m.sha256, "head": m.head, "val_f2": s}
                                                 for m, s in zip(members, singles, strict=True)],
            "rule": rule.to_json(), "booster": booster.model_to_string(), "seed": seed, "candidates": k}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(blob))
    return (f"wrote {out}: LightGBM stack of {len(members)} models on {len(ids)} images of {blob['split']}, "
            f"{k} candidate labels per image ({len(x):,} rows); its out-of-fold F2 there {f2:.4f} (each model "
            "alone: " + ", ".join(f"{m.head} {s:.4f}" for m, s in zip(members, singles, strict=True))
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
    k: int  # candidate labels per image (all of them in a version-1 file)
    split: str = "?"  # what it was fitted on: split name and image count
    images: int = 0
    seed: int = 0


def read_stack(path: Path) -> StackFile:
    """A stack file written by `fit_stack`, checked; one-line errors name the file."""
    stack = open_model(path, "json")
    if not isinstance(stack, Stack):
        raise ImetError(f"{path}: not an imet stack file (a {stack.name} file)")
    return stack.file


def stack_file(blob: dict, path: Path) -> StackFile:
    """The contents of a stack file, checked; one-line errors name the file."""
    import lightgbm as lgb

    try:
        if blob.get("version") not in (1, FORMAT_VERSION):
            raise ImetError(f"{path}: stack format version {blob.get('version')} is not supported (this imet reads "
                            f"1 and {FORMAT_VERSION}); fit the stack again")
        attr = np.array(blob["attribute_ids"], dtype=np.int64)
        kinds = tuple(str(k) for k in blob["kinds"])
        names = [str(k) for k in blob["kind_names"]]
        code = np.array([names.index(k) for k in kinds], np.float32)
        prior = values.reals(blob["prior"], "prior", len(attr))
        members = [member_entry(m) for m in blob["members"]]
        rule = Rule.from_json(blob["rule"], len(attr))
        rule.columns(kinds)
        check_booster_text(blob["booster"], 4 * len(members) + 2, f"{path}: damaged stack file, booster")
        booster = lgb.Booster(model_str=blob["booster"])
        val_f2 = values.real(blob["val_f2"], "val_f2")
        k = len(attr) if blob["version"] == 1 else blob["candidates"]  # version 1: a row for every label
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(attr):
            raise ImetError(f"{path}: damaged stack file (candidates {k!r} is not a label count in 1..{len(attr)})")
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
    return StackFile(path, members, rule, Vocabulary(attr, kinds, kinds), prior, code, booster, val_f2, k,
                     str(blob.get("split", "?")), int(blob.get("images", 0)), int(blob.get("seed", 0)))


class Stack(Blend):
    """A stack file read as a model: its members' probabilities through the second-stage LightGBM."""

    name = "stack"

    def params(self) -> dict:
        """What the stacker was fitted on and with: split, images, seed, candidates per image, trees."""
        return {"split": self.file.split, "images": self.file.images, "seed": self.file.seed,
                "candidates": self.file.k, "trees": int(self.file.booster.num_trees())}

    def combine(self, probs: list[np.ndarray]) -> np.ndarray:
        return stacked(self.file.booster, probs, self.file.prior, self.file.code, self.file.k)


register_format(FORMAT, "json", lambda blob, path: Stack(stack_file(blob, path)))
