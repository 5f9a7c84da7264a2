"""HOG per view: 8 orientations, 16x16 cells, 3x3 blocks give 10,368 values at 224 px.

Two implementations of the same numbers. `skimage` calls `skimage.feature.hog` on one view at a time (the
reference). `torch` does a batch at once on any device and matches it to float32 rounding (<= 1e-6 on
uint8 views, see tests/test_hog.py), by building scikit-image's own decisions into lookup tables:

- gradients: central differences of integers, zero on the first and last row (g_row) and column (g_col);
- RGB: each pixel keeps the channel of largest magnitude `np.hypot(g_row, g_col)`, the first on ties. On
  this machine's libm two gradients with the same g_row**2 + g_col**2 can get hypot values one ulp apart,
  so the channels are ranked by the dense rank of numpy's hypot over every possible (g_row, g_col);
- orientation: hard binning (no interpolation) of `rad2deg(arctan2(g_row, g_col)) % 180` into
  [180/O*i, 180/O*(i+1)) as scikit-image compares it in float64; the bin and the magnitude
  `np.hypot(g_col, g_row)` of each integer gradient come from tables computed with numpy once, so exact
  boundary angles (0, 45, 90, 135 degrees are common) land where scikit-image puts them;
- cells: the mean of the magnitudes per bin over the cell's pixels (floor(S / cell) cells per side);
- blocks: L2-Hys, eps = 1e-5, flattened as (block row, block col, cell row, cell col, orientation).

The tables only cover integer gradients, so the torch path takes uint8 views (which is what the store
holds). On the CPU the cell sums run in float32 in scikit-image's order, which depends neither on the
thread count nor on the batch, so resumed and sharded stores keep their bytes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from skimage.feature import hog

from imet.featurize.options import IMPLS, HogParams

EPS = 1e-5  # scikit-image's _hog_normalize_block
CLIP = 0.2  # L2-Hys


def hog_view(params: HogParams, view: np.ndarray) -> np.ndarray:
    """scikit-image on one view: (S, S, 3) or (S, S) uint8 -> (length,) float32."""
    return hog(view, orientations=params.orientations, pixels_per_cell=(params.cell, params.cell),
               cells_per_block=(params.block, params.block), channel_axis=-1 if view.ndim == 3 else None
               ).astype(np.float32)


def hog_skimage(params: HogParams, views: np.ndarray) -> np.ndarray:
    """scikit-image view by view: (B, H, W[, C]) uint8 -> (B, length) float32."""
    return np.stack([hog_view(params, v) for v in views]) if len(views) else np.zeros((0, 0), np.float32)


G = 255  # |gradient| <= 255 for uint8 pixels
N = (2 * G + 1) ** 2  # integer gradients (g_row, g_col), numbered (g_row + G) * (2G + 1) + (g_col + G)
PAIR_BITS, CHANNEL_BITS = 18, 2  # N < 2**18 pairs; up to 4 channels


@lru_cache(maxsize=8)
def _tables(orientations: int, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every integer gradient: a channel key, scikit-image's magnitude and its orientation bin.

    key[c * N + pair] = rank << 20 | (channels - 1 - c) << 18 | pair, where rank is the dense rank of numpy's
    hypot(g_row, g_col): the largest key over the channels of a pixel is the first channel of largest
    magnitude (scikit-image's argmax), and its low bits say which gradient that channel has.
    """
    g = np.arange(-G, G + 1, dtype=np.float64)
    g_row, g_col = (a.ravel() for a in np.meshgrid(g, g, indexing="ij"))
    rank = np.unique(np.hypot(g_row, g_col), return_inverse=True)[1].astype(np.int64)
    pair = np.arange(N, dtype=np.int64)
    key = np.concatenate([rank << (PAIR_BITS + CHANNEL_BITS) | (channels - 1 - c) << PAIR_BITS | pair
                          for c in range(channels)])
    magnitude = np.hypot(g_col, g_row)  # _hoghistogram's argument order
    theta = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    width = 180.0 / orientations
    bins = np.full(N, orientations, np.int64)  # `orientations` = in no bin (dropped, as scikit-image does)
    for i in range(orientations):
        bins[(theta >= width * i) & (theta < width * (i + 1))] = i
    return key, magnitude.astype(np.float32), bins


