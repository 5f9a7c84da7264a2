"""A scikit-learn estimator over imet's pooled heads, for features and labels in plain arrays.

`HeadClassifier(make_head("linear", epochs=20)).fit(X, y)`: X is (n, F) float features, one row per image
(pooled vectors, their last `hog_dim` columns HOG); y is the (n, C) 0/1 label matrix. `fit` holds out a
seeded `val_fraction` of the rows as the val split the head tunes its decoding on, and fits a clone of the
head on the rest through an `ArrayStore`; `predict_proba` gives (n, C) probabilities, `predict` the (n, C)
0/1 labels of the head's tuned decoding, `score` the sample-averaged F2 (the competition's metric). The head
is a nested parameter, so `GridSearchCV(..., {"head__lr": [...]})`, `set_params(head=...)`, `clone` and
`Pipeline` work as for any scikit-learn estimator.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted

from imet.errors import ParamError
from imet.heads import Head
from imet.metrics import scores
from imet.store import ArrayStore

POOLED_HEADS = ("linear", "linear_hog", "lgbm")  # the heads that read one vector per view (no maps)


class HeadClassifier(ClassifierMixin, BaseEstimator):
    """A pooled imet head (linear, linear_hog, lgbm) as a multi-label scikit-learn classifier."""

    def __init__(self, head: Head, *, hog_dim: int = 0, val_fraction: float = 0.2, split_seed: int = 0):
        self.head = head  # an unfitted imet head (make_head); fit trains a clone of it
        self.hog_dim = hog_dim  # the last hog_dim columns of X are HOG (linear_hog and lgbm's hog_pca read them)
        self.val_fraction = val_fraction  # rows held out to tune the head's decoding (thresholds) on
        self.split_seed = split_seed  # seed of the rows held out

    def fit(self, X, y) -> HeadClassifier:
        name = self.head.name if isinstance(self.head, Head) else repr(self.head)
        if name not in POOLED_HEADS:
            raise ParamError(f"head: HeadClassifier takes a pooled head, make_head(name) with name one of "
                             f"{', '.join(POOLED_HEADS)}, not {name} (map heads fit on an imet.ArrayStore)", ["head"])
        if not 0 < self.val_fraction < 1:
            raise ParamError(f"val_fraction must be in (0, 1), not {self.val_fraction}", ["val_fraction"])
        X = self._features(X, fitting=True)
        y = np.asarray(y)
        if y.ndim != 2 or len(y) != len(X):
            raise ValueError(f"y must be an (n, C) 0/1 label matrix with one row per row of X ({len(X)}), not "
                             f"shape {y.shape}")
        n_val = int(round(self.val_fraction * len(X)))
        if not 0 < n_val < len(X):
            raise ValueError(f"{len(X)} rows with val_fraction {self.val_fraction} leave {n_val} val rows and "
                             f"{len(X) - n_val} train rows; each needs at least one")
        split = np.full(len(X), "train", dtype=object)
        split[np.random.default_rng(self.split_seed).permutation(len(X))[:n_val]] = "val"
        self.head_ = clone(self.head).fit(self._store(X, y, split), log=lambda _: None)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """(n, C) float32 probabilities of each label."""
        return self._predict(X)[0]

    def predict(self, X) -> np.ndarray:
        """(n, C) uint8 0/1 labels, decoded by the thresholds (and label-count rule) tuned on the held-out rows."""
        return self._predict(X)[1].astype(np.uint8)

    def score(self, X, y, sample_weight=None) -> float:
        """Sample-averaged F2 of `predict(X)` against y (what GridSearchCV maximises by default)."""
        if sample_weight is not None:
            raise ValueError("score: sample_weight is not supported (F2 is averaged over samples equally)")
        return scores(np.asarray(y), self.predict(X))["f2"]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.classifier_tags.multi_label = True
        return tags

    def _predict(self, X) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self, "head_")
        X = self._features(X, fitting=False)
        store = self._store(X, np.zeros((len(X), len(self.head_.vocab_)), np.uint8), np.full(len(X), "test"))
        _, probs, labels = self.head_.predict_labels(store, "test")  # the rows in order
        return probs.astype(np.float32), labels  # one view per row: its average is its float32 probability

    def _features(self, X, *, fitting: bool) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be an (n, features) array, not shape {X.shape}")
        if not 0 <= self.hog_dim < X.shape[1]:
            raise ParamError(f"hog_dim must be in 0..{X.shape[1] - 1} (X has {X.shape[1]} columns, pooled "
                             f"first), not {self.hog_dim}", ["hog_dim"])
        if fitting:
            self.n_features_in_ = X.shape[1]
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} columns; this classifier was fitted on {self.n_features_in_}")
        return X

    def _store(self, X: np.ndarray, y: np.ndarray, split: np.ndarray) -> ArrayStore:
        width = X.shape[1] - self.hog_dim
        return ArrayStore(pooled=X[:, :width], hog=X[:, width:] if self.hog_dim else None, targets=y, split=split,
                          name="X")
