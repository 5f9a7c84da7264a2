"""Blends: model weights and a decoding rule tuned on validation probabilities, applied to other splits.

`fit_blend` reads probability files of several models on one labelled split (``imet predict --split val
--probs``; they carry the true labels, the label kinds and each model's identity), searches the weights
of a weighted mean of the models' image probabilities and then the decoding rule of the mean (global,
per-class or per-kind, as `Head.tune` does), scoring sample-averaged F2, and writes a blend file (JSON).

Weights are searched by coordinate ascent on the simplex: each model's weight in turn takes the best of
`WEIGHT_STEPS` (the others scaled to fill the rest), scored by the F2 of the best global threshold on the
mean with the members' class weights undone at one power (tuned once, on the equal-weight mean): one
histogram pass over the (N, C) mean per candidate, so the search stays cheap at 1,103 labels; the rule of the
family asked for (global, per-class, per-kind, power tuned again) is searched only at the end. Passes repeat
until one changes nothing (at most `SWEEPS`). The decoding rule is then searched on those weights and on
each model alone, and the best of these is kept: on the tuning split a blend never scores below its best
model decoded by a rule of the same family.

Hard 0/1 votes (attn_rnn, whose image labels are the union of its views' beams) are refused: a weighted
mean of votes and probabilities has no threshold that means the same for both.

A blend file is used two ways:

- `apply_blend` on probability files of the same models on any split (kaggle-test from ``predict --data``
  included): the files must come from the very model files the blend was tuned on (sha256), on the same
  images and labels;
- `load_blend` gives a `Blend` that predicts from a store through its member model files (recorded by
  path and checked by sha256), so ``imet evaluate``, ``imet report`` and ``imet predict --store`` take a
  blend file wherever they take a model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet.decode import values
from imet.decode.rule import Rule, search_per_kind
from imet.decode.submission import write_submission
from imet.decode.thresholds import average_views, search_global, search_per_class, search_power, undo_weights
from imet.errors import ImetError
from imet.files import atomic_path, sha256_file
from imet.heads import Head, load_model
from imet.labels import Vocabulary
from imet.metrics import scores
from imet.predict import read_probs, write_probs
from imet.store import FeatureStore

FORMAT, FORMAT_VERSION = "imet-blend", 1
log = logging.getLogger(__name__)
WEIGHT_STEPS = np.arange(0, 21) / 20  # 0, 0.05, ..., 1
SWEEPS = 4


@dataclass
class Member:
    """One model of a probability file: where its model file was, its sha256, its head."""

    model: str
    sha256: str
    head: str


def _member(path: Path, meta: dict) -> Member:
    if not meta.get("probabilistic", True) or meta.get("head") == "attn_rnn":
        raise ImetError(f"{path}: holds {meta.get('head', 'a model')}'s 0/1 votes, not probabilities; a blend "
                        "averages probabilistic heads only (linear, linear_hog, lgbm, csra, mldecoder)")
    if "model_sha256" not in meta or "model" not in meta:
        raise ImetError(f"{path}: does not record its model file (written by an older imet); write it again "
                        "with imet predict --probs")
    return Member(str(meta["model"]), str(meta["model_sha256"]), str(meta.get("head", "?")))


def read_members(paths: list[Path]) -> tuple[list[str], list[np.ndarray], np.ndarray, dict, list[Member]]:
    """(ids, one (N, C) probability array per file in the first file's image order, attribute ids, the first
    file's meta, members); refuses votes, files of other labels or images, and one model given twice."""
    ids, probs, attribute_ids, first, members = None, [], None, None, []
    for path in paths:
        these, p, attr, meta = read_probs(path)
        member = _member(path, meta)
        if ids is None:
            ids, attribute_ids, first = these, attr, meta
        elif not np.array_equal(attr, attribute_ids):
            raise ImetError(f"{path}: labels differ from {paths[0]}'s; a blend needs models of one vocabulary")
        elif sorted(these) != sorted(ids):
            raise ImetError(f"{path}: holds other images than {paths[0]} ({len(these)} and {len(ids)} images); "
                            "predict every model on the same split")
        twice = [m for m in members if m.sha256 == member.sha256]
        if twice:
            raise ImetError(f"{path}: the same model file as another input ({twice[0].model}); give each model once")
        position = {image_id: k for k, image_id in enumerate(these)}
        probs.append(p[[position[i] for i in ids]].astype(np.float64))
        members.append(member)
    return ids, probs, attribute_ids, first, members


def search_weights(probs: list[np.ndarray], score: Callable[[np.ndarray], float]) -> tuple[np.ndarray, float]:
    """(weights summing to 1, their score) by coordinate ascent from equal weights; `score` rates the
    weighted mean of `probs` (each (N, C)) by the F2 of its best decoding."""
    m = len(probs)
    stack = np.stack(probs)  # (M, N, C)

    def rate(w: np.ndarray) -> float:
        return score(np.tensordot(w, stack, axes=1))

    weights = np.full(m, 1.0 / m)
    best = rate(weights)
    for _ in range(SWEEPS if m > 1 else 0):
        changed = False
        for i in range(m):
            for step in WEIGHT_STEPS:
                cand = _with_weight(weights, i, step)
                if cand is None or np.allclose(cand, weights):
                    continue
                f = rate(cand)
                if f > best + 1e-9:
                    weights, best, changed = cand, f, True
        if not changed:
            break
    return weights, best


def _with_weight(weights: np.ndarray, i: int, step: float) -> np.ndarray | None:
    """`weights` with weight i set to `step` and the others scaled to sum to 1 - step (None: impossible)."""
    rest = np.delete(weights, i)
    if step == 1.0 or rest.sum() == 0:
        return None if step < 1.0 or len(weights) == 1 else np.eye(len(weights))[i]
    out = weights * (1.0 - step) / rest.sum()
    out[i] = step
    return out


def search_rule(probs: np.ndarray, truth: np.ndarray, kinds: tuple[str, ...], thresholds: str, *,
                min_labels: int = 1, max_labels: int | None = None, shrink: float = 10.0,
                weights: np.ndarray | None = None, power: float | None = None) -> tuple[Rule, float]:
    """The decoding rule of image probabilities tuned on their truth, as `Head.tune` does, and its F2: the
    class `weights` undone at `power` (None: the power tuned here, as `search_power` does)."""
    if power is None:
        power, t, f2 = search_power(probs, truth, weights, min_labels=min_labels, max_labels=max_labels)
    else:
        t, f2 = search_global(undo_weights(probs, weights, power), truth, min_labels=min_labels,
                              max_labels=max_labels)
    weights = weights if power else None
    if thresholds == "per-class":
        ct = search_per_class(undo_weights(probs, weights, power), truth, start=t, shrink=shrink)
        rule = Rule.global_(t, min_labels, max_labels, ct, weights, power)
        return rule, scores(truth, rule.apply(probs, kinds))["f2"]
    if thresholds == "per-kind":
        rule, f_kind = search_per_kind(probs, truth, kinds, start=t, weights=weights, power=power)
        if f_kind > f2:
            return rule, f_kind
    return Rule.global_(t, min_labels, max_labels, None, weights, power), f2


def member_weights(found: list[np.ndarray | None]) -> np.ndarray | None:
    """(C,) the class weights to undo in a blend: the mean of the members' recorded ones (None if none has)."""
    found = [w for w in found if w is not None]
    return np.mean(found, axis=0) if found else None


def labelled_inputs(prob_paths: list[Path], store_path: Path | None = None, model_paths: list[Path] | None = None,
                    split: str = "val", *, with_weights: bool = False) -> tuple:
    """(ids, per-model (N, C) probabilities, attribute ids, (N, C) truth, kinds, members, split name) to tune
    on: from labelled probability files, or from model files predicting a labelled split of a store; with
    `with_weights`, also the members' class weights for decoding to undo (`member_weights`)."""
    if prob_paths:
        ids, probs, attribute_ids, meta, members = read_members(prob_paths)
        if "targets" not in meta or "kinds" not in meta:
            raise ImetError(f"{prob_paths[0]}: holds no true labels; tune on a labelled split "
                            "(imet predict --split val --probs, or imet fit --folds K --oof)")
        require_positives(meta["targets"], str(prob_paths[0]))
        out = ids, probs, attribute_ids, meta["targets"], meta["kinds"], members, str(meta.get("split", "?"))
        if not with_weights:
            return out
        return *out, member_weights([_rule_weights(path, len(attribute_ids)) for path in prob_paths])
    from imet.predict import load_model_or_blend

    if store_path is None or not model_paths:
        raise ImetError("give probability files, or --store and --model files")
    store, images, probs, members, found = FeatureStore(store_path), None, [], [], []
    for path in model_paths:
        head = load_model_or_blend(path)
        member = _member(Path(path), {"head": head.name, "probabilistic": head.probabilistic,
                                      "model": str(Path(path).resolve()), "model_sha256": sha256_file(path)})
        if any(m.sha256 == member.sha256 for m in members):
            raise ImetError(f"{path}: the same model file as another --model; give each model once")
        these, p, _ = head.predict_labels(store, split)
        if images is not None and not np.array_equal(these, images):
            raise ImetError(f"{path}: predicts other images of {split} than {model_paths[0]}")
        images = these
        probs.append(p.astype(np.float64))
        members.append(member)
        found.append(getattr(head, "loss_weights_", None) if hasattr(head, "vocab_") else None)
    require_positives(store.targets[images], f"{store_path}: split {split}")
    out = ([str(store.image_ids[i]) for i in images], probs, store.vocab.attribute_ids, store.targets[images],
           store.vocab.kinds, members, split)
    return (*out, member_weights(found)) if with_weights else out


def require_positives(truth: np.ndarray, where: str) -> None:
    """Refuse to tune a decoding rule on images that carry no label at all (every rule scores the same there)."""
    if not np.asarray(truth).any():
        raise ImetError(f"{where}: its {len(truth)} images carry no true label; a decoding rule cannot be tuned "
                        "on them (tune on a labelled split with positives)")


def fit_blend(prob_paths: list[Path], out: Path, *, store_path: Path | None = None,
              model_paths: list[Path] | None = None, split: str = "val", thresholds: str = "per-kind",
              min_labels: int = 1, max_labels: int | None = None) -> str:
    """Tune weights and decoding on labelled probability files (one per model), or on model files predicting
    a labelled split of a store, and write the blend file."""
    if max_labels is not None and min_labels > max_labels:
        raise ImetError(f"--min-labels {min_labels} is more than --max-labels {max_labels}")
    if thresholds == "per-kind" and max_labels is not None:
        raise ImetError("--max-labels bounds the global and per-class rules; per-kind decoding searches each kind's "
                        "own label counts: drop --max-labels or choose --thresholds global")
    ids, probs, attribute_ids, truth, kinds, members, split, undo = labelled_inputs(
        prob_paths, store_path, model_paths, split, with_weights=True)
    if min_labels > len(attribute_ids):
        raise ImetError(f"--min-labels {min_labels} is more than the {len(attribute_ids)} labels")
    power, _, _ = search_power(np.mean(probs, axis=0), truth, undo, min_labels=min_labels, max_labels=max_labels)
    scored = undo if power else None

    def score(mean: np.ndarray) -> float:  # one global search per candidate: cheap at 1,103 labels
        return search_global(undo_weights(mean, scored, power), truth, min_labels=min_labels,
                             max_labels=max_labels)[1]

    searched, _ = search_weights(probs, score)
    # the searched weights, then each model alone: the rule searched on each, the best kept (ties: the first),
    # so the blend never scores below its best model on the tuning split
    tried = []
    for w in [searched, *np.eye(len(probs))]:
        mean = np.tensordot(w, np.stack(probs), axes=1)
        tried.append((w, *search_rule(mean, truth, kinds, thresholds, min_labels=min_labels, max_labels=max_labels,
                                      weights=undo)))
    weights, rule, f2 = max(tried, key=lambda t: t[2])
    singles = [t[2] for t in tried[1:]]
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "split": split,
            "images": len(ids), "val_f2": f2, "attribute_ids": attribute_ids.tolist(), "kinds": list(kinds),
            "members": [{"model": m.model, "sha256": m.sha256, "head": m.head, "weight": float(w), "val_f2": s}
                        for m, w, s in zip(members, weights, singles, strict=True)],
            "rule": rule.to_json()}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(blob, indent=1))
    lines = [f"wrote {out}: blend of {len(members)} models tuned on {len(ids)} images of "
             f"{blob['split']}; F2 there {f2:.4f} (each model with its own rule searched alike: "
             + ", ".join(f"{m.head} {s:.4f}" for m, s in zip(members, singles, strict=True)) + ")",
             "weights: " + ", ".join(f"{Path(m.model).name} {w:.2f}" for m, w in zip(members, weights, strict=True)),
             f"decoding: {rule.describe()}"]
    return "\n".join(lines)