class TorchHog:
    """HOG of a batch of uint8 views on their device, equal to scikit-image's (module docstring)."""

    def __init__(self, params: HogParams):
        self.params = params
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device, channels: int) -> tuple[torch.Tensor, ...]:
        if (device, channels) not in self._cache:
            tables = _tables(self.params.orientations, channels)
            self._cache[device, channels] = tuple(torch.from_numpy(t).to(device) for t in tables)
        return self._cache[device, channels]

    def _pairs(self, views: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, C, h, w) int32 gradient numbers (+ c * N) over the first h rows, w cols.

        g_row = x[r + 1] - x[r - 1] and g_col = x[:, c + 1] - x[:, c - 1], zero on the image's first and
        last row (column); rows and columns past h, w still feed the gradients of the last whole cell.
        """
        b, height, width, c = views.shape
        x = torch.empty(b, c, height, width, dtype=torch.int32, device=views.device).copy_(views.permute(0, 3, 1, 2))
        offset = G * (2 * G + 1) + G + N * torch.arange(c, dtype=torch.int32, device=views.device)
        pairs = offset.view(1, c, 1, 1).expand(b, c, h, w).clone()
        hr, wc = min(h, height - 1), min(w, width - 1)  # rows 1..hr-1 and columns 1..wc-1 have gradients
        pairs[:, :, 1:hr].add_(x[:, :, 2:hr + 1, :w] - x[:, :, : hr - 1, :w], alpha=2 * G + 1)
        pairs[:, :, :, 1:wc] += x[:, :, :h, 2:wc + 1] - x[:, :, :h, : wc - 1]
        return pairs

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) or (B, H, W) uint8 -> (B, length) float32, on the views' device."""
        if views.dtype != torch.uint8:
            raise TypeError(f"torch HOG takes uint8 views, got {views.dtype}")
        views = views.unsqueeze(-1) if views.dim() == 3 else views
        p, (b, height, width, c) = self.params, views.shape
        rows, cols = height // p.cell, width // p.cell
        if rows < p.block or cols < p.block:
            raise ValueError(f"a {height}x{width} view is too small for one {p.block}x{p.block} block "
                             f"of {p.cell} px cells")
        key, magnitude, bins = self._tables(views.device, c)
        pairs = self._pairs(views, rows * p.cell, cols * p.cell)  # (B, C, h, w)
        best = key.index_select(0, pairs.flatten()).view(pairs.shape).amax(dim=1)  # (B, h, w)
        pair = (best & ((1 << PAIR_BITS) - 1)).flatten()
        hist = self._cells(magnitude.index_select(0, pair), bins.index_select(0, pair), b, rows, cols)
        return self._blocks(hist).reshape(b, -1)

    def _cells(self, mag: torch.Tensor, bins: torch.Tensor, b: int, rows: int, cols: int) -> torch.Tensor:
        """Mean magnitude per orientation bin over each cell: (B * h * w,) -> (B, rows, cols, O).

        On the CPU, bincount adds each cell's pixels row by row as scikit-image does, in float32; on CUDA
        (whose bincount adds in no fixed order) a one-hot tensor is summed over each cell.
        """
        o, c = self.params.orientations, self.params.cell
        if mag.device.type == "cpu":
            cell = self._cell_of(b, rows, cols, mag.device) + bins  # (B * h * w,) in [0, B*rows*cols*(O+1))
            hist = torch.bincount(cell, weights=mag, minlength=b * rows * cols * (o + 1)).to(torch.float32)
            hist = hist.view(b, rows, cols, o + 1)[..., :o]
        else:
            votes = mag.new_zeros(len(mag), o + 1).scatter_(1, bins.unsqueeze(1), mag.unsqueeze(1))
            hist = votes.view(b, rows, c, cols, c, o + 1).sum(dim=(2, 4))[..., :o]
        return hist / (c * c)

    def _cell_of(self, b: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """(B * h * w,) int64: (O + 1) x the number of each pixel's cell in the batch."""
        k = ("cell", b, rows, cols, device)
        if k not in self._cache:
            c, o = self.params.cell, self.params.orientations
            r = torch.arange(rows * c, device=device) // c
            q = torch.arange(cols * c, device=device) // c
            cell = (torch.arange(b, device=device).view(b, 1, 1) * rows + r.view(1, -1, 1)) * cols + q.view(1, 1, -1)
            self._cache[k] = (cell * (o + 1)).flatten()
        return self._cache[k]

    def _blocks(self, hist: torch.Tensor) -> torch.Tensor:
        """L2-Hys normalised blocks: (B, rows, cols, O) -> (B, n_br, n_bc, block * block * O)."""
        k = self.params.block
        blocks = hist.unfold(1, k, 1).unfold(2, k, 1)  # (B, n_br, n_bc, O, k, k)
        blocks = blocks.permute(0, 1, 2, 4, 5, 3).flatten(3)  # (B, n_br, n_bc, k * k * O)
        out = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + EPS**2)
        out = out.clamp(max=CLIP)
        return out / torch.sqrt((out * out).sum(-1, keepdim=True) + EPS**2)


def compute(params: HogParams, views: np.ndarray | torch.Tensor, impl: str = "torch") -> np.ndarray:
    """HOG of a batch of uint8 views with either implementation: (B, H, W[, C]) -> (B, length) float32."""
    if impl == "skimage":
        return hog_skimage(params, np.asarray(views))
    if impl != "torch":
        raise ValueError(f"unknown HOG implementation {impl!r} (choose from {', '.join(IMPLS)})")
    views = torch.as_tensor(views)
    with torch.inference_mode():
        return TorchHog(params)(views).cpu().numpy()
