"""Stores with planted evidence: labels whose answer sits where we put it, to measure what each head can find.

Each label gets one kind of evidence (`KINDS`):

- ``global``: a direction added to every cell of the map (and so to the pooled vector): any head sees it.
- ``cell``: a strong direction added to a small object: an s x s block of cells at a random position of each
  view (s from `Design.object_size`): pooling dilutes it by the number of cells and buries it in noise;
  attention over the cells can find it.
- ``hog``: a direction in the HOG vector only: heads that read HOG see it.
- ``tied``: no evidence of its own; it follows a parent label (present with it with probability
  `Design.tie`): found through the parent's evidence or through label co-occurrence.

Culture labels (one per image) have global evidence; tags are drawn among the cell, hog and global tags (tied
tags follow). A `Design` holds every knob (sizes, strengths, object size, views per image, the long tail of
label frequencies, float16 or int8 maps); `imet_design` is iMet's shape (1,103 labels: 398 cultures, 705
tags, a long tail) and `family` a fixed sample of designs, so that no head is measured on one design only.

`write_planted_store` writes the store in chunks of images (each chunk from its own seeded generator), so
100k+ views are made in bounded memory; the ground truth comes back as a `Planted` (kinds, parents, the
evidence block of every (view, label), the directions), which `save`/`load` keep beside the store.
`probe_labels` is the evidence-aware reference: per label, the projection on its true direction where the
evidence really is (the best block for ``cell``), the ceiling a head can hope for.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet import codec as codecs
from imet import store
from imet.decode.thresholds import fit_logistic
from imet.files import atomic_path
from imet.labels import Vocabulary
from imet.metrics import TAIL

KINDS = ("global", "cell", "hog", "tied")
SPLIT_SHARES = {"train": 0.6, "val": 0.2, "test": 0.2}
CHUNK_BYTES = 128 << 20  # float32 map bytes generated at once


@dataclass(frozen=True)
class Design:
    """Everything that decides a planted store (the defaults: a small 20-label store)."""

    n_images: int = 800
    cultures: int = 4  # culture labels: global evidence, one per image
    cell_tags: int = 8  # tags whose evidence is one object (a block of cells)
    hog_tags: int = 4  # tags seen in HOG only
    global_tags: int = 0  # tags with global evidence
    tied_tags: int = 4  # tags with no evidence, following a parent (a culture or a cell tag)
    tags_per_image: tuple[int, int] = (1, 3)  # drawn tags (cell, hog, global) per image: uniform in [lo, hi]
    tail: float = 0.0  # Zipf exponent of label popularity within cultures and within drawn tags (0: uniform)
    tie: float = 0.9  # P(tied tag | its parent): co-occurrence strength
    grid: int = 14  # cells per side of a view's map
    channels: int = 64  # map channels D
    pooled_dim: int | None = None  # width of the pooled vector (None: D; wider: a random isometric lift)
    pooled_noise: float = 0.0  # extra N(0, σ²) per pooled channel, on top of the mean of the cells' noise
    hog: int = 128  # HOG width (0: the store holds no HOG)
    views: tuple[int, int] = (2, 2)  # views per image: uniform in [lo, hi]
    cell_strength: float = 5.0  # the object's evidence in each of its cells, in noise standard deviations
    object_size: tuple[int, int] = (1, 1)  # object side in cells: uniform in [lo, hi] per (view, label)
    global_strength: float = 0.2
    hog_strength: float = 3.0
    rank: int | None = None  # CNN-like maps: noise N(0, 1) in a rank-dim subspace + N(0, floor²) per channel
    floor: float = 0.3
    maps_dtype: str = "float16"  # or int8 with a per-channel scale (a codec, as `imet store compact` writes)
    seed: int = 0

    @property
    def n_labels(self) -> int:
        return self.cultures + self.cell_tags + self.hog_tags + self.global_tags + self.tied_tags

    def check(self) -> None:
        """Refuse designs that cannot be written, naming the field."""
        lo, hi = self.object_size
        problems = [
            (self.cultures < 1, "cultures must be >= 1"),
            (self.cell_tags + self.hog_tags + self.global_tags < 1, "needs one cell, hog or global tag"),
            (self.tied_tags and not self.cultures + self.cell_tags, "tied tags need a culture or cell parent"),
            (not 1 <= lo <= hi <= self.grid, f"object_size {self.object_size} must lie in 1..grid {self.grid}"),
            (not 1 <= self.views[0] <= self.views[1], f"views {self.views} must be 1 <= lo <= hi"),
            (not 1 <= self.tags_per_image[0] <= self.tags_per_image[1], "tags_per_image must be 1 <= lo <= hi"),
            (self.maps_dtype not in codecs.DTYPES, f"maps_dtype must be one of {', '.join(codecs.DTYPES)}"),
            (self.n_images < 5, "n_images must be >= 5"),
            (not self.pooled_noise >= 0, "pooled_noise must be >= 0"),
            (self.hog < 0 or (self.hog_tags and not self.hog), "hog must be >= 0, and >= 1 with hog tags"),
        ]
        for bad, what in problems:
            if bad:
                raise ValueError(f"planted design: {what}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: dict) -> Design:
        tuples = {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


IMET_LABELS = {"cultures": 398, "cell_tags": 300, "hog_tags": 150, "global_tags": 80, "tied_tags": 175}  # 1,103


def imet_design(n_images: int = 5000, *, labels: int = 1103, channels: int = 256, maps_dtype: str = "int8",
                pooled_dim: int = 2048, hog: int = 512, seed: int = 0, **rest) -> Design:
    """iMet's shape: 1,103 labels (398 cultures, 705 tags; `labels` scales every kind's count), a long tail
    (Zipf 1.1: at 5,000 images most labels have fewer than 20 train positives), 1-6 views per image, ~4.4
    labels per image; compact int8 maps, pooled vectors 2,048 wide. HOG at 512 keeps stores small (iMet's is
    10,368: pass hog=10368)."""
    counts = {k: max(1, round(v * labels / 1103)) for k, v in IMET_LABELS.items()}
    return Design(n_images=n_images, **counts, tags_per_image=(1, 5), tail=1.1, tie=0.8, channels=channels,
                  pooled_dim=pooled_dim, hog=hog, views=(1, 6), object_size=(1, 2), maps_dtype=maps_dtype,
                  seed=seed, **rest)


FAMILY_RANGES = {  # what `family` samples designs from (issue 21): each a range or a set of choices
    "cell_strength": (2.0, 6.0), "object_size": (1, 3), "grid": (7, 14), "channels": (64, 128, 256, 512),
    "labels": (32, 128), "tie": (0.5, 0.95), "views": (1, 6),
}


def family(count: int, seed: int = 0, *, n_images: int = 800, **ranges) -> list[Design]:
    """A fixed sample of `count` designs from FAMILY_RANGES (override any range by keyword, e.g.
    channels=(64, 2048), labels=(32, 1103)): strength, object size, grid, channels, labels and their split
    among kinds, co-occurrence, views per image all vary; the same (count, seed, ranges) give the same list."""
    r = {**FAMILY_RANGES, **ranges}
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(count):
        grid = int(rng.integers(r["grid"][0], r["grid"][1] + 1))
        size_hi = int(rng.integers(1, min(r["object_size"][1], grid) + 1))
        size_lo = int(rng.integers(max(1, r["object_size"][0]), size_hi + 1))
        n = int(np.exp(rng.uniform(np.log(r["labels"][0]), np.log(r["labels"][1]))))
        share = rng.dirichlet([2, 3, 1.5, 1, 1.5])  # cultures, cell, hog, global, tied
        counts = np.maximum(1, np.round(share * n).astype(int))
        v_lo = int(rng.integers(r["views"][0], r["views"][1] + 1))
        v_hi = int(rng.integers(v_lo, r["views"][1] + 1))
        out.append(Design(
            n_images=n_images, cultures=int(counts[0]), cell_tags=int(counts[1]), hog_tags=int(counts[2]),
            global_tags=int(counts[3]), tied_tags=int(counts[4]), tags_per_image=(1, 3),
            tail=float(rng.choice([0.0, 0.8])), tie=float(rng.uniform(*r["tie"])), grid=grid,
            channels=int(rng.choice(r["channels"])), views=(v_lo, v_hi),
            cell_strength=float(np.round(rng.uniform(*r["cell_strength"]), 2)), object_size=(size_lo, size_hi),
            seed=seed * 1000 + i))
    return out


@dataclass(frozen=True)
class Planted:
    """Where the evidence of each label is, in a store written by `write_planted_store`."""

    design: Design
    kinds: np.ndarray  # (C,) str, one of KINDS
    parent: np.ndarray  # (C,) int: the label a tied label follows (-1 for the others)
    map_dirs: np.ndarray  # (C, D) unit directions of the map evidence (global and cell labels)
    hog_dirs: np.ndarray  # (C, K) unit directions of the HOG evidence (hog labels)
    objects: np.ndarray  # (E, 5) int: view, label, top row, left column, size of every planted object
    n_views: int

    def cells(self, views: np.ndarray) -> np.ndarray:
        """(n, C) int: the top-left cell (row * grid + column) of each present cell label's object in each of
        `views`, -1 where none."""
        views = np.asarray(views, dtype=np.int64)
        out = np.full((len(views), len(self.kinds)), -1, np.int64)
        if not len(views):
            return out
        o, order = self.objects, np.argsort(views, kind="stable")
        pos = np.minimum(np.searchsorted(views[order], o[:, 0]), len(views) - 1)
        hit = views[order][pos] == o[:, 0]  # objects in the views asked for (a view asked twice: its first row)
        out[order[pos[hit]], o[hit, 1]] = o[hit, 2] * self.design.grid + o[hit, 3]
        return out

    @property
    def cell(self) -> np.ndarray:
        """(M, C) int: `cells` of every view (small stores; large ones ask `cells` for the views they need)."""
        return self.cells(np.arange(self.n_views))

    def on_object(self, views: np.ndarray, labels: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """(n,) bool: whether cell `cells[k]` (row * grid + column) lies in the object of label `labels[k]` in
        view `views[k]` (False where that label has no object there)."""
        o = self.objects
        key = o[:, 0] * len(self.kinds) + o[:, 1]
        order = np.argsort(key)
        want = np.asarray(views, np.int64) * len(self.kinds) + np.asarray(labels, np.int64)
        pos = np.minimum(np.searchsorted(key[order], want), max(len(o) - 1, 0))
        if not len(o):
            return np.zeros(len(want), bool)
        found = key[order][pos] == want
        top, left, size = (o[order][pos, j] for j in (2, 3, 4))
        row, col = np.asarray(cells) // self.design.grid, np.asarray(cells) % self.design.grid
        return found & (row >= top) & (row < top + size) & (col >= left) & (col < left + size)

    def save(self, path: Path) -> None:
        """The truth as one .npz file (next to its store, say), read back by `load`."""
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(f, design=json.dumps(self.design.to_json()), kinds=self.kinds.astype(str), parent=self.parent,
                     map_dirs=self.map_dirs, hog_dirs=self.hog_dirs, objects=self.objects, n_views=self.n_views)

    @classmethod
    def load(cls, path: Path) -> Planted:
        with np.load(Path(path)) as z:
            return cls(Design.from_json(json.loads(str(z["design"]))), z["kinds"].astype(object), z["parent"],
                       z["map_dirs"], z["hog_dirs"], z["objects"], int(z["n_views"]))


def write_planted_store(path: Path, design: Design | None = None, *, labels: dict[str, int] | None = None,
                        **fields) -> Planted:
    """Write a finished store of planted features to `path` (splits 60/20/20 by image) and return the truth.

    Give a `Design`, or its fields as keywords (`views=2` and `object_size=1` mean fixed values); `labels`
    counts labels per evidence kind as before (global = cultures, cell, hog, tied). Maps are N(0, 1) per
    channel plus the evidence, pooled vectors the mean of the cells (lifted to `pooled_dim`), HOG N(0, 1)
    plus its evidence.

    With `rank`, the maps have the shape of a CNN's instead: their noise is N(0, 1) in a random `rank`-dim
    subspace plus N(0, floor²) in every channel, and the map evidence lies in that subspace (a label's
    evidence varies like the features do). Without it every channel is equally noisy and the evidence points
    anywhere: the worst case for a channel PCA (`imet store compact`), which keeps the directions of most
    variance.
    """
    if labels is not None:
        counts = {"global": 4, "cell": 8, "hog": 4, "tied": 4, **labels}
        fields.update(cultures=counts["global"], cell_tags=counts["cell"], hog_tags=counts["hog"],
                      tied_tags=counts["tied"])
    for key in ("views", "object_size"):
        if isinstance(fields.get(key), int):
            fields[key] = (fields[key], fields[key])
    design = dataclasses.replace(design or Design(), **fields)
    design.check()
    truth, targets, n_views = _plan_truth(design)
    image = np.repeat(np.arange(design.n_images), n_views)
    pooled_lift = _lift(design)
    maps_codec = _maps_codec(design, truth, targets, image) if design.maps_dtype == "int8" else None
    shapes = {"maps": (design.grid, design.grid, maps_codec.dim if maps_codec else design.channels),
              "pooled": (len(pooled_lift) if pooled_lift is not None else design.channels,),
              **({"hog": (design.hog,)} if design.hog else {})}
    objects = []

    def chunks():
        for lo, hi, chunk in _chunks(design, n_views):
            views = np.arange(lo, hi)
            feats, obj = _features(design, truth, targets, image[views], views, chunk)
            if pooled_lift is not None:
                feats["pooled"] = feats["pooled"] @ pooled_lift.T
            if maps_codec is not None:
                feats["maps"] = maps_codec.encode(feats["maps"])
            objects.append(obj)
            yield lo, feats

    store.write_arrays(Path(path), _plan(design, truth.kinds, targets, image, maps_codec), shapes, chunks())
    return dataclasses.replace(truth, objects=np.concatenate(objects), n_views=len(image))


def _plan_truth(design: Design) -> tuple[Planted, np.ndarray, np.ndarray]:
    """Kinds, parents, directions, targets (N, C) and views per image (N,), from the design's seed."""
    rng = np.random.default_rng([design.seed, 0])
    d = design
    kinds = np.array(["global"] * d.cultures + ["cell"] * d.cell_tags + ["hog"] * d.hog_tags
                     + ["global"] * d.global_tags + ["tied"] * d.tied_tags, dtype=object)
    culture = np.zeros(len(kinds), bool)
    culture[:d.cultures] = True
    parents = np.flatnonzero(culture | (kinds == "cell"))
    parent = np.full(len(kinds), -1)
    parent[kinds == "tied"] = rng.choice(parents, d.tied_tags)
    targets = _targets(rng, d, kinds, culture, parent)
    n_views = rng.integers(d.views[0], d.views[1] + 1, d.n_images)
    map_dirs = _unit_rows(rng, len(kinds), d.channels)
    hog_dirs = _unit_rows(rng, len(kinds), d.hog)
    if d.rank is not None:  # the evidence lies in the noise's subspace
        q = _subspace(d)
        map_dirs = map_dirs @ q.T @ q
        map_dirs /= np.linalg.norm(map_dirs, axis=1, keepdims=True)
    truth = Planted(d, kinds, parent, map_dirs.astype(np.float32), hog_dirs, np.zeros((0, 5), np.int64), 0)
    return truth, targets, n_views


