"""Compact features: a channel PCA (and int8 quantisation) fitted once on a seeded sample, kept in the store.

A `Codec` turns a feature's last axis of D values into K stored values: y = (x - mean) @ basis, the basis
being the K leading principal directions of the sample (columns by decreasing variance, each with its largest
entry positive, so the same sample gives the same bytes whatever LAPACK path found it). Stored as float16,
or as int8 with a per-channel scale (q = round(y / scale), scale = HEADROOM * max |y| of the sample / 127).
Readers return y (float32): the heads work in the projected space and take its width from the data.

What to compact is one `Request` (maps_dim, maps_dtype, hog_dim, each declared once in `Request.params`):
featurize fits its codecs before the first batch and stores them (resume, shards and merge reuse them);
`imet store compact` (featurize/compact.py) re-encodes a store already written. This module knows no store.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from imet.errors import ParamError
from imet.params import Bound, Choice, Int, Param, check_values

DTYPES = ("float16", "int8")  # the first: the full store's own maps dtype (no codec)
HEADROOM = 2.0  # int8: the sample's largest |value| of a channel maps to 127 / HEADROOM (room for outliers)
SAMPLE = 256  # train views whose features (every map cell, or the HOG vector) fit a codec
ROWS = 8192  # sample rows per covariance update
log = logging.getLogger(__name__)
CHANNELS = Bound("channels", "{}, the maps' channels")
HOG_LENGTH = Bound("hog_length", "{}, the HOG values")


@dataclass(frozen=True)
class Request:
    """Which features to store through a codec, and how: none at the defaults (the paper's full features)."""

    maps_dim: int | None = None
    maps_dtype: str = DTYPES[0]
    hog_dim: int | None = None

    params: ClassVar[dict[str, Param]] = {
        "maps_dim": Param(Int(1, CHANNELS), "Store the maps' cells projected on their first K principal components "
                          "(channel PCA fitted on a seeded sample of train views, kept in the store).",
                          none="no projection"),
        "maps_dtype": Param(Choice(DTYPES), "Stored dtype of the maps; int8 with a per-channel scale kept in the "
                            "store."),
        "hog_dim": Param(Int(1, HOG_LENGTH), "Store HOG projected on its first K principal components.",
                         none="no projection"),
    }

    def check(self, bounds: dict[str, int | None] | None = None, owner: str = "codec") -> Request:
        """Refuse a value outside its declaration; `bounds`: channels and hog_length, where known."""
        check_values(owner, self.params, {f.name: getattr(self, f.name) for f in fields(self)}, bounds)
        return self

    def features(self) -> dict[str, tuple[int | None, str]]:
        """(dimensions, dtype) of each feature to store through a codec."""
        out = {}
        if self.maps_dim is not None or self.maps_dtype != DTYPES[0]:
            out["maps"] = (self.maps_dim, self.maps_dtype)
        if self.hog_dim is not None:
            out["hog"] = (self.hog_dim, "float32")
        return out

    def settings(self) -> dict:
        """This request as the store's settings record it (the keys only of the features it compacts)."""
        wanted = self.features()
        return {**({"maps_dim": self.maps_dim, "maps_dtype": self.maps_dtype} if "maps" in wanted else {}),
                **({"hog_dim": self.hog_dim} if "hog" in wanted else {})}


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


def fit(sample: np.ndarray, dim: int | None, dtype: str, *, name: str = "dim") -> Codec:
    """A codec from (n, D) sample rows: the `dim` leading principal directions (None: no projection) and,
    for int8, per-channel scales from the projected sample. Rows are read in chunks (the sample may be float16).
    `dim` is checked against its declaration by `Request.check`; here only against what the sample allows
    (n rows give n - 1 directions), refused naming the parameter `name`."""
    n, d = sample.shape
    if dtype not in DTYPES + ("float32",):
        raise ParamError(f"{name}: dtype {dtype!r}; choose from {', '.join(DTYPES)}", [name])
    if dim is not None and not 1 <= dim <= min(d, n - 1):
        raise ParamError(f"{name} {dim}: cannot keep {dim} principal components of {d} values from a sample of {n} "
                         f"rows (at most {min(d, n - 1)})", [name])
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


def codec_settings(codecs: dict[str, Codec]) -> dict:
    """The sha256 of each codec, recorded in the settings so that models refuse another codec by name."""
    return {f"{k}_codec_sha256": c.sha256() for k, c in codecs.items()}
