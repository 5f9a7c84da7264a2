"""Whole-file store tools: `describe` (sizes and settings), `verify` (every check, every byte), `merge` (shards)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from imet.errors import ImetError
from imet.files import atomic_path, exclusive
from imet.labels import FULL_IMET_VIEWS, SPLITS
from imet.store.format import (
    CHECKSUMS,
    DONE,
    FAILED,
    LEGACY_CHECKSUM,
    PENDING,
    PROVENANCE,
    Writer,
    _structure_problems,
    create,
    read_header,
    read_plan,
    row_checksums,
    view_checksum,
)
from imet.store.reader import FeatureStore, meta_problems


def describe(path: Path) -> dict:
    """`imet store info`: what is in a store, as data: sizes, completeness, codecs and settings."""
    fs = FeatureStore(path, allow_incomplete=True)
    status = fs.status
    per_view = fs.bytes_per_view()
    features = {}
    for key in fs.features:
        _, shape, dtype = fs.specs[f"features/{key}"]
        features[key] = {"shape": tuple(shape[1:]), "dtype": np.dtype(dtype).name,
                         "bytes": int(np.prod(shape)) * np.dtype(dtype).itemsize, "bytes_per_view": per_view[key]}
    return {"path": fs.path, "disk_bytes": fs.path.stat().st_blocks * 512, "fingerprint": fs.fingerprint,
            "labels": len(fs.vocab), "cultures": int(fs.vocab.culture.sum()),
            "images": {s: int((fs.split == s).sum()) for s in SPLITS if (fs.split == s).any()},
            "views": len(fs.view_image), "view_range": fs.view_range,
            "status": {name: int((status == code).sum()) for name, code in
                       (("done", DONE), ("failed", FAILED), ("pending", PENDING))},
            "features": features, "full_imet_views": FULL_IMET_VIEWS,
            "codecs": {key: codec.describe() for key, codec in fs.codecs.items()}, "settings": fs.settings}


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
            raise ImetError(f"{out}: exists; merge writes a new store (remove it or choose another path)")
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
