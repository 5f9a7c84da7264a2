"""Blends: model weights and a decoding rule tuned on validation probabilities, applied to other splits.

`fit_blend` reads probability files of several models on one labelled split (``imet predict --split val
--probs``; they carry the true labels, the label kinds and each model's identity), searches the weights
of a weighted mean of the models' image probabilities and then the decoding rule of the mean (global,
per-class, per-kind or calibrated, as `Head.tune` does), scoring sample-averaged F2, and writes a blend file (JSON).

Weights are searched by coordinate ascent on the simplex: each model's weight in turn takes the best of
`WEIGHT_STEPS` (the others scaled to fill the rest), scored by the F2 of the best global threshold on the
mean with the members' class weights undone at one power (tuned once, on the equal-weight mean): one
histogram pass over the (N, C) mean per candidate, so the search stays cheap at 1,103 labels; the rule of the
family asked for (global, per-class, per-kind, calibrated; power tuned again) is searched only at the end. Passes repeat
until one changes nothing (at most `SWEEPS`). The decoding rule is then searched on those weights and on
each model alone, and the best of these is kept: on the tuning split a blend never scores below its best
model decoded by a rule of the same family.

Hard 0/1 votes (attn_rnn, whose image labels are the union of its views' beams) are refused: a weighted
mean of votes and probabilities has no threshold that means the same for both.

A blend file is used two ways:

- `imet.predict.apply_blend` on probability files of the same models on any split (kaggle-test from
  ``predict --data`` included): the files must come from the very model files the blend was tuned on
  (sha256), on the same images and labels;
- opened by `imet.models.open_model` (this module registers the `imet-blend` format), a `Blend` predicts
  from a store through its member model files, so ``imet evaluate``, ``imet report`` and ``imet predict
  --store`` take a blend file wherever they take a model. A member is the model file of the recorded sha256
  found first at: the recorded file name in the blend file's folder, then the recorded path
  (`find_member`). So a folder of model files and their blend moves as a unit (a Kaggle input folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet.decode import values
from imet.decode.rule import Rule, search_rule
from imet.decode.spec import BLEND_MIN_POSITIVES, BLEND_WEIGHTINGS, ENSEMBLE, Decoding
from imet.decode.thresholds import search_global, search_power, undo_weights
from imet.errors import ImetError
from imet.files import atomic_path, sha256_file
from imet.heads import Head, load_model
from imet.labels import Vocabulary
from imet.loader import open_model, register_format, rule_info, vocab_info
from imet.metrics import average_precision
from imet.probfiles import read_probs
from imet.store import FeatureStore

FORMAT, FORMAT_VERSION = "imet-blend", 1
LABEL_WEIGHTS_VERSION = 2  # a blend file with weights per label: an imet without them refuses it by its version
log = logging.getLogger(__name__)
WEIGHT_STEPS = np.arange(0, 21) / 20  # 0, 0.05, ..., 1
LABEL_STEPS = np.arange(0, 5) / 4  # per-label weights: 0, 0.25, ..., 1 (a finer grid fits val's noise)
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


def search_label_weights(stack: np.ndarray, truth: np.ndarray, weights: np.ndarray,
                         min_positives: int) -> np.ndarray:
    """(M, C) weights per label, each column summing to 1: by coordinate ascent from `weights` (the global ones),
    every label at once, each member's weight in turn taking the best of `LABEL_STEPS` (the others scaled to fill
    the rest) by that label's average precision on `truth`; a label with fewer than `min_positives` positives
    keeps `weights` (too few to choose by). `stack`: the models' (M, N, C) probabilities."""
    m, c = stack.shape[0], stack.shape[2]
    current = np.repeat(np.asarray(weights, dtype=np.float64)[:, None], c, axis=1)  # (M, C)
    own = np.count_nonzero(truth, axis=0) >= min_positives
    if m == 1 or not own.any():
        return current
    best = np.nan_to_num(average_precision(truth, np.einsum("mc,mnc->nc", current, stack)), nan=-1.0)
    for _ in range(SWEEPS):
        changed = False
        for i in range(m):
            for step in LABEL_STEPS:
                rest = current.sum(axis=0) - current[i]
                possible = own & ((rest > 0) | (step == 1.0)) & ~np.isclose(current[i], step)
                if not possible.any():
                    continue
                cand = np.where(rest > 0, current * (1.0 - step) / np.where(rest > 0, rest, 1.0), 0.0)
                cand[i] = step
                ap = np.nan_to_num(average_precision(truth, np.einsum("mc,mnc->nc", cand, stack)), nan=-1.0)
                better = possible & (ap > best + 1e-9)
                current[:, better], best[better], changed = cand[:, better], ap[better], changed or better.any()
        if not changed:
            break
    return current


