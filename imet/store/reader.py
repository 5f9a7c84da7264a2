"""The store's reading side: `StoreReader`, what heads read of a store, and `FeatureStore`, a store file.

`FeatureStore` (a file, memory-mapped) and `ArrayStore` (numpy arrays, `imet.store.arrays`) both implement
`StoreReader`; what they compute alike from labels, splits and status lives in `Labelled`.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from imet.codec import Codec
from imet.errors import ImetError
from imet.labels import SPLITS, Vocabulary
from imet.store.format import (
    CHECKSUMS,
    DONE,
    FAILED,
    FEATURES,
    LEGACY_CHECKSUM,
    PENDING,
    _hash_file_meta,
    _open,
    _read_codecs,
    _specs,
    _strings,
    row_checksums,
    view_checksum,
)


class StoreReader(Protocol):
    """What heads, decoding and predictions read of a store: M views of N images with C labels."""

    path: Path  # the file, or the name that stands for it in messages
    settings: dict  # how the features were made: a model refuses a store made otherwise (`identity`)
    fingerprint: str  # the images, labels and views ("" for arrays)
    codecs: dict[str, Codec]  # compact features: how they were encoded
    vocab: Vocabulary  # (C,) labels
    image_ids: np.ndarray  # (N,) str
    split: np.ndarray  # (N,) one of SPLITS
    targets: np.ndarray  # (N, C) uint8 0/1
    view_image: np.ndarray  # (M,) int64: the image of each view
    culture_only: np.ndarray  # (M,) bool: views that train culture labels only

    @property
    def features(self) -> tuple[str, ...]: ...  # the feature arrays held: some of maps, pooled, hog

    @property
    def status(self) -> np.ndarray: ...  # (M,) uint8 PENDING, DONE or FAILED

    def shape(self, key: str) -> tuple[int, ...]: ...  # per-view shape of a feature

    def read(self, key: str, idx) -> np.ndarray: ...  # rows idx of a feature, float (decoded)

    def views(self, split: str | None = None) -> np.ndarray: ...  # done views, optionally of one split

    def view_targets(self, idx) -> np.ndarray: ...  # (n, C) float32 targets of views

    def layout(self) -> dict[str, list[int]]: ...  # per-view shapes: what a model made for it expects

    def bytes_per_view(self) -> dict[str, int]: ...  # stored bytes of one view of each feature

    def release(self) -> None: ...  # drop what this process holds mapped (nothing for arrays)


class Labelled:
    """What every store computes alike from its labels, splits, status and feature shapes."""

    def views(self, split: str | None = None) -> np.ndarray:
        """Indices of finished (done) views, optionally of one split."""
        keep = self.status == DONE
        if split is not None:
            if split not in SPLITS:
                raise ImetError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
            keep &= self.split[self.view_image] == split
        return np.flatnonzero(keep)

    def view_targets(self, idx) -> np.ndarray:
        """(n, C) float32 targets of views: the image's labels, culture labels only for culture_only views."""
        idx = np.asarray(idx, dtype=np.int64)
        t = self.targets[self.view_image[idx]].astype(np.float32)
        t[np.ix_(self.culture_only[idx], ~self.vocab.culture)] = 0.0
        return t

    def layout(self) -> dict[str, list[int]]:
        """Per-view shapes of the feature arrays: what a model made for this store expects."""
        return {k: list(self.shape(k)) for k in self.features}

    @property
    def pooled(self) -> np.ndarray:
        return self.array("pooled")

    @property
    def maps(self) -> np.ndarray:
        return self.array("maps")

    @property
    def hog(self) -> np.ndarray:
        return self.array("hog")