def _targets(rng: np.random.Generator, d: Design, kinds: np.ndarray, culture: np.ndarray,
             parent: np.ndarray) -> np.ndarray:
    """(N, C) uint8: one culture, tags_per_image drawn tags (by popularity), and the tied tags of present
    parents (each with probability `tie`)."""
    n = d.n_images
    targets = np.zeros((n, len(kinds)), np.uint8)
    cultures = rng.permutation(np.flatnonzero(culture))  # popularity ranks in random order of the labels
    tags = rng.permutation(np.flatnonzero(~culture & (kinds != "tied")))
    targets[np.arange(n), rng.choice(cultures, n, p=_popularity(len(cultures), d.tail))] = 1
    k = np.minimum(rng.integers(d.tags_per_image[0], d.tags_per_image[1] + 1, n), len(tags))
    p, most = _popularity(len(tags), d.tail), int(k.max())
    for lo in range(0, n, 4096):  # a weighted sample without replacement per image (Efraimidis-Spirakis):
        keys = np.log(rng.random((min(4096, n - lo), len(tags)))) / p  # the k largest keys of log(u) / p
        top = np.argpartition(-keys, most - 1, axis=1)[:, :most]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(keys, top, 1), axis=1), 1)  # best first
        rows, j = np.nonzero(np.arange(most) < k[lo:lo + len(top), None])
        targets[lo + rows, tags[top[rows, j]]] = 1
    for c in np.flatnonzero(kinds == "tied"):
        targets[:, c] = targets[:, parent[c]] & (rng.random(n) < d.tie)
    return targets


