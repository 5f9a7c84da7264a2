"""A synthetic dataset in the Kaggle iMet layout, built to behave like the real task rather than a fixture.

What the pictures encode, and why it matches iMet:

- Culture labels are global: each culture has a palette, a background texture (stripes, checker, noise,
  gradient, rings, waves, dots or grid, at a culture-specific frequency and angle) and a frame style.
  An image carries one or two cultures; with two, the background follows one and the frame the other.
- About 20% of images carry no culture at all, only tags, on a neutral grey-ish unframed background,
  as many real iMet images carry tags only (this is what the tag-only view plan in `imet.data` is for).
- Tag labels are local: each tag is a drawn object (a shape in a colour or a fill pattern), 6-35% of the
  shorter side, anywhere in the picture, at any rotation; 1-6 tags per image.
- Labels co-occur: some tags come in groups, and each culture favours a few tags.
- Label frequencies are long-tailed (Zipf-like). A culture and two tags are planted on two images only (seen
  once or twice), and labels.csv lists a culture and a tag that no image carries, so the "drop labels seen
  < 3 times" filter always has something to drop. Any other label an image carries is seen at least 3 times
  (rarer draws are handed to the commonest label of their kind), so the filter drops exactly the two planted
  images and even a 10-image dataset keeps most of its images.
- Every image has its shorter side at 300 px; most aspect ratios lie between 1:1 and 1:2 either way, a few
  are as extreme as 1:6 (scrolls).

The label vocabulary and the styles are fixed (WORLD_SEED), so datasets written with different seeds share
their labels; `seed` drives everything sampled per image. The same seed writes byte-identical files.
"""

from __future__ import annotations

import colorsys
import functools
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imet.errors import ImetError

N_CULTURES = 12  # cultures that images carry (labels.csv lists one more that none carries)
N_TAGS = 32  # tags that images carry (labels.csv lists one more that none carries)
SHORT_SIDE = 300
TAG_ONLY = 0.2  # fraction of images without a culture label
TWO_CULTURES = 0.25  # among images with a culture, the fraction carrying two
PRIMARY_TAGS_P = (0.3, 0.3, 0.2, 0.12, 0.08)  # P(1..5 tags drawn) before group companions join
MAX_TAGS = 6
COMPANION_P = 0.8  # P(a group member joins when another member is drawn)
FAVOURITE_BOOST = 6.0  # weight factor of a culture's favourite tags on its images
ZIPF_CULTURE, ZIPF_TAG = 1.0, 1.1  # exponents of the label frequency laws
EXTREME_P = 0.05  # fraction of images with an aspect ratio beyond 1:4
WORLD_SEED = 2019
MARKER = ".imet-synth.json"  # marks a directory as synth output, which a later run may overwrite
CORRUPT_KINDS = ("truncated", "empty", "gray", "rgba", "16bit")
_CORRUPT_TEXT = {
    "truncated": "truncated PNG (first half of a valid file)",
    "empty": "zero-byte file",
    "gray": "grayscale (mode L)",
    "rgba": "RGBA with transparency",
    "16bit": "16-bit grayscale (mode I;16)",
}

_CULTURE_NAMES = (
    "aldorian", "barsetic", "caldane", "dunmeric", "estravian", "felisian", "gorvane",
    "halmish", "istrian", "jorvic", "kelmarin", "lutheric", "morvanese",
)  # fmt: skip
_TEXTURES = ("stripes", "checker", "noise", "gradient", "rings", "waves", "dots", "grid")
_FRAME_STYLES = ("plain", "bevel", "double", "mat")
_FRAME_COLOURS = (
    (196, 156, 68), (28, 24, 22), (92, 58, 32), (176, 178, 182),
    (112, 30, 28), (226, 218, 196), (48, 110, 84), (30, 42, 86),
)  # fmt: skip  gilt, black, walnut, silver, oxblood, ivory, jade, navy
_COLOURS = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (240, 200, 40), "green": (50, 150, 60),
    "teal": (30, 150, 150), "blue": (40, 80, 190), "purple": (120, 60, 160), "pink": (235, 120, 170),
    "black": (30, 30, 30), "white": (245, 245, 240), "brown": (120, 75, 40), "gold": (212, 175, 55),
}  # fmt: skip
_SHAPES = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
    "arrow", "crescent", "heart", "spiral", "pentagon", "bolt", "leaf", "clover",
)  # fmt: skip
_PATTERNS = ("striped", "dotted", "checked")
_CREAM = np.array([240, 234, 218], dtype=np.float32)


