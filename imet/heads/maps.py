"""What every head over the 14x14 maps shares: reading maps in batches, their statistics, the device, and
`MapHead`, the base of the class-attention heads (csra, mldecoder).

A class-attention head scores every label from the map cells with its own attention per label, so each
label's loss reaches the cells that carry its evidence directly (an attention shared by all labels, as in
attn_rnn, gets a weak, indirect signal). Training: the paper's weighted BCE, Adam with cosine annealing,
early stopping on val F2; decoding: view averaging and a threshold tuned on val, like the linear heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imet.decode.thresholds import average_views
from imet.heads.params import MapParams
from imet.heads.train import (
    CHUNK,
    TrainedHead,
    adam,
    chunks,
    feature_stats,
    minibatches,
    moments,
    pos_weight,
    read_inputs,
    train_epochs,
)
from imet.progress import progress
from imet.runtime import autocast, identity, kept_heap, pick_device
from imet.store import FeatureStore

MAP_STATS_VIEWS = 512  # random train views whose cells give the per-channel map statistics


class MapBatches(torch.utils.data.Dataset):
    """Item k: (maps (n, L, D) float32, other inputs (n, F), targets (n, C)) of the k-th batch of views.

    Only the store's path and array offsets travel to DataLoader workers; each maps the file itself.
    """

    def __init__(self, store: FeatureStore, keys: tuple[str, ...], batches: list[np.ndarray]):
        self.store, self.keys, self.batches = store, keys, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        views = self.batches[k]
        maps = self.store.read("maps", views)  # (n, h, w, D) float16 (float32 from an int8 store)
        n, h, w, d = maps.shape
        maps = torch.from_numpy(maps.reshape(n, h * w, d).astype(np.float32, copy=False))  # (n, L, D)
        other = read_inputs(self.store, self.keys, views) if self.keys else torch.zeros(n, 0)
        return maps, other, torch.from_numpy(self.store.view_targets(views))


def map_loader(store: FeatureStore, keys: tuple[str, ...], batches: list[np.ndarray], device: torch.device,
               workers: int | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Batches of MapBatches read ahead by DataLoader workers (default: 1 on the CPU, 4 on CUDA)."""
    cuda = device.type == "cuda"
    workers = (4 if cuda else 1) if workers is None else workers
    return iter(torch.utils.data.DataLoader(
        MapBatches(store, keys, batches), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=identity, prefetch_factor=4 if workers else None, pin_memory=cuda))