def _popularity(n: int, tail: float) -> np.ndarray:
    """(n,) probabilities proportional to rank^-tail (uniform at 0)."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -tail
    return w / w.sum()


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _subspace(d: Design) -> np.ndarray:
    """(rank, D) orthonormal rows: the subspace of CNN-like map noise."""
    sub = np.random.default_rng([d.seed, 1])
    return np.linalg.qr(sub.normal(size=(d.channels, d.rank)))[0].T.astype(np.float32)


def _lift(d: Design) -> np.ndarray | None:
    """(P, D) orthonormal columns mapping the mean cell to a wider pooled vector (None: pooled is D wide)."""
    if d.pooled_dim is None or d.pooled_dim == d.channels:
        return None
    if d.pooled_dim < d.channels:
        raise ValueError(f"planted design: pooled_dim {d.pooled_dim} must be >= channels {d.channels}")
    rng = np.random.default_rng([d.seed, 3])
    return np.linalg.qr(rng.normal(size=(d.pooled_dim, d.channels)))[0].astype(np.float32)


def _chunks(d: Design, n_views: np.ndarray):
    """(first view, end view, chunk index) of runs of whole images, about CHUNK_BYTES of float32 maps each."""
    per_chunk = max(1, CHUNK_BYTES // (d.views[1] * d.grid * d.grid * d.channels * 4))
    ends = np.concatenate(([0], np.cumsum(n_views)))
    for k, lo in enumerate(range(0, d.n_images, per_chunk)):
        hi = min(lo + per_chunk, d.n_images)
        yield int(ends[lo]), int(ends[hi]), k


def _features(d: Design, truth: Planted, targets: np.ndarray, image: np.ndarray, views: np.ndarray,
              chunk: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Maps (n, g, g, D) float32, pooled (n, D) and HOG (n, K) of a run of views, and their objects (E, 5)."""
    rng = np.random.default_rng([d.seed, 2, chunk])
    n, cells = len(views), d.grid * d.grid
    maps = rng.standard_normal((n, cells, d.channels), dtype=np.float32)  # (n, L, D)
    if d.rank is not None:
        q = _subspace(d)
        maps *= d.floor
        maps += rng.standard_normal((n, cells, d.rank), dtype=np.float32) @ q
    present = targets[image].astype(bool)  # (n, C)
    glob = (present & (truth.kinds == "global")).astype(np.float32)
    maps += d.global_strength * (glob @ truth.map_dirs)[:, None, :]
    rows, labels = np.nonzero(present & (truth.kinds == "cell"))
    size = rng.integers(d.object_size[0], d.object_size[1] + 1, len(rows))
    top = (rng.random(len(rows)) * (d.grid - size + 1)).astype(np.int64)
    left = (rng.random(len(rows)) * (d.grid - size + 1)).astype(np.int64)
    grid = maps.reshape(n, d.grid, d.grid, d.channels)
    for s in np.unique(size):
        pick = np.flatnonzero(size == s)
        for dr in range(s):
            for dc in range(s):
                np.add.at(grid, (rows[pick], top[pick] + dr, left[pick] + dc),
                          d.cell_strength * truth.map_dirs[labels[pick]])
    hog = rng.standard_normal((n, d.hog), dtype=np.float32)
    hog += d.hog_strength * (present & (truth.kinds == "hog")).astype(np.float32) @ truth.hog_dirs
    pooled = maps.mean(1)
    if d.pooled_noise:  # drawn last: designs without it keep every other draw
        pooled += d.pooled_noise * rng.standard_normal(pooled.shape, dtype=np.float32)
    objects = np.stack([views[rows], labels, top, left, size], axis=1).astype(np.int64)
    return {"maps": grid, "pooled": pooled, **({"hog": hog} if d.hog else {})}, objects


