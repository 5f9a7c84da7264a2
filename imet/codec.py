"""Compact features: a channel PCA (and int8 quantisation) fitted once on a seeded sample, kept in the store.

A `Codec` turns a feature's last axis of D values into K stored values: y = (x - mean) @ basis, the basis
being the K leading principal directions of the sample (columns by decreasing variance, each with its largest
entry positive, so the same sample gives the same bytes whatever LAPACK path found it). Stored as float16,
or as int8 with a per-channel scale (q = round(y / scale), scale = HEADROOM * max |y| of the sample / 127).
Readers return y (float32): the heads work in the projected space and take its width from the data.

`featurize --maps-dim/--maps-dtype/--hog-dim` fits the codec before the first batch and stores it; resume,
shards and merge reuse the stored one. `compact_store` re-encodes a store already written (`imet store compact`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imet.errors import ImetError
from imet.files import atomic_path, exclusive

DTYPES = ("float16", "int8")
HEADROOM = 2.0  # int8: the sample's largest |value| of a channel maps to 127 / HEADROOM (room for outliers)
SAMPLE = 256  # train views whose features (every map cell, or the HOG vector) fit a codec
ROWS = 8192  # sample rows per covariance update
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Codec:
    """How one feature's last axis is stored: projection (optional) then float16 or int8."""

    mean: np.ndarray | None  # (D,) float32 subtracted before projecting; None: no projection
    basis: np.ndarray | None  # (D, K) float32 orthonormal columns by decreasing variance; None: identity
    scale: np.ndarray | None  # (K,) float32 for int8 (stored value * scale = projected value); None: float
    dtype: str  # storage dtype of the projected values: float16, int8 or float32

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1] if self.basis is not None else len(self.scale))

    def sha256(self) -> str:
        """Identity of the codec's arrays (the settings record it, so models refuse another codec by name)."""
        h = hashlib.sha256(self.dtype.encode())
        for a in (self.mean, self.basis, self.scale):
            h.update(b"-" if a is None else np.ascontiguousarray(a, "<f4").tobytes())
        return h.hexdigest()

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in (("mean", self.mean), ("basis", self.basis), ("scale", self.scale)) if v is not None}

    def describe(self, width: int | None = None) -> str:
        proj = f"PCA {width or len(self.mean)} -> {self.dim}" if self.basis is not None else "no projection"
        return f"{proj}, stored {self.dtype}" + (" with a per-channel scale" if self.scale is not None else "")

    def encoder(self, device=None) -> Encoder:
        """The codec's arrays on a torch device (CPU by default), ready to encode batches there."""
        return Encoder(self, device)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """(..., D) features -> (..., K) stored values, on the CPU (the same arithmetic as on a device)."""
        import torch

        return self.encoder().encode(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """(..., K) stored values -> (..., K) float32 projected values (what readers return)."""
        out = np.asarray(stored, dtype=np.float32)
        return out * self.scale if self.scale is not None else out

    def reconstruct(self, stored: np.ndarray) -> np.ndarray:
        """(..., K) stored values -> (..., D) float32 approximation of the original features."""
        y = self.decode(stored)
        return y @ self.basis.T + self.mean if self.basis is not None else y


class Encoder:
    """A codec's arrays on one device: `encode` is one matmul (and a rounding for int8) per batch."""

    def __init__(self, codec: Codec, device=None):
        import torch  # only featurize and compaction encode: readers need no torch

        device = torch.device(device or "cpu")

        def put(a):
            return None if a is None else torch.tensor(np.asarray(a, np.float64), device=device)

        self.dtype = {"float16": torch.float16, "int8": torch.int8, "float32": torch.float32}[codec.dtype]
        self.basis, self.scale = put(codec.basis), put(codec.scale)
        self.offset = None if codec.basis is None else -(put(codec.mean) @ self.basis)  # (K,): -mean @ basis

    def encode(self, x):
        """(..., D) tensor -> (..., K) tensor in the storage dtype.

        In float64: a float32 BLAS call may sum in another order from one process to the next (seen on
        MKL: a resumed batch came out a few float32 ulps off), which float64 sums hide once rounded.
        """
        import torch

        y = x.double()
        if self.basis is not None:
            y = torch.addmm(self.offset, y.reshape(-1, y.shape[-1]), self.basis).reshape(*y.shape[:-1], -1)
        if self.scale is None:
            return y.to(self.dtype)
        return torch.clamp(torch.round(y / self.scale), -127, 127).to(torch.int8)


def fit(sample: np.ndarray, dim: int | None, dtype: str, *, what: str = "features") -> Codec:
    """A codec from (n, D) sample rows: the `dim` leading principal directions (None: no projection) and,
    for int8, per-channel scales from the projected sample. Rows are read in chunks (the sample may be float16)."""
    n, d = sample.shape
    if dtype not in DTYPES + ("float32",):
        raise ImetError(f"{what}: dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dim is not None and not 1 <= dim <= min(d, n - 1):
        raise ImetError(f"{what}: cannot keep {dim} principal components of {d} values from a sample of {n} rows "
                        f"(at most {min(d, n - 1)})")
    mean = basis = None
    if dim is not None:
        mean, basis = _principal(sample, dim)
    codec = Codec(mean, basis, None, dtype)
    if dtype != "int8":
        return codec
    peak = np.zeros(dim or d, np.float32)
    for lo in range(0, n, ROWS):
        y = Codec(mean, basis, None, "float32").encode(np.asarray(sample[lo:lo + ROWS], np.float32))
        peak = np.maximum(peak, np.abs(y).max(0))
    scale = np.where(peak > 0, peak * HEADROOM / 127, 1.0).astype(np.float32)
    return Codec(mean, basis, scale, dtype)


def _principal(sample: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), basis (D, dim)) of the sample: an SVD of the centred rows when they are fewer than the
    columns (HOG), else the eigenvectors of their covariance summed in float64 chunks (map cells)."""
    n, d = sample.shape
    mean = np.zeros(d)
    for lo in range(0, n, ROWS):
        mean += np.asarray(sample[lo:lo + ROWS], np.float64).sum(0)
    mean /= n
    if n <= d:
        _, _, vt = np.linalg.svd(np.asarray(sample, np.float64) - mean, full_matrices=False)
        basis = vt[:dim].T
    else:
        cov = np.zeros((d, d))
        for lo in range(0, n, ROWS):
            x = np.asarray(sample[lo:lo + ROWS], np.float64) - mean
            cov += x.T @ x
        _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
        basis = vectors[:, ::-1][:, :dim]
    sign = np.sign(basis[np.abs(basis).argmax(0), np.arange(dim)])
    return mean.astype(np.float32), (basis * sign).astype(np.float32)


def sample_views(views: np.ndarray, seed: int, n: int = SAMPLE) -> np.ndarray:
    """A fixed, seeded, sorted choice of up to `n` of `views`."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(views, min(n, len(views)), replace=False))


def compact_store(src: Path, out: Path, *, maps_dim: int | None = None, maps_dtype: str = "float16",
                  hog_dim: int | None = None, seed: int = 0) -> str:
    """Re-encode a finished store's maps (and HOG) through codecs fitted on a seeded sample of its train
    views, into a new store at `out` (atomically); pooled vectors, plan and labels are copied unchanged."""
    src, out = Path(src), Path(out)
    if not out.parent.is_dir():
        raise ImetError(f"{out}: --out directory {out.parent} does not exist")
    with exclusive(out):  # a second compaction to the same new store is refused while this one runs
        if out.exists() or out.resolve() == src.resolve():
            raise ImetError(f"{out}: --out exists; choose a new path (compact never overwrites a store)")
        return _compact(src, out, maps_dim, maps_dtype, hog_dim, seed)


def _compact(src: Path, out: Path, maps_dim: int | None, maps_dtype: str, hog_dim: int | None, seed: int) -> str:
    from imet import store

    fs = store.FeatureStore(src)
    wanted = {"maps": (maps_dim, maps_dtype)} if maps_dim is not None or maps_dtype != "float16" else {}
    if hog_dim is not None:
        wanted["hog"] = (hog_dim, "float32")
    if not wanted:
        raise ImetError("store compact: give --maps-dim, --maps-dtype int8 or --hog-dim")
    for key in wanted:
        if key not in fs.features:
            raise ImetError(f"{src}: has no {key} to compact (it has {', '.join(fs.features)})")
        if key in fs.codecs:
            raise ImetError(f"{src}: its {key} are already compact ({fs.codecs[key].describe()}); compact the "
                            "full store")
    train = fs.views("train")
    if not len(train):
        raise ImetError(f"{src}: has no finished train views to fit the codec on")
    pick = sample_views(train, seed)
    codecs = {}
    for key, (dim, dtype) in wanted.items():
        width = fs.shape(key)[-1]
        rows = fs.read(key, pick).reshape(-1, width)
        codecs[key] = fit(rows, dim, dtype, what=f"--{key}-dim {dim}")
        log.info("%s: %s", key, codecs[key].describe(width))
    plan = store.read_plan(src)
    settings = {**plan.settings, **codec_settings(codecs, {k: d for k, (d, _) in wanted.items()}, maps_dtype)}
    shapes = {k: (*fs.shape(k)[:-1], codecs[k].dim) if k in codecs else fs.shape(k) for k in fs.features}
    new = store.Plan(plan.vocab, plan.image_ids, plan.split, plan.targets, plan.views, settings, codecs)
    with atomic_path(out) as tmp:
        store.create(tmp, new, shapes)
        _copy_encoded(fs, store.Writer(tmp), codecs)
    before, after = fs.bytes_per_view(), store.FeatureStore(out).bytes_per_view()
    return (f"wrote {out}: " + "; ".join(f"{k} {c.describe(fs.shape(k)[-1])}" for k, c in codecs.items())
            + f"; features {sum(before.values()):,} -> {sum(after.values()):,} bytes per view "
            f"({sum(before.values()) / sum(after.values()):.1f}x smaller)")


def _copy_encoded(fs, writer, codecs: dict[str, Codec], block_views: int = 64) -> None:
    """Every view of `fs` into `writer`, features through their codecs (failed views keep zero rows)."""
    import torch

    from imet import store

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


def codec_settings(codecs: dict[str, Codec], dims: dict[str, int | None], maps_dtype: str) -> dict:
    """The settings that make a codec part of the feature identity: its requested form and its sha256."""
    out = {}
    if "maps" in codecs:
        out.update(maps_dim=dims.get("maps"), maps_dtype=maps_dtype)
    if "hog" in codecs:
        out["hog_dim"] = dims.get("hog")
    out.update({f"{k}_codec_sha256": c.sha256() for k, c in codecs.items()})
    return out

