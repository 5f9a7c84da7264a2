"""The Kaggle iMet data layout: label vocabulary, labelled images, the paper's filter, splits and view plans.

A data dir holds `labels.csv` (attribute_id,attribute_name), `train.csv` (id,attribute_ids), images
`train/{id}.png|.jpg` and `test/{id}.png|.jpg`, and optionally `sample_submission.csv` listing the test ids.
Nothing here decodes pixels: view plans are data that the featurizer applies.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet.errors import ImetError, where
from imet.labels import KINDS, SPLITS, Vocabulary

IMAGE_EXTENSIONS = tuple(e for x in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
                         for e in (x, x.upper()))
N_CROPS = 5  # section 4.2: 1 resize + 5 random crops per image
CROP_SHORT_SIDE = 300  # crops are taken with the shorter side at 300 px for 224 px views
JITTER = 0.2  # colour jitter factors are drawn from [1 - JITTER, 1 + JITTER]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_ID = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]*")  # a plain file name: no separators, not hidden


@dataclass
class Dataset:
    """Images of one data dir after the label filter, with their split and multi-hot targets."""

    root: Path
    vocab: Vocabulary
    ids: list[str]  # labelled images first (train.csv order), then kaggle-test (submission order)
    split: np.ndarray  # (N,) str, one of SPLITS
    targets: np.ndarray  # (N, C) uint8; all zero for kaggle-test images
    dropped_labels: int
    dropped_images: int

    def image_path(self, i: int) -> Path:
        return image_file(self.root, self.ids[i], self.split[i])


def image_file(root: Path, image_id: str, split: str) -> Path:
    """The image file of an image (the .png path when no file exists, so errors name it)."""
    folder = Path(root) / ("test" if split == "kaggle-test" else "train")
    for ext in IMAGE_EXTENSIONS:
        path = folder / f"{image_id}{ext}"
        if path.exists():
            return path
    return folder / f"{image_id}.png"


def check_id(image_id: str, path, line: int | None) -> str:
    if not _ID.fullmatch(image_id) or image_id != image_id.strip():
        raise ImetError(
            f"{where(path, line)}: image id {image_id!r} is not a plain file name "
            "(no path separators or control characters, no leading '.' or spaces)"
        )
    return image_id


def _text(path: Path) -> str:
    """A CSV file's text: UTF-8 (a BOM is dropped) or UTF-16 with its BOM; anything else is refused."""
    if not path.is_file():
        raise ImetError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ImetError(f"{path}: cannot read ({e.strerror})") from None
    encoding = "utf-16" if raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ImetError(f"{where(path, line)}: not {encoding.removesuffix('-sig').upper()} text (byte "
                        f"0x{raw[e.start]:02x}); save the file as UTF-8") from None