def _with_weight(weights: np.ndarray, i: int, step: float) -> np.ndarray | None:
    """`weights` with weight i set to `step` and the others scaled to sum to 1 - step (None: impossible)."""
    rest = np.delete(weights, i)
    if step == 1.0 or rest.sum() == 0:
        return None if step < 1.0 or len(weights) == 1 else np.eye(len(weights))[i]
    out = weights * (1.0 - step) / rest.sum()
    out[i] = step
    return out


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
    if store_path is None or not model_paths:
        raise ImetError("give probability files, or --store and --model files")
    store, images, probs, members, found = FeatureStore(store_path), None, [], [], []
    for path in model_paths:
        head = load_model(path)
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
        found.append(getattr(head, "loss_weights_", None))
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
              model_paths: list[Path] | None = None, split: str = "val", decoding: Decoding = ENSEMBLE,
              weights: str = "per-label", min_positives: int = BLEND_MIN_POSITIVES) -> str:
    """Tune weights and the rule `decoding` asks for on labelled probability files (one per model), or on model
    files predicting a labelled split of a store, and write the blend file. `weights`: "global" (one weight per
    model) or "per-label" (then each label with at least `min_positives` positives on the split gets its own,
    `search_label_weights`)."""
    decoding.check("blend")
    if weights not in BLEND_WEIGHTINGS:
        raise ImetError(f"blend: weights {weights!r} is not one of {', '.join(BLEND_WEIGHTINGS)}")
    if min_positives < 1:
        raise ImetError(f"blend: min_positives {min_positives} is below 1")
    ids, probs, attribute_ids, truth, kinds, members, split, undo = labelled_inputs(
        prob_paths, store_path, model_paths, split, with_weights=True)
    decoding.check("blend", len(attribute_ids))
    lo, hi = decoding.min_labels, decoding.max_labels
    power, _, _ = search_power(np.mean(probs, axis=0), truth, undo, min_labels=lo, max_labels=hi)
    scored = undo if power else None

    def score(mean: np.ndarray) -> float:  # one global search per candidate: cheap at 1,103 labels
        return search_global(undo_weights(mean, scored, power), truth, min_labels=lo, max_labels=hi)[1]

    searched, _ = search_weights(probs, score)
    stack, c = np.stack(probs), len(attribute_ids)
    # the searched weights (and per label, when asked), then each model alone: the rule searched on each, the best
    # kept (ties: the first), so the blend never scores below its best model on the tuning split
    candidates = [np.repeat(w[:, None], c, axis=1) for w in [searched, *np.eye(len(probs))]]
    own = np.count_nonzero(truth, axis=0) >= min_positives
    moved = 0  # labels whose own weights rank their images better than the global ones
    if weights == "per-label":
        by_label = search_label_weights(stack, truth, searched, min_positives)
        moved = int((~np.isclose(by_label, candidates[0]).all(axis=0)).sum())
        if moved:
            candidates.insert(0, by_label)
    tried = []
    for w in candidates:
        found = search_rule(np.einsum("mc,mnc->nc", w, stack), truth, kinds, decoding, weights=undo)
        tried.append((w, found.rule, found.f2))
    chosen, rule, f2 = max(tried, key=lambda t: t[2])
    singles = [t[2] for t in tried[-len(probs):]]
    per_label = not np.allclose(chosen, chosen[:, :1])
    overall = chosen.mean(axis=1) if per_label else chosen[:, 0]
    blob = {"format": FORMAT, "version": LABEL_WEIGHTS_VERSION if per_label else FORMAT_VERSION, "split": split,
            "images": len(ids), "val_f2": f2, "attribute_ids": attribute_ids.tolist(), "kinds": list(kinds),
            "members": [{"model": m.model, "sha256": m.sha256, "head": m.head, "weight": float(w), "val_f2": s}
                        for m, w, s in zip(members, overall, singles, strict=True)],
            "rule": rule.to_json()}
    if per_label:
        blob["min_positives"] = min_positives
        for entry, row in zip(blob["members"], chosen, strict=True):
            entry["label_weights"] = [float(x) for x in row]
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(blob, indent=1))
    names = [Path(m.model).name for m in members]
    lines = [f"wrote {out}: blend of {len(members)} models tuned on {len(ids)} images of "
             f"{blob['split']}; F2 there {f2:.4f} (each model with its own rule searched alike: "
             + ", ".join(f"{m.head} {s:.4f}" for m, s in zip(members, singles, strict=True)) + ")"]
    if weights == "per-label":
        lines.append(f"weights per label: {int(own.sum())} of {c} labels have >= {min_positives} positives there, "
                     f"{moved} of them rank their images better with weights of their own"
                     + ("" if per_label or not moved else f"; F2 with them {tried[0][2]:.4f}, below: not kept"))
    lines.append(("weights (mean over labels): " if per_label else "weights: ")
                 + ", ".join(f"{n} {w:.2f}" for n, w in zip(names, overall, strict=True)))
    lines.append(f"decoding: {rule.describe()}")
    return "\n".join(lines)