@dataclass
class BlendFile:
    path: Path
    members: list[dict]
    weights: np.ndarray
    rule: Rule
    vocab: Vocabulary
    val_f2: float


def read_blend(path: Path) -> BlendFile:
    """A blend file written by `fit_blend`, checked; one-line errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ImetError(f"{path}: blend file not found")
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...]]]]
        raise ImetError(f"{path}: not an imet blend file ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ImetError(f"{path}: not an imet blend file")
    if blob.get("version") != FORMAT_VERSION:
        raise ImetError(f"{path}: blend format version {blob.get('version')} is not supported")
    try:
        attr = np.array(blob["attribute_ids"], dtype=np.int64)
        kinds = tuple(str(k) for k in blob["kinds"])
        vocab = Vocabulary(attr, kinds, kinds)
        members = [{"model": str(m["model"]), "sha256": str(m["sha256"]), "head": str(m["head"])}
                   for m in blob["members"]]
        weights = np.array([values.real(m["weight"], f"member {k}: weight", 0, np.inf)
                            for k, m in enumerate(blob["members"])])
        rule = Rule.from_json(blob["rule"], len(attr))
        rule.columns(kinds)
        val_f2 = values.real(blob["val_f2"], "val_f2")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ImetError(f"{path}: damaged blend file ({type(e).__name__}: {e})") from None
    if len(kinds) != len(attr) or not members:
        raise ImetError(f"{path}: damaged blend file (labels or members inconsistent)")
    if not weights.sum() > 0:
        raise ImetError(f"{path}: damaged blend file (its weights are all 0: the blend would be no model)")
    if abs(weights.sum() - 1) > 1e-6:  # a weighted mean: only the weights' ratios count (5 and 5 is 0.5 and 0.5)
        log.warning("%s: blend weights sum to %g; used divided by their sum", path, weights.sum())
    return BlendFile(path, members, weights / weights.sum(), rule, vocab, val_f2)


def apply_blend(blend_path: Path, prob_paths: list[Path], out: Path, *, probs_out: Path | None = None) -> str:
    """The submission of a blend (or stack) file from probability files of its models on one split (any
    order of files); each of its models must give exactly one file, from the very model file (sha256)."""
    from imet.files import atomic_paths

    b = open_combiner(blend_path)
    ids, probs, attribute_ids, meta, members = read_members(prob_paths)
    if not np.array_equal(attribute_ids, b.vocab_.attribute_ids):
        raise ImetError(f"{prob_paths[0]}: labels differ from those of {blend_path}")
    by_sha = {m.sha256: (k, path) for k, (m, path) in enumerate(zip(members, prob_paths, strict=True))}
    for m in b.file.members:
        if m["sha256"] not in by_sha:
            raise ImetError(f"{blend_path}: no input comes from its model {m['model']} (sha256 "
                            f"{m['sha256'][:12]}...); give one probability file of each blended model")
    extra = [path for sha, (_, path) in by_sha.items() if sha not in {m["sha256"] for m in b.file.members}]
    if extra:
        raise ImetError(f"{extra[0]}: comes from a model that {blend_path} was not tuned on")
    combined = b.combine([probs[by_sha[m["sha256"]][0]] for m in b.file.members])
    labels = b.label_sets(combined)
    with atomic_paths(out, probs_out) as (out_tmp, probs_tmp):
        write_submission(out_tmp, ids, labels, attribute_ids)
        if probs_tmp is not None:
            write_probs(probs_tmp, ids, combined, attribute_ids, kinds=b.vocab_.kinds, targets=meta.get("targets"),
                        head=b.name, probabilistic=True, rule=json.dumps(b.rule().to_json()),
                        split=str(meta.get("split", "?")))
    return (f"wrote {out}: {len(ids)} images, {b.name} of {len(b.file.members)} models ({b.decoding()}), "
            f"{labels.sum(1).mean():.2f} labels per image")


class Blend:
    """A blend file read as a model: predicts a store's split through its member model files."""

    name = "blend"
    probabilistic = True

    def __init__(self, path: Path):
        self.file = self.read(path)
        self.vocab_ = self.file.vocab
        self._heads: list[Head] | None = None

    read = staticmethod(read_blend)

    @property
    def heads(self) -> list[Head]:
        """The member models, loaded from their files (checked by sha256) on first use."""
        if self._heads is None:
            self._heads = [_load_member(self.file.path, m) for m in self.file.members]
        return self._heads

    def combine(self, probs: list[np.ndarray]) -> np.ndarray:
        """(N, C) blended probabilities of the members' (N, C) image probabilities, in member order."""
        return sum(w * p for w, p in zip(self.file.weights, probs, strict=True))

    def check_store(self, store: FeatureStore) -> None:
        for head in self.heads:
            head.check_store(store)

    def rule(self) -> Rule:
        return self.file.rule

    @property
    def threshold_(self) -> float:
        return self.file.rule.groups[0].threshold

    def decoding(self) -> str:
        return self.file.rule.describe()

    def label_sets(self, probs: np.ndarray) -> np.ndarray:
        return self.file.rule.apply(probs, self.vocab_.kinds)

    def predict_labels(self, store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices, (n, C) combined probabilities, (n, C) bool labels) of a split's images."""
        self.check_store(store)
        views = store.views(split)
        images, probs = None, []
        for head in self.heads:
            these, p = average_views(head._finite_probs(head.predict_proba(store, views)), store.view_image[views])
            images = these if images is None else images
            probs.append(p)
        combined = self.combine(probs)
        return images, combined, self.label_sets(combined)


