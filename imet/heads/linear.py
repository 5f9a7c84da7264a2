"""`linear` and `linear_hog`: one FC layer on the pooled vector (sections 3.1) or on pooled ⊕ HOG (3.2).

Inputs are standardised with train statistics kept in the model. Loss: BCE with a weight per class
(negatives/positives, at most 10), Adam with cosine annealing and weight decay 1e-5. Features stream
from the store's memmaps in minibatches, so a store larger than RAM trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from imet.heads.base import Head, class_weights, register
from imet.store import FeatureStore

CHUNK = 1024  # views per read when streaming statistics or predictions


class Standardize(nn.Module):
    """x -> (x - mean) / std with the train statistics as buffers (saved with the model)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def read_inputs(store: FeatureStore, keys: tuple[str, ...], views: np.ndarray) -> torch.Tensor:
    """(n, F) float32: the named features of `views`, flattened and concatenated."""
    parts = [x.reshape(len(x), int(np.prod(x.shape[1:]))) for x in (store.read(k, views) for k in keys)]
    return torch.from_numpy(np.concatenate(parts, axis=1).astype(np.float32, copy=False))


def chunks(views: np.ndarray, size: int = CHUNK) -> Iterator[np.ndarray]:
    for lo in range(0, len(views), size):
        yield views[lo:lo + size]


def moments(batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std of the rows of (n, F) float32 batches, summed in float64; constant columns
    get std 1."""
    total = total_sq = None
    n = 0
    for x in batches:
        s, sq = x.sum(0, dtype=torch.float64), (x * x).sum(0, dtype=torch.float64)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        n += len(x)
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()


def feature_stats(store: FeatureStore, keys: tuple[str, ...], views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over `views`, streamed; constant features get std 1."""
    return moments(read_inputs(store, keys, part) for part in chunks(views))


def pos_weight(store: FeatureStore, views: np.ndarray, enabled: bool = True) -> torch.Tensor:
    """(C,) the paper's class weights over the views' targets (culture-only views count culture labels only)."""
    pos = np.zeros(len(store.vocab))
    for part in chunks(views):
        pos += store.view_targets(part).sum(0)
    return torch.from_numpy(class_weights(pos, len(views))) if enabled else torch.ones(len(pos))


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Positions 0..n-1 in a fresh random order, cut into batches (each sorted, for sequential reads)."""
    order = rng.permutation(n)
    for lo in range(0, n, batch_size):
        yield np.sort(order[lo:lo + batch_size])


def train_epochs(head: Head, net: nn.Module, opt: torch.optim.Optimizer,
                 epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
                 batch_loss: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], *, n_train: int, store: FeatureStore,
                 val: np.ndarray, log: Callable[[str], None], where: str = "") -> list[float]:
    """The one training loop of every head: `head.epochs` passes of Adam steps with cosine annealing over
    `epoch_batches()` (tuples whose last item is the (n, C) targets), the loss checked finite each epoch, and
    early stopping on val F2 after `head.patience` epochs without a better one (0 or absent: never), keeping
    the best epoch's weights. Returns the mean train loss of each epoch."""
    steps = head.epochs * -(-n_train // head.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    patience = getattr(head, "patience", 0)
    best, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(1, head.epochs + 1):
        t0, total = time.monotonic(), 0.0
        net.train()
        for batch in epoch_batches():
            loss = batch_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(batch[-1])
        history.append(total / n_train)
        head.check_loss(epoch, history[-1])
        line = f"{head.name} epoch {epoch}/{head.epochs}: loss {history[-1]:.4f}"
        if patience:
            score = head.val_score(store, val)
            line += f", val F2 {score:.4f}"
            if score > best:
                best, stale = score, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
        seconds = time.monotonic() - t0
        log(f"{line} ({seconds:.1f} s, {n_train / seconds:.0f} views/s{where})")
        if patience and stale >= patience:
            log(f"{head.name}: no better val F2 for {patience} epochs; keeping epoch {epoch - stale}")
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    return history


@register
class LinearHead(Head):
    """One FC layer on the standard pooled ResNet50 vector: the paper's baseline (section 3.1)."""

    name = "linear"
    needs = ("pooled",)

    def __init__(self, *, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-5,
                 class_weights: bool = True, patience: int = 0, **base):
        super().__init__(**base)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weights = class_weights  # BCE weight negatives/positives per class, clipped at 10
        self.patience = patience  # stop after this many epochs without a better val F2 (0: never)

    def _module(self) -> nn.Module | None:
        return getattr(self, "net_", None)

    def _build(self, learned: dict) -> None:
        dim = sum(int(np.prod(shape)) for shape in learned["layout"].values())
        c = len(learned["vocab"]["attribute_ids"])
        self.net_ = nn.Sequential(Standardize(torch.zeros(dim), torch.ones(dim)), nn.Linear(dim, c))

    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        mean, std = feature_stats(store, self.needs, train)
        self.net_ = nn.Sequential(Standardize(mean, std), nn.Linear(len(mean), len(store.vocab)))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight(store, train, self.class_weights))
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)

        def batches():
            for pos in minibatches(len(train), self.batch_size, rng):
                views = train[pos]
                yield read_inputs(store, self.needs, views), torch.from_numpy(store.view_targets(views))

        train_epochs(self, self.net_, opt, batches, lambda b: loss_fn(self.net_(b[0]), b[1]), n_train=len(train),
                     store=store, val=val, log=log)

    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        self.check_fitted()
        self.net_.eval()
        out = np.empty((len(views), self.net_[1].out_features), np.float32)
        with torch.inference_mode():
            for lo in range(0, len(views), CHUNK):
                part = views[lo:lo + CHUNK]
                out[lo:lo + len(part)] = torch.sigmoid(self.net_(read_inputs(store, self.needs, part))).numpy()
        return out


@register
class LinearHogHead(LinearHead):
    """One FC layer on pooled ⊕ HOG (section 3.2)."""

    name = "linear_hog"
    needs = ("pooled", "hog")
