"""Stores with planted evidence: labels whose answer sits where we put it, to measure what each head can find.

Each label gets one kind of evidence (`KINDS`):

- ``global``: a direction added to every cell of the map (and so to the pooled vector): any head sees it.
- ``cell``: a strong direction added to ONE random cell of each view (a small object): pooling dilutes it by
  the number of cells and buries it in noise; attention over the cells can find it.
- ``hog``: a direction in the HOG vector only: heads that read HOG see it.
- ``tied``: no evidence of its own; it follows a parent label (present with it, 90%): found through the
  parent's evidence or through label co-occurrence.

The ground truth (kinds, parents, the evidence cell of every view and label, the directions) comes back as a
`Planted`, and `probe_scores` gives the evidence-aware reference: per label, the projection on its true
direction where the evidence really is (max over cells for ``cell``), the ceiling a head can hope for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet import store
from imet.labels import Vocabulary

KINDS = ("global", "cell", "hog", "tied")
SPLIT_SHARES = {"train": 0.6, "val": 0.2, "test": 0.2}


@dataclass(frozen=True)
class Planted:
    """Where the evidence of each label is, in a store written by `write_planted_store`."""

    kinds: np.ndarray  # (C,) str, one of KINDS
    parent: np.ndarray  # (C,) int: the label a tied label follows (-1 for the others)
    cell: np.ndarray  # (M, C) int: the cell holding a present `cell` label's evidence in each view (-1: none)
    map_dirs: np.ndarray  # (C, D) unit directions of the map evidence (global and cell labels)
    hog_dirs: np.ndarray  # (C, K) unit directions of the HOG evidence (hog labels)


def write_planted_store(path: Path, *, n_images: int = 800, labels: dict[str, int] | None = None, grid: int = 14,
                        channels: int = 64, hog: int = 128, views: int = 2, cell_strength: float = 5.0,
                        global_strength: float = 0.2, hog_strength: float = 3.0, seed: int = 0) -> Planted:
    """Write a finished store of planted features to `path` (splits 60/20/20 by image) and return the truth.

    `labels` counts labels per kind (default 4 global, 8 cell, 4 hog, 4 tied); global labels are the
    `culture` labels (one per image), the others are tags (1 to 3 per image among cell and hog, plus the
    tied ones that follow them). Maps are N(0, 1) per channel plus the evidence, pooled vectors the mean of
    the cells, HOG N(0, 1) plus its evidence.
    """
    rng = np.random.default_rng(seed)
    counts = {"global": 4, "cell": 8, "hog": 4, "tied": 4, **(labels or {})}
    kinds = np.array([k for k in KINDS for _ in range(counts[k])], dtype=object)
    n_labels, cells = len(kinds), grid * grid
    if min(counts["global"], counts["cell"] + counts["hog"]) < 1:
        raise ValueError("need at least one global label and one cell or hog label")
    parents = np.flatnonzero(np.isin(kinds, ("global", "cell")))
    parent = np.full(n_labels, -1)
    parent[kinds == "tied"] = rng.choice(parents, counts["tied"])
    targets = _targets(rng, kinds, parent, n_images)
    map_dirs = _unit_rows(rng, n_labels, channels)
    hog_dirs = _unit_rows(rng, n_labels, hog)
    m = n_images * views
    present = np.repeat(targets, views, axis=0).astype(bool)  # (M, C)
    maps = rng.normal(size=(m, cells, channels)).astype(np.float32)  # (M, L, D)
    glob = (present & (kinds == "global")).astype(np.float32)  # (M, C)
    maps += global_strength * (glob @ map_dirs)[:, None, :]
    cell = np.full((m, n_labels), -1)
    is_cell = present & (kinds == "cell")
    cell[is_cell] = rng.integers(0, cells, int(is_cell.sum()))
    rows, labels_ = np.nonzero(is_cell)
    np.add.at(maps, (rows, cell[rows, labels_]), cell_strength * map_dirs[labels_])
    hog_x = rng.normal(size=(m, hog)).astype(np.float32)
    hog_x += hog_strength * (present & (kinds == "hog")).astype(np.float32) @ hog_dirs
    features = {"maps": maps.reshape(m, grid, grid, channels).astype(np.float16),
                "pooled": maps.mean(1), "hog": hog_x}
    _write(Path(path), targets, kinds, views, features, rng)
    return Planted(kinds, parent, cell, map_dirs, hog_dirs)


def _targets(rng: np.random.Generator, kinds: np.ndarray, parent: np.ndarray, n_images: int) -> np.ndarray:
    """(N, C) uint8: one global (culture) label, 1-3 cell or hog tags, and the tied labels of present parents."""
    targets = np.zeros((n_images, len(kinds)), np.uint8)
    culture = np.flatnonzero(kinds == "global")
    tags = np.flatnonzero(np.isin(kinds, ("cell", "hog")))
    for i in range(n_images):
        targets[i, rng.choice(culture)] = 1
        targets[i, rng.choice(tags, min(len(tags), rng.integers(1, 4)), replace=False)] = 1
    for c in np.flatnonzero(kinds == "tied"):
        targets[:, c] = targets[:, parent[c]] & (rng.random(n_images) < 0.9)
    return targets


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(path: Path, targets: np.ndarray, kinds: np.ndarray, views: int, features: dict[str, np.ndarray],
           rng: np.random.Generator) -> None:
    n_images, n_labels = targets.shape
    kind = tuple("culture" if k == "global" else "tag" for k in kinds)
    vocab = Vocabulary(np.arange(n_labels, dtype=np.int64), tuple(f"{k}::{e}{c}" for c, (k, e) in
                                                                   enumerate(zip(kind, kinds, strict=True))), kind)
    shares = np.cumsum([SPLIT_SHARES[s] for s in ("train", "val", "test")]) * n_images
    split = np.array(["train", "val", "test"], dtype=object)[np.searchsorted(shares, rng.permutation(n_images),
                                                                              side="right")]
    image = np.repeat(np.arange(n_images), views)
    plan = store.Plan(vocab, np.array([f"p{i:05d}" for i in range(n_images)], dtype=object), split, targets,
                      {"image": image, "culture_only": np.zeros(len(image), bool)}, {"planted": True})
    store.create(path, plan, {k: v.shape[1:] for k, v in features.items()})
    writer = store.Writer(path)
    writer.write(0, {**features, "status": np.full(len(image), store.DONE, np.uint8)})
    writer.close()


def probe_scores(planted: Planted, maps: np.ndarray, hog: np.ndarray) -> np.ndarray:
    """(n, C) the evidence-aware score of each label on views `maps` (n, H, W, D) and `hog` (n, K).

    The projection on the label's true direction where its evidence is: max over cells (cell), mean over
    cells (global), HOG (hog); a tied label takes its parent's score.
    """
    cells = maps.reshape(len(maps), -1, maps.shape[-1]).astype(np.float32)  # (n, L, D)
    proj = cells @ planted.map_dirs.T  # (n, L, C)
    out = np.where(planted.kinds == "cell", proj.max(1), proj.mean(1))
    out = np.where(planted.kinds == "hog", hog @ planted.hog_dirs.T, out)
    tied = np.flatnonzero(planted.kinds == "tied")
    out[:, tied] = out[:, planted.parent[tied]]
    return out


def recall_by_kind(planted: Planted, truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per evidence kind, the share of true (image, label) pairs of that kind that were predicted."""
    out = {}
    for kind in KINDS:
        cols = planted.kinds == kind
        positives = truth[:, cols].sum()
        if positives:
            out[kind] = float((truth[:, cols] & labels[:, cols]).sum() / positives)
    return out


def probe_labels(planted: Planted, st: store.FeatureStore, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The reference that knows the evidence: per label, a logistic regression on its probe score (train
    views), view probabilities averaged per image, one global threshold tuned on val.

    Returns (image indices, (n, C) bool labels) of `split`.
    """
    from sklearn.linear_model import LogisticRegression

    from imet.decode.thresholds import apply_thresholds, average_views, search_global

    def score(views: np.ndarray) -> np.ndarray:
        return probe_scores(planted, st.read("maps", views), st.read("hog", views))

    train = st.views("train")
    x, y = score(train), st.view_targets(train)
    models = [LogisticRegression().fit(x[:, [c]], y[:, c]) for c in range(y.shape[1])]

    def probs(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = score(views)
        p = np.stack([m.predict_proba(s[:, [c]])[:, 1] for c, m in enumerate(models)], axis=1)
        return average_views(p.astype(np.float32), st.view_image[views])

    images, p = probs(st.views("val"))
    threshold, _ = search_global(p, st.targets[images])
    images, p = probs(st.views(split))
    return images, apply_thresholds(p, threshold)
