"""`lgbm`: LightGBM one-vs-rest on the pooled vector, optionally ⊕ a PCA of HOG.

One binary booster per label that has at least `min_positives` positive train views (and as many
negatives); every other label predicts its prior, the fraction of train views carrying it. Positives
weigh negatives/positives, at most 10 (`scale_pos_weight`, the paper's class weights); each booster stops
early on the val views' log loss.

At iMet's shape (1,103 labels, 650k train views) one booster per label over every row is days of work;
most labels have a few hundred positives or fewer. So each label's booster trains on its positives and
`negatives` sampled negatives per positive (at least `min_negatives`), and its logit is shifted back by
log(kept share of negatives), which makes its probabilities those of a fit on every row (King and Zeng's
prior correction; measured in tests/test_lgbm.py). Train cost then grows with the positives, not with
views x labels. Bagging (`subsample`) and `colsample` thin rows and features per tree.

With few rows per booster, a round's cost is the features it builds histograms for and splits on, not
the rows: by default each tree samples about TREE_FEATURES features (10% of 2,048 pooled), which LightGBM
builds histograms for alone: 3x less CPU than half the features at 1,103 labels, same test F2
(docs/scale.md, "Where lgbm's time goes at 1,103 labels").

LightGBM trains on its own binned copy of the features (one byte per feature and view), never on the float
matrix: the bin edges come from a seeded sample of `BIN_ROWS` train views, then every train view is read
from the store in chunks and pushed into the binned set (`binned`; the float32 (n_train_views, F) matrix,
F = pooled width + hog_pca, would be 5.4 GB at full iMet, and LightGBM's sample of 200k of its rows as
doubles 4.9 GB more). The targets are kept as each label's positive rows (`label_positives`), never as a
float32 (views, labels) matrix. Every label's rows are subsets of that one binned set, trained by a pool of
single-threaded workers. Val views too, for early stopping, binned with the train views' edges.
Prediction streams in chunks. The HOG PCA is fitted on the train views from a covariance accumulated in
chunks (memory: hog width² float64) and saved as tensors.

The model file holds each booster as LightGBM's model text (`model_to_string`), never a pickle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

import imet.checkpoint as recording
from imet.booster_text import check_booster_text
from imet.errors import ImetError
from imet.forest import Forest
from imet.heads.base import Head, register
from imet.heads.params import TREE_FEATURES, LgbmParams
from imet.heads.train import CHUNK, chunks, class_weights
from imet.progress import progress
from imet.runtime import cores
from imet.store import FeatureStore

MAX_BIN = 63  # histogram bins per feature: 2.4x faster than LightGBM's 255 here, same early-stopped scores
BIN_ROWS = 20_000  # train views the bin edges are found from (LightGBM's default is 200k rows: 63 bins need fewer)
LGBM_FORMAT = 2  # 2: boosters trained on sampled negatives, with a logit offset each (1: every row, no offset)


class HogPca(nn.Module):
    """x -> (x - mean) @ components: HOG projected on its top principal directions of the train views."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("components", components)  # (D, k), largest variance first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components  # (B, D) -> (B, k)


def fit_hog_pca(store: FeatureStore, views: np.ndarray, k: int, chunk: int = CHUNK) -> HogPca:
    """PCA of the views' HOG from the float64 covariance summed over chunks (k capped at the HOG width)."""
    total = gram = None
    for part in chunks(views, chunk):
        x = torch.from_numpy(store.read("hog", part).reshape(len(part), -1)).double()  # (B, D)
        total = x.sum(0) if total is None else total + x.sum(0)
        gram = x.T @ x if gram is None else gram + x.T @ x
    mean = total / len(views)
    cov = gram / len(views) - torch.outer(mean, mean)  # (D, D)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    components = vectors[:, -min(k, len(mean)):].flip(1)  # (D, k)
    signs = torch.sign(components.gather(0, components.abs().argmax(0, keepdim=True)))
    return HogPca(mean.float(), (components * signs).float())  # largest entry positive: a fixed sign