@dataclass(frozen=True)
class Culture:
    name: str
    texture: str
    colours: np.ndarray  # (2, 3) float32: the texture's low and high colour
    freq: float  # texture periods per 300 px
    angle: float  # texture direction, radians
    bands: tuple  # frame as (inset px, width px, (r, g, b)) rectangles, outermost first
    favourites: tuple[int, ...]  # tags drawn more often on this culture's images


@dataclass(frozen=True)
class Tag:
    name: str
    shape: str
    colour: tuple[int, int, int]
    fill: str  # "solid" or one of _PATTERNS


@dataclass(frozen=True)
class World:
    """Everything fixed across seeds: labels, their ids, styles and the label frequency laws."""

    cultures: tuple[Culture, ...]
    tags: tuple[Tag, ...]
    labels: tuple[tuple[int, str], ...]  # labels.csv rows (attribute_id, attribute_name), ascending ids
    culture_ids: np.ndarray  # (N_CULTURES,) attribute id of each culture
    tag_ids: np.ndarray  # (N_TAGS,) attribute id of each tag
    culture_p: np.ndarray  # (N_CULTURES,) Zipf-like, 0 for the forced-rare culture
    tag_p: np.ndarray  # (N_TAGS,) Zipf-like, 0 for the forced-rare tags
    groups: tuple[tuple[int, ...], ...]  # tags that usually appear together
    rare_culture: int
    rare_tags: tuple[int, int]  # seen exactly once and exactly twice in train.csv


# ---------------------------------------------------------------------------------------------- the world