class FeatureStore(Labelled):
    """Read-only view of a finished store: metadata in memory, features as np.memmap (no copy).

    Safe to hand to DataLoader workers: pickling keeps only the path and the array specs, and each
    process maps the file again on first use.
    """

    RELEASE_BYTES = 64 << 20  # drop the store's mapped pages when the process holds this much more
    CHECK_BYTES = 256 << 10  # bytes read between two looks at the process's resident file pages
    BIG_ROW = 64 << 10  # rows at least this big are read one by one in file order
    VERIFY_READS = True  # `read` checks checksums (benchmarks/bench_checksum.py turns it off to compare)

    def __init__(self, path: Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        with _open(self.path) as f:
            try:
                self._load(f)
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise ImetError(f"{self.path}: damaged store ({type(e).__name__}: {e}); "
                                "see `imet store verify`") from None
        self._maps: dict[str, np.memmap] = {}
        self._file_base = _file_pages()
        self._unchecked = 0
        self._verified: np.ndarray | None = None  # legacy stores: views whose features were checked
        if not allow_incomplete:
            problems = meta_problems(self)
            if problems:
                raise ImetError(f"{self.path}: damaged store: {problems[0]}" + (
                    f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") + "; see `imet store verify`")
            self._check_complete()

    def _load(self, f: h5py.File) -> None:
        self.settings = json.loads(f.attrs.get("settings", "{}"))
        self.vocab = Vocabulary(
            f["labels/attribute_id"][()].astype(np.int64),
            tuple(_strings(f["labels/name"])),
            tuple(_strings(f["labels/kind"])),
        )
        self.image_ids = np.array(_strings(f["images/id"]), dtype=object)
        self.split = np.array(_strings(f["images/split"]), dtype=object)
        self.targets = f["images/targets"][()].astype(np.uint8)
        self.view_image = f["views/image"][()].astype(np.int64)
        n = len(self.view_image)
        self.culture_only = f["views/culture_only"][()].astype(bool) if "views/culture_only" in f else np.zeros(n, bool)
        self.view_range = tuple(int(x) for x in f.attrs.get("view_range", (0, n)))
        self.specs = _specs(f)
        self.codecs = _read_codecs(f)
        self.fingerprint = str(f.attrs.get("fingerprint", "")) or _hash_file_meta(f)
        self.plan_arrays = {k: f[f"views/{k}"][()] for k in ("crop", "offset", "flip", "jitter") if f"views/{k}" in f}

    def _check_complete(self) -> None:
        start, stop = self.view_range
        if (start, stop) != (0, len(self.view_image)):
            raise ImetError(
                f"{self.path}: this is a shard (views {start}..{stop} of {len(self.view_image)}); "
                "merge the shards with `imet store merge`"
            )
        pending = int((self.status == PENDING).sum())
        if pending:
            raise ImetError(
                f"{self.path}: store is incomplete ({pending} of {len(self.status)} views not featurized); "
                "rerun the same `imet featurize` command to finish it"
            )

    # -- arrays --------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        state["_file_base"] = _file_pages()
        return state

    def array(self, key: str) -> np.memmap:
        """The memmap of 'maps', 'pooled', 'hog', 'status', 'box' or 'error' (mapped once per process)."""
        full = key if "/" in key else (f"features/{key}" if key in FEATURES else f"views/{key}")
        if full not in self.specs:
            raise ImetError(f"{self.path}: store has no {key!r} array (it has: {', '.join(self.features)})")
        if full not in self._maps:
            offset, shape, dtype = self.specs[full]
            self._maps[full] = np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)
        return self._maps[full]

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(k.split("/")[1] for k in self.specs if k.startswith("features/"))

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-view shape of a feature array, e.g. (14, 14, 2048) for maps."""
        return tuple(self.specs[f"features/{key}"][1][1:])

    @property
    def status(self) -> np.ndarray:
        return np.asarray(self.array("status"))

    def read(self, key: str, idx) -> np.ndarray:
        """Rows `idx` of a feature array, in the order given, each row copied once; int8 features come back
        as float32 in their stored (projected) space, scaled by their codec.

        A contiguous run is one slice; big rows (maps) are copied one by one in ascending file order, so
        a store on disk is read forward; small rows are gathered by numpy in one pass.
        """
        arr = self.array(key)
        idx = np.asarray(idx, dtype=np.int64)
        contiguous = bool(len(idx)) and bool((idx[1:] == idx[:-1] + 1).all())
        if contiguous:
            out = np.array(arr[idx[0]:idx[-1] + 1])
        elif arr[:1].nbytes >= self.BIG_ROW:
            out = np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype)
            for j in np.argsort(idx, kind="stable"):
                out[j] = arr[idx[j]]
        else:
            out = arr[idx]
        if key in FEATURES:
            refuse_nonfinite(f"{self.path}: features/{key}", idx, out, self.view_range[0],
                             "; the store is damaged, see `imet store verify`")
        if key in FEATURES and self.VERIFY_READS:
            self._check_rows(key, idx, out)
        codec = self.codecs.get(key)
        if codec is not None and codec.scale is not None:
            out = codec.decode(out)
        self._unchecked += out.nbytes
        if self._unchecked >= self.CHECK_BYTES:
            self._unchecked = 0
            if _file_pages() - self._file_base > self.RELEASE_BYTES:
                self.release()
        return out

    def _check_rows(self, key: str, idx: np.ndarray, rows: np.ndarray) -> None:
        """Refuse rows read whose bytes differ from the crc32 written with them (a flipped bit on disk).

        A store written before per-feature checksums has one crc32 over all features of a view: a view is
        checked the first time this process reads it, all its features read for that."""
        if f"views/{CHECKSUMS[key]}" in self.specs:
            bad = idx[row_checksums(rows) != self.array(CHECKSUMS[key])[idx]]
        elif f"views/{LEGACY_CHECKSUM}" in self.specs:
            if self._verified is None:
                self._verified = np.zeros(len(self.array("status")), bool)
            todo = np.unique(idx[~self._verified[idx]])
            arrays, stored = {k: self.array(k) for k in self.features}, self.array(LEGACY_CHECKSUM)
            bad = np.array([r for r in todo if view_checksum(arrays, r) != int(stored[r])], np.int64)
            self._verified[todo] = True
        else:
            return  # a hand-written store without checksums
        if len(bad):
            raise ImetError(f"{self.path}: features/{key} of view {int(bad[0]) + self.view_range[0]} do not match "
                            f"their checksum ({len(bad)} of the {len(idx)} views read): the store is damaged "
                            "(corrupted bytes), see `imet store verify`")

    def release(self) -> None:
        """Drop this process's mapped pages (the OS page cache keeps them): resident memory stays flat.

        A page fault on a file mapping maps a whole neighbourhood (fault-around, large folios), so
        scattered small rows can map far more than they read; `read` therefore watches the process's
        resident file pages rather than counting bytes.
        """
        for m in self._maps.values():
            if getattr(m, "_mmap", None) is not None:
                m._mmap.madvise(mmap.MADV_DONTNEED)
        self._file_base = _file_pages()

    def bytes_per_view(self) -> dict[str, int]:
        """Stored bytes of one view of each feature array."""
        return {k: int(np.prod(self.shape(k))) * np.dtype(self.specs[f"features/{k}"][2]).itemsize
                for k in self.features}


def label_problems(fs: StoreReader) -> list[str]:
    """What is wrong with a store's labels, images and views, file or arrays (cheap: no feature byte is read)."""
    problems = []
    c, n, m = len(fs.vocab), len(fs.image_ids), len(fs.view_image)
    ids = fs.vocab.attribute_ids
    if len(np.unique(ids)) != c or not (np.diff(ids) > 0).all():
        problems.append("labels/attribute_id must be unique and ascending")
    if len(fs.vocab.names) != c or len(fs.vocab.kinds) != c:
        problems.append(f"labels/name and labels/kind need one entry per label ({c})")
    if set(fs.vocab.kinds) - {"culture", "tag"}:
        problems.append("labels/kind must be 'culture' or 'tag'")
    if fs.targets.shape != (n, c) or fs.targets.max(initial=0) > 1:
        problems.append(f"images/targets must be 0/1 of shape ({n}, {c}), got {fs.targets.shape}")
    if len(set(fs.image_ids)) != n:
        problems.append("images/id has duplicates")
    if len(fs.split) != n or set(fs.split) - set(SPLITS):
        problems.append(f"images/split needs one of {', '.join(SPLITS)} per image")
    if m and (fs.view_image.min() < 0 or fs.view_image.max() >= n):
        problems.append("views/image points outside images/")
    if len(fs.culture_only) != m:
        problems.append(f"views/culture_only has {len(fs.culture_only)} rows, expected {m}")
    return problems


def meta_problems(fs: FeatureStore) -> list[str]:
    """`label_problems`, then what is wrong with the file's view range and array sizes."""
    problems = label_problems(fs)
    m = len(fs.view_image)
    start, stop = fs.view_range
    if not 0 <= start <= stop <= m:
        problems.append(f"view_range {start}..{stop} does not fit {m} views")
    short = [k for k, (_, shape, _) in fs.specs.items() if shape[0] != stop - start]
    if "views/status" not in fs.specs:
        problems.append("dataset views/status is missing")
    elif short:
        problems.append(f"{short[0]} has {fs.specs[short[0]][1][0]} rows, expected {stop - start} (the views "
                        f"{start}..{stop})")
    else:
        problems += status_problems(fs.status)
    return problems


def status_problems(status: np.ndarray) -> list[str]:
    if set(np.unique(status)) - {PENDING, DONE, FAILED}:
        return ["views/status has values other than 0 (pending), 1 (done), 2 (failed)"]
    return []

def refuse_nonfinite(what: str, idx: np.ndarray, rows: np.ndarray, first_view: int = 0, hint: str = "") -> None:
    """Refuse feature rows read (of views `idx`) that hold NaN or inf, naming the first such view."""
    if not _finite(rows):
        bad = idx[[not _finite(row) for row in rows]]
        raise ImetError(f"{what} of view {int(bad[0]) + first_view} holds NaN or inf ({len(bad)} of the {len(idx)} "
                        f"views read){hint}")


def _finite(x: np.ndarray) -> bool:
    """No NaN or inf in x (float16 by its bits, a quarter of a copy's time; np.isfinite takes as long as one)."""
    if x.dtype == np.float16:
        return not x.size or int(np.max(x.view(np.uint16) & 0x7FFF)) < 0x7C00  # exponent all ones: inf or NaN
    return bool(np.isfinite(x).all())


def _file_pages() -> int:
    """Bytes of file-backed memory resident in this process (Linux; 0 elsewhere, where nothing is dropped)."""
    try:
        with open("/proc/self/statm") as f:
            shared = int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 0
    return shared * mmap.PAGESIZE