def _rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row of a CSV file that must have `columns`."""
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    try:
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ImetError(
                f"{path}: missing column(s) {', '.join(missing)}; the header must be {','.join(columns)}"
            )
        for row in reader:
            if None in row.values():
                raise ImetError(f"{where(path, reader.line_num)}: too few fields")
            if None in row:
                raise ImetError(f"{where(path, reader.line_num)}: too many fields (expected {len(reader.fieldnames)})")
            yield reader.line_num, row
    except csv.Error as e:
        raise ImetError(f"{where(path, reader.reader.line_num)}: not valid CSV ({e})") from None


def _int64(text: str, path: Path, line: int, what: str) -> int:
    """An attribute id: an integer that fits int64."""
    try:
        value = int(text)
    except ValueError:
        raise ImetError(f"{where(path, line)}: {what} {text[:40]!r} is not an integer") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise ImetError(f"{where(path, line)}: {what} {text[:40]} does not fit a 64-bit integer")
    return value


def read_vocabulary(path: Path) -> Vocabulary:
    """labels.csv -> the full vocabulary, ordered by attribute id."""
    entries: dict[int, tuple[str, str]] = {}
    for line, row in _rows(path, ("attribute_id", "attribute_name")):
        aid = _int64(row["attribute_id"], path, line, "attribute_id")
        name = row["attribute_name"]
        kind, _, rest = name.partition("::")
        if kind not in KINDS or not rest.strip():
            raise ImetError(
                f"{where(path, line)}: attribute_name {name!r} must start with 'culture::' or 'tag::'"
            )
        if aid in entries:
            raise ImetError(f"{where(path, line)}: duplicate attribute_id {aid}")
        entries[aid] = (name, kind)
    if not entries:
        raise ImetError(f"{path}: no labels")
    order = sorted(entries)
    return Vocabulary(
        np.array(order, dtype=np.int64),
        tuple(entries[a][0] for a in order),
        tuple(entries[a][1] for a in order),
    )


def read_train(path: Path, vocab: Vocabulary) -> tuple[list[str], list[np.ndarray]]:
    """train.csv -> image ids and, per image, its dense label indices."""
    ids: list[str] = []
    labels: list[np.ndarray] = []
    seen: dict[str, int] = {}
    for line, row in _rows(path, ("id", "attribute_ids")):
        image_id = check_id(row["id"], path, line)
        if image_id in seen:
            raise ImetError(f"{where(path, line)}: duplicate image id {image_id!r} (first on line {seen[image_id]})")
        seen[image_id] = line
        fields = row["attribute_ids"].split()
        if not fields:
            raise ImetError(f"{where(path, line)}: image {image_id!r} has an empty attribute_ids list")
        try:
            attribute_ids = [int(x) for x in fields]
        except ValueError:
            raise ImetError(
                f"{where(path, line)}: attribute_ids {row['attribute_ids']!r} must be integers separated by spaces"
            ) from None
        for x in fields:
            _int64(x, path, line, "attribute id")
        known = np.isin(attribute_ids, vocab.attribute_ids)
        if not known.all():
            bad = [a for a, k in zip(attribute_ids, known, strict=True) if not k]
            raise ImetError(f"{where(path, line)}: attribute id(s) {bad} are not in labels.csv")
        ids.append(image_id)
        labels.append(np.unique(vocab.encode(attribute_ids)))
    if not ids:
        raise ImetError(f"{path}: no images")
    return ids, labels


def input_paths(root: Path | None) -> list[Path]:
    """What a data dir's readers open: its CSVs and image folders (every image in them is an input), for
    the check that no output overwrites an input. Other files in the dir are not inputs."""
    if root is None:
        return []
    root = Path(root)
    return [root / "labels.csv", root / "train.csv", root / "sample_submission.csv", root / "train", root / "test"]


def read_test_ids(root: Path) -> list[str]:
    """Kaggle test ids: sample_submission.csv order when present, else the sorted files of test/."""
    path = root / "sample_submission.csv"
    if path.exists():
        ids, seen = [], set()
        for line, row in _rows(path, ("id",)):
            image_id = check_id(row["id"], path, line)
            if image_id in seen:
                raise ImetError(f"{where(path, line)}: duplicate image id {image_id!r}")
            seen.add(image_id)
            ids.append(image_id)
        return ids
    folder = root / "test"
    if not folder.is_dir():
        return []
    ids, seen = [], {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # hidden files (.DS_Store) are not images
        if p.suffix not in IMAGE_EXTENSIONS:
            raise ImetError(f"{p}: not an image file imet reads ({', '.join(IMAGE_EXTENSIONS[::2])}); remove it, "
                            "or list the test ids in sample_submission.csv")
        image_id = check_id(p.stem, p, None)
        if image_id in seen:
            raise ImetError(f"{p}: image id {image_id!r} also has the file {seen[image_id].name}; keep one")
        seen[image_id] = p
        ids.append(image_id)
    return ids


def filter_rare(labels: list[np.ndarray], n_labels: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's filter: drop labels seen fewer than `min_count` times and the images carrying them.

    Dropping images can push other labels under the bar, so this repeats until nothing changes.
    Returns (keep_label (C,) bool, keep_image (N,) bool).
    """
    keep_image = np.ones(len(labels), dtype=bool)
    flat = np.concatenate(labels)
    owner = np.repeat(np.arange(len(labels)), [len(x) for x in labels])
    while True:
        live = keep_image[owner]
        counts = np.bincount(flat[live], minlength=n_labels)
        keep_label = counts >= min_count
        bad_image = np.zeros(len(labels), dtype=bool)
        bad_image[owner[live & ~keep_label[flat]]] = True
        if not bad_image.any():
            return keep_label, keep_image
        keep_image &= ~bad_image


