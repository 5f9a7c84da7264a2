"""The toolkit every trained head shares: reading features in chunks, their statistics, the paper's class
weights, random minibatches, the val F2 score and the one training loop (`train_epochs`).

Heads build their module and optimiser, then hand `train_epochs` a batch iterator and a loss; everything
streams from the store's memmaps, so a store larger than RAM trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import imet.heads.ddp as ddp
from imet.heads.base import Head
from imet.heads.params import Bool, Choice, Float, Int, Param
from imet.progress import progress
from imet.store import FeatureStore

CHUNK = 1024  # views per read when streaming statistics or predictions
TRAINING_PARAMS = {  # the parameters of every head trained by train_epochs
    "epochs": Param(Int(1), "Passes over the train views."),
    "batch_size": Param(Int(1), "Views per optimiser step."),
    "lr": Param(Float(0, low_open=True), "Adam learning rate."),
    "weight_decay": Param(Float(0), "Adam weight decay."),
    "class_weights": Param(Bool(), "Weight positives by negatives/positives per class, clipped at 10."),
    "patience": Param(Int(0), "Early stopping: epochs without a better val F2 before stopping, keeping the best "
                              "epoch (0: off)."),
}
LOSS_PARAMS = {  # the loss of every head trained by train_epochs (TrainedHead)
    "loss": Param(Choice(("bce", "asl", "focal")),
                  "bce: the paper's weighted BCE; asl: asymmetric loss (Ridnik et al. 2021); focal: focal loss."),
    "focal_gamma": Param(Float(0), "Focal loss: focusing exponent of both positives and negatives."),
    "asl_gamma_pos": Param(Float(0), "ASL: focusing exponent of the positives."),
    "asl_gamma_neg": Param(Float(0), "ASL: focusing exponent of the negatives."),
    "asl_clip": Param(Float(0, 1, high_open=True), "ASL: probability margin shifted off the negatives."),
}


class Standardize(nn.Module):
    """x -> (x - mean) / std with the train statistics as buffers (saved with the model)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None, *,
                    gamma_pos: float = 0.0, gamma_neg: float = 0.0, clip: float = 0.0) -> torch.Tensor:
    """Mean over (sample, label) of the asymmetric loss (Ridnik et al. 2021, eq. 7) on logits (n, C):

        y=1: -w_c (1 - p)^gamma_pos log p          y=0: -p_m^gamma_neg log(1 - p_m),  p_m = max(p - clip, 0)

    with w_c the class weight of the positives (`pos_weight`, (C,)). Zero gammas and clip give the weighted
    BCE (`nn.BCEWithLogitsLoss`); gamma_pos = gamma_neg = gamma and no clip, the focal loss. The focusing
    factors keep their gradient (the papers' definition; the ASL code can detach them)."""
    p = torch.sigmoid(logits)
    pos = -F.logsigmoid(logits)  # -log p, stable for large |logit|
    if gamma_pos:
        pos = pos * (1 - p).pow(gamma_pos)
    if pos_weight is not None:
        pos = pos * pos_weight
    if clip:
        p_m = (p - clip).clamp_min(0)  # shifted probability: easy negatives (p <= clip) cost nothing
        neg = -torch.log1p(-p_m)  # 1 - p_m >= clip > 0
    else:
        p_m, neg = p, -F.logsigmoid(-logits)
    if gamma_neg:
        neg = neg * p_m.pow(gamma_neg)
    return (targets * pos + (1 - targets) * neg).mean()


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


def class_weights(positives: np.ndarray, n: int, clip: float = 10.0) -> np.ndarray:
    """Per-class BCE weight of the positives: negatives / positives, at most `clip` (section 5, eq. 7).

    `positives` counts each class over `n` samples; a class never seen gets `clip`.
    """
    pos = np.asarray(positives, dtype=np.float64)
    ratio = (n - pos) / np.maximum(pos, 1)
    return np.minimum(np.where(pos > 0, ratio, clip), clip).astype(np.float32)


