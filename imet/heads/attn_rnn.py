"""`attn_rnn`: the paper's AttnCNN-RNN (sections 3.3-3.4) as a head — training, γ tuning, decoding.

The model itself (f_R, attention, LSTM, Algorithm 2's loss) is imet/heads/attn_model.py; beam search is
imet/decode/beam.py. This module feeds them from the store: minibatches of maps (float16 on disk) and
f_R inputs through a prefetching DataLoader, so a store far larger than RAM trains; CUDA (with bf16
autocast) when present. Decoding emits one label sequence per view, so `predict_proba` gives 0/1 votes; an
image's labels are those that any of its views emitted (the paper's union), or half or all of them: γ (the stop
rule's scale on the train class frequencies, eq. 6) and that vote are tuned on val by `fit`.

Choices the paper leaves open (or makes otherwise), made here (the model's own are in attn_model.py):
- The start (`start`): the paper trains f_att from a random start; on 14x14 cells that attention gets a 1/L
  gradient per cell and never forms (issue 21: 21% of the attention on the evidence cell). By default `fit`
  first fits a csra head on the same train views (tuned on the same val) and starts from it as `init_from`
  does: its module becomes f_R (the first v_pred), its class scorers on single cells start f_att. What was
  used is recorded in the model (`start_`). `start="paper"` is the paper's start; `attention=False` (the
  ablation) has no attention to start and keeps the paper's linear f_R.
- `residual` (on by default): p_t = sigmoid(f_pred(h_t) + f_R's logits), not eq. 5: the decoder starts as f_R
  and learns corrections (measured better: docs/benchmarks.md).
- `hog` unset: f_R (and the csra start) read HOG when the store has it (section 3.4's variant; measured
  better on the planted family, docs/benchmarks.md).
- γ is tuned on val over a log grid of 6 decades, extended where the best γ sits on a rising edge (the paper
  gives no grid); with it, the view vote (the paper: the union of the views).
- Early stopping on val F2 (`patience`), counted from the decoder as started when it has a start (its csra or
  --init-from: the start's weights come back when no epoch beats it), Adam with cosine annealing
  (train_epochs), class weights clipped at 10 (the paper's, section 4).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import imet.heads.ddp as ddp
from imet.decode.beam import BeamResult, beam_search_rules
from imet.decode.thresholds import apply_thresholds, average_views
from imet.errors import ImetError
from imet.heads.attn_model import AttnRNN
from imet.heads.base import Head, get_head, load_model, register
from imet.heads.linear import LinearHead
from imet.heads.maps import MapBatches, MapHead, map_loader, map_stats
from imet.heads.params import VOTES, AttnRNNParams
from imet.heads.train import (
    TrainedHead,
    adam,
    chunks,
    feature_stats,
    minibatches,
    pos_weight,
    snapshot,
    train_epochs,
)
from imet.metrics import scores
from imet.progress import progress
from imet.runtime import autocast, kept_heap, pick_device
from imet.store import FeatureStore

# The γ grid searched on val: 4 points a decade over 1e-3..1e3, the stop rule's whole useful range (γ f > 1 stops
# every path at its first label, γ f << p never stops one). Where the best γ lands on an edge of what was
# searched, EXTEND_DECADES more decades beyond it are searched, at most MAX_EXTENSIONS times on each side.
GAMMAS = np.logspace(-3, 3, 25)
EXTEND_DECADES, MAX_EXTENSIONS = 2, 3
DEFAULT_BEAM = 5  # K when `beam` is not given (fewer on a store of fewer labels: K is at most the labels)
DECODE_CHUNK = {"cpu": 64, "cuda": 256}  # views per beam-search call (64 views of float32 maps: 100 MiB)


@register
class AttnRNNHead(AttnRNNParams, TrainedHead):
    """Attention LSTM decoder over the 14x14 maps, trained without a label order (Algorithm 2)."""

    name = "attn_rnn"
    probabilistic = False
    @property
    def needs(self) -> tuple[str, ...]:
        return ("maps", "pooled", "hog") if self.uses_hog else ("maps", "pooled")

    @property
    def uses_hog(self) -> bool:
        """`hog` as resolved by the last fit (or the model file), else as given."""
        return self.__dict__.get("hog_", bool(self.hog))

    def fit(self, store: FeatureStore, y: None = None, **kwargs) -> AttnRNNHead:
        """Head.fit, with hog=None resolved first (`needs` depends on it)."""
        self.validate()  # parameters first, as Head.fit checks them
        self.require_store(store, y)
        self._resolve_hog(store)
        return super().fit(store, **kwargs)

    def _resolve_hog(self, store: FeatureStore) -> None:
        """hog_: `hog`, or when None: HOG when the store has it (section 3.4's variant; linear_hog reads it
        too), or as the init_from model read it."""
        if self.hog is not None:
            self.hog_ = bool(self.hog)
        elif self.init_from:
            init = load_model(Path(self.init_from))
            self.hog_ = init.hog if isinstance(init, MapHead) else init.name == "linear_hog"
        else:
            self.hog_ = "hog" in store.layout()

    def _device(self) -> torch.device:
        return pick_device(self.device, self.name)

    # -- training ------------------------------------------------------------------------------
    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        if self.thresholds != "global":
            raise ImetError("attn_rnn decodes by beam search and a vote over views; "
                            "the thresholds parameter does not apply")
        if "hog_" not in self.__dict__:  # a caller of _fit that bypassed fit
            self._resolve_hog(store)
        c, d = len(store.vocab), store.shape("maps")[-1]
        train_images = np.unique(store.view_image[train])
        self.steps_ = min(self.steps or int(store.targets[train_images].sum(1).max()), c)
        self.freq_ = store.targets[train_images].mean(0).astype(np.float64)  # f: class frequencies in train
        if self.init_from:
            init = load_model(Path(self.init_from))
            init.check_store(store)
            self.start_ = {"from": "init_from", "path": str(self.init_from), "head": init.name}
        elif self.start == "csra" and self.attention:
            init = self._fit_start(store, train, val, log)
        else:  # the paper's start; the no-attention ablation has no attention to start
            init, self.start_ = None, {"from": "paper"}
        self.fr_head_ = fr_head_spec(init, self.hog_, self.init_from)
        self.fr_keys_ = fr_keys(self.fr_head_, self.hog_)
        fr_dim = sum(int(np.prod(store.shape(k))) for k in self.fr_keys_)
        fr_net = None if self.fr_head_ is None else copy.deepcopy(init.net_)
        self.model_ = AttnRNN(n_labels=c, map_channels=d, fr_dim=fr_dim, hidden=self.hidden,
                              attention_dim=self.attention_dim, pred_dim=self.pred_dim, dropout=self.dropout,
                              attention=self.attention, residual=self.residual, fr_net=fr_net)
        self._init_fr(store, train, init)
        self.model_.set_map_stats(*map_stats(store, train, np.random.default_rng(self.seed)))
        self._init_attention(store, train, init)
        device = self._device()
        model = self.model_.to(device)
        weights = pos_weight(store, train, self.class_weights).to(device)
        criterion = self.loss_fn(weights)  # bce (the paper's weighted BCE), asl or focal, per step
        opt = adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)

        def batches():
            for batch in self._loader(store, train, rng):
                yield tuple(x.to(device, non_blocking=True) for x in batch)

        def batch_loss(batch):
            maps, fr_in, targets = batch
            with autocast(device, self.amp):
                return model.loss(maps, fr_in, targets, weights, steps=self.steps_, pool=self.pool, criterion=criterion)

        self.history_ = train_epochs(self, model, opt, batches, batch_loss, n_train=len(train), store=store, val=val,
                                     log=log, where=f" on {device.type}", rng=rng,
                                     start=self._start_score(store, val, init, model, log))
        self.model_ = model.cpu()

    def _fit_start(self, store: FeatureStore, train: np.ndarray, val: np.ndarray,
                   log: Callable[[str], None]) -> Head:
        """The class-attention start: a csra head fitted on the same train views (tuned on the same val), whose
        cell scorers start f_att and whose module becomes f_R. The paper starts f_att at random; on 196 cells
        that attention gets a 1/L gradient per cell and never forms (issue 21: 21% on the evidence cell)."""
        from imet.heads.csra import CSRAHead

        params = dict(hog=self.hog_, epochs=self.start_epochs, patience=0, batch_size=self.batch_size,
                      class_weights=self.class_weights, seed=self.seed, device=self.device, workers=self.workers,
                      amp=self.amp, loss=self.loss, focal_gamma=self.focal_gamma, asl_gamma_pos=self.asl_gamma_pos,
                      asl_gamma_neg=self.asl_gamma_neg, asl_clip=self.asl_clip)
        head = CSRAHead(**params)
        log(f"{self.name}: fitting its start, csra ({self.start_epochs} epochs at most)")
        head.fit(store, log=log, views=(train, val))
        val_f2 = getattr(head, "val_f2_", None)  # under torchrun only rank 0 tunes (and writes the model)
        self.start_ = {"from": "csra", "params": {k: v for k, v in params.items() if k not in ("device", "workers")},
                       "val_f2": None if val_f2 is None else float(val_f2)}
        if val_f2 is not None:
            log(f"{self.name}: start csra val F2 {val_f2:.4f} ({head.fit_seconds_:.0f} s)")
        return head

    def _start_score(self, store: FeatureStore, val: np.ndarray, init: Head | None, model: AttnRNN,
                     log: Callable[[str], None]) -> tuple[float, dict] | None:
        """With early stopping and a start (its csra, or --init-from), the decoder as started, scored on val, is
        the bar its epochs must beat, as mldecoder's start is: on the planted family the untrained decoder (f_R's
        probabilities, beam search, eq. 6) scored as well as the trained one, or better (docs/benchmarks.md,
        "Where attn_rnn loses to its start"), and an epoch that does not beat it is not kept."""
        if not self.patience or init is None:
            return None
        f2 = ddp.current().from_main(lambda: self.val_score(store, val))
        log(f"{self.name}: as started, val F2 {f2:.4f} (its epochs must beat it)")
        return f2, snapshot(model)

    def _loader(self, store: FeatureStore, views: np.ndarray, rng: np.random.Generator) -> Iterator:
        batches = [views[pos] for pos in minibatches(len(views), self.batch_size, rng)]
        return map_loader(store, self.fr_keys_, batches, self._device(), self.workers)

    def _init_fr(self, store: FeatureStore, train: np.ndarray, init: Head | None) -> None:
        """f_R from a fitted linear head (--init-from), else its standardisation from the train views; a map
        head's module is f_R itself (`fr_head_spec`)."""
        if self.fr_head_ is not None:
            return
        if isinstance(init, LinearHead):
            standardize, fc = init.net_
            self.model_.init_fr(fc.weight.detach(), fc.bias.detach(), standardize.mean, standardize.std)
            return
        mean, std = feature_stats(store, self.fr_keys_, train)
        self.model_.fr_mean.copy_(mean)
        self.model_.fr_std.copy_(std)

    def _init_attention(self, store: FeatureStore, train: np.ndarray, init: Head | None) -> None:
        """f_att from the class scorers of the --init-from model applied to single cells (see init_attention)."""
        if init is None or not self.attention:
            return
        weight, bias = cell_scorers(init, store.shape("maps")[-1])
        if weight is None:
            return
        keep = np.argsort(-self.freq_, kind="stable")[:self.attention_dim]  # the most frequent labels when A < C
        sample = MapBatches(store, (), [np.sort(np.random.default_rng(self.seed).choice(train, min(64, len(train)),
                                                                                    replace=False))])[0][0]
        self.model_.init_attention(weight[keep], bias[keep], sample)

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, store: FeatureStore, views: np.ndarray, *, gamma: float | None = None,
               return_alpha: bool = False) -> BeamResult:
        """Beam search over `views` in chunks: one label sequence per view (and its attention maps)."""
        self.check_fitted()
        return self.decode_gammas(store, views, [self.gamma_ if gamma is None else gamma], return_alpha)[0]

    def decode_gammas(self, store: FeatureStore, views: np.ndarray, gammas, return_alpha: bool = False,
                      ) -> list[BeamResult]:
        """`decode` under each of `gammas` (the stop rule's scale), from one beam search (beam_search_rules)."""
        self.check_fitted()
        device, home = self._device(), next(self.model_.parameters()).device
        model = self.model_.to(device)
        log_thr = torch.from_numpy(np.log(np.maximum(np.outer(gammas, self.freq_), 1e-12)))  # (G, C)
        chunk, parts = DECODE_CHUNK[device.type], []
        with kept_heap(), progress(total=len(views), desc=f"{self.name} decode", leave=False) as bar:
            for part in list(chunks(views, chunk)) or [views]:  # no views: one empty batch, an empty result
                maps, fr_in, _ = MapBatches(store, self.fr_keys_, [part])[0]
                with autocast(device, self.amp):
                    out = beam_search_rules(model, maps, fr_in, beam=self.beam_width(), steps=self.steps_,
                                            log_thresholds=log_thr, return_alpha=return_alpha)
                parts.append([BeamResult(*(None if x is None else x.cpu() for x in r)) for r in out])
                bar.update(len(part))
        self.model_ = model.to(home)  # where it was: a training in progress scores val with it
        return [BeamResult(*(None if rule[0][i] is None else torch.cat([r[i] for r in rule]) for i in range(4)))
                for rule in zip(*parts, strict=True)]

    def predict_labels(self, store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, votes, labels, _ = self.explain_split(store, split)
        return images, votes, labels

    def explain_split(self, store: FeatureStore, split: str, images: np.ndarray | None = None) -> tuple:
        """predict_labels plus, per (image, label), the attention of the step that emitted it.

        The emitting view is the one that emitted the label at the earliest step (then the first view).
        Returns (images, votes, labels, records) with records a dict of arrays: image, view, label, step,
        alpha (n, h, w).
        """
        self.check_store(store)
        views = store.views(split)
        if images is not None:
            views = views[np.isin(store.view_image[views], images)]
        result = self.decode(store, views, return_alpha=True)
        images, votes = average_views(self.votes(result), store.view_image[views])
        labels = apply_thresholds(votes, self.threshold_, min_labels=self.min_labels, max_labels=self.max_labels)
        return images, votes, labels, self._emitting(store, views, result, images, labels)

    def _emitting(self, store: FeatureStore, views: np.ndarray, result: BeamResult, images: np.ndarray,
                  labels: np.ndarray) -> dict[str, np.ndarray]:
        grid = store.shape("maps")[:2]
        seq = result.labels.numpy()  # (n_views, T)
        row, step = np.nonzero(seq >= 0)
        label = seq[row, step]
        image = store.view_image[views[row]]
        order = np.lexsort((row, step, label, image))  # per (image, label): earliest step, then first view
        row, step, label, image = row[order], step[order], label[order], image[order]
        first = np.ones(len(row), bool)
        first[1:] = (image[1:] != image[:-1]) | (label[1:] != label[:-1])
        keep = first & labels[np.searchsorted(images, image), label]
        row, step, label, image = row[keep], step[keep], label[keep], image[keep]
        alpha = result.alpha.numpy()[row, step].reshape(-1, *grid)
        return {"image": image, "view": views[row], "label": label, "step": step, "alpha": alpha}

    def votes(self, result: BeamResult) -> np.ndarray:
        """(n, C) float32 0/1: the labels each view's path emitted."""
        labels = result.labels.numpy()
        out = np.zeros((len(labels), len(self.freq_)), np.float32)
        rows, cols = np.nonzero(labels >= 0)
        out[rows, labels[rows, cols]] = 1.0
        return out

    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        """0/1 per view and label: this head gives hard labels (its image labels are a vote of its views)."""
        return self.votes(self.decode(store, views))

    def tune(self, store: FeatureStore, val: np.ndarray) -> None:
        """γ from a grid (the paper tunes γ on val) and the view vote (`view_vote`), by val F2; every grid point
        from one decode; ties go to the smaller γ, then to the vote listed first."""
        self.val_f2_, self.gamma_, self.threshold_ = self.best_rule(store, val)
        self.class_thresholds_ = None

    def val_score(self, store: FeatureStore, val: np.ndarray) -> float:
        """Val F2 at the best γ and vote: the early-stopping score (one decode of val per epoch)."""
        return self.best_rule(store, val)[0]

    def best_rule(self, store: FeatureStore, val: np.ndarray) -> tuple[float, float, float]:
        """(val F2, γ, vote threshold) of the best stop rule and view vote, over GAMMAS extended where the best
        γ lands on an edge (`search_gammas`)."""
        votes = list(VOTES.values()) if self.view_vote == "tune" else [VOTES[self.view_vote]]

        def rules(gammas: np.ndarray) -> list[tuple[float, float, float]]:
            out = []
            for gamma, result in zip(gammas, self.decode_gammas(store, val, gammas), strict=True):
                images, mean_votes = average_views(self.votes(result), store.view_image[val])
                for vote in votes:
                    labels = apply_thresholds(mean_votes, vote, min_labels=self.min_labels,
                                              max_labels=self.max_labels)
                    out.append((scores(store.targets[images], labels)["f2"], float(gamma), vote))
            return out

        return search_gammas(rules)

    def beam_width(self) -> int:
        """K of the beam search: `beam`, or DEFAULT_BEAM capped at the label count."""
        return self.beam or min(DEFAULT_BEAM, len(self.vocab_))

    def decoding(self) -> str:
        vote = {v: k for k, v in VOTES.items()}.get(self.threshold_, f"{self.threshold_:.2g}")
        return f"beam {self.beam_width()}, gamma {self.gamma_:.3g}, labels emitted by {vote} of an image's views"

    def decoding_info(self) -> dict:
        """Beam search: the beam width, the tuned stop rule's gamma and the share of an image's views that vote."""
        return {"mode": "beam", "beam": self.beam_width(), "gamma": float(self.gamma_), "vote": float(self.threshold_)}

    # -- persistence ---------------------------------------------------------------------------
    def _module(self) -> torch.nn.Module | None:
        return getattr(self, "model_", None)

    def _extra_state(self) -> dict:
        return {"model_config": self.model_.config, "fr_head": self.fr_head_, "gamma": self.gamma_,
                "steps": self.steps_, "freq": self.freq_.tolist(), "history": list(self.history_),
                "start": self.start_, "hog": self.hog_}

    def _build(self, learned: dict) -> None:
        self.fr_head_ = learned.get("fr_head")
        self.hog_ = bool(learned.get("hog", self.hog))  # files of an older imet: hog was True or False
        self.fr_keys_ = fr_keys(self.fr_head_, self.hog_)
        fr_net = None
        if self.fr_head_ is not None:
            spec = self.fr_head_
            fr_net = get_head(spec["name"])(**spec["params"])._make(**spec["sizes"])
        self.model_ = AttnRNN(**learned["model_config"], fr_net=fr_net)
        self.gamma_, self.steps_ = learned["gamma"], learned["steps"]
        self.freq_ = np.array(learned["freq"], dtype=np.float64)
        self.history_ = learned["history"]
        self.start_ = learned.get("start")  # None in files of an older imet


def search_gammas(rules: Callable[[np.ndarray], list[tuple[float, float, float]]]) -> tuple[float, float, float]:
    """The best (F2, γ, vote) that `rules(gammas)` gives over GAMMAS, extended by EXTEND_DECADES decades past
    an edge where the best γ lands on it and beats the γ next to it (F2 still rising there; a plateau, e.g. no
    path ever stops below some γ, is not extended), at most MAX_EXTENSIONS times; ties go to the smaller γ,
    then to the rule listed first."""
    step = GAMMAS[1] / GAMMAS[0]
    more = np.arange(1, round(EXTEND_DECADES / np.log10(step)) + 1)  # grid steps of one extension
    seen = rules(GAMMAS)
    for _ in range(MAX_EXTENSIONS):
        best = min(seen, key=lambda r: (-r[0], r[1]))
        gammas = sorted({r[1] for r in seen})
        at = {g: max(r[0] for r in seen if r[1] == g) for g in gammas}  # best F2 at each γ
        if best[1] == gammas[0] and at[gammas[0]] > at[gammas[1]]:
            seen += rules(gammas[0] / step ** more[::-1])
        elif best[1] == gammas[-1] and at[gammas[-1]] > at[gammas[-2]]:
            seen += rules(gammas[-1] * step ** more)
        else:
            break
    return min(seen, key=lambda r: (-r[0], r[1]))


def cell_scorers(head: Head, channels: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(W (C, D), b (C,)) such that W v + b scores each label on one RAW map cell v, from a fitted linear-type
    head whose pooled part has the maps' width (the pooled vector is a mean of such cells), or a csra head;
    (None, None) for heads without one."""
    from imet.heads.csra import CSRAHead

    with torch.no_grad():
        if isinstance(head, LinearHead):
            standardize, fc = head.net_
            if head.layout_.get("pooled") != [channels]:
                return None, None
            w = fc.weight[:, :channels] / standardize.std[:channels]
            return w, fc.bias - w @ standardize.mean[:channels]
        if isinstance(head, CSRAHead):
            net = head.net_
            w = net.classifier.weight / net.map_std
            return w, net.classifier.bias - w @ net.map_mean
    return None, None


def fr_head_spec(init: Head | None, hog: bool, path: str | None) -> dict | None:
    """How f_R starts from the --init-from model: None for the paper's linear f_R (from a linear / linear_hog
    model matching --hog, or random), else {name, params, sizes} of a map head (csra, mldecoder) whose module
    becomes f_R, so the first v_pred already carries the cells' local evidence (issue 10, item 4)."""
    if init is None:
        return None
    if isinstance(init, MapHead):
        if init.hog != hog:
            raise ImetError(f"{path}: this {init.name} model was fitted with hog={init.hog}; fit attn_rnn with "
                            f"hog={init.hog} to start f_R from it")
        return {"name": init.name, "params": init.get_params(), "sizes": dict(init.module_sizes_)}
    want = "linear_hog" if hog else "linear"
    if not isinstance(init, LinearHead) or init.name != want:
        raise ImetError(f"{path}: init_from needs a {want}, csra or mldecoder model (this is {init.name})")
    return None


def fr_keys(spec: dict | None, hog: bool) -> tuple[str, ...]:
    """The store features f_R reads besides the maps: pooled (+ HOG) for the linear f_R, HOG or nothing for a
    map head's."""
    if spec is None:
        return ("pooled", "hog") if hog else ("pooled",)
    return ("hog",) if hog else ()