def feature_width(store: FeatureStore, pca: HogPca | None) -> int:
    """F: the width of a view's features, the pooled vector then its HOG PCA when there is one."""
    return int(np.prod(store.shape("pooled"))) + (0 if pca is None else pca.components.shape[1])


def design_matrix(store: FeatureStore, views: np.ndarray, pca: HogPca | None) -> np.ndarray:
    """(n, F) float32 in memory: pooled features of `views`, then their HOG PCA when there is one."""
    out = np.empty((len(views), feature_width(store, pca)), np.float32)
    lo = 0
    for part in chunks(views):
        x = store.read("pooled", part).reshape(len(part), -1)
        if pca is not None:
            with torch.inference_mode():
                hog = torch.from_numpy(store.read("hog", part).reshape(len(part), -1).astype(np.float32))
                x = np.concatenate([x, pca(hog).numpy()], axis=1)
        out[lo:lo + len(part)] = x
        lo += len(part)
    return out


def binned(store: FeatureStore, views: np.ndarray, pca: HogPca | None, params: dict, seed: int,
           reference=None):
    """LightGBM's constructed Dataset of `views` (labels 0: each booster sets its own on a subset), built
    without the (n, F) float matrix: bin edges from a seeded sample of at most BIN_ROWS views (or those of
    `reference`, a Dataset built here), then the views read from the store and pushed in chunks."""
    import lightgbm as lgb  # imported where used: the other heads' processes stay smaller

    class Rows(lgb.Sequence):
        batch_size = CHUNK

        def __len__(self) -> int:
            return len(views)

        def __getitem__(self, idx):  # LightGBM reads ranges only: its row sampling is skipped (a reference)
            return design_matrix(store, views[idx], pca)

    if reference is None:
        sample = np.sort(np.random.default_rng(seed).permutation(len(views))[:BIN_ROWS])
        reference = lgb.Dataset(design_matrix(store, views[sample], pca), params=params).construct()
    return lgb.Dataset(Rows(), np.zeros(len(views), np.float32), reference=reference, params=params).construct()


