"""Predictions out of models: Kaggle submissions, per-image probability files, blends and Table 1."""

from __future__ import annotations

import csv
import hashlib
import json
import numbers
from pathlib import Path

import h5py
import numpy as np

from imet.decode import values
from imet.decode.submission import write_submission
from imet.errors import ImetError
from imet.files import atomic_path, atomic_paths, check_free_space, sha256_file
from imet.heads import Head, load_model
from imet.metrics import roc_auc, scores
from imet.progress import progress
from imet.store import FeatureStore, foreign_storage


def _split_images(store: FeatureStore, split: str) -> np.ndarray:
    images = np.flatnonzero(store.split == split)
    if not len(images):
        raise ImetError(f"{store.path}: no images in split {split!r}")
    return images


def predict(store_path: Path, model_path: Path, out: Path, *, split: str = "kaggle-test",
            probs_path: Path | None = None, attention_path: Path | None = None) -> dict:
    """Write the submission of a split (every image once, in store order = sample_submission order).

    Returns what was written: out, split, images, labels_per_image, no_view (images written with no
    labels: none of their views could be read), probs and attention (paths or None), attention_labels.
    """
    store, head = FeatureStore(store_path), load_model_or_blend(model_path)
    if attention_path is None:
        images, probs, labels = head.predict_labels(store, split)
    elif not hasattr(head, "explain_split"):
        raise ImetError(f"{model_path}: --attention needs an attention head: attn_rnn, csra or mldecoder "
                        f"(this is {head.name})")
    else:
        images, probs, labels, records = head.explain_split(store, split)
    everyone = _split_images(store, split)
    full = np.zeros((len(everyone), len(store.vocab)), bool)
    full[np.searchsorted(everyone, images)] = labels
    ids = [str(store.image_ids[i]) for i in everyone]
    with atomic_paths(out, probs_path, attention_path) as (out_tmp, probs_tmp, attention_tmp):  # all or none
        write_submission(out_tmp, ids, full, store.vocab.attribute_ids)
        if probs_tmp is not None:
            write_probs(probs_tmp, [str(store.image_ids[i]) for i in images], probs, store.vocab.attribute_ids,
                        kinds=store.vocab.kinds, targets=None if split == "kaggle-test" else store.targets[images],
                        **probs_meta(head, model_path), split=split)
        if attention_tmp is not None:
            write_attention(attention_tmp, store, records)
    return {"out": out, "split": split, "images": len(ids), "labels_per_image": float(labels.sum(1).mean()),
            "no_view": len(everyone) - len(images), "probs": probs_path, "attention": attention_path,
            "attention_labels": len(records["label"]) if attention_path is not None else 0}


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


def probs_meta(head: Head, model_path: Path) -> dict:
    """What a probability file records of its model: head, whether it gives probabilities or 0/1 votes, its
    full decoding rule (JSON), and the model file (resolved path and sha256), so that a blend can check it."""

    return {"head": head.name, "probabilistic": bool(head.probabilistic), "threshold": float(head.threshold_),
            "rule": json.dumps(head.rule().to_json()), "model": str(Path(model_path).resolve()),
            "model_sha256": sha256_file(model_path)}


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


def load_model_or_blend(path: Path) -> Head:
    """A fitted head from a model file, or a blend or stack (imet.blend.Blend) from its file: all predict a split."""
    from imet.blend import is_blend_file, open_combiner

    return open_combiner(path) if is_blend_file(path) else load_model(path)


def evaluate(store_path: Path, model_paths: list[Path], split: str = "val") -> list[dict]:
    """The paper's Table 1 rows: F2, F1, precision, recall (and micro AUC for probabilistic heads)."""
    store = FeatureStore(store_path)
    rows = []
    for path in progress(model_paths, desc=f"evaluate on {split}", unit="models"):
        head = load_model_or_blend(path)
        rows.append({"model": str(path), "head": head.name, **evaluate_head(head, store, split)})
    return rows


def evaluate_head(head: Head, store: FeatureStore, split: str) -> dict:
    if split == "kaggle-test":
        raise ImetError("kaggle-test images have no labels to evaluate against; use --split val or test")
    images, probs, labels = head.predict_labels(store, split)
    return score_row(split, store.targets[images], probs, labels, head.probabilistic)


def score_row(split: str, truth: np.ndarray, probs: np.ndarray, labels: np.ndarray, probabilistic: bool) -> dict:
    """One row of Table 1 from predictions made: F2, F1, precision, recall (and micro AUC from probabilities)."""
    row = {"split": split, "images": len(truth), **scores(truth, labels)}
    if probabilistic:
        row["auc_micro"] = roc_auc(truth, probs)[1]
    return row


COLUMNS = ("f2", "f1", "precision", "recall", "auc_micro")


def table(rows: list[dict]) -> str:
    """Rows as a fixed-width text table like the paper's Table 1."""
    width = max(len(r["model"]) for r in rows)
    head = f"{'model':<{width}}  {'head':<10} " + " ".join(f"{c:>9}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r[c]:>9.4f}" if c in r else f"{'-':>9}" for c in COLUMNS)
        lines.append(f"{r['model']:<{width}}  {r['head']:<10} {cells}")
    return "\n".join(lines)


def write_rows(rows: list[dict], path: Path, as_json: bool | None = None) -> None:
    """The table as JSON (as_json, by default for a .json suffix) or CSV, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        if as_json or (as_json is None and path.suffix == ".json"):
            json.dump(rows, f, indent=2)
        else:
            writer = csv.DictWriter(f, fieldnames=["model", "head", "split", "images", *COLUMNS])
            writer.writeheader()
            writer.writerows(rows)
