"""`imet store compact`: a finished store's maps (and HOG) re-encoded through codecs fitted on a seeded sample
of its train views, into a new store; pooled vectors, plan and labels are copied unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from imet import store
from imet.codec import Codec, Request, codec_settings, fit, sample_views
from imet.errors import ImetError, ParamError
from imet.files import atomic_path, exclusive

log = logging.getLogger(__name__)


def compact_store(src: Path, out: Path, *, maps_dim: int | None = None, maps_dtype: str = Request.maps_dtype,
                  hog_dim: int | None = None, seed: int = 0) -> dict:
    """Re-encode the store `src` into a new store at `out` (atomically). Returns what was done: out, the
    codecs (feature -> (width, Codec)) and the bytes per view before and after."""
    src, out = Path(src), Path(out)
    request = Request(maps_dim, maps_dtype, hog_dim).check(owner="store compact")
    if not out.parent.is_dir():
        raise ImetError(f"{out}: directory {out.parent} does not exist")
    with exclusive(out):  # a second compaction to the same new store is refused while this one runs
        if out.exists() or out.resolve() == src.resolve():
            raise ImetError(f"{out}: exists; choose a new path (compact never overwrites a store)")
        return _compact(src, out, request, seed)


def _compact(src: Path, out: Path, request: Request, seed: int) -> dict:
    fs = store.FeatureStore(src)
    wanted = request.features()
    if not wanted:
        raise ParamError("store compact: give maps_dim, maps_dtype int8 or hog_dim", list(Request.params))
    for key in wanted:
        if key not in fs.features:
            raise ImetError(f"{src}: has no {key} to compact (it has {', '.join(fs.features)})")
        if key in fs.codecs:
            raise ImetError(f"{src}: its {key} are already compact ({fs.codecs[key].describe()}); compact the "
                            "full store")
    request.check({"channels": fs.shape("maps")[-1] if "maps" in fs.features else None,
                   "hog_length": fs.shape("hog")[-1] if "hog" in fs.features else None}, owner=str(src))
    train = fs.views("train")
    if not len(train):
        raise ImetError(f"{src}: has no finished train views to fit the codec on")
    pick = sample_views(train, seed)
    codecs = {}
    for key, (dim, dtype) in wanted.items():
        width = fs.shape(key)[-1]
        codecs[key] = fit(fs.read(key, pick).reshape(-1, width), dim, dtype, name=f"{key}_dim")
        log.info("%s: %s", key, codecs[key].describe(width))
    plan = store.read_plan(src)
    settings = {**plan.settings, **request.settings(), **codec_settings(codecs)}
    shapes = {k: (*fs.shape(k)[:-1], codecs[k].dim) if k in codecs else fs.shape(k) for k in fs.features}
    new = store.Plan(plan.vocab, plan.image_ids, plan.split, plan.targets, plan.views, settings, codecs)
    with atomic_path(out) as tmp:
        store.create(tmp, new, shapes)
        _copy_encoded(fs, store.Writer(tmp), codecs)
    return {"out": out, "codecs": {k: (fs.shape(k)[-1], c) for k, c in codecs.items()},
            "bytes_before": sum(fs.bytes_per_view().values()),
            "bytes_after": sum(store.FeatureStore(out).bytes_per_view().values())}


def _copy_encoded(fs: store.FeatureStore, writer: store.Writer, codecs: dict[str, Codec],
                  block_views: int = 64) -> None:
    """Every view of `fs` into `writer`, features through their codecs (failed views keep zero rows)."""
    status = fs.status
    encoders = {k: c.encoder() for k, c in codecs.items()}
    for lo in range(0, len(status), block_views):
        idx = np.arange(lo, min(lo + block_views, len(status)))
        values = {k: np.asarray(fs.array(k)[lo:idx[-1] + 1]) for k in ("box", "error") if f"views/{k}" in fs.specs}
        for key in fs.features:
            rows = fs.read(key, idx)
            if key in encoders:
                rows = encoders[key].encode(torch.from_numpy(rows)).numpy()  # one matmul per block
                rows[status[idx] != store.DONE] = 0
            values[key] = rows
        writer.write(lo, {**values, "status": status[idx]})
        fs.release()
    writer.close()
