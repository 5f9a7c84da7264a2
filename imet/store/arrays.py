"""`ArrayStore`: a store in memory, from numpy arrays, read as a store file is (`StoreReader`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imet.codec import Codec
from imet.errors import ImetError
from imet.labels import SPLITS, Vocabulary
from imet.store.format import DONE, FEATURES
from imet.store.reader import Labelled, label_problems, refuse_nonfinite, status_problems


class ArrayStore(Labelled):
    """A store in memory, from numpy arrays: every head fits and predicts on it as on a store file.

    Features of M views, at least one of pooled (M, F), maps (M, h, w, D) and hog (M, K); `targets` (N, C)
    0/1 per image and `split` (N,) one of SPLITS per image (default: unlabelled kaggle-test images);
    `view_image` (M,) the image of each view (default: one view per image); `vocab` the labels (default:
    attribute ids 0..C-1 named label_0, ...); `image_ids` (default: "0", "1", ...); `status` (M,) DONE or
    FAILED per view (default: all done). `name` stands for the file in messages.
    """

    def __init__(self, *, pooled: np.ndarray | None = None, maps: np.ndarray | None = None,
                 hog: np.ndarray | None = None, targets: np.ndarray | None = None, split=None,
                 view_image: np.ndarray | None = None, vocab: Vocabulary | None = None, image_ids=None,
                 culture_only: np.ndarray | None = None, status: np.ndarray | None = None,
                 settings: dict | None = None, name: str = "<arrays>", codecs: dict[str, Codec] | None = None):
        self.path, self.settings, self.codecs = Path(name), dict(settings or {}), dict(codecs or {})
        features = {k: np.asarray(v) for k, v in (("maps", maps), ("pooled", pooled), ("hog", hog)) if v is not None}
        if not features:
            raise ImetError(f"{name}: give at least one of pooled, maps and hog")
        m = len(next(iter(features.values())))
        for key, x in features.items():
            want = 4 if key == "maps" else 2
            scaled = key in self.codecs and self.codecs[key].scale is not None  # int8 through its codec
            if x.ndim != want or len(x) != m or not (np.issubdtype(x.dtype, np.floating) or scaled):
                raise ImetError(f"{name}: {key} must be a float array of {want} dimensions with one row per view "
                                f"({m} views), not {x.dtype} {x.shape}")
        self.view_image = np.arange(m, dtype=np.int64) if view_image is None else np.asarray(view_image, np.int64)
        n = len(image_ids) if image_ids is not None else int(self.view_image.max()) + 1 if m else 0
        if targets is None:
            targets = np.zeros((n, len(vocab) if vocab is not None else 0), np.uint8)
        self.targets = np.asarray(targets)
        n = len(self.targets)
        if self.targets.ndim != 2 or not np.isin(self.targets, (0, 1)).all():
            raise ImetError(f"{name}: targets must be (images, labels) of 0 and 1, not {self.targets.shape}")
        self.targets = self.targets.astype(np.uint8)
        self.vocab = vocab if vocab is not None else Vocabulary(
            np.arange(self.targets.shape[1], dtype=np.int64), tuple(f"label_{c}" for c in range(self.targets.shape[1])),
            ("tag",) * self.targets.shape[1])
        self.split = np.asarray(["kaggle-test"] * n if split is None else split, dtype=object)
        self.image_ids = np.asarray([str(i) for i in range(n)] if image_ids is None else image_ids, dtype=object)
        self._check_sizes(name, m, n)
        self.culture_only = np.zeros(m, bool) if culture_only is None else np.asarray(culture_only, bool)
        self._status = np.full(m, DONE, np.uint8) if status is None else np.asarray(status, np.uint8)
        self.fingerprint, self.plan_arrays = "", {}  # no file: no fingerprint, no view plan to redraw pixels
        self._features = features
        problems = label_problems(self)  # what a store file is refused for, the arrays are refused for
        if len(self._status) != m:
            problems.append(f"views/status has {len(self._status)} rows, expected {m} (the views 0..{m})")
        problems += status_problems(self._status)
        if problems:
            raise ImetError(f"{name}: {problems[0]}")

    def _check_sizes(self, name: str, m: int, n: int) -> None:
        if len(self.view_image) != m or (m and (self.view_image.min() < 0 or self.view_image.max() >= n)):
            raise ImetError(f"{name}: view_image must give each of the {m} views an image in 0..{n - 1}")
        if self.targets.shape[1] != len(self.vocab):
            raise ImetError(f"{name}: targets have {self.targets.shape[1]} labels, the vocabulary {len(self.vocab)}")
        if len(self.split) != n or len(self.image_ids) != n:
            raise ImetError(f"{name}: split and image_ids need one entry per image ({n})")
        unknown = sorted(set(self.split) - set(SPLITS))
        if unknown:
            raise ImetError(f"{name}: unknown split {unknown[0]!r}; choose from {', '.join(SPLITS)}")

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self._features)

    @property
    def status(self) -> np.ndarray:
        return self._status

    def array(self, key: str) -> np.ndarray:
        """The array given for 'maps', 'pooled', 'hog' or 'status'."""
        if key == "status":
            return self._status
        if key not in self._features:
            raise ImetError(f"{self.path}: store has no {key!r} array (it has: {', '.join(self.features)})")
        return self._features[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.array(key).shape[1:])

    def read(self, key: str, idx) -> np.ndarray:
        """Rows `idx` of a feature, copied, in the order given; int8 features decoded through their codec."""
        idx = np.asarray(idx, dtype=np.int64)
        out = self.array(key)[idx]
        if key in FEATURES:
            refuse_nonfinite(f"{self.path}: features/{key}", idx, out)
        codec = self.codecs.get(key)
        if codec is not None and codec.scale is not None:
            out = codec.decode(out)
        return out

    def bytes_per_view(self) -> dict[str, int]:
        return {k: int(np.prod(self.shape(k))) * v.dtype.itemsize for k, v in self._features.items()}

    def release(self) -> None:
        """Nothing to drop: the arrays are the caller's."""
