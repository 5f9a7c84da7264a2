"""Probability and attention files: what `predict --probs`, `fit --folds --oof` and `predict --attention` write.

A probability file (HDF5, format `imet-probs`) holds per-image probabilities of one model on one split: ids,
probs, attribute_ids, the label kinds and, for a labelled split, the true labels; its attributes say which
model made the numbers (path, sha256, head) and how it decodes them (its whole rule), and a content checksum
binds the two. Blends and stacks are fitted on these files. An attention file (`imet-attention`) holds the
alpha maps of the labels an attention head predicted.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from pathlib import Path

import h5py
import numpy as np

from imet.decode import values
from imet.errors import ImetError
from imet.files import atomic_path, check_free_space, sha256_file
from imet.loader import Predictor
from imet.store import FeatureStore, foreign_storage


def write_attention(path: Path, store: FeatureStore, records: dict[str, np.ndarray]) -> None:
    """Per (image, predicted label): image id, view, attribute id, step and α map (n, h, w), atomically."""
    check_free_space(path, records["alpha"].size * 4 + len(records["label"]) * 64, new_file=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image_id", data=[str(store.image_ids[i]) for i in records["image"]],
                         dtype=h5py.string_dtype())
        f["view"] = records["view"].astype(np.int64)
        f["attribute_id"] = store.vocab.attribute_ids[records["label"]]
        f["step"] = records["step"].astype(np.int64)
        f["alpha"] = records["alpha"].astype(np.float32)
        f.attrs.update({"format": "imet-attention", "store_fingerprint": store.fingerprint})


def probs_meta(head: Predictor, model_path: Path) -> dict:
    """What a probability file records of its model: head, whether it gives probabilities or 0/1 votes, its
    full decoding rule (JSON), and the model file (resolved path and sha256), so that a blend can check it."""
    return {"head": head.name, "probabilistic": bool(head.probabilistic), "threshold": float(head.threshold_),
            "rule": json.dumps(head.rule().to_json()), "model": str(Path(model_path).resolve()),
            "model_sha256": sha256_file(model_path)}


def write_model_probs(path: Path, store: FeatureStore, split: str, predictor: Predictor, model_path: Path, *,
                      predicted: tuple[np.ndarray, np.ndarray] | None = None, **meta) -> None:
    """A model's per-image probabilities on a split of a store, as `imet predict --probs` writes them (what
    `fit_blend` and `fit_stack` read): `predictor` is the model read from (or saved to) `model_path`, whose path
    and sha256 the file records with the model's rule. `predicted`: (image indices, (n, C) probabilities)
    already computed, e.g. the out-of-fold ones of `fit_folds` (split "oof"); `meta` adds or overrides
    attributes (`model`: the path to record)."""
    images, probs = predictor.predict_labels(store, split)[:2] if predicted is None else predicted
    write_probs(path, [str(store.image_ids[i]) for i in images], probs, store.vocab.attribute_ids,
                kinds=store.vocab.kinds, targets=None if split == "kaggle-test" else store.targets[images],
                **{**probs_meta(predictor, model_path), "split": split, **meta})


BOUND = ("model_sha256", "model", "head", "probabilistic", "rule", "threshold", "split")  # attributes the
# content checksum covers: which model made the numbers and how it decodes them


def content_sha256(arrays: dict[str, np.ndarray | list], meta: dict) -> str:
    """sha256 of a probability file's arrays (ids, probs, attribute_ids, kinds, targets, status: those present)
    and of the attributes in BOUND, so that an edited number or a model identity moved onto other numbers
    shows (`content_sha256` attribute). It detects damage and edits, not a forger who recomputes it."""
    h = hashlib.sha256()
    for key in ("ids", "probs", "attribute_ids", "kinds", "targets", "status"):
        if key in arrays:
            value = arrays[key]
            data = ("\n".join(map(str, value)).encode() if key in ("ids", "kinds") else
                    np.ascontiguousarray(value, {"probs": "<f4", "attribute_ids": "<i8"}.get(key, "u1")).tobytes())
            h.update(f"{key}:{len(data)}:".encode() + data)
    for key in BOUND:
        if key in meta:
            h.update(f"{key}={_plain(meta[key])}\n".encode())
    return h.hexdigest()


def _plain(value) -> str:
    """An attribute as text, the same whether it came from Python or back from HDF5 (numpy scalars)."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return value.decode() if isinstance(value, bytes) else str(value)