def _maps_codec(d: Design, truth: Planted, targets: np.ndarray, image: np.ndarray) -> codecs.Codec:
    """int8 maps: a per-channel scale fitted on the first views' cells (as `store compact` fits one)."""
    n = min(len(image), codecs.SAMPLE)
    feats, _ = _features(d, truth, targets, image[:n], np.arange(n), 0)
    return codecs.fit(feats["maps"].reshape(-1, d.channels), None, "int8", name="maps_dtype")


def _plan(d: Design, kinds: np.ndarray, targets: np.ndarray, image: np.ndarray,
          maps_codec: codecs.Codec | None) -> store.Plan:
    n_images, n_labels = targets.shape
    culture = np.arange(n_labels) < d.cultures
    kind = tuple("culture" if c else "tag" for c in culture)
    names = tuple(f"{k}::{e}{c}" for c, (k, e) in enumerate(zip(kind, kinds, strict=True)))
    vocab = Vocabulary(np.arange(n_labels, dtype=np.int64), names, kind)
    rng = np.random.default_rng([d.seed, 4])
    shares = np.cumsum([SPLIT_SHARES[s] for s in ("train", "val", "test")]) * n_images
    split = np.array(["train", "val", "test"], dtype=object)[np.searchsorted(shares, rng.permutation(n_images),
                                                                              side="right")]
    settings = {"planted": d.to_json()}
    found = {"maps": maps_codec} if maps_codec is not None else {}
    if found:
        settings.update(codecs.Request(None, d.maps_dtype).settings(), **codecs.codec_settings(found))
    return store.Plan(vocab, np.array([f"p{i:06d}" for i in range(n_images)], dtype=object), split, targets,
                      {"image": image, "culture_only": np.zeros(len(image), bool)}, settings, found)