def _zipf(n: int, exponent: float, rng: np.random.Generator, zero: list[int]) -> np.ndarray:
    """Probabilities 1/rank^exponent over a random ranking, with `zero` (the last ranks) at 0."""
    rank = np.empty(n)
    order = [i for i in rng.permutation(n) if i not in zero] + zero
    rank[order] = np.arange(1, n + 1)
    p = rank**-exponent
    p[zero] = 0.0
    return p / p.sum()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _frame_bands(style: str, width: int, colour, rng: np.random.Generator) -> tuple:
    c = np.array(colour, dtype=float)
    dark, light = tuple(int(x) for x in c * 0.6), tuple(int(x) for x in np.minimum(c * 1.3 + 20, 255))
    if style == "plain":
        return ((0, width, colour),)
    if style == "bevel":
        return ((0, width // 2, dark), (width // 2, width - width // 2, colour), (width, 2, light))
    if style == "double":
        return ((0, width, colour), (width + 5, 3, colour), (width + 8, 1, dark))
    mat = tuple(int(x) for x in _hsv(rng.random(), 0.08, 0.9))
    return ((0, width // 2, colour), (width // 2, width, mat), (width // 2 + width, 2, dark))


def _make_culture(i: int, name: str, texture: str, rng: np.random.Generator, tags: np.ndarray) -> Culture:
    hue = i / N_CULTURES + rng.uniform(-0.02, 0.02)
    low = _hsv(hue, rng.uniform(0.3, 0.7), rng.uniform(0.35, 0.6))
    high = _hsv(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.15, 0.5), rng.uniform(0.75, 0.95))
    style = _FRAME_STYLES[i % len(_FRAME_STYLES)]
    colour = _FRAME_COLOURS[rng.integers(len(_FRAME_COLOURS))]
    return Culture(
        name=name,
        texture=texture,
        colours=np.stack([low, high]),
        freq=float(rng.uniform(3.0, 12.0)),
        angle=float(rng.uniform(0, np.pi)),
        bands=_frame_bands(style, int(rng.integers(8, 24)), colour, rng),
        favourites=tuple(int(t) for t in rng.choice(tags, 3, replace=False)),
    )


def _make_tags(rng: np.random.Generator) -> list[Tag]:
    """Two tags per shape: one solid, one filled with a pattern, in different colours."""
    names = list(_COLOURS)
    tags = []
    for shape in _SHAPES:
        solid, patterned = rng.choice(len(names), 2, replace=False)
        pattern = _PATTERNS[rng.integers(len(_PATTERNS))]
        tags.append(Tag(f"tag::{names[solid]} {shape}", shape, _COLOURS[names[solid]], "solid"))
        colour = names[patterned]
        tags.append(Tag(f"tag::{pattern} {colour} {shape}", shape, _COLOURS[colour], pattern))
    return tags[:N_TAGS]


def _attribute_ids(n_culture: int, n_tag: int, rng: np.random.Generator) -> np.ndarray:
    """iMet-like ids: cultures from 0, then tags, ascending with irregular gaps."""
    steps = 1 + np.where(rng.random(n_culture + n_tag) < 0.6, 0, rng.integers(1, 5, n_culture + n_tag))
    steps[0] = 0
    steps[n_culture] = rng.integers(6, 30)
    return np.cumsum(steps)


def _make_groups(candidates: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, ...], ...]:
    """Four pairs and two triples of tags that tend to appear together."""
    pick = rng.permutation(candidates)[:14]
    cuts = (0, 2, 4, 6, 8, 11, 14)
    return tuple(tuple(int(t) for t in pick[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))


@functools.lru_cache(maxsize=1)
def build_world() -> World:
    """The fixed label vocabulary and styles (the same for every seed)."""
    rng = np.random.default_rng(WORLD_SEED)
    tags = _make_tags(rng)
    tag_p = _zipf(N_TAGS, ZIPF_TAG, rng, zero=[N_TAGS - 2, N_TAGS - 1])
    common = np.flatnonzero(tag_p > 0)
    textures = rng.permutation(np.resize(_TEXTURES, N_CULTURES))
    cultures = [
        _make_culture(i, f"culture::{_CULTURE_NAMES[i]}", str(textures[i]), rng, common)
        for i in range(N_CULTURES)
    ]
    names = [c.name for c in cultures] + [f"culture::{_CULTURE_NAMES[-1]}"]
    culture_order = rng.permutation(len(names))  # position of each culture in id order
    tag_names = [t.name for t in tags] + ["tag::violet key"]
    tag_order = rng.permutation(len(tag_names))
    ids = _attribute_ids(len(names), len(tag_names), rng)
    culture_ids, tag_ids = ids[: len(names)][culture_order], ids[len(names) :][tag_order]
    rows = sorted(zip(culture_ids.tolist(), names, strict=True))
    rows += sorted(zip(tag_ids.tolist(), tag_names, strict=True))
    return World(
        cultures=tuple(cultures),
        tags=tuple(tags),
        labels=tuple(rows),
        culture_ids=culture_ids[:N_CULTURES],
        tag_ids=tag_ids[:N_TAGS],
        culture_p=_zipf(N_CULTURES, ZIPF_CULTURE, rng, zero=[N_CULTURES - 1]),
        tag_p=tag_p,
        groups=_make_groups(common, rng),
        rare_culture=N_CULTURES - 1,
        rare_tags=(N_TAGS - 2, N_TAGS - 1),
    )


# --------------------------------------------------------------------------------------------- the labels


@dataclass
class Item:
    """One image to write: its id, culture and tag indices (into World.cultures / World.tags)."""

    image_id: str
    cultures: list[int]
    tags: list[int]


def sample_labels(world: World, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """One image's cultures (0-2) and tags (1-6), from the frequency laws, favourites and groups."""
    cultures: list[int] = []
    if rng.random() >= TAG_ONLY:
        k = 2 if rng.random() < TWO_CULTURES else 1
        cultures = [int(c) for c in rng.choice(N_CULTURES, k, replace=False, p=world.culture_p)]
    w = world.tag_p.copy()
    for c in cultures:
        w[list(world.cultures[c].favourites)] *= FAVOURITE_BOOST
    k = 1 + rng.choice(len(PRIMARY_TAGS_P), p=PRIMARY_TAGS_P)
    tags = [int(t) for t in rng.choice(N_TAGS, k, replace=False, p=w / w.sum())]
    for t in list(tags):
        for group in world.groups:
            if t in group:
                tags += [m for m in group if m not in tags and rng.random() < COMPANION_P]
    return cultures, tags[:MAX_TAGS]


def _force_rare(items: list[Item], world: World, rng: np.random.Generator) -> set[int]:
    """Put the rare culture on two images, one rare tag on the first of them, the other on both."""
    chosen = [int(i) for i in rng.choice(len(items), min(2, len(items)), replace=False)]
    for n, i in enumerate(chosen):
        item = items[i]
        extra = [world.rare_tags[1]] + ([world.rare_tags[0]] if n == 0 else [])
        item.tags = item.tags[: MAX_TAGS - len(extra)] + extra
        item.cultures = item.cultures[:1] + [world.rare_culture]
    return set(chosen)


def _lift_rare(items: list[Item], skip: set[int]) -> None:
    """Hand the occurrences of labels seen once or twice (outside the images `skip`) to the commonest label
    of their kind, so that the min-count filter drops only the planted rare labels, even on tiny datasets."""
    for kind, n in (("cultures", N_CULTURES), ("tags", N_TAGS)):
        live = [getattr(item, kind) for i, item in enumerate(items) if i not in skip]
        while True:
            counts = np.bincount([x for labels in live for x in labels], minlength=n)
            rare = np.flatnonzero((counts > 0) & (counts < 3))
            if not len(rare) or (counts > 0).sum() < 2:
                break
            low, top = int(rare[np.argmin(counts[rare])]), int(np.argmax(counts))
            top = top if top != low else int(np.argsort(counts, kind="stable")[-2])
            for labels in live:
                if low in labels:
                    labels.remove(low)
                    if top not in labels:
                        labels.append(top)


def plan_labels(world: World, seed: int, images: int, n_test: int) -> tuple[list[Item], list[Item], set[int]]:
    """Train and test items with ids and labels, and which train items carry the planted rare labels."""
    ids = _unique_ids(images + n_test, np.random.default_rng([seed, 0]))
    rng = np.random.default_rng([seed, 1])
    train = [Item(i, *sample_labels(world, rng)) for i in ids[:images]]
    rare = _force_rare(train, world, rng)
    _lift_rare(train, rare)
    test = [Item(i, *sample_labels(world, rng)) for i in ids[images:]]
    return train, test, rare


def _unique_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct 16-digit hex ids, like iMet's."""
    ids: dict[str, None] = {}
    while len(ids) < n:
        ids[rng.bytes(8).hex()] = None
    return list(ids)


def _robust_donors(items: list[Item]) -> list[Item]:
    """Images ordered by the count of their rarest label, commonest first: safe labels to copy."""
    counts = np.zeros(N_CULTURES + N_TAGS, dtype=int)
    for item in items:
        counts[item.cultures] += 1
        counts[[N_CULTURES + t for t in item.tags]] += 1
    floor = [min(counts[item.cultures + [N_CULTURES + t for t in item.tags]]) for item in items]
    return [items[i] for i in np.argsort(floor, kind="stable")[::-1]]


# -------------------------------------------------------------------------------------------- the pixels


def image_size(rng: np.random.Generator, extreme: bool = False) -> tuple[int, int]:
    """(width, height) with the shorter side at 300 px and an artwork-like aspect ratio."""
    if extreme:
        ratio = rng.uniform(4.0, 6.5)
    elif rng.random() < 0.88:
        ratio = float(np.exp(rng.uniform(0, np.log(2.0))))
    else:
        ratio = rng.uniform(2.0, 3.0)
    long_side = int(round(SHORT_SIDE * ratio))
    return (SHORT_SIDE, long_side) if rng.random() < 0.55 else (long_side, SHORT_SIDE)


def _value_noise(h: int, w: int, cells: float, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float32 smooth noise in [0, 1] with about `cells` blobs per 300 px."""
    gh, gw = (max(2, int(np.ceil(s / SHORT_SIDE * cells)) + 1) for s in (h, w))
    grid = Image.fromarray(rng.random((gh, gw), dtype=np.float32))
    t = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC))
    return (t - t.min()) / max(float(np.ptp(t)), 1e-6)


def texture(kind: str, h: int, w: int, freq: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """(h, w) float32 pattern in [0, 1]; `freq` is in periods per 300 px."""
    y, x = np.ogrid[:h, :w]
    u, v = np.float32(x / SHORT_SIDE), np.float32(y / SHORT_SIDE)
    along = u * np.cos(angle) + v * np.sin(angle)  # (h, w)
    across = v * np.cos(angle) - u * np.sin(angle)
    phase = rng.random()
    if kind == "stripes":
        return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * (freq * along + phase)), 0, 1)
    if kind == "checker":
        return ((np.floor(freq * along + phase) + np.floor(freq * across + phase)) % 2).astype(np.float32)
    if kind == "rings":
        cx, cy = rng.uniform(0, w / SHORT_SIDE), rng.uniform(0, h / SHORT_SIDE)
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(u - cx, v - cy))
    if kind == "waves":
        wobble = 0.15 * freq * np.sin(2 * np.pi * along + phase)
        return 0.5 + 0.5 * np.sin(2 * np.pi * (freq * across + wobble))
    if kind in ("dots", "grid"):
        fu, fv = (freq * along + phase) % 1 - 0.5, (freq * across) % 1 - 0.5
        if kind == "dots":
            return (fu * fu + fv * fv < 0.07).astype(np.float32)
        return (np.minimum(np.abs(fu), np.abs(fv)) > 0.42).astype(np.float32)
    if kind == "gradient":
        g = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        return 0.8 * g + 0.2 * (0.5 + 0.5 * np.sin(2 * np.pi * freq * across))
    if kind == "noise":
        return 0.65 * _value_noise(h, w, freq, rng) + 0.35 * _value_noise(h, w, 3 * freq, rng)
    raise ValueError(f"unknown texture {kind!r}; choose from {', '.join(_TEXTURES)}")


def _culture_background(c: Culture, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float32: the culture's texture in its palette, with per-image jitter."""
    freq = c.freq * rng.uniform(0.9, 1.1)
    t = texture(c.texture, h, w, freq, c.angle + rng.normal(0, 0.08), rng)
    low, high = c.colours + rng.normal(0, 6, (2, 3)).astype(np.float32)
    return low + t[..., None] * (high - low)


def _neutral_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) float32: unstyled grey-ish paper or wall for tag-only images."""
    grey = rng.uniform(150, 215) + rng.normal(0, 5, 3).astype(np.float32)
    t = texture("gradient", h, w, 1.0, rng.uniform(0, 2 * np.pi), rng)
    return grey + (t[..., None] - 0.5) * rng.uniform(10, 30)


def draw_frame(arr: np.ndarray, bands: tuple) -> None:
    """Paint rectangular frame bands (inset, width, colour) into an (h, w, 3) array in place."""
    h, w = arr.shape[:2]
    for inset, width, colour in bands:
        a, b = inset, inset + width
        arr[a:b, a : w - a] = colour
        arr[h - b : h - a, a : w - a] = colour
        arr[a : h - a, a:b] = colour
        arr[a : h - a, w - b : w - a] = colour


def _lighting(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uneven light, a soft vignette and grain, as on a photographed object; returns uint8."""
    h, w = arr.shape[:2]
    y, x = np.ogrid[:h, :w]
    r2 = ((x / w - 0.5) ** 2 + (y / h - 0.5) ** 2).astype(np.float32)
    light = (0.9 + 0.18 * _value_noise(h, w, 1.5, rng)) * (1 - 0.35 * r2)
    grain = rng.standard_normal((h, w, 1), dtype=np.float32) * 3.0
    return np.clip(arr * light[..., None] + grain, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the objects


def _polygon(n: int, r: float = 1.0, phase: float = -np.pi / 2, centre=(0.0, 0.0)) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a) + centre[0], r * np.sin(a) + centre[1]], 1)


def _star() -> np.ndarray:
    a = -np.pi / 2 + np.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 17


def _spiral() -> np.ndarray:
    theta = np.linspace(0, 5 * np.pi, 80)
    r = 0.08 + 0.92 * theta / theta[-1]
    return np.stack([r * np.cos(theta), r * np.sin(theta)], 1)


@functools.cache
def shape_ops(shape: str) -> tuple:
    """A shape as drawing operations in unit coordinates (radius about 1, y down):
    ("poly", points, value) fills a polygon; ("line", points, width, value) draws a polyline."""
    P = np.array  # noqa: N806
    ops = {
        "circle": [("poly", _polygon(48), 255)],
        "square": [("poly", _polygon(4, 1.0, np.pi / 4), 255)],
        "triangle": [("poly", _polygon(3, 1.1, -np.pi / 2, (0, 0.2)), 255)],
        "star": [("poly", _star(), 255)],
        "cross": [("poly", P([(-3, -10), (3, -10), (3, -3), (10, -3), (10, 3), (3, 3), (3, 10), (-3, 10),
                              (-3, 3), (-10, 3), (-10, -3), (-3, -3)]) / 10, 255)],  # fmt: skip
        "ring": [("poly", _polygon(48), 255), ("poly", _polygon(48, 0.58), 0)],
        "diamond": [("poly", P([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]), 255)],
        "hexagon": [("poly", _polygon(6, 1.0, 0.0), 255)],
        "arrow": [("poly", P([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25),
                              (-1, 0.25)]), 255)],  # fmt: skip
        "crescent": [("poly", _polygon(48), 255), ("poly", _polygon(48, 0.85, 0, (0.42, -0.18)), 0)],
        "heart": [("poly", _heart(), 255)],
        "spiral": [("line", _spiral(), 0.16, 255)],
        "pentagon": [("poly", _polygon(5), 255)],
        "bolt": [("poly", P([(0.1, -1), (-0.5, 0.1), (-0.05, 0.1), (-0.25, 1), (0.5, -0.15), (0.05, -0.15),
                             (0.35, -1)]), 255)],  # fmt: skip
        "leaf": [("poly", _polygon(40) * (1.0, 0.45), 255), ("line", P([(-0.9, 0), (0.9, 0)]), 0.07, 0)],
        "clover": [("poly", _polygon(32, 0.45, 0, c), 255) for c in _polygon(3, 0.5)]
        + [("line", P([(0, 0.2), (0.15, 1)]), 0.12, 255)],
    }
    return tuple(ops[shape])


def object_mask(shape: str, size: int, angle: float, pad: int) -> Image.Image:
    """An 'L' mask of `shape`, `size` px across, rotated by `angle`, drawn 2x and reduced (anti-aliased)."""
    side = 2 * (size + 2 * pad)
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for op in shape_ops(shape):
        points = [tuple(p) for p in (op[1] @ rot.T) * size + side / 2]
        if op[0] == "poly":
            draw.polygon(points, fill=op[2])
        else:
            draw.line(points, fill=op[3], width=max(2, int(op[2] * size * 2)), joint="curve")
    return mask.reduce(2)


def _fill(tag: Tag, side: int, size: int, angle: float, rng: np.random.Generator) -> Image.Image:
    """An RGB patch: the tag's colour lit from the top left, or its pattern on cream (turning with it)."""
    y, x = np.ogrid[:side, :side]
    u, v = (x - side / 2) / size, (y - side / 2) / size
    along, across = u * np.cos(angle) + v * np.sin(angle), v * np.cos(angle) - u * np.sin(angle)
    colour = np.array(tag.colour, dtype=np.float32) * rng.uniform(0.9, 1.1)
    if tag.fill == "solid":
        shade = 1.08 - 0.25 * (u + v + 1) / 2
        rgb = np.clip(colour * shade[..., None], 0, 255)
    else:
        fu, fv = (4 * along) % 1, (4 * across) % 1
        if tag.fill == "striped":
            on = fu < 0.5
        elif tag.fill == "dotted":
            on = (fu - 0.5) ** 2 + (fv - 0.5) ** 2 > 0.06
        else:
            on = (fu < 0.5) ^ (fv < 0.5)
        rgb = np.where(on[..., None], colour, _CREAM)
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))


