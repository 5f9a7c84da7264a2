"""Predictions out of model files (any format, through imet.models): Kaggle submissions (with probability and
attention files), a blend's submission from probability files, and Table 1 rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from imet.blend import read_members
from imet.decode.submission import write_submission
from imet.errors import ImetError
from imet.files import atomic_path, atomic_paths
from imet.metrics import COLUMNS, evaluate_head
from imet.models import open_model
from imet.probfiles import write_attention, write_model_probs, write_probs
from imet.progress import progress
from imet.store import FeatureStore


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
    store, head = FeatureStore(store_path), open_model(model_path)
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
            write_model_probs(probs_tmp, store, split, head, model_path, predicted=(images, probs))
        if attention_tmp is not None:
            write_attention(attention_tmp, store, records)
    return {"out": out, "split": split, "images": len(ids), "labels_per_image": float(labels.sum(1).mean()),
            "no_view": len(everyone) - len(images), "probs": probs_path, "attention": attention_path,
            "attention_labels": len(records["label"]) if attention_path is not None else 0}


def evaluate(store_path: Path, model_paths: list[Path], split: str = "val") -> list[dict]:
    """The paper's Table 1 rows: F2, F1, precision, recall (and micro AUC for probabilistic heads)."""
    store = FeatureStore(store_path)
    rows = []
    for path in progress(model_paths, desc=f"evaluate on {split}", unit="models"):
        head = open_model(path)
        rows.append({"model": str(path), "head": head.name, **evaluate_head(head, store, split)})
    return rows


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


def apply_blend(blend_path: Path, prob_paths: list[Path], out: Path, *, probs_out: Path | None = None) -> str:
    """The submission of a blend (or stack) file from probability files of its models on one split (any
    order of files); each of its models must give exactly one file, from the very model file (sha256)."""
    b = open_model(blend_path, "json")
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