# -- the probe: the evidence-aware ceiling --------------------------------------------------------------

def probe_scores(planted: Planted, maps: np.ndarray, hog: np.ndarray) -> np.ndarray:
    """(n, C) the evidence-aware score of each label on views `maps` (n, H, W, D) and `hog` (n, K).

    The projection on the label's true direction where its evidence is: the best object-sized block
    (cell: the largest block sum over the block's side, the matched filter's z-score, over the design's
    sizes), the mean over cells (global), HOG (hog); a tied label takes its parent's score.
    """
    n, g = len(maps), maps.shape[1]
    cells = maps.reshape(n, g * g, -1).astype(np.float32)  # (n, L, D)
    out = cells.mean(1) @ planted.map_dirs.T  # (n, C): the mean cell's projection
    cell = np.flatnonzero(planted.kinds == "cell")
    if len(cell):
        proj = (cells @ planted.map_dirs[cell].T).reshape(n, g, g, len(cell))  # only cell labels need every cell
        best = np.full((n, len(cell)), -np.inf, np.float32)
        lo, hi = planted.design.object_size
        for s in range(lo, hi + 1):
            box = sum(proj[:, dr:g - s + 1 + dr, dc:g - s + 1 + dc] for dr in range(s) for dc in range(s))
            best = np.maximum(best, box.reshape(n, -1, len(cell)).max(1) / s)
        out[:, cell] = best
    out = np.where(planted.kinds == "hog", hog.astype(np.float32) @ planted.hog_dirs.T, out)
    tied = np.flatnonzero(planted.kinds == "tied")
    out[:, tied] = out[:, planted.parent[tied]]
    return out


