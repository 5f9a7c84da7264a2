"""The feature store: one HDF5 file, the contract between featurize and the heads.

Only this module knows the layout (docs/store.md describes it for people writing their own).
Big per-view arrays are contiguous, uncompressed and allocated at creation, so their byte offsets are
known at once: the featurizer writes them in place through np.memmap (no HDF5 metadata changes after
creation, hence nothing to corrupt when a run is killed) and readers map them without copying.
A file may cover only a range of the views (a shard); a full store covers them all.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from imet.codec import Codec
from imet.errors import ImetError
from imet.files import atomic_path, check_free_space, clean_stale, exclusive
from imet.labels import SPLITS, Vocabulary

SCHEMA = "imet-store"
VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
ERROR_LEN = 160  # bytes kept of a failed view's reason
BIG_ROW = 64 << 10  # rows at least this big are read one by one in file order
CHECK_BYTES = 256 << 10  # bytes read between two looks at the process's resident file pages
FEATURES = ("maps", "pooled", "hog")
FEATURE_DTYPES = {"maps": np.float16, "pooled": np.float32, "hog": np.float32}
# Per-view arrays written by the featurizer (mappable, one row per view of the file's range).
WRITTEN = {"status": ((), np.uint8), "box": ((4,), np.float32), "error": ((), f"S{ERROR_LEN}")}
# checksum_<feature>: the view's row of that feature as little-endian uint64 words (zero-padded), summed modulo
# 2**64 (`row_checksums`), written with its batch; every read checks it. A flipped bit, a changed word, bytes of
# another file always change it; it costs what a copy of the bytes costs (crc32 cost 10x more).
CHECKSUMS = {key: f"checksum_{key}" for key in FEATURES}
LEGACY_CHECKSUM = "checksum"  # stores written before per-feature checksums: one crc32 over all features of a view
PER_VIEW = (*WRITTEN, *CHECKSUMS.values(), LEGACY_CHECKSUM)  # written per view, not part of the plan
REQUIRED = ("labels/attribute_id", "labels/name", "labels/kind", "images/id", "images/split", "images/targets",
            "views/image", "views/status")
_STR = h5py.string_dtype()
# Settings recorded for people, not compared on resume or merge and not part of the fingerprint.
PROVENANCE = ("imet_version", "torch_version", "data_dir")
# Settings that decide which images and views a store holds, or how they were batched, but not the bytes
# of one view's features. Every other setting is the store's feature identity (see `identity`).
PLAN_KEYS = ("limit", "split_seed", "min_label_count", "splits", "batch_size")
CODEC_ARRAYS = ("mean", "basis", "scale")  # codec/<feature>/<array>: how a compact feature was encoded
FULL_IMET_VIEWS = (109_237 + 7_443) * 6  # iMet 2019 train + stage-1 test images, six views each (700,080)


def feature_dtypes(settings: dict) -> dict[str, np.dtype]:
    """The stored dtype of each feature for these settings (int8 maps with `maps_dtype` int8)."""
    return {**FEATURE_DTYPES, **({"maps": np.int8} if settings.get("maps_dtype") == "int8" else {})}


@dataclass(frozen=True)
class Plan:
    """What a store is made of before any pixel is read: labels, images, views and settings."""

    vocab: Vocabulary
    image_ids: np.ndarray  # (N,) str
    split: np.ndarray  # (N,) str
    targets: np.ndarray  # (N, C) uint8
    views: dict[str, np.ndarray]  # image (M,) plus optional crop, offset, flip, jitter, culture_only
    settings: dict
    codecs: dict[str, Codec] = field(default_factory=dict)  # compact features: how they are encoded

    @property
    def n_views(self) -> int:
        return len(self.views["image"])

    def fingerprint(self, shapes: dict[str, tuple]) -> str:
        """A hash of everything that decides the store's content (not of the feature bytes)."""
        h = hashlib.sha256()
        compared = {k: v for k, v in self.settings.items() if k not in PROVENANCE}
        h.update(json.dumps(compared, sort_keys=True).encode())
        h.update(json.dumps({k: list(v) for k, v in sorted(shapes.items())}).encode())
        h.update(self.vocab.attribute_ids.astype("<i8").tobytes())
        h.update("\n".join(self.image_ids).encode())
        h.update("\n".join(self.split).encode())
        h.update(np.ascontiguousarray(self.targets, dtype=np.uint8).tobytes())
        for key in sorted(self.views):
            h.update(key.encode() + np.ascontiguousarray(self.views[key]).tobytes())
        return h.hexdigest()[:16]


