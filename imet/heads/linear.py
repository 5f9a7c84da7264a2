"""`linear` and `linear_hog`: one FC layer on the pooled vector (sections 3.1) or on pooled ⊕ HOG (3.2).

Inputs are standardised with train statistics kept in the model. Loss: BCE with a weight per class
(negatives/positives, at most 10; `loss` asl or focal reshape it), Adam with cosine annealing and weight
decay 1e-5. Features stream from the store's memmaps in minibatches, so a store larger than RAM trains.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from imet.heads.base import register
from imet.heads.params import LinearHogParams, LinearParams
from imet.heads.train import (
    CHUNK,
    Standardize,
    TrainedHead,
    adam,
    feature_stats,
    minibatches,
    pos_weight,
    read_inputs,
    train_epochs,
)
from imet.progress import progress
from imet.store import FeatureStore


@register
class LinearHead(LinearParams, TrainedHead):
    """One FC layer on the standard pooled ResNet50 vector: the paper's baseline (section 3.1)."""

    name = "linear"
    needs = ("pooled",)
    def _module(self) -> nn.Module | None:
        return getattr(self, "net_", None)

    def _build(self, learned: dict) -> None:
        dim = sum(int(np.prod(shape)) for shape in learned["layout"].values())
        c = len(learned["vocab"]["attribute_ids"])
        self.net_ = nn.Sequential(Standardize(torch.zeros(dim), torch.ones(dim)), nn.Linear(dim, c))

    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        mean, std = feature_stats(store, self.needs, train)
        self.net_ = nn.Sequential(Standardize(mean, std), nn.Linear(len(mean), len(store.vocab)))
        loss_fn = self.loss_fn(pos_weight(store, train, self.class_weights))
        opt = adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)

        def batches():
            for pos in minibatches(len(train), self.batch_size, rng):
                views = train[pos]
                yield read_inputs(store, self.needs, views), torch.from_numpy(store.view_targets(views))

        train_epochs(self, self.net_, opt, batches, lambda b: loss_fn(self.net_(b[0]), b[1]), n_train=len(train),
                     store=store, val=val, log=log, rng=rng)

    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        self.check_fitted()
        self.net_.eval()
        out = np.empty((len(views), self.net_[1].out_features), np.float32)
        with torch.inference_mode(), progress(total=len(views), desc=f"{self.name} predict", leave=False) as bar:
            for lo in range(0, len(views), CHUNK):
                part = views[lo:lo + CHUNK]
                out[lo:lo + len(part)] = torch.sigmoid(self.net_(read_inputs(store, self.needs, part))).numpy()
                bar.update(len(part))
        return out


@register
class LinearHogHead(LinearHogParams, LinearHead):
    """One FC layer on pooled ⊕ HOG (section 3.2)."""

    name = "linear_hog"
    needs = ("pooled", "hog")