def learned_planted(planted: Planted, st: store.FeatureStore, chunk: int = 64) -> Planted:
    """`planted` with every label's evidence direction estimated from the train views, for the probe that knows
    where each label's evidence is but not its direction (`probe_labels(learned_planted(...), st)`): what a
    head that localises perfectly can still learn from this many train positives.

    The estimate is the difference of class means on the features where the evidence is (the mean cell for
    global labels, HOG for hog labels, the object's block for cell labels, against the mean cell of all
    train views), the maximum-likelihood direction under the design's isotropic noise. Tied labels keep
    following their parent. A label without train positives gets a zero direction (a constant score)."""
    train = st.views("train")
    n_labels, width = planted.map_dirs.shape
    pos_cells, all_cells = np.zeros((n_labels, width)), np.zeros(width)  # sums of the mean cell
    pos_hog, all_hog = np.zeros(planted.hog_dirs.shape), np.zeros(planted.hog_dirs.shape[1])
    blocks, n_blocks = np.zeros((n_labels, width)), np.zeros(n_labels)  # sums of each cell label's object blocks
    objects = planted.objects[np.isin(planted.objects[:, 0], train)]
    for lo in range(0, len(train), chunk):
        part = train[lo:lo + chunk]
        y = st.view_targets(part).astype(np.float64)
        maps = st.read("maps", part).astype(np.float32)  # (n, g, g, D)
        mean_cell = maps.reshape(len(part), -1, width).mean(1)
        pos_cells += y.T @ mean_cell
        all_cells += mean_cell.sum(0)
        if len(all_hog):
            hog = st.read("hog", part).astype(np.float32)
            pos_hog += y.T @ hog
            all_hog += hog.sum(0)
        row = {int(v): i for i, v in enumerate(part)}
        for view, label, top, left, size in objects[np.isin(objects[:, 0], part)]:
            blocks[label] += maps[row[int(view)], top:top + size, left:left + size].mean((0, 1))
            n_blocks[label] += 1
        st.release()
    n_pos = st.view_targets(train).sum(0).astype(np.float64)[:, None]
    n_neg = len(train) - n_pos

    def contrast(pos: np.ndarray, total: np.ndarray) -> np.ndarray:  # mean of positives - mean of the others
        return np.where(n_pos > 0, pos / np.maximum(n_pos, 1) - (total - pos) / np.maximum(n_neg, 1), 0.0)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    map_dirs = contrast(pos_cells, all_cells)
    cell = planted.kinds == "cell"
    map_dirs[cell] = np.where(n_blocks[cell, None] > 0, blocks[cell] / np.maximum(n_blocks[cell, None], 1)
                              - all_cells / len(train), 0.0)
    return dataclasses.replace(planted, map_dirs=unit(map_dirs), hog_dirs=unit(contrast(pos_hog, all_hog)))