@dataclass
class BlendFile:
    path: Path
    members: list[dict]  # model (the recorded path), sha256, head, val_f2 (alone, when recorded)
    weights: np.ndarray
    rule: Rule
    vocab: Vocabulary
    val_f2: float
    split: str = "?"  # what it was tuned on: split name and image count
    images: int = 0
    label_weights: np.ndarray | None = None  # (M, C), each column summing to 1: weights per label (version 2)
    min_positives: int = 0  # with label_weights: fewer positives on the tuning split kept the global weights


def read_blend(path: Path) -> BlendFile:
    """A blend file written by `fit_blend`, checked; one-line errors name the file."""
    blend = open_model(path, "json")
    if not isinstance(blend, Blend) or blend.name != "blend":
        raise ImetError(f"{path}: not an imet blend file (a {blend.name} file)")
    return blend.file


def blend_file(blob: dict, path: Path) -> BlendFile:
    """The contents of a blend file, checked; one-line errors name the file."""
    version = blob.get("version")
    if version not in (FORMAT_VERSION, LABEL_WEIGHTS_VERSION):
        raise ImetError(f"{path}: blend format version {version} is not supported")
    try:
        attr = np.array(blob["attribute_ids"], dtype=np.int64)
        kinds = tuple(str(k) for k in blob["kinds"])
        vocab = Vocabulary(attr, kinds, kinds)
        members = [member_entry(m) for m in blob["members"]]
        weights = np.array([values.real(m["weight"], f"member {k}: weight", 0, np.inf)
                            for k, m in enumerate(blob["members"])])
        per_label = None if version == FORMAT_VERSION else np.array(
            [[values.real(x, f"member {k}: label weight", 0, np.inf) for x in m["label_weights"]]
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
    if per_label is not None:
        if per_label.shape != (len(members), len(attr)):
            raise ImetError(f"{path}: damaged blend file (label weights are {per_label.shape[-1]} per member, "
                            f"not one per label: {len(attr)})")
        sums = per_label.sum(axis=0)
        if not (sums > 0).all():
            raise ImetError(f"{path}: damaged blend file (every weight of label {attr[np.argmin(sums)]} is 0)")
        if np.abs(sums - 1).max() > 1e-4:
            log.warning("%s: some labels' weights do not sum to 1; used divided by their sum", path)
        per_label = per_label / sums
    return BlendFile(path, members, weights / weights.sum(), rule, vocab, val_f2, str(blob.get("split", "?")),
                     int(blob.get("images", 0)), per_label, int(blob.get("min_positives", 0)))


def member_entry(m: dict) -> dict:
    """A member as a blend or stack file records it: model path, sha256, head (and its own F2 when recorded)."""
    out = {"model": str(m["model"]), "sha256": str(m["sha256"]), "head": str(m["head"])}
    if m.get("val_f2") is not None:
        out["val_f2"] = values.real(m["val_f2"], "member val_f2")
    return out


class Blend:
    """A blend file read as a model (an `imet.loader.Predictor`): predicts a store's images through its member
    model files, or combines its members' image probabilities."""

    name = "blend"
    probabilistic = True

    def __init__(self, file: BlendFile):
        self.file = file
        self.vocab_ = file.vocab
        self._heads: list[Head] | None = None

    @property
    def heads(self) -> list[Head]:
        """The member models, loaded from their files (checked by sha256) on first use."""
        if self._heads is None:
            self._heads = [_load_member(self.file.path, m) for m in self.file.members]
        return self._heads

    def combine(self, probs: list[np.ndarray]) -> np.ndarray:
        """(N, C) blended probabilities of the members' (N, C) image probabilities, in member order."""
        weights = self.file.weights if self.file.label_weights is None else self.file.label_weights
        return sum(w * p for w, p in zip(weights, probs, strict=True))  # a weight per model or (C,) per label

    def describe(self) -> dict:
        """What the blend file holds (`imet model info`): its decoding rule, labels, F2 on the split it was tuned
        on, and each member's recorded path, sha256, head, weight, F2 alone and where its file is found now."""
        weights = getattr(self.file, "weights", None)
        per_label = getattr(self.file, "label_weights", None)
        members = []
        for k, m in enumerate(self.file.members):
            found, looked = find_member(self.file.path, m)
            members.append({**m, **({} if weights is None else {"weight": float(weights[k])}),
                            **({} if per_label is None else {"label_weights": per_label[k].tolist()}),
                            "found": None if found is None else str(found),
                            "looked": [{"path": str(p), "what": what} for p, what in looked]})
        return {"head": self.name, "probabilistic": True, "params": self.params(),
                "decoding": {**rule_info(self.file.rule), "text": self.decoding()}, "features": None,
                "labels": vocab_info(self.vocab_), "scores": {f"{self.file.split}_f2": float(self.file.val_f2)},
                "members": members}

    def params(self) -> dict:
        """What the blend was tuned on (its rule's family and label counts are in its decoding), and its weights:
        one per model, or per label (labels with fewer than min_positives positives there keep global ones)."""
        if self.file.label_weights is None:
            return {"split": self.file.split, "images": self.file.images, "weights": "global"}
        return {"split": self.file.split, "images": self.file.images, "weights": "per-label",
                "min_positives": self.file.min_positives}

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

    def image_probs(self, store: FeatureStore, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, (n, C) combined probabilities of the members' image probabilities)."""
        images, probs = None, []
        for head in self.heads:
            these, p = head.image_probs(store, views)
            images = these if images is None else images
            probs.append(p)
        return images, self.combine(probs)

    def predict_labels(self, store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices, (n, C) combined probabilities, (n, C) bool labels) of a split's images."""
        self.check_store(store)
        images, probs = self.image_probs(store, store.views(split))
        return images, probs, self.label_sets(probs)


def find_member(blend_path: Path, member: dict) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the member's model file, None if found nowhere; each place looked at before it, and what was there).

    The places, in order: the recorded file name in the blend file's folder, then the recorded path. A file
    is the member only if its sha256 is the recorded one."""
    recorded = Path(member["model"])
    places = [Path(blend_path).parent / recorded.name, recorded]
    if places[0].resolve() == recorded.resolve():
        places = places[:1]
    looked = []
    for path in places:
        if not path.is_file():
            looked.append((path, "not there"))
        elif sha256_file(path) != member["sha256"]:
            looked.append((path, "another file (changed since the blend was tuned: sha256 differs)"))
        else:
            return path, looked
    return None, looked


def _load_member(blend_path: Path, member: dict) -> Head:
    path, looked = find_member(blend_path, member)
    if path is None:
        raise ImetError(f"{blend_path}: its model {Path(member['model']).name} (sha256 {member['sha256'][:12]}...) "
                        "is found nowhere (" + "; ".join(f"{p}: {what}" for p, what in looked) + "); put that "
                        "model file next to the blend file, or blend probability files with imet blend apply")
    head = load_model(path)
    if not head.probabilistic:
        raise ImetError(f"{blend_path}: its model {path} gives 0/1 votes; a blend takes probabilistic heads only")
    return head


def _rule_weights(path: Path, n_labels: int) -> np.ndarray | None:
    """The class weights a probability file's decoding rule undoes (None: it undoes none, or has no rule)."""
    meta = read_probs(path)[3]
    try:
        return Rule.from_json(json.loads(meta["rule"]), n_labels).weights
    except (KeyError, TypeError, ValueError):
        return None


register_format(FORMAT, "json", lambda blob, path: Blend(blend_file(blob, path)))