def write_probs(path: Path, ids: list[str], probs: np.ndarray, attribute_ids: np.ndarray, *,
                kinds: tuple[str, ...] | None = None, targets: np.ndarray | None = None, **meta) -> None:
    """Per-image probabilities (HDF5: ids, probs, attribute_ids, the label kinds and, for a labelled split,
    the true labels; meta as attributes, and the content checksum), written atomically."""
    arrays = {"ids": list(ids), "probs": probs.astype(np.float32), "attribute_ids": np.asarray(attribute_ids, np.int64)}
    if kinds is not None:
        arrays["kinds"] = list(kinds)
    if targets is not None:
        arrays["targets"] = np.asarray(targets, np.uint8)
    size = sum(a.nbytes if isinstance(a, np.ndarray) else sum(len(str(x)) + 16 for x in a) for a in arrays.values())
    check_free_space(path, size, new_file=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            if key in ("ids", "kinds"):
                f.create_dataset(key, data=value, dtype=h5py.string_dtype())
            else:
                f[key] = value
        f.attrs.update({"format": "imet-probs", **meta, "content_sha256": content_sha256(arrays, meta)})


def read_probs(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """A probabilities file from `predict --probs`, checked: shapes agree, ids unique, values in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ImetError(f"{path}: probabilities file not found")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "imet-probs":
                raise ImetError(f"{path}: not an imet probabilities file (write one with imet predict --probs)")
            foreign = foreign_storage(f)
            if foreign:
                raise ImetError(f"{path}: damaged probabilities file ({foreign[0]}: its numbers are not in it)")
            missing = [k for k in ("ids", "probs", "attribute_ids") if k not in f]
            if missing:
                raise ImetError(f"{path}: damaged probabilities file (no {', '.join(missing)})")
            arrays = {k: f[k][()] for k in ("ids", "probs", "attribute_ids", "kinds", "targets", "status") if k in f}
            for key in ("ids", "kinds"):
                if key in arrays:
                    arrays[key] = [s.decode() if isinstance(s, bytes) else str(s) for s in arrays[key]]
            meta = dict(f.attrs)
    except OSError as e:
        raise ImetError(f"{path}: cannot read probabilities ({e})") from None
    ids, probs, attribute_ids = arrays["ids"], arrays["probs"], arrays["attribute_ids"]
    if "kinds" in arrays:
        meta["kinds"] = tuple(arrays["kinds"])
    if "targets" in arrays:
        meta["targets"] = arrays["targets"]
    if "status" in arrays:  # written by predict --data: 1 done, 2 no usable view, 0 not yet
        status = arrays["status"]
        if status.shape != (len(ids),):
            raise ImetError(f"{path}: status has shape {status.shape}, expected ({len(ids)},)")
        if (status == 0).any():
            raise ImetError(f"{path}: unfinished ({int((status == 0).sum())} images pending); rerun its "
                            "imet predict command")
        ids, probs = [i for i, s in zip(ids, status, strict=True) if s == 1], probs[status == 1]
    if probs.ndim != 2 or probs.shape != (len(ids), len(attribute_ids)) or probs.dtype.kind != "f":
        raise ImetError(f"{path}: probs has shape {probs.shape}, expected ({len(ids)} ids, "
                        f"{len(attribute_ids)} labels) of floats")
    if len(set(ids)) != len(ids):
        raise ImetError(f"{path}: ids holds duplicates")
    if len(meta.get("kinds", attribute_ids)) != len(attribute_ids) or meta.get("targets", probs).shape != probs.shape:
        raise ImetError(f"{path}: kinds or targets do not match its {len(ids)} ids and {len(attribute_ids)} labels")
    if not np.isfinite(probs).all() or probs.min(initial=0) < 0 or probs.max(initial=0) > 1:
        raise ImetError(f"{path}: probs holds NaN, inf or values outside [0, 1]")
    try:
        values.real(meta.get("threshold", 0.5), "attribute threshold")
    except ValueError as e:
        raise ImetError(f"{path}: {e}") from None
    if "content_sha256" not in meta:
        raise ImetError(f"{path}: records no content checksum (written by an older imet); write it again with "
                        "imet predict --probs")
    if content_sha256(arrays, meta) != meta["content_sha256"]:
        raise ImetError(f"{path}: its numbers or the model it names changed since it was written (content "
                        "checksum differs); write it again with imet predict --probs")
    return ids, probs, attribute_ids, meta