def _probe_all(planted: Planted, st: store.FeatureStore, views: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(n, C) probe scores of `views`, read in chunks (a store larger than memory)."""
    out = np.empty((len(views), len(planted.kinds)), np.float32)
    for lo in range(0, len(views), chunk):
        part = views[lo:lo + chunk]
        hog = st.read("hog", part) if "hog" in st.features else np.zeros((len(part), 0), np.float32)
        out[lo:lo + len(part)] = probe_scores(planted, st.read("maps", part), hog)
        st.release()
    return out


def probe_probs(planted: Planted, st: store.FeatureStore, splits: tuple[str, ...] = ("val", "test"),
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split, (image indices, (n, C) probabilities) from the probe: per label a logistic regression on
    its probe score over the train views, view probabilities averaged per image."""
    from imet.decode.thresholds import average_views

    train = st.views("train")
    a, b = fit_logistic(_probe_all(planted, st, train), st.view_targets(train))
    out = {}
    for split in splits:
        views = st.views(split)
        p = 1 / (1 + np.exp(-(a * _probe_all(planted, st, views) + b)))
        out[split] = average_views(p.astype(np.float32), st.view_image[views])
    return out


def probe_labels(planted: Planted, st: store.FeatureStore, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The reference that knows the evidence: `probe_probs` decoded by one global threshold tuned on val.

    Returns (image indices, (n, C) bool labels) of `split`.
    """
    from imet.decode.thresholds import apply_thresholds, search_global

    probs = probe_probs(planted, st, ("val", split))
    threshold, _ = search_global(probs["val"][1], st.targets[probs["val"][0]])
    images, p = probs[split]
    return images, apply_thresholds(p, threshold)


def recall_by_kind(planted: Planted, truth: np.ndarray, labels: np.ndarray,
                   train_positives: np.ndarray | None = None) -> dict[str, float]:
    """Per evidence kind, the share of true (image, label) pairs of that kind that were predicted; with
    `train_positives` (C,), also "tail": labels with fewer than imet.metrics.TAIL train positives."""
    groups = {kind: planted.kinds == kind for kind in KINDS}
    if train_positives is not None:
        groups["tail"] = np.asarray(train_positives) < TAIL
    out = {}
    for name, cols in groups.items():
        positives = truth[:, cols].sum()
        if positives:
            out[name] = float((truth[:, cols] & labels[:, cols]).sum() / positives)
    return out