def map_stats(store: FeatureStore, views: np.ndarray, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over every cell of up to MAP_STATS_VIEWS random `views`; a constant channel
    gets std 1."""
    sample = np.sort(rng.choice(views, min(len(views), MAP_STATS_VIEWS), replace=False))
    d = store.shape("maps")[-1]
    return moments(torch.from_numpy(store.read("maps", part).reshape(-1, d).astype(np.float32, copy=False))  # (n*L, D)
                   for part in chunks(sample, 16))  # 16 views: 3,136 cells, 25 MiB


class ClassAttention(nn.Module):
    """Base of the class-attention modules: raw cells in, (B, C) logits and (B, C, L) attention out.

    Subclasses implement `scores(maps, attention) -> (logits (B, C), attention (B, C, L) or None)`, applying
    their layers to the cells standardised with the train statistics through `on_cells`. With `hog_dim` > 0,
    a linear term on the standardised HOG vector is added to the logits.
    """

    def __init__(self, n_labels: int, channels: int, hog_dim: int):
        super().__init__()
        self.register_buffer("map_mean", torch.zeros(channels))
        self.register_buffer("map_std", torch.ones(channels))
        self.register_buffer("hog_mean", torch.zeros(hog_dim))
        self.register_buffer("hog_std", torch.ones(hog_dim))
        self.hog = nn.Linear(hog_dim, n_labels, bias=False) if hog_dim else None
        if self.hog is not None:  # starts silent: random HOG logits would drown the cells' weak first signal
            nn.init.zeros_(self.hog.weight)

    def forward(self, maps: Tensor, hog: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """maps (B, L, D) raw, hog (B, K) raw (K may be 0) -> logits (B, C), and with `attention` each label's
        attention (B, C, L) (else None: training and prediction never build the (B, C, L) tensor)."""
        logits, attention = self.scores(maps, attention)
        if self.hog is not None:
            logits = logits + self.hog((hog - self.hog_mean) / self.hog_std)
        return logits, attention

    def on_cells(self, maps: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """weight @ standardised cell (+ bias) for raw maps (B, L, D) -> (B, L, out): the standardisation is
        folded into the weights, so the maps (the big tensor) are read once and never copied."""
        w = weight / self.map_std  # (out, D)
        b = -(w @ self.map_mean) if bias is None else bias - w @ self.map_mean
        return F.linear(maps, w, b)

    def scores(self, maps: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Raw maps (B, L, D) -> logits (B, C) and, with `attention`, attention (B, C, L) (else None); layers
        on cells go through on_cells."""
        raise NotImplementedError


class MapHead(MapParams, TrainedHead):
    """A head scoring every label from the map cells (and HOG with `hog`); subclasses give the module."""

    probabilistic = True
    @property
    def needs(self) -> tuple[str, ...]:
        return ("maps", "hog") if self.hog else ("maps",)

    @property
    def other_keys(self) -> tuple[str, ...]:
        return ("hog",) if self.hog else ()

    module_layout: ClassVar[dict] = {}  # recorded with the module's sizes: a later layout refuses older files

    def _make(self, n_labels: int, channels: int, hog_dim: int) -> ClassAttention:
        raise NotImplementedError

    def _start_score(self) -> tuple[float, dict] | None:
        """The val F2 and weights the training starts from when `_start` started it from another model."""
        return None

    def _start(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        """Set `net_`'s starting weights (its map statistics are set): random unless a subclass says."""

    def _module(self) -> nn.Module | None:
        return getattr(self, "net_", None)

    def _extra_state(self) -> dict:
        return {"module": self.module_sizes_}

    def _build(self, learned: dict) -> None:
        self.module_sizes_ = learned["module"]
        self.net_ = self._make(**self.module_sizes_)

    # -- training ------------------------------------------------------------------------------
    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        hog_dim = int(np.prod(store.shape("hog"))) if self.hog else 0
        self.module_sizes_ = {"n_labels": len(store.vocab), "channels": store.shape("maps")[-1], "hog_dim": hog_dim,
                              **self.module_layout}
        self.net_ = self._make(**self.module_sizes_)
        mean, std = map_stats(store, train, np.random.default_rng(self.seed))
        self.net_.map_mean.copy_(mean)
        self.net_.map_std.copy_(std)
        if hog_dim:
            mean, std = feature_stats(store, ("hog",), train)
            self.net_.hog_mean.copy_(mean)
            self.net_.hog_std.copy_(std)
        self._start(store, train, val, log)
        device = pick_device(self.device, self.name)
        net = self.net_.to(device)
        loss_fn = self.loss_fn(pos_weight(store, train, self.class_weights).to(device))
        hog = [p for n, p in net.named_parameters() if n.startswith("hog.")]
        rest = [p for n, p in net.named_parameters() if not n.startswith("hog.")]
        opt = adam([{"params": rest}, {"params": hog, "weight_decay": self.hog_decay}], lr=self.lr,
                   weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)

        def batches():
            parts = [train[pos] for pos in minibatches(len(train), self.batch_size, rng)]
            for batch in map_loader(store, self.other_keys, parts, device, self.workers):
                yield tuple(x.to(device, non_blocking=True) for x in batch)

        def batch_loss(batch):
            maps, other, targets = batch
            with autocast(device, self.amp):
                logits, _ = net(maps, other)
            return loss_fn(logits.float(), targets)

        train_epochs(self, net, opt, batches, batch_loss, n_train=len(train), store=store, val=val, log=log,
                     where=f" on {device.type}", rng=rng, start=self._start_score())
        self.net_ = net.cpu()

    # -- prediction ----------------------------------------------------------------------------
    def _outputs(self, store: FeatureStore, views: np.ndarray, attention: bool = False) -> Iterator:
        """(positions, probabilities (n, C), attention (n, C, L) or None) per chunk of `views`."""
        self.check_fitted()
        device = pick_device(self.device, self.name)
        net = self.net_.to(device)  # stays there: moving it back would break a training in progress
        size = max(1, CHUNK // 16)  # 64 views of maps at once
        training = net.training  # early stopping scores val in the middle of training
        net.eval()
        with (torch.inference_mode(), kept_heap(),
              progress(total=len(views), desc=f"{self.name} predict", leave=False) as bar):
            for lo in range(0, len(views), size):
                maps, other, _ = MapBatches(store, self.other_keys, [views[lo:lo + size]])[0]
                with autocast(device, self.amp):
                    logits, alpha = net(maps.to(device), other.to(device), attention)
                probs = torch.sigmoid(logits.float()).cpu().numpy()
                bar.update(len(probs))
                yield lo, probs, alpha.float().cpu().numpy() if attention else None
        net.train(training)

    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        self.check_fitted()
        out = np.empty((len(views), self.module_sizes_["n_labels"]), np.float32)
        for lo, probs, _ in self._outputs(store, views):
            out[lo:lo + len(probs)] = probs
        return out

    def explain_split(self, store: FeatureStore, split: str, images: np.ndarray | None = None) -> tuple:
        """predict_labels plus, per (image, predicted label), the label's attention on the image's view that
        scored it highest. Returns (images, probs, labels, records) with records a dict of arrays: image,
        view, label, step (the label's rank in the image, by probability), alpha (n, h, w)."""
        self.check_store(store)
        views = store.views(split)
        if images is not None:
            views = views[np.isin(store.view_image[views], images)]
        view_probs = self.predict_proba(store, views)
        images, probs = average_views(view_probs, store.view_image[views])
        labels = self.label_sets(probs)
        first = np.searchsorted(store.view_image[views], images)  # views of an image are together
        count = np.diff(np.append(first, len(views)))
        image_k, label = np.nonzero(labels)
        row = np.array([first[k] + int(np.argmax(view_probs[first[k]:first[k] + count[k], c]))
                        for k, c in zip(image_k, label, strict=True)], dtype=np.int64)
        rank = np.argsort(np.argsort(-probs, axis=1, kind="stable"), axis=1)  # (n, C) 0 = most probable
        alpha = np.zeros((len(row), *store.shape("maps")[:2]), np.float32)
        wanted, pos = np.unique(row, return_inverse=True)  # views to look at; each pair's one among them
        order = np.argsort(pos, kind="stable")
        for lo, _, att in self._outputs(store, views[wanted], attention=True):  # att (n, C, L)
            a, b = np.searchsorted(pos[order], [lo, lo + len(att)])
            pick = order[a:b]
            alpha[pick] = att[pos[pick] - lo, label[pick]].reshape(-1, *alpha.shape[1:])
        records = {"image": images[image_k], "view": views[row], "label": label, "step": rank[image_k, label],
                   "alpha": alpha}
        return images, probs, labels, records