def label_positives(store: FeatureStore, views: np.ndarray) -> list[np.ndarray]:
    """Per label, the ascending positions in `views` of its positive views: the targets read in chunks and
    kept as ~labels-per-view int64 a view, not as the float32 (views, labels) matrix (2.9 GB at full iMet)."""
    rows, cols = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for lo in range(0, len(views), CHUNK):
        r, c = np.nonzero(store.view_targets(views[lo:lo + CHUNK]))
        rows.append(r + lo)
        cols.append(c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    order = np.argsort(cols, kind="stable")  # by label, rows ascending within each
    return np.split(rows[order], np.cumsum(np.bincount(cols, minlength=len(store.vocab)))[:-1])


def column(positives: np.ndarray, n: int) -> np.ndarray:
    """A label's (n,) 0/1 column from its positive rows."""
    y = np.zeros(n, bool)
    y[positives] = True
    return y


def boosted_labels(positives: np.ndarray, n: int, min_positives: int) -> np.ndarray:
    """Labels with at least `min_positives` positive and negative rows of `n` (`positives`: each label's count):
    the ones that get a booster."""
    return np.flatnonzero((positives >= min_positives) & (n - positives >= min_positives))


def sample_rows(y: np.ndarray, negatives: int, floor: int, seed: int, label: int) -> tuple[np.ndarray, float]:
    """(sorted rows, log of the kept share of negatives) of one label's 0/1 column `y`: every positive and
    `negatives` negatives per positive, at least `floor` (all of them when there are fewer, or `negatives`
    is 0), drawn by a generator seeded by (seed, label): a label's sample does not depend on the thread."""
    pos, neg = np.flatnonzero(y > 0), np.flatnonzero(y <= 0)
    keep = len(neg) if negatives == 0 else min(len(neg), max(negatives * len(pos), floor))
    if keep == len(neg):
        return np.arange(len(y)), 0.0
    chosen = np.random.default_rng([seed, label]).choice(neg, keep, replace=False)
    return np.sort(np.concatenate([pos, chosen])), float(np.log(keep / len(neg)))


def early_stopped(booster, rounds: int, patience: int) -> int:
    """Train `booster` until `patience` rounds bring no lower val loss (as lightgbm.early_stopping does);
    the round count with the least loss, which its saved text keeps."""
    best, best_round = np.inf, 0
    for r in range(1, rounds + 1):
        finished = booster.update()  # True: no split left, no tree added
        loss = booster.eval_valid()[0][2]
        if loss < best:
            best, best_round = loss, r
        if finished or r - best_round >= patience:
            break
    return max(1, min(best_round, booster.current_iteration()))


class Ticker:
    """A progress bar's `update(1)` made safe for the worker threads that train boosters."""

    def __init__(self, bar):
        self.bar, self.lock = bar, threading.Lock()

    def tick(self) -> None:
        with self.lock:
            self.bar.update(1)


def check_boosters(texts: list[str], n_features: int, what: str = "booster") -> None:
    """Check every booster's model text before anything parses it (`imet.booster_text`: LightGBM's own parser
    aborts the process on damaged text); errors name `what` and the booster's index."""
    for i, text in enumerate(texts):
        check_booster_text(text, n_features, f"{what} {i}")


@register
class LgbmHead(LgbmParams, Head):
    """LightGBM one-vs-rest on pooled (⊕ HOG PCA); labels with too few positives predict their prior."""

    name = "lgbm"
    @property
    def needs(self) -> tuple[str, ...]:
        return ("pooled", "hog") if self.hog_pca else ("pooled",)

    def feature_fraction(self, n_features: int) -> float:
        """`colsample`, or the share that gives each tree TREE_FEATURES of `n_features` (1 when fewer)."""
        return self.colsample if self.colsample is not None else min(1.0, TREE_FEATURES / n_features)

    def booster_params(self, scale_pos_weight: float, threads: int, n_features: int) -> dict:
        """LightGBM parameters of one label's booster over `n_features` features."""
        bagging = {"bagging_fraction": self.subsample, "bagging_freq": 1} if self.subsample < 1 else {}
        return {"objective": "binary", "metric": "binary_logloss", "num_leaves": self.num_leaves,
                "learning_rate": self.learning_rate, "min_data_in_leaf": self.min_leaf,
                "feature_fraction": self.feature_fraction(n_features), "max_bin": MAX_BIN,
                "bin_construct_sample_cnt": BIN_ROWS,
                "scale_pos_weight": scale_pos_weight, "num_threads": threads, "seed": self.seed, "verbosity": -1,
                **bagging}

    def threads(self) -> int:
        return cores() if self.n_jobs < 1 else self.n_jobs

    # -- training -----------------------------------------------------------------------------
    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        self.pca_ = fit_hog_pca(store, train, self.hog_pca) if self.hog_pca else None
        pos, vpos = label_positives(store, train), label_positives(store, val)
        counts, n, nv = np.array([len(p) for p in pos], np.int64), len(train), len(val)
        self.priors_ = counts.astype(np.float32) / np.float32(n)  # (C,) the fallback of labels without a booster
        self.labels_ = boosted_labels(counts, n, self.min_positives)
        weights = class_weights(counts, n)
        # every label's rows are subsets of these two, binned once (edges from BIN_ROWS train views)
        self.n_features_ = feature_width(store, self.pca_)
        base = self.booster_params(1.0, threads=self.threads(), n_features=self.n_features_)
        whole = binned(store, train, self.pca_, base, self.seed)
        whole_val = binned(store, val, self.pca_, base, self.seed, reference=whole)
        rows = n * len(self.labels_)
        sampled = sum(len(sample_rows(column(pos[c], n), self.negatives, self.min_negatives, self.seed, c)[0])
                      for c in self.labels_)
        log(f"{self.name}: {len(self.labels_)} of {len(counts)} labels get a booster on {whole.num_feature()} "
            f"features ({len(train)} train views; {sampled:,} label rows of {rows:,} after sampling negatives); "
            "the others predict their prior")
        with progress(total=len(self.labels_), desc=f"{self.name} boosters", unit="boosters") as bar:
            ticker = Ticker(bar)
            with ThreadPoolExecutor(max(1, min(self.threads(), len(self.labels_)))) as pool:
                done = list(pool.map(lambda c: self._train_one(c, whole, column(pos[c], n), whole_val,
                                                               column(vpos[c], nv), float(weights[c]), ticker),
                                     self.labels_))
        self.texts_ = [t for t, _ in done]
        self.offsets_ = np.array([o for _, o in done], np.float64).reshape(-1)  # (boosters,)
        check_boosters(self.texts_, self.n_features_)  # exactly what a saved model loads
        if self.texts_:
            log(f"{self.name}: {np.mean([t.count(chr(10) + 'Tree=') for t in self.texts_]):.0f} trees per booster "
                "on average")
        metrics = recording.current().metrics
        if metrics is not None:  # one row for the whole fit: its boosters have no common epochs or loss
            seconds = time.monotonic() - t0
            metrics.write({"head": self.name, "val_f2": self.val_score(store, val), "lr": self.learning_rate,
                           "seconds": seconds, "views_per_s": len(train) / seconds})

    def _train_one(self, c: int, whole, y: np.ndarray, whole_val, yv: np.ndarray, weight: float,
                   progress: Ticker) -> tuple[str, float]:
        """(model text, logit offset) of label c's booster, on one thread (a pool runs labels side by side).

        Trained on the label's positives and a sample of its negatives (`sample_rows`); the booster's logit
        plus log(kept share of negatives) is the full data's (the odds correction of King and Zeng, 2001),
        so early stopping scores the corrected probabilities on val rows sampled alike (negatives weighted
        back by their sampling rate: an estimate of the whole val log loss).
        """
        import lightgbm as lgb

        rows, offset = sample_rows(y, self.negatives, self.min_negatives, self.seed, c)
        params = self.booster_params(weight, threads=1, n_features=whole.num_feature())
        train = whole.subset(rows, params=params).construct()
        train.set_label(y[rows].astype(np.float32))
        booster = lgb.Booster(params, train)
        booster.set_train_data_name("train")
        best = self.rounds
        if self.early_stopping_rounds:
            vrows, voff = sample_rows(yv, self.negatives, self.min_negatives, self.seed + 1, c)
            val = whole_val.subset(vrows, params=params).construct()
            val.set_label(yv[vrows].astype(np.float32))
            val.set_weight(np.where(yv[vrows] > 0, 1.0, np.exp(-voff)).astype(np.float32))
            val.set_init_score(np.full(len(vrows), offset))
            booster.add_valid(val, "val")
            best = early_stopped(booster, self.rounds, self.early_stopping_rounds)
        else:
            for _ in range(self.rounds):
                booster.update()
        progress.tick()
        # read back as lightgbm.train does: the text LightGBM writes of the model it loads (a live booster
        # writes leaf_weight in a tree of one leaf, which LightGBM's reader ignores and the text check refuses)
        return lgb.Booster(model_str=booster.model_to_string(num_iteration=best)).model_to_string(), offset

    # -- prediction ---------------------------------------------------------------------------
    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        self.check_fitted()
        out = np.empty((len(views), len(self.priors_)), np.float32)
        with progress(total=len(views), desc=f"{self.name} predict", leave=False) as bar:
            for lo in range(0, len(views), CHUNK):
                part = views[lo:lo + CHUNK]
                x = design_matrix(store, part, self.pca_)
                out[lo:lo + len(part)] = self.priors_
                forest = self.forest()
                if forest is not None:  # LightGBM's raw scores to the bit, every booster at once
                    raw = self.forest_raw(forest, x) + self.offsets_
                    out[lo:lo + len(part), self.labels_] = 1 / (1 + np.exp(-raw))
                else:
                    for c, booster, offset in zip(self.labels_, self.boosters_, self.offsets_, strict=True):
                        raw = booster.predict(x, raw_score=True, num_threads=self.threads()) + offset
                        out[lo:lo + len(part), c] = 1 / (1 + np.exp(-raw))
                bar.update(len(part))
        return out

    def forest_raw(self, forest: Forest, x: np.ndarray) -> np.ndarray:
        """`forest.raw(x)`, its rows split among `threads()` threads (numpy's steps release the GIL)."""
        threads = min(self.threads(), len(x))
        if threads < 2:
            return forest.raw(x)
        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(forest.raw, np.array_split(x, threads))))

    def forest(self) -> Forest | None:
        """The boosters as one `imet.forest.Forest`, parsed once per set of texts: LightGBM's predict
        converts each row once per booster (25 ms a view at 1,103 labels), the forest scores them all
        several times faster with the same raw scores. None where it cannot (no boosters, a tree of
        more than 64 leaves, a missing-value split imet's fits do not make): LightGBM predicts then."""
        def parse() -> Forest | None:
            try:
                return Forest(self.texts_, self.n_features_) if self.texts_ else None
            except ValueError:
                return None

        return self._per_texts("_forest", parse)

    @property
    def boosters_(self) -> list:
        """LightGBM's own boosters of the texts, parsed when first asked (its predict, where the forest cannot
        score): 0.15-0.36 MiB each, 170-400 MB at 1,103 labels, which a fit or a loaded model need not hold,
        nor each of the K models of `fit --folds`."""
        import lightgbm as lgb  # imported where used: the other heads' processes stay smaller

        return self._per_texts("_boosters", lambda: [lgb.Booster(model_str=t) for t in self.texts_])

    def _per_texts(self, key: str, parse: Callable[[], object]):
        """`parse()` once per set of booster texts, kept under `key` with the texts it was parsed from (a refit
        or a load gives new texts, and a new parse)."""
        cached = self.__dict__.get(key)
        if cached is None or cached[0] is not self.texts_:
            self.__dict__[key] = cached = (self.texts_, parse())
        return cached[1]

    # -- persistence: booster texts and priors as plain values, the PCA as a module --------------
    def _module(self) -> nn.Module | None:
        return getattr(self, "pca_", None)

    def _extra_state(self) -> dict:
        return {"boosters": list(self.texts_), "booster_labels": self.labels_.tolist(),
                "priors": self.priors_.tolist(), "lgbm_format": LGBM_FORMAT, "offsets": self.offsets_.tolist(),
                "hog_components": 0 if self.pca_ is None else int(self.pca_.components.shape[1])}

    def _build(self, learned: dict) -> None:
        self.texts_ = list(learned["boosters"])
        self.labels_ = np.array(learned["booster_labels"], dtype=np.int64)
        self.priors_ = np.array(learned["priors"], dtype=np.float32)
        version = learned.get("lgbm_format", 1)
        if version not in (1, LGBM_FORMAT):
            raise ImetError(f"lgbm model format {version} is not supported (this imet reads 1 and {LGBM_FORMAT}); "
                            "refit the model")
        if version == 1:  # fitted on every row: no offsets, and the parameters it was fitted with
            self.offsets_, self.negatives, self.subsample = np.zeros(len(self.texts_)), 0, 1.0
        else:
            self.offsets_ = np.array(learned["offsets"], dtype=np.float64).reshape(-1)
        k = learned["hog_components"]
        c = len(learned["vocab"]["attribute_ids"])
        if (len(self.labels_) != len(self.texts_) or len(np.unique(self.labels_)) != len(self.labels_)
                or not ((self.labels_ >= 0) & (self.labels_ < c)).all() or self.priors_.shape != (c,)
                or not ((self.priors_ >= 0) & (self.priors_ <= 1)).all() or not isinstance(k, int) or k < 0
                or len(self.offsets_) != len(self.texts_) or not (self.offsets_ <= 0).all()):
            raise ImetError("damaged imet model file (booster_labels, priors, offsets or hog_components do not fit its "
                            f"{len(self.texts_)} boosters and {c} labels)")
        dim = int(np.prod(learned["layout"]["hog"])) if k else 0
        self.n_features_ = int(np.prod(learned["layout"]["pooled"])) + k
        check_boosters(self.texts_, self.n_features_, "damaged imet model file, booster")
        self.pca_ = HogPca(torch.zeros(dim), torch.zeros(dim, k)) if k else None
