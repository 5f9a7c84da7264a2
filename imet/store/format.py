"""The store file's format and writing side: layout constants, the plan, `create`, `Writer`, checksums.

Only the `imet.store` package knows the layout (docs/store.md describes it for people writing their own).
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
from imet.files import atomic_path, check_free_space, clean_stale
from imet.labels import Vocabulary

SCHEMA = "imet-store"
VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2
ERROR_LEN = 160  # bytes kept of a failed view's reason
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


def contiguous(group: h5py.Group, name: str, shape: tuple, dtype) -> None:
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
                contiguous(views, key, (stop - start, *tail), dtype)
            for key in sorted(shapes, key=FEATURES.index):
                contiguous(views, CHECKSUMS[key], (stop - start,), np.uint64)
            features = _group(f, "features")
            for key in sorted(shapes, key=FEATURES.index):  # one order, however shapes were listed
                contiguous(features, key, (stop - start, *shapes[key]), dtypes[key])
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
        with open(path, "rb") as g:
            if g.read(2).startswith((b"PK", b"{")):  # a torch archive (a zip) or JSON: imet's model files
                raise ImetError(f"{path}: a model file, not a store (imet model info looks into it)") from None
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


def read_plan(path: Path) -> Plan:
    """The plan a store or shard was made from (labels, images, views, settings)."""
    with _open(path) as f:
        vocab = Vocabulary(f["labels/attribute_id"][()].astype(np.int64), tuple(_strings(f["labels/name"])),
                           tuple(_strings(f["labels/kind"])))
        views = {k: f[f"views/{k}"][()] for k in f["views"] if k not in PER_VIEW}
        return Plan(vocab, np.array(_strings(f["images/id"]), dtype=object),
                    np.array(_strings(f["images/split"]), dtype=object), f["images/targets"][()], views,
                    json.loads(f.attrs.get("settings", "{}")), _read_codecs(f))


def _strings(d: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in d[()]]


def _hash_file_meta(f: h5py.File) -> str:
    """Fingerprint of a hand-written store that has none: its labels, images and views."""
    h = hashlib.sha256()
    h.update("\n".join(_strings(f["images/id"])).encode())
    for key in ("labels/attribute_id", "images/targets", "views/image"):
        h.update(np.ascontiguousarray(f[key][()]).tobytes())
    return h.hexdigest()[:16]
