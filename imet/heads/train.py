"""The toolkit every trained head shares: reading features in chunks, their statistics, the paper's class
weights, random minibatches, the val F2 score and the one training loop (`train_epochs`).

Heads build their module and optimiser, then hand `train_epochs` a batch iterator and a loss; everything
streams from the store's memmaps, so a store larger than RAM trains.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import imet.checkpoint as recording
import imet.heads.ddp as ddp
from imet.errors import ImetError
from imet.heads.base import Head
from imet.heads.params import TrainedParams
from imet.progress import progress
from imet.runtime import kept_heap
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


def adam(params, **options) -> torch.optim.Adam:
    """Adam as every head steps it: PyTorch's fused kernel (one pass over each parameter for the whole update).
    At linear_hog's 13.7 M weights (1,103 labels) the update took 14 ms against 127 ms for the default
    multi-tensor Adam, which had been over half of each batch's time (1 thread, `python
    benchmarks/bench_adam.py`); the weights equal the default's to float rounding."""
    return torch.optim.Adam(params, fused=True, **options)


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


class TrainedHead(TrainedParams, Head):
    """Base of the heads trained by `train_epochs`: the loss, declared once for all of them (LOSS_PARAMS)."""

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


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `net`'s weights that later steps do not change (for `load_state_dict`): early stopping's best
    epoch, and a start to come back to."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def train_epochs(head: Head, net: nn.Module, opt: torch.optim.Optimizer,
                 epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
                 batch_loss: Callable[[tuple[torch.Tensor, ...]], torch.Tensor], *, n_train: int, store: FeatureStore,
                 val: np.ndarray, log: Callable[[str], None], where: str = "",
                 rng: np.random.Generator | None = None,
                 start: tuple[float, dict[str, torch.Tensor]] | None = None) -> list[float]:
    """The one training loop of every head: `head.epochs` passes of Adam steps with cosine annealing over
    `epoch_batches()` (tuples whose last item is the (n, C) targets), the loss checked finite each epoch, and
    early stopping on val F2 after `head.patience` epochs without a better one (0 or absent: never), keeping
    the best epoch's weights. `start`: the val F2 and weights of where `net` starts (a head started from
    another model), the best to beat from the first epoch: early stopping then keeps the start when no epoch
    scores above it. Returns the mean train loss of each epoch.

    `batch_loss` is the mean over the batch's views: under torchrun (imet.heads.ddp) each rank's batches are
    its shares of the global batches of `minibatches(n_train, head.batch_size)`, and weighting each rank's
    mean by its share makes the step the single process's.

    Inside `imet.checkpoint.recording`, each epoch also writes a metrics row (val F2 scored every epoch then)
    and the whole training state to the checkpoint, and a checkpointed run resumes after its last epoch:
    `rng` is the generator `epoch_batches` draws its batch order from (its state is part of that state)."""
    steps = head.epochs * -(-n_train // head.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    patience = getattr(head, "patience", 0)
    ranks = ddp.current()
    step_loss = ranks.wrap(net, batch_loss, next(net.parameters()).device)
    recorder = recording.current()
    phase = recorder.next_phase()
    loop = Loop()
    if start is not None and patience:
        loop.best, loop.best_state = start
    if recorder.checkpoint is not None:
        if rng is None:
            raise ImetError(f"{head.name}: this head does not hand its batch order to the training loop, so it "
                            "cannot resume; fit it without --checkpoint")
        loop.resume(recorder.checkpoint, phase, head, net, opt, sched, rng, n_train, log)
    with kept_heap():  # each step's activations and gradients reuse the last step's pages (CPU)
        for epoch in range(len(loop.history) + 1, 0 if loop.stopped else head.epochs + 1):
            t0, total, lr = time.monotonic(), 0.0, math.nan
            net.train()
            with progress(total=n_train, desc=f"{head.name} epoch {epoch}/{head.epochs}", leave=False) as bar:
                for k, batch in enumerate(epoch_batches()):
                    n_global = ranks.step_views(k, head.batch_size, n_train, len(batch[-1]))  # on all ranks
                    loss = step_loss(batch)
                    opt.zero_grad(set_to_none=True)
                    (loss * ranks.weight(n_global)).backward()
                    lr = opt.param_groups[0]["lr"]
                    opt.step()
                    sched.step()
                    total += loss.item() * ranks.count(n_global)
                    bar.update(n_global)
            loop.history.append(ranks.total(total) / n_train)
            head.check_loss(epoch, loop.history[-1])
            line = f"{head.name} epoch {epoch}/{head.epochs}: loss {loop.history[-1]:.4f}"
            score = math.nan
            if patience or recorder.scores:
                score = ranks.from_main(lambda: head.val_score(store, val))
                line += f", val F2 {score:.4f}"
            if patience:
                loop.early_stopping(score, net)
            seconds = time.monotonic() - t0
            log(f"{line} ({seconds:.1f} s, {n_train / seconds:.0f} views/s{where})")
            loop.stopped = bool(patience and loop.stale >= patience)
            if ranks.main and recorder.metrics is not None:
                recorder.metrics.write({"head": head.name, "epoch": epoch, "loss": loop.history[-1], "val_f2": score,
                                        "lr": lr, "seconds": seconds, "views_per_s": n_train / seconds})
            if ranks.main and recorder.checkpoint is not None:
                recorder.checkpoint.save(phase, loop.state(head, net, opt, sched, rng, n_train))
            if loop.stopped:
                kept = epoch - loop.stale
                log(f"{head.name}: no better val F2 for {patience} epochs; keeping "
                    + (f"epoch {kept}" if kept else f"its start's (val F2 {loop.best:.4f})"))
                break
    if loop.best_state is not None:
        net.load_state_dict(loop.best_state)
    return loop.history


class Loop:
    """The state of `train_epochs` between epochs besides the module, optimiser and scheduler: the losses so
    far and early stopping's best val F2, its weights and the epochs since; what a checkpoint adds to them."""

    def __init__(self):
        self.history: list[float] = []
        self.best, self.best_state, self.stale, self.stopped = -1.0, None, 0, False

    def early_stopping(self, score: float, net: nn.Module) -> None:
        if score > self.best:
            self.best, self.stale = score, 0
            self.best_state = snapshot(net)
        else:
            self.stale += 1

    def state(self, head: Head, net: nn.Module, opt: torch.optim.Optimizer, sched, rng: np.random.Generator | None,
              n_train: int) -> dict:
        """Everything the next epoch depends on, as plain tensors and JSON text (loaded with weights_only)."""
        cpu = lambda d: None if d is None else {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        return {"head": head.name, "n_train": n_train, "epochs_done": len(self.history),
                "history": list(self.history), "best": self.best, "stale": self.stale, "stopped": self.stopped,
                "net": cpu(net.state_dict()), "best_state": cpu(self.best_state), "opt": opt.state_dict(),
                "sched": json.dumps(sched.state_dict()),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                        "numpy": json.dumps(None if rng is None else rng.bit_generator.state),
                        "python": json.dumps(random.getstate())}}

    def resume(self, checkpoint, phase: int, head: Head, net: nn.Module, opt: torch.optim.Optimizer, sched,
               rng: np.random.Generator | None, n_train: int, log: Callable[[str], None]) -> None:
        """Load phase `phase`'s state, if the checkpoint holds one, into the module, optimiser, scheduler, the
        random generators and this loop."""
        saved = checkpoint.load(phase)
        if saved is None:
            return
        if saved["head"] != head.name or saved["n_train"] != n_train:
            raise ImetError(f"{checkpoint.folder}: phase {phase} of this checkpoint trained {saved['head']} on "
                            f"{saved['n_train']} views, not {head.name} on {n_train}; give --checkpoint a new folder")
        device = next(net.parameters()).device
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(json.loads(saved["sched"]))
        self.history, self.best, self.stale = saved["history"], saved["best"], saved["stale"]
        self.stopped, best = saved["stopped"], saved["best_state"]
        self.best_state = None if best is None else {k: v.to(device) for k, v in best.items()}
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        if not ddp.current().main:  # every rank restored rank 0's state: the others get dropout draws of their own
            torch.manual_seed(torch.initial_seed() + 7919 * len(self.history))
        if rng is not None and saved["rng"]["numpy"] != "null":
            rng.bit_generator.state = json.loads(saved["rng"]["numpy"])
        python = json.loads(saved["rng"]["python"])
        random.setstate((python[0], tuple(python[1]), python[2]))
        log(f"{head.name}: resuming after epoch {len(self.history)} of {head.epochs} from {checkpoint.folder}"
            + (" (training had finished)" if self.stopped or len(self.history) >= head.epochs else ""))