def open_combiner(path: Path) -> Blend:
    """The Blend (or Stack) of a blend or stack file, by its format."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            kind = json.load(f).get("format")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError):
        kind = None
    if kind == "imet-stack":
        from imet.stack import Stack

        return Stack(path)
    return Blend(path)


def _load_member(blend_path: Path, member: dict) -> Head:

    path = Path(member["model"])
    if not path.is_file():
        raise ImetError(f"{blend_path}: its model {path} is not there; put it back, or blend probability files "
                        "with imet blend apply")
    if sha256_file(path) != member["sha256"]:
        raise ImetError(f"{blend_path}: its model {path} changed since the blend was tuned (sha256 differs); "
                        "tune the blend again")
    head = load_model(path)
    if not head.probabilistic:
        raise ImetError(f"{blend_path}: its model {path} gives 0/1 votes; a blend takes probabilistic heads only")
    return head


def _rule_weights(path: Path, n_labels: int) -> np.ndarray | None:
    """The class weights a probability file's decoding rule undoes (None: it undoes none, or has no rule)."""
    from imet.predict import read_probs

    meta = read_probs(path)[3]
    try:
        return Rule.from_json(json.loads(meta["rule"]), n_labels).weights
    except (KeyError, TypeError, ValueError):
        return None


def is_blend_file(path: Path) -> bool:
    """True for a JSON file (blend files are JSON; model files are torch archives)."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"{"
    except OSError:
        return False

