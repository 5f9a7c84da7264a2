"""HOG per view with scikit-image: 8 orientations, 16x16 cells, 3x3 blocks give 10,368 values at 224 px."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from skimage.feature import hog


@dataclass(frozen=True)
class HogParams:
    orientations: int = 8
    cell: int = 16  # pixels per cell (square)
    block: int = 3  # cells per block (square)

    def asdict(self) -> dict:
        return asdict(self)

    def length(self, size: int) -> int:
        """Number of HOG values for a size x size view (0 when the view is too small for one block)."""
        blocks = max(size // self.cell - self.block + 1, 0)
        return blocks * blocks * self.block * self.block * self.orientations

    def __call__(self, view: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 -> (length,) float32."""
        return hog(view, orientations=self.orientations, pixels_per_cell=(self.cell, self.cell),
                   cells_per_block=(self.block, self.block), channel_axis=-1).astype(np.float32)