def identity(settings: dict) -> dict:
    """The settings that decide a view's feature bytes: all of them but PROVENANCE and PLAN_KEYS.

    A new setting is part of the identity unless it is added to one of those lists. Weights are known
    by their sha256 when they have one, so torchvision's cached file and the same file given as a path
    are the same weights. A hand-written store's identity is its `settings` attribute as written.
    """
    out = {k: v for k, v in settings.items() if k not in PROVENANCE + PLAN_KEYS}
    weights = out.get("weights")
    if isinstance(weights, dict) and "sha256" in weights:
        out["weights"] = {"sha256": weights["sha256"]}
    return out


def identity_diff(model: dict, store: dict, features: tuple[str, ...]) -> list[str]:
    """Identity settings on which a model (fitted on `model`) and a store differ, sorted.

    A setting named after a feature the model does not read (`hog`, `hog_impl` for a pooled-only
    model; `maps`) is not compared: its bytes never reach the model.
    """
    def read_by_model(key: str) -> bool:
        owner = next((f for f in FEATURES if key == f or key.startswith(f + "_")), None)
        return owner is None or owner in features

    a, b = identity(model), identity(store)
    return sorted(k for k in a.keys() | b.keys() if read_by_model(k) and a.get(k) != b.get(k))


def _contiguous(group: h5py.Group, name: str, shape: tuple, dtype) -> None:
    """An uncompressed contiguous dataset allocated now, never filled (sparse zeros on disk)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # no timestamps: the same store is the same bytes
    space = h5py.h5s.create_simple(tuple(shape))
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl).close()


def array_sizes(shapes: dict[str, tuple], settings: dict | None = None) -> dict[str, tuple[tuple, str, int]]:
    """Per-view (shape, dtype, bytes) of every array `create` allocates for these feature shapes."""
    dtypes = feature_dtypes(settings or {})
    out = {f"views/{k}": (tail, dtype) for k, (tail, dtype) in WRITTEN.items()}
    out.update({f"views/{CHECKSUMS[k]}": ((), np.uint64) for k in shapes})
    out.update({f"features/{k}": (tuple(tail), dtypes[k]) for k, tail in shapes.items()})
    return {k: (tail, dtype, int(np.prod(tail, dtype=np.int64)) * np.dtype(dtype).itemsize)
            for k, (tail, dtype) in out.items()}


def _group(f: h5py.File, name: str) -> h5py.Group:
    """A group without timestamps (so equal stores are equal files)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    h5py.h5g.create(f.id, name.encode(), gcpl=gcpl).close()
    return f[name]