def draw_object(img: Image.Image, tag: Tag, rng: np.random.Generator) -> None:
    """Paste one tag object (with an outline and a soft shadow) somewhere in `img`, in place."""
    size = int(SHORT_SIDE * np.exp(rng.uniform(np.log(0.06), np.log(0.35))))
    pad = max(4, size // 8)
    angle = rng.uniform(0, 2 * np.pi)
    mask = object_mask(tag.shape, size, angle, pad)
    side = mask.size[0]
    x0 = int(rng.integers(0, img.width - side + 1))
    y0 = int(rng.integers(0, img.height - side + 1))
    box = (x0, y0, x0 + side, y0 + side)
    shadow = Image.new("L", mask.size, 0)
    shadow.paste(mask.filter(ImageFilter.GaussianBlur(2)).point(lambda a: a * 2 // 5), (2, 3))
    img.paste((15, 12, 10), box, shadow)
    edge = 3 if size < 40 else 5
    img.paste((35, 30, 28), box, mask.filter(ImageFilter.MaxFilter(edge)))
    img.paste(_fill(tag, side, size, angle, rng), box, mask)


def render(world: World, cultures: list[int], tags: list[int], rng: np.random.Generator,
           extreme: bool = False) -> Image.Image:
    """One RGB picture: background and frame from the cultures (or neutral), one object per tag."""
    w, h = image_size(rng, extreme)
    if cultures:
        order = rng.permutation(cultures)
        ground, frame = world.cultures[order[0]], world.cultures[order[-1]]
        arr = _culture_background(ground, h, w, rng)
        draw_frame(arr, frame.bands)
    else:
        arr = _neutral_background(h, w, rng)
    img = Image.fromarray(_lighting(arr, rng))
    for t in tags:
        for _ in range(1 + (rng.random() < 0.15)):
            draw_object(img, world.tags[t], rng)
    return img


# ------------------------------------------------------------------------------------------- the writing


def _prepare(out: Path) -> None:
    """Refuse a non-empty directory that synth did not write; clear a previous synth output."""
    if out.exists() and not out.is_dir():
        raise ImetError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ImetError(
            f"{out}: directory is not empty and is not a previous `imet synth` output (no {MARKER}); "
            "refusing to write into it, choose a new or empty directory"
        )
    for sub in ("train", "test"):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)
        (out / sub).mkdir(parents=True)


def _write_csv(path: Path, header: str, rows: list[str]) -> None:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8", newline="\n")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def corrupt_bytes(kind: str, img: Image.Image) -> bytes:
    """The file content of an awkward image of `kind` (one of CORRUPT_KINDS) made from an RGB picture."""
    if kind == "truncated":
        data = _png_bytes(img)
        return data[: len(data) // 2]
    if kind == "empty":
        return b""
    if kind == "gray":
        return _png_bytes(img.convert("L"))
    grey = np.asarray(img.convert("L"))
    if kind == "16bit":
        return _png_bytes(Image.fromarray(grey.astype("<u2") * 257))  # mode I;16
    h, w = grey.shape
    y, x = np.ogrid[:h, :w]
    r = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))  # a cut-out: opaque oval, clear corners
    alpha = np.clip((1.05 - r) * 5, 0, 1) * 255
    return _png_bytes(Image.fromarray(np.dstack([np.asarray(img), alpha.astype(np.uint8)])))


def _corrupt_items(items: list[Item], k: int, rng: np.random.Generator) -> list[tuple[Item, str]]:
    """k awkward train images cycling through CORRUPT_KINDS, each with the labels of an image whose
    labels are all common (so the rare-label filter keeps it)."""
    pool = _robust_donors(items)[: max(1, len(items) // 4)]
    out = []
    for i in range(k):
        kind = CORRUPT_KINDS[i % len(CORRUPT_KINDS)]
        donor = pool[rng.integers(len(pool))]
        out.append((Item(f"corrupt-{kind}-{i:02d}", list(donor.cultures), list(donor.tags)), kind))
    return out


def _label_field(item: Item, world: World) -> str:
    ids = sorted(world.culture_ids[item.cultures].tolist() + world.tag_ids[item.tags].tolist())
    return " ".join(str(a) for a in ids)


def _render_all(folder: Path, items: list[Item], world: World, seed: int, stream: int, extreme: int) -> int:
    """Write one PNG per item (image i from its own generator); returns how many came out extreme."""
    n_extreme = 0
    for i, item in enumerate(items):
        rng = np.random.default_rng([seed, stream, i])
        is_extreme = bool(rng.random() < EXTREME_P) or i == extreme
        img = render(world, item.cultures, item.tags, rng, extreme=is_extreme)
        (folder / f"{item.image_id}.png").write_bytes(_png_bytes(img))
        n_extreme += is_extreme
    return n_extreme


def _interleave(items: list[Item], extra: list[Item], rng: np.random.Generator) -> list[Item]:
    """`items` with `extra` inserted at random places, in order."""
    at = set(rng.choice(len(items) + len(extra), len(extra), replace=False).tolist())
    rest, more = iter(items), iter(extra)
    return [next(more) if i in at else next(rest) for i in range(len(items) + len(extra))]


def _report(out: Path, items: list[Item], n_test: int, n_extreme: int, broken, world: World) -> str:
    """The summary that `imet synth` prints."""
    n_cultures = np.bincount([len(item.cultures) for item in items], minlength=3)
    n_tags = np.array([len(item.tags) for item in items])
    seen: dict[str, int] = {}
    for item in items:
        for a in _label_field(item, world).split():
            seen[a] = seen.get(a, 0) + 1
    lines = [
        f"wrote {len(items)} train and {n_test} test images to {out}",
        f"labels.csv      {len(world.labels)} labels ({N_CULTURES + 1} culture, {N_TAGS + 1} tag): "
        f"{len(world.labels) - len(seen)} carried by no image, "
        f"{sum(c < 3 for c in seen.values())} seen < 3 times",
        f"cultures/image  none (tag-only) {n_cultures[0]}, one {n_cultures[1]}, two {n_cultures[2]}",
        f"tags/image      mean {n_tags.mean():.2f}, min {n_tags.min()}, max {n_tags.max()}",
        f"aspect ratio    {n_extreme} train images beyond 1:4",
    ]
    if broken:
        lines.append(f"corrupt train   {len(broken)} images (in train.csv, with valid labels):")
        lines += [f"  {item.image_id:<24} {_CORRUPT_TEXT[kind]}" for item, kind in broken]
    return "\n".join(lines)


def write_synthetic(
    out: Path, *, images: int, seed: int, test_images: int | None = None, corrupt: int = 0
) -> str:
    """Write an iMet-like dataset (see the module docstring) to `out` and return a short summary.

    `out` must be new, empty or a previous synth output (which is replaced). `corrupt` awkward train
    images are added on top of `images`, cycling through CORRUPT_KINDS.
    """
    out = Path(out)
    n_test = max(1, images // 10) if test_images is None else test_images
    if images < 1 or n_test < 0 or corrupt < 0:
        raise ImetError(
            f"synth: need images >= 1, test images >= 0 and corrupt >= 0; got {images}, {n_test}, {corrupt}"
        )
    world = build_world()
    _prepare(out)
    params = {"images": images, "seed": seed, "test_images": n_test, "corrupt": corrupt}
    marker = json.dumps({"written_by": "imet synth", **params}, sort_keys=True)
    (out / MARKER).write_text(marker + "\n", encoding="utf-8", newline="\n")
    train, test, rare = plan_labels(world, seed, images, n_test)
    donors = [it for i, it in enumerate(train) if i not in rare] or train
    broken = _corrupt_items(donors, corrupt, np.random.default_rng([seed, 5]))
    for i, (item, kind) in enumerate(broken):
        img = render(world, item.cultures, item.tags, np.random.default_rng([seed, 4, i]))
        (out / "train" / f"{item.image_id}.png").write_bytes(corrupt_bytes(kind, img))
    forced = int(np.random.default_rng([seed, 6]).integers(min(images, 20)))  # one sure extreme aspect
    n_extreme = _render_all(out / "train", train, world, seed, 2, forced)
    _render_all(out / "test", test, world, seed, 3, extreme=-1)
    rows = _interleave(train, [item for item, _ in broken], np.random.default_rng([seed, 7]))
    _write_csv(out / "labels.csv", "attribute_id,attribute_name", [f"{a},{name}" for a, name in world.labels])
    labelled = [f"{r.image_id},{_label_field(r, world)}" for r in rows]
    _write_csv(out / "train.csv", "id,attribute_ids", labelled)
    _write_csv(out / "sample_submission.csv", "id,attribute_ids", [f"{it.image_id},0" for it in test])
    return _report(out, rows, n_test, n_extreme, broken, world)