def iterative_stratification(targets: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """(N,) subset 0..S-1 of each row of (N, C) 0/1 targets, subset s getting fractions[s] of the rows and
    of each label's rows: iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011).

    The label with the fewest rows still unassigned goes first (ties at random): each of its unassigned
    rows, in a seeded random order, joins the subset that most wants that label (its desired count less
    what it has), ties to the subset that wants the most rows, then at random. Rows with no label fill the
    subsets that want the most rows. The train/val/test split and the folds of `fit --folds` both come
    from here.
    """
    targets = np.asarray(targets).astype(bool)
    rng = np.random.default_rng(seed)
    n, c = targets.shape
    frac = np.asarray(fractions, dtype=float) / sum(fractions)
    per_image = [np.flatnonzero(row) for row in targets]
    per_label = [rng.permutation(np.flatnonzero(targets[:, j])) for j in range(c)]
    remaining = targets.sum(0).astype(np.int64)
    want_label = frac[:, None] * remaining[None, :]  # (S, C)
    want_total = frac * n
    subset = np.full(n, -1)
    tiebreak = rng.random((n, len(frac)))
    for _ in range(c):
        live = np.flatnonzero(remaining > 0)
        if not len(live):
            break
        label = live[np.argmin(remaining[live] + rng.random(len(live)) * 0.5)]
        for i in per_label[label]:
            if subset[i] >= 0:
                continue
            s = np.lexsort((tiebreak[i], want_total, want_label[:, label]))[-1]
            subset[i] = s
            want_label[s, per_image[i]] -= 1
            want_total[s] -= 1
            remaining[per_image[i]] -= 1
    for i in np.flatnonzero(subset < 0):  # images without labels
        s = int(np.argmax(want_total))
        subset[i] = s
        want_total[s] -= 1
    return subset


def stratified_split(targets: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """(N,) subset index per image by `iterative_stratification`, then every label present in subset 0:
    rare labels land in the largest subset (train) first, and one that still has no image there gets one
    moved there."""
    subset = iterative_stratification(targets, fractions, seed)
    for j in np.flatnonzero(targets.any(0) & ~targets[subset == 0].any(0)):
        subset[np.flatnonzero(targets[:, j])[0]] = 0
    return subset


def load_dataset(
    root: Path,
    *,
    min_label_count: int = 3,
    split_seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Dataset:
    """Read a Kaggle-layout data dir, apply the rare-label filter and split the labelled images."""
    root = Path(root)
    if not root.is_dir():
        raise ImetError(f"{root}: data dir not found")
    full = read_vocabulary(root / "labels.csv")
    ids, labels = read_train(root / "train.csv", full)
    keep_label, keep_image = filter_rare(labels, len(full), min_label_count)
    if not keep_image.any():
        raise ImetError(f"{root / 'train.csv'}: no image is left after dropping labels seen < {min_label_count} times")
    vocab = full.subset(keep_label)
    dense = np.cumsum(keep_label) - 1  # old dense index -> new dense index
    kept = np.flatnonzero(keep_image)
    targets = np.zeros((len(kept), len(vocab)), dtype=np.uint8)
    for row, i in enumerate(kept):
        targets[row, dense[labels[i]]] = 1
    subset = stratified_split(targets.astype(bool), fractions, split_seed)
    test_ids = read_test_ids(root)
    both = set(test_ids) & set(ids)
    if both:
        source = root / "sample_submission.csv" if (root / "sample_submission.csv").exists() else root / "test"
        raise ImetError(f"{source}: test image id(s) {sorted(both)[:5]} are also in train.csv")
    for folder, needed in (("train", True), ("test", bool(test_ids))):
        if needed and not (root / folder).is_dir():
            raise ImetError(f"{root / folder}: image directory not found (a data dir holds train/ and test/)")
    return Dataset(
        root=root,
        vocab=vocab,
        ids=[ids[i] for i in kept] + test_ids,
        split=np.array([SPLITS[s] for s in subset] + ["kaggle-test"] * len(test_ids), dtype=object),
        targets=np.concatenate([targets, np.zeros((len(test_ids), len(vocab)), dtype=np.uint8)]),
        dropped_labels=int(len(full) - keep_label.sum()),
        dropped_images=int(len(ids) - len(kept)),
    )


@dataclass(frozen=True)
class ViewPlan:
    """Every view of every image, as data (section 4.2). M rows, grouped by image in image order."""

    image: np.ndarray  # (M,) int64 index into Dataset.ids
    crop: np.ndarray  # (M,) bool: a random crop (True) or a resize of the whole image (False)
    offset: np.ndarray  # (M, 2) float32: crop position as fractions (x, y) of the free room; 0 for resizes
    flip: np.ndarray  # (M,) bool: horizontal flip
    jitter: np.ndarray  # (M, 3) float32: brightness, contrast, saturation factors (1 = unchanged)
    culture_only: np.ndarray  # (M,) bool: the view's targets are the image's culture labels only

    def __len__(self) -> int:
        return len(self.image)


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    digest = hashlib.sha1(image_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def plan_views(dataset: Dataset, seed: int = 0) -> ViewPlan:
    """Six views per image. Train: a tag-only image gets 6 resizes; any other gets 1 resize + 5 crops
    whose targets are its culture labels only; all train views get a random flip and colour jitter.
    Val, test and kaggle-test: 1 resize + 5 crops, no flip, no jitter. Each image draws from its own
    generator (seed, id), so a plan does not depend on the other images."""
    culture = dataset.vocab.culture
    has_culture = (dataset.targets[:, culture] > 0).any(1)
    has_tag = (dataset.targets[:, ~culture] > 0).any(1)
    n_views = 1 + N_CROPS
    rows = []
    for i, image_id in enumerate(dataset.ids):
        rng = _image_rng(seed, image_id)
        train = dataset.split[i] == "train"
        crop = np.arange(n_views) >= 1
        if train and has_tag[i] and not has_culture[i]:
            crop[:] = False
        offset = rng.random((n_views, 2)) * crop[:, None]
        flip = rng.random(n_views) < 0.5
        jitter = rng.uniform(1 - JITTER, 1 + JITTER, (n_views, 3))
        if not train:
            flip[:] = False
            jitter[:] = 1.0
        rows.append((np.full(n_views, i), crop, offset, flip, jitter, crop & train))
    cols = list(zip(*rows, strict=True))
    return ViewPlan(
        image=np.concatenate(cols[0]).astype(np.int64),
        crop=np.concatenate(cols[1]),
        offset=np.concatenate(cols[2]).astype(np.float32),
        flip=np.concatenate(cols[3]),
        jitter=np.concatenate(cols[4]).astype(np.float32),
        culture_only=np.concatenate(cols[5]),
    )


def crop_box(width: int, height: int, size: int, crop: bool, offset) -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1) of a width x height image that a view of `size` px shows.

    A resize shows the whole image. A crop scales the image so its shorter side is
    CROP_SHORT_SIDE * size / 224 (at least `size`), then cuts size x size at `offset` of the free room.
    """
    if not crop:
        return (0.0, 0.0, float(width), float(height))
    scale = max(CROP_SHORT_SIDE * size / 224, size) / min(width, height)
    side = size / scale  # the crop's side in original pixels
    x0 = float(offset[0]) * (width - side)
    y0 = float(offset[1]) * (height - side)
    return (x0, y0, x0 + side, y0 + side)


def summary(dataset: Dataset) -> str:
    """A short text report: images per split, labels by kind, label frequency and views."""
    vocab, t = dataset.vocab, dataset.targets
    labelled = dataset.split != "kaggle-test"
    counts = t[labelled].sum(0)
    per_image = t[labelled].sum(1)
    culture = vocab.culture
    lines = [
        f"data dir        {dataset.root}",
        f"labels          {len(vocab)} ({int(culture.sum())} culture, {int((~culture).sum())} tag); "
        f"dropped {dataset.dropped_labels} seen too rarely",
        f"images          {int(labelled.sum())} labelled (dropped {dataset.dropped_images}), "
        f"{int((~labelled).sum())} kaggle-test",
    ]
    for name in SPLITS:
        m = dataset.split == name
        covered = int((t[m].sum(0) > 0).sum())
        lines.append(f"  {name:<13} {int(m.sum()):>7} images, {covered} labels present")
    lines += [
        f"labels/image    mean {per_image.mean():.2f}, min {per_image.min()}, max {per_image.max()}",
        f"label counts    min {counts.min()}, median {int(np.median(counts))}, max {counts.max()}",
        f"views           {len(dataset.ids) * (1 + N_CROPS)} ({1 + N_CROPS} per image)",
    ]
    return "\n".join(lines)