def create(path: Path, plan: Plan, shapes: dict[str, tuple], view_range: tuple[int, int] | None = None,
           fingerprint: str | None = None) -> None:
    """Write a new store (or shard covering `view_range`) with every array allocated, atomically.

    The file holds no timestamps, so the same plan and features give the same bytes (a resumed, a merged
    and an uninterrupted run alike).
    """
    path = Path(path)
    start, stop = view_range or (0, plan.n_views)
    clean_stale(path)
    dtypes = feature_dtypes(plan.settings)
    check_free_space(path, sum((stop - start) * size for _, _, size in array_sizes(shapes, plan.settings).values()),
                     new_file=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs.update(schema=SCHEMA, schema_version=VERSION,
                           settings=json.dumps(plan.settings, sort_keys=True), view_range=[start, stop],
                           fingerprint=fingerprint or plan.fingerprint(shapes))
            labels = _group(f, "labels")
            labels.create_dataset("attribute_id", data=plan.vocab.attribute_ids.astype(np.int64), track_times=False)
            labels.create_dataset("name", data=list(plan.vocab.names), dtype=_STR, track_times=False)
            labels.create_dataset("kind", data=list(plan.vocab.kinds), dtype=_STR, track_times=False)
            images = _group(f, "images")
            images.create_dataset("id", data=list(plan.image_ids), dtype=_STR, track_times=False)
            images.create_dataset("split", data=list(plan.split), dtype=_STR, track_times=False)
            images.create_dataset("targets", data=plan.targets.astype(np.uint8), track_times=False)
            views = _group(f, "views")
            for key in sorted(plan.views):  # one order, however the plan was read
                views.create_dataset(key, data=plan.views[key], track_times=False)
            for key, (tail, dtype) in WRITTEN.items():
                _contiguous(views, key, (stop - start, *tail), dtype)
            for key in sorted(shapes, key=FEATURES.index):
                _contiguous(views, CHECKSUMS[key], (stop - start,), np.uint64)
            features = _group(f, "features")
            for key in sorted(shapes, key=FEATURES.index):  # one order, however shapes were listed
                _contiguous(features, key, (stop - start, *shapes[key]), dtypes[key])
            if plan.codecs:
                codec = _group(f, "codec")
                for key in sorted(plan.codecs, key=FEATURES.index):
                    group = _group(codec, key)
                    for name, array in plan.codecs[key].arrays().items():
                        group.create_dataset(name, data=np.asarray(array, np.float32), track_times=False)


def _specs(f: h5py.File) -> dict[str, tuple[int, tuple, np.dtype]]:
    """(offset, shape, dtype) of every mappable per-view array, keyed 'views/x' or 'features/x'."""
    out = {}
    size = Path(f.filename).stat().st_size
    for group, names in (("views", (*WRITTEN, *CHECKSUMS.values(), LEGACY_CHECKSUM)), ("features", FEATURES)):
        for name in names:
            key = f"{group}/{name}"
            if key not in f:
                continue
            d = f[key]
            offset = d.id.get_offset()
            if d.chunks is not None or d.compression is not None or offset is None:
                raise ImetError(
                    f"{f.filename}: dataset {key} cannot be memory-mapped (it must be contiguous, "
                    "uncompressed and written); see docs/store.md"
                )
            if offset + d.id.get_storage_size() > size or d.id.get_storage_size() != d.size * d.dtype.itemsize:
                raise ImetError(f"{f.filename}: dataset {key} lies outside the file (offset {offset}); the file is "
                                "truncated or damaged")
            out[key] = (offset, d.shape, d.dtype)
    return out


def foreign_storage(f: h5py.File) -> list[str]:
    """Objects of an HDF5 file whose bytes are not where a reader of this file would look: soft and external
    links, virtual datasets, datasets stored in external files (a memory map of this file at their offset
    would read another file's bytes)."""
    found = []

    def link(name: str, info) -> None:
        if not isinstance(info, h5py.HardLink):
            found.append(f"{name} is {'a soft' if isinstance(info, h5py.SoftLink) else 'an external'} link")

    def obj(name: str, item) -> None:
        if isinstance(item, h5py.Dataset) and (item.is_virtual or item.id.get_create_plist().get_external_count()):
            found.append(f"{name} is {'a virtual' if item.is_virtual else 'an externally stored'} dataset")

    f.visititems_links(link)
    f.visititems(obj)
    return found


def _read_codecs(f: h5py.File) -> dict[str, Codec]:
    """The codec of each compact feature (codec/<feature>/{mean, basis, scale}), checked against its array,
    against the sha256 the settings record for it, and for finite values and positive scales."""
    out = {}
    try:
        settings = json.loads(f.attrs.get("settings", "{}"))
    except (ValueError, TypeError, RecursionError):
        settings = {}
    for key in sorted(f.get("codec", {}), key=lambda k: FEATURES.index(k) if k in FEATURES else -1):
        if key not in FEATURES or f"features/{key}" not in f:
            raise ImetError(f"{f.filename}: codec/{key} describes no feature array of the store")
        arrays = {name: f[f"codec/{key}/{name}"][()].astype(np.float32) for name in CODEC_ARRAYS
                  if name in f[f"codec/{key}"]}
        width = f[f"features/{key}"].shape[-1]
        codec = Codec(arrays.get("mean"), arrays.get("basis"), arrays.get("scale"), f[f"features/{key}"].dtype.name)
        if (codec.basis is None) != (codec.mean is None) or (codec.basis is not None and (
                codec.basis.ndim != 2 or codec.mean.shape != codec.basis.shape[:1])) or codec.dim != width or (
                codec.scale is not None and codec.scale.shape != (width,)):
            raise ImetError(f"{f.filename}: codec/{key} does not fit features/{key} of width {width} (mean (D,) "
                            "and basis (D, K) go together, K and scale (K,) are the feature's last axis)")
        if not all(np.isfinite(a).all() for a in codec.arrays().values()) or (
                codec.scale is not None and not (codec.scale > 0).all()):
            raise ImetError(f"{f.filename}: codec/{key} holds NaN, inf or a scale that is not positive (damaged "
                            "store)")
        recorded = settings.get(f"{key}_codec_sha256") if isinstance(settings, dict) else None
        if recorded is not None and codec.sha256() != recorded:
            raise ImetError(f"{f.filename}: codec/{key} differs from the codec its settings record "
                            f"({key}_codec_sha256): the store is damaged, see `imet store verify`")
        out[key] = codec
    for key in FEATURES:
        dtype = f[f"features/{key}"].dtype if f"features/{key}" in f else np.dtype(np.float32)
        if dtype.kind in "iu" and (key not in out or out[key].scale is None):
            raise ImetError(f"{f.filename}: features/{key} is {dtype.name} but codec/{key}/scale is missing "
                            "(integer features need a per-channel scale; see docs/store.md)")
    return out


def _open(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise ImetError(f"{path}: store not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ImetError(f"{path}: not a readable HDF5 file ({e})") from None
    if f.attrs.get("schema") != SCHEMA:
        f.close()
        raise ImetError(f"{path}: not an imet store (schema attribute {SCHEMA!r} missing)")
    if str(f.attrs.get("schema_version", -1)) != str(VERSION):
        version = f.attrs.get("schema_version")
        f.close()
        raise ImetError(f"{path}: store schema version {version} is not supported (this imet reads {VERSION})")
    problems = foreign_storage(f) or _structure_problems(f)
    if problems:
        f.close()
        raise ImetError(f"{path}: damaged store: {'; '.join(problems)} (see `imet store verify`)")
    return f


def _structure_problems(f: h5py.File) -> list[str]:
    """Missing required datasets and unreadable attributes: what stops a store from being read at all."""
    problems = [f"dataset {k} is missing" for k in REQUIRED if k not in f]
    try:
        settings = json.loads(f.attrs.get("settings", "{}"))
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
    except (ValueError, TypeError, RecursionError) as e:
        problems.append(f"attribute settings is not valid JSON ({type(e).__name__}: {str(e)[:80]})")
    if "view_range" in f.attrs:
        try:
            start, stop = (int(x) for x in f.attrs["view_range"])
        except (ValueError, TypeError):
            problems.append(f"attribute view_range must be [start, stop], got {f.attrs['view_range']!r}")
    return problems


class Writer:
    """Writes features of a view range in place through np.memmap; status last, so a kill loses nothing done.

    Every RELEASE_BYTES written, the arrays are flushed and the process's mapped pages dropped (the page cache
    keeps them), so resident memory stays flat however large the store.
    """

    RELEASE_BYTES = 256 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        with _open(self.path) as f:
            self.start, self.stop = (int(x) for x in f.attrs["view_range"])
            specs = _specs(f)
        logical = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in specs.values())
        check_free_space(self.path, logical - self.path.stat().st_blocks * 512)  # no SIGBUS on a full disk
        self.arrays = {
            key.split("/")[1]: np.memmap(self.path, dtype=dtype, mode="r+", offset=offset, shape=shape)
            for key, (offset, shape, dtype) in specs.items()
        }
        self._unreleased = 0

    def status(self) -> np.ndarray:
        return np.array(self.arrays["status"])

    def write(self, start: int, values: dict[str, np.ndarray], checksum: bool = True) -> None:
        """Rows start.. (global view indices) of every array in `values`; give 'status' to mark them.

        With 'status' (and `checksum`), the crc32 of each marked view's feature rows is written before it.
        """
        lo = start - self.start
        for key, value in values.items():
            if key != "status":
                self.arrays[key][lo:lo + len(value)] = value
        if "status" in values and checksum:
            rows = slice(lo, lo + len(values["status"]))
            for key in FEATURES:
                if CHECKSUMS[key] in self.arrays:
                    self.arrays[CHECKSUMS[key]][rows] = row_checksums(self.arrays[key][rows])
            if LEGACY_CHECKSUM in self.arrays:  # resuming a store written before per-feature checksums
                self.arrays[LEGACY_CHECKSUM][rows] = [view_checksum(self.arrays, r) for r in range(lo, rows.stop)]
        if "status" in values:
            self.arrays["status"][lo:lo + len(values["status"])] = values["status"]
        self._unreleased += sum(np.asarray(v).nbytes for v in values.values())
        if self._unreleased >= self.RELEASE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Feature bytes reach the file before the status that vouches for them; then the mapped pages are
        dropped from this process (MADV_DONTNEED on a shared file mapping keeps the data)."""
        for key, array in self.arrays.items():
            if key != "status":
                array.flush()
        self.arrays["status"].flush()
        for array in self.arrays.values():
            if getattr(array, "_mmap", None) is not None:
                array._mmap.madvise(mmap.MADV_DONTNEED)
        self._unreleased = 0

    def close(self) -> None:
        self.flush()
        self.arrays.clear()


def write_arrays(path: Path, plan: Plan, shapes: dict[str, tuple],
                 chunks: Iterable[tuple[int, dict[str, np.ndarray]]]) -> Path:
    """A store of `plan` at `path` with features given as arrays: each chunk is (first view, {feature: rows}),
    its views marked done. For stores made without a backbone (tests, planted stores, benchmarks)."""
    create(path, plan, shapes)
    writer = Writer(path)
    try:
        for start, values in chunks:
            n = len(next(iter(values.values())))
            writer.write(start, {**values, "status": np.full(n, DONE, np.uint8)})
    finally:
        writer.close()
    return Path(path)


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """(n,) uint64: each of n rows of one feature, as stored, read as little-endian uint64 words (the last one
    zero-padded) and summed modulo 2**64 (what `views/checksum_<feature>` holds)."""
    if not len(rows):
        return np.zeros(0, np.uint64)
    data = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)  # (n, bytes)
    if data.shape[1] % 8:
        data = np.pad(data, ((0, 0), (0, -data.shape[1] % 8)))
    return data.view("<u8").sum(axis=1, dtype=np.uint64)


def view_checksum(arrays: dict[str, np.ndarray], row: int) -> int:
    """crc32 of one view's feature rows, features in FEATURES order (what a legacy `views/checksum` holds)."""
    crc = 0
    for key in FEATURES:
        if key in arrays:
            crc = zlib.crc32(np.ascontiguousarray(arrays[key][row]).data, crc)
    return crc


def read_header(path: Path) -> dict:
    """Settings, fingerprint, view range and feature shapes of a store or shard, without mapping it."""
    with _open(path) as f:
        return {
            "settings": json.loads(f.attrs.get("settings", "{}")),
            "fingerprint": str(f.attrs.get("fingerprint", "")),
            "view_range": tuple(int(x) for x in f.attrs.get("view_range", (0, len(f["views/image"])))),
            "n_views": len(f["views/image"]),
            "shapes": {k: f[f"features/{k}"].shape[1:] for k in FEATURES if f"features/{k}" in f},
            "codecs": _read_codecs(f),
        }


def recorded_data_dir(path: Path) -> Path | None:
    """The data dir a store was featurized from (its `data_dir` setting), or None when it records none or
    cannot be read (the command that reads the store then says why)."""
    try:
        value = read_header(path)["settings"].get("data_dir")
    except (ImetError, OSError):
        return None
    return Path(value) if isinstance(value, str) and value else None


class FeatureStore:
    """Read-only view of a finished store: metadata in memory, features as np.memmap (no copy).

    Safe to hand to DataLoader workers: pickling keeps only the path and the array specs, and each
    process maps the file again on first use.
    """

    RELEASE_BYTES = 64 << 20  # drop the store's mapped pages when the process holds this much more

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
    def pooled(self) -> np.memmap:
        return self.array("pooled")

    @property
    def maps(self) -> np.memmap:
        return self.array("maps")

    @property
    def hog(self) -> np.memmap:
        return self.array("hog")

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
        elif arr[:1].nbytes >= BIG_ROW:
            out = np.empty((len(idx), *arr.shape[1:]), dtype=arr.dtype)
            for j in np.argsort(idx, kind="stable"):
                out[j] = arr[idx[j]]
        else:
            out = arr[idx]
        if key in FEATURES and not _finite(out):
            bad = idx[[not _finite(row) for row in out]]
            raise ImetError(f"{self.path}: features/{key} of view {int(bad[0]) + self.view_range[0]} holds NaN or "
                            f"inf ({len(bad)} of the {len(idx)} views read); the store is damaged, see "
                            "`imet store verify`")
        if key in FEATURES and VERIFY_READS:
            self._check_rows(key, idx, out)
        codec = self.codecs.get(key)
        if codec is not None and codec.scale is not None:
            out = codec.decode(out)
        self._unchecked += out.nbytes
        if self._unchecked >= CHECK_BYTES:
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

    # -- labels and splits ---------------------------------------------------------------------
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

    def bytes_per_view(self) -> dict[str, int]:
        """Stored bytes of one view of each feature array."""
        return {k: int(np.prod(self.shape(k))) * np.dtype(self.specs[f"features/{k}"][2]).itemsize
                for k in self.features}

    def layout(self) -> dict[str, list[int]]:
        """Per-view shapes of the feature arrays: what a model made for this store expects."""
        return {k: list(self.shape(k)) for k in self.features}


VERIFY_READS = True  # FeatureStore.read checks checksums (benchmarks/bench_checksum.py turns it off to compare)


def meta_problems(fs: FeatureStore) -> list[str]:
    """What is wrong with a store's labels, images and view layout (cheap: no feature byte is read)."""
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
    start, stop = fs.view_range
    if not 0 <= start <= stop <= m:
        problems.append(f"view_range {start}..{stop} does not fit {m} views")
    short = [k for k, (_, shape, _) in fs.specs.items() if shape[0] != stop - start]
    if "views/status" not in fs.specs:
        problems.append("dataset views/status is missing")
    elif short:
        problems.append(f"{short[0]} has {fs.specs[short[0]][1][0]} rows, expected {stop - start} (the views "
                        f"{start}..{stop})")
    elif set(np.unique(fs.status)) - {PENDING, DONE, FAILED}:
        problems.append("views/status has values other than 0 (pending), 1 (done), 2 (failed)")
    return problems


def _finite(x: np.ndarray) -> bool:
    """No NaN or inf in x (float16 by its bits, a quarter of a copy's time; np.isfinite takes as long as one)."""
    if x.dtype == np.float16:
        return not x.size or int(np.max(x.view(np.uint16) & 0x7FFF)) < 0x7C00  # exponent all ones: inf or NaN
    return bool(np.isfinite(x).all())


class ArrayStore(FeatureStore):
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
        status = np.full(m, DONE, np.uint8) if status is None else np.asarray(status, np.uint8)
        self.view_range, self.fingerprint, self.plan_arrays = (0, m), "", {}
        self._maps = {f"features/{k}": v for k, v in features.items()} | {"views/status": status}
        self.specs = {key: (0, a.shape, a.dtype) for key, a in self._maps.items()}
        self._file_base, self._unchecked = _file_pages(), 0
        problems = meta_problems(self)  # what a store file is refused for, the arrays are refused for
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

    def __getstate__(self) -> dict:
        return self.__dict__.copy()  # the arrays travel with the store (there is no file to map again)

    def release(self) -> None:
        """Nothing to drop: the arrays are the caller's."""


def _file_pages() -> int:
    """Bytes of file-backed memory resident in this process (Linux; 0 elsewhere, where nothing is dropped)."""
    try:
        with open("/proc/self/statm") as f:
            shared = int(f.read().split()[2])
    except (OSError, IndexError, ValueError):
        return 0
    return shared * mmap.PAGESIZE


def _strings(d: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in d[()]]


def _hash_file_meta(f: h5py.File) -> str:
    """Fingerprint of a hand-written store that has none: its labels, images and views."""
    h = hashlib.sha256()
    h.update("\n".join(_strings(f["images/id"])).encode())
    for key in ("labels/attribute_id", "images/targets", "views/image"):
        h.update(np.ascontiguousarray(f[key][()]).tobytes())
    return h.hexdigest()[:16]


def describe(path: Path) -> str:
    """`imet store info`: what is in a store, its sizes, completeness and settings."""
    fs = FeatureStore(path, allow_incomplete=True)
    status = fs.status
    start, stop = fs.view_range
    n = len(fs.view_image)
    lines = [f"store        {fs.path} ({fs.path.stat().st_blocks * 512 / 2**20:.1f} MiB on disk)",
             f"fingerprint  {fs.fingerprint}",
             f"labels       {len(fs.vocab)} ({int(fs.vocab.culture.sum())} culture)",
             "images       " + ", ".join(f"{s} {int((fs.split == s).sum())}" for s in SPLITS if (fs.split == s).any()),
             f"views        {n}" + (f" (this shard: {start}..{stop})" if (start, stop) != (0, n) else ""),
             f"status       done {int((status == DONE).sum())}, failed {int((status == FAILED).sum())}, "
             f"pending {int((status == PENDING).sum())}" + ("  (complete)" if not (status == PENDING).any()
                                                              else "  (INCOMPLETE: rerun imet featurize)")]
    per_view = fs.bytes_per_view()
    for key in fs.features:
        offset, shape, dtype = fs.specs[f"features/{key}"]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        lines.append(f"features     {key:<7} {tuple(shape[1:])} {np.dtype(dtype).name}, {size / 2**20:.1f} MiB, "
                     f"{per_view[key]:,} B/view, {human_bytes(per_view[key] * FULL_IMET_VIEWS)} at full iMet")
    total = sum(per_view.values())
    lines.append(f"full iMet    {human_bytes(total * FULL_IMET_VIEWS)} of features at {total:,} B/view for "
                 f"{FULL_IMET_VIEWS:,} views (train + stage-1 test images, six views each)")
    for key, codec in fs.codecs.items():
        lines.append(f"codec        {key:<7} {codec.describe()}")
    for key, value in fs.settings.items():
        lines.append(f"setting      {key} = {json.dumps(value)}")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def verify(path: Path) -> list[str]:
    """`imet store verify`: problems found in a store (an empty list means it is sound)."""
    try:
        with h5py.File(path, "r") as f:
            structure = _structure_problems(f)
        if structure:
            return [f"{path}: {p}" for p in structure]
    except OSError:
        pass  # FeatureStore names the problem
    try:
        fs = FeatureStore(path, allow_incomplete=True)
    except ImetError as e:
        return [str(e)]
    problems = meta_problems(fs)
    if problems:
        return problems
    status = fs.status
    if (status == PENDING).any():
        problems.append(f"{int((status == PENDING).sum())} views pending: the store is incomplete")
    if not fs.features:
        problems.append("no feature arrays under features/")
    for key in fs.features:
        problems += _check_feature(fs, key, status)
    return problems + _check_checksums(fs, status)


def _check_checksums(fs: FeatureStore, status: np.ndarray) -> list[str]:
    """Finished views whose feature bytes no longer match the crc32 written with them."""
    rows = np.flatnonzero(status != PENDING)
    bad = set()
    for key in fs.features:
        if f"views/{CHECKSUMS[key]}" not in fs.specs:
            continue
        stored, arr = fs.array(CHECKSUMS[key]), fs.array(key)
        step = max(1, (64 << 20) // max(arr[0].nbytes, 1))
        for lo in range(0, len(rows), step):
            part = rows[lo:lo + step]
            bad.update(part[row_checksums(np.asarray(arr[part])) != stored[part]].tolist())
            fs.release()
    if f"views/{LEGACY_CHECKSUM}" in fs.specs:
        stored, arrays = fs.array(LEGACY_CHECKSUM), {k: fs.array(k) for k in fs.features}
        for row in rows:
            if view_checksum(arrays, row) != int(stored[row]):
                bad.add(int(row))
            if row % 256 == 255:
                fs.release()
    if bad:
        views = sorted(int(r) + fs.view_range[0] for r in bad)
        return [f"features of {len(views)} views do not match their checksum (corrupted bytes; views {views[:5]})"]
    return []


def _check_feature(fs: FeatureStore, key: str, status: np.ndarray) -> list[str]:
    arr = fs.array(key)
    if len(arr) != len(status):
        return [f"features/{key} has {len(arr)} rows, expected {len(status)}"]
    done = status == DONE
    bad = []
    step = max(1, (64 << 20) // max(arr[0].nbytes, 1))
    for lo in range(0, len(arr), step):
        block = np.asarray(arr[lo:lo + step])[done[lo:lo + step]]
        finite = np.isfinite(block.reshape(len(block), -1)).all(1)
        bad += (lo + np.flatnonzero(done[lo:lo + step])[~finite]).tolist()
        fs.release()
    if bad:
        return [f"features/{key}: {len(bad)} done views hold NaN or inf (first rows {bad[:5]})"]
    return []


def read_plan(path: Path) -> Plan:
    """The plan a store or shard was made from (labels, images, views, settings)."""
    with _open(path) as f:
        vocab = Vocabulary(f["labels/attribute_id"][()].astype(np.int64), tuple(_strings(f["labels/name"])),
                           tuple(_strings(f["labels/kind"])))
        views = {k: f[f"views/{k}"][()] for k in f["views"] if k not in PER_VIEW}
        return Plan(vocab, np.array(_strings(f["images/id"]), dtype=object),
                    np.array(_strings(f["images/split"]), dtype=object), f["images/targets"][()], views,
                    json.loads(f.attrs.get("settings", "{}")), _read_codecs(f))


def merge(shards: list[Path], out: Path) -> None:
    """Assemble finished shards into one contiguous store at `out`, atomically.

    Refuses shards whose settings (PROVENANCE aside) or plans differ, that overlap, leave gaps or are
    unfinished. A crash leaves the shards intact and nothing at `out`.
    """
    if not shards:
        raise ImetError("store merge: no shards given")
    headers = [read_header(p) for p in shards]
    first = headers[0]
    for path, h in zip(shards, headers, strict=True):
        a = {k: v for k, v in h["settings"].items() if k not in PROVENANCE}
        b = {k: v for k, v in first["settings"].items() if k not in PROVENANCE}
        if a != b or h["shapes"] != first["shapes"] or h["n_views"] != first["n_views"]:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)) or ["feature shapes"]
            raise ImetError(f"{path}: settings differ from {shards[0]} ({', '.join(diff)})")
        if h["fingerprint"] != first["fingerprint"]:
            raise ImetError(f"{path}: made from other images, labels or views than {shards[0]}")
    _check_cover(shards, [h["view_range"] for h in headers], first["n_views"])
    for path in shards:
        pending = int((FeatureStore(path, allow_incomplete=True).status == PENDING).sum())
        if pending:
            raise ImetError(f"{path}: shard is unfinished ({pending} views pending); rerun its featurize command")
    plan = read_plan(shards[0])
    with exclusive(out):  # a second merge into the same new store is refused while this one runs
        if Path(out).exists():
            raise ImetError(f"{out}: exists; merge writes a new store (remove it or choose another --out)")
        with atomic_path(out) as tmp:
            create(tmp, plan, first["shapes"], fingerprint=first["fingerprint"])
            writer = Writer(tmp)
            for path in sorted(shards, key=lambda p: read_header(p)["view_range"][0]):
                _copy_shard(FeatureStore(path, allow_incomplete=True), writer)
            writer.close()


def _check_cover(shards: list[Path], ranges: list[tuple[int, int]], n_views: int) -> None:
    order = np.argsort([r[0] for r in ranges], kind="stable")
    expected = 0
    for i in order:
        start, stop = ranges[i]
        if start < expected:
            raise ImetError(f"{shards[i]}: views {start}..{stop} overlap another shard")
        if start > expected:
            raise ImetError(f"{shards[i]}: starts at view {start}; views {expected}..{start} are in no shard")
        expected = stop
    if expected != n_views:
        raise ImetError(f"views {expected}..{n_views} are in no shard (missing shard files?)")


def _copy_shard(shard: FeatureStore, writer: Writer, block_bytes: int = 64 << 20) -> None:
    start, stop = shard.view_range
    have = {k.split("/")[1] for k in shard.specs}
    copied = all(k in have for k in writer.arrays if k in CHECKSUMS.values())
    if not copied and LEGACY_CHECKSUM in have:  # its checksums will be computed again: check the old ones first
        problems = _check_checksums(shard, shard.status)
        if problems:
            raise ImetError(f"{shard.path}: {problems[0]}; featurize that shard again")
    keys = [k for k in writer.arrays if k != "status" and k in have] + ["status"]
    for key in keys:  # checksums are copied, not recomputed (a corrupted shard stays detectable)...
        src = shard.array(key)
        step = max(1, block_bytes // max(src[:1].nbytes, 1))
        for lo in range(0, stop - start, step):
            writer.write(start + lo, {key: np.asarray(src[lo:lo + step])}, checksum=not copied)
            shard.release()  # ...unless the shard has none (written by hand or by an older imet)
