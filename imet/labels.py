"""Labels and splits: the label vocabulary and the split names that the data, the store and the heads share,
and the size of the iMet 2019 data they come from.

Nothing here reads files: `imet.data` builds a Vocabulary from labels.csv, `imet.store` from the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imet.errors import ImetError

KINDS = ("culture", "tag")
SPLITS = ("train", "val", "test", "kaggle-test")
FULL_IMET_VIEWS = (109_237 + 7_443) * 6  # iMet 2019 train + stage-1 test images, six views each (700,080)


@dataclass(frozen=True)
class Vocabulary:
    """Dense label indices <-> original attribute ids, with names and kinds (culture or tag)."""

    attribute_ids: np.ndarray  # (C,) int64, ascending
    names: tuple[str, ...]
    kinds: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.attribute_ids)

    @property
    def culture(self) -> np.ndarray:
        """(C,) bool: which labels are culture labels."""
        return np.array([k == "culture" for k in self.kinds], dtype=bool)

    def encode(self, attribute_ids) -> np.ndarray:
        """Original attribute ids -> dense indices (all must be in the vocabulary)."""
        ids = np.asarray(attribute_ids, dtype=np.int64)
        pos = np.searchsorted(self.attribute_ids, ids)
        pos = np.minimum(pos, len(self) - 1)
        if len(ids) and not np.array_equal(self.attribute_ids[pos], ids):
            unknown = ids[self.attribute_ids[pos] != ids]
            raise ImetError(f"attribute ids not in the vocabulary: {unknown[:5].tolist()}")
        return pos

    def decode(self, indices) -> np.ndarray:
        """Dense indices -> original attribute ids."""
        return self.attribute_ids[np.asarray(indices, dtype=np.int64)]

    def subset(self, keep: np.ndarray) -> Vocabulary:
        keep = np.asarray(keep, dtype=bool)
        return Vocabulary(
            self.attribute_ids[keep],
            tuple(n for n, k in zip(self.names, keep, strict=True) if k),
            tuple(n for n, k in zip(self.kinds, keep, strict=True) if k),
        )