def pos_weight(store: FeatureStore, views: np.ndarray, enabled: bool = True) -> torch.Tensor:
    """(C,) the paper's class weights over the views' targets (culture-only views count culture labels only)."""
    pos = np.zeros(len(store.vocab))
    for part in chunks(views):
        pos += store.view_targets(part).sum(0)
    return torch.from_numpy(class_weights(pos, len(views))) if enabled else torch.ones(len(pos))


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Positions 0..n-1 in a fresh random order, cut into batches (each sorted, for sequential reads); under
    torchrun, this rank's share of each (imet.heads.ddp)."""
    order, ranks = rng.permutation(n), ddp.current()
    for lo in range(0, n, batch_size):
        yield ranks.share(np.sort(order[lo:lo + batch_size]))


class TrainedHead(Head):
    """Base of the heads trained by `train_epochs`: the loss, declared once for all of them (LOSS_PARAMS)."""

    params = LOSS_PARAMS

    def __init__(self, *, loss: str = "bce", focal_gamma: float = 2.0, asl_gamma_pos: float = 0.0,
                 asl_gamma_neg: float = 4.0, asl_clip: float = 0.05, **base):
        super().__init__(**base)
        self.loss = loss  # bce (the paper) | asl | focal
        self.focal_gamma = focal_gamma  # focal: (1 - p_t)^gamma on every term
        self.asl_gamma_pos = asl_gamma_pos  # ASL's gamma+ (the paper: 0)
        self.asl_gamma_neg = asl_gamma_neg  # ASL's gamma- (the paper: 4)
        self.asl_clip = asl_clip  # ASL's probability margin m on the negatives (the paper: 0.05)

    def loss_fn(self, pos_weight: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(logits (n, C), targets (n, C)) -> the scalar loss this head is set to, with the class weights."""
        if self.loss == "bce":
            return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        kw = ({"gamma_pos": self.focal_gamma, "gamma_neg": self.focal_gamma} if self.loss == "focal" else
              {"gamma_pos": self.asl_gamma_pos, "gamma_neg": self.asl_gamma_neg, "clip": self.asl_clip})
        return lambda logits, targets: multilabel_loss(logits, targets, pos_weight, **kw)

    def training_weights(self, store: FeatureStore, train: np.ndarray) -> np.ndarray | None:
        """(C,) the BCE weight of each class's positives in training (None: unweighted), for decoding to undo."""
        if not getattr(self, "class_weights", False):
            return None
        return pos_weight(store, train, True).numpy().astype(np.float64)


def train_epochs(head: Head, net: nn.Module, opt: torch.optim.Optimizer,
                 epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
                 batch_loss: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], *, n_train: int, store: FeatureStore,
                 val: np.ndarray, log: Callable[[str], None], where: str = "") -> list[float]:
    """The one training loop of every head: `head.epochs` passes of Adam steps with cosine annealing over
    `epoch_batches()` (tuples whose last item is the (n, C) targets), the loss checked finite each epoch, and
    early stopping on val F2 after `head.patience` epochs without a better one (0 or absent: never), keeping
    the best epoch's weights. Returns the mean train loss of each epoch.

    `batch_loss` is the mean over the batch's views: under torchrun (imet.heads.ddp) each rank's batches are
    its shares of the global batches of `minibatches(n_train, head.batch_size)`, and weighting each rank's
    mean by its share makes the step the single process's."""
    steps = head.epochs * -(-n_train // head.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    patience = getattr(head, "patience", 0)
    best, best_state, stale, history = -1.0, None, 0, []
    ranks = ddp.current()
    step_loss = ranks.wrap(net, batch_loss, next(net.parameters()).device)
    for epoch in range(1, head.epochs + 1):
        t0, total = time.monotonic(), 0.0
        net.train()
        with progress(total=n_train, desc=f"{head.name} epoch {epoch}/{head.epochs}", leave=False) as bar:
            for k, batch in enumerate(epoch_batches()):
                n_global = ranks.step_views(k, head.batch_size, n_train, len(batch[-1]))  # on all ranks
                loss = step_loss(batch)
                opt.zero_grad(set_to_none=True)
                (loss * ranks.weight(n_global)).backward()
                opt.step()
                sched.step()
                total += loss.item() * ranks.count(n_global)
                bar.update(n_global)
        history.append(ranks.total(total) / n_train)
        head.check_loss(epoch, history[-1])
        line = f"{head.name} epoch {epoch}/{head.epochs}: loss {history[-1]:.4f}"
        if patience:
            score = ranks.from_main(lambda: head.val_score(store, val))
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
