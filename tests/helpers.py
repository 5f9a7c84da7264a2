"""Tiny data for tests: a hand-made Kaggle-layout dir and feature stores written without a backbone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from imet import store
from imet.heads import HEADS, Head, make_head
from imet.labels import Vocabulary
from imet.planted import Design

# A planted store (imet.planted) whose tags' evidence sits in ONE map cell of each view: strong there, diluted by
# the 16 cells and buried in extra noise in the pooled vector. One culture label (on every image) is required by
# the planted designs; 4 such tags, 1 or 2 per image, 2 views per image, no HOG.
ONE_CELL = Design(n_images=400, cultures=1, cell_tags=4, hog_tags=0, tied_tags=0, tags_per_image=(1, 2), grid=4,
                  channels=16, hog=0, cell_strength=4.0, pooled_noise=0.5)

# culture::<b>: markup in a label name, which pages must escape (test_report)
LABELS = [(3, "culture::a"), (7, "culture::<b>"), (10, "tag::x"), (12, "tag::y"), (15, "tag::z"), (20, "tag::rare")]

# Small sizes, so that any head fits quickly on a tiny store; each applied where the head takes it.
CHEAP = {"epochs": 2, "hidden": 16, "attention_dim": 16, "pred_dim": 16, "width": 16, "heads": 2, "beam": 2,
         "workers": 0, "rounds": 5, "min_positives": 2, "min_leaf": 2}


def cheap_head(name: str, **params) -> Head:
    """Head `name` with CHEAP's sizes, then `params`; a parameter the head does not take is left out, so one
    call serves every head in a parametrised test."""
    accepted = HEADS[name].param_names()
    return make_head(name, **{k: v for k, v in {**CHEAP, **params}.items() if k in accepted})


def quiet(_: str) -> None:
    """A `log` for fit that drops its lines."""


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_data_dir(root: Path, n_images: int = 24, n_test: int = 4, seed: int = 0) -> Path:
    """A small Kaggle-layout dir: 6 labels (one seen once), small images of varied aspect ratio."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    write_csv(root / "labels.csv", ["attribute_id", "attribute_name"], [list(x) for x in LABELS])
    rows = []
    for i in range(n_images):
        labels = [3 if i % 2 else 7]
        labels += [t for t in (10, 12, 15) if rng.random() < 0.5] or [10]
        if i == 0:
            labels.append(20)
        if i % 5 == 4:
            labels = [t for t in labels if t >= 10]  # tag-only image
        rows.append([f"img{i:03d}", " ".join(map(str, labels))])
        _image(rng, (48 + 8 * (i % 4), 40 + 16 * (i % 3))).save(root / "train" / f"img{i:03d}.png")
    write_csv(root / "train.csv", ["id", "attribute_ids"], rows)
    test_ids = [f"t{i:02d}" for i in range(n_test)]
    for t in test_ids:
        _image(rng, (64, 48)).save(root / "test" / f"{t}.png")
    write_csv(root / "sample_submission.csv", ["id", "attribute_ids"], [[t, "0"] for t in reversed(test_ids)])
    return root


def _image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_store(path: Path, *, n_images: int = 40, n_labels: int = 6, views_per_image: int = 2,
               dim: int = 16, grid: tuple[int, int] = (3, 3), channels: int = 8, hog: int = 12,
               seed: int = 0, features: dict[str, np.ndarray] | None = None,
               targets: np.ndarray | None = None) -> Path:
    """A finished store of random (or given) features, written through the store module."""
    rng = np.random.default_rng(seed)
    if targets is None:
        targets = (rng.random((n_images, n_labels)) < 0.3).astype(np.uint8)
        targets[np.arange(n_images), rng.integers(0, n_labels, n_images)] = 1
    n_images, n_labels = targets.shape
    split = np.array((["train"] * 6 + ["val", "val", "test", "test"]) * (n_images // 10 + 1), dtype=object)
    vocab = Vocabulary(np.arange(n_labels, dtype=np.int64) * 2 + 1,
                       tuple(f"{'culture' if c < n_labels // 3 else 'tag'}::l{c}" for c in range(n_labels)),
                       tuple("culture" if c < n_labels // 3 else "tag" for c in range(n_labels)))
    image = np.repeat(np.arange(n_images), views_per_image)
    plan = store.Plan(vocab, np.array([f"i{i}" for i in range(n_images)], dtype=object), split[:n_images],
                      targets, {"image": image, "culture_only": np.zeros(len(image), bool)}, {"test": True})
    m = len(image)
    if features is None:
        features = {"pooled": rng.normal(size=(m, dim)).astype(np.float32),
                    "maps": rng.normal(size=(m, *grid, channels)).astype(np.float16),
                    "hog": rng.random((m, hog)).astype(np.float32)}
    return store.write_arrays(path, plan, {k: v.shape[1:] for k, v in features.items()}, [(0, features)])
