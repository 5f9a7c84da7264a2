"""Head parameters declared once, without torch: per head, the default in its constructor's signature (as in
scikit-learn), the constraint and one line of help in its `params` (name -> Param, merged along the class
hierarchy, a subclass overriding a parent's entry).

Each head class (imet.heads.linear, ...) inherits its declaration class here (`LinearParams`, ...), so the
parameters live in one place and `imet fit --help` or an argument error reads them (`DECLARED`) without
importing torch. From these come `get_params`/`set_params`, the checks of `Head.validate` (errors name the
parameter, never a command-line flag) and the options of `imet fit`, help and defaults included. The constraint
types live in `imet.params` (featurize and the codec declare their settings with them too).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

from imet.decode.spec import PARAMS as DECODING
from imet.decode.spec import Decoding
from imet.errors import ImetError
from imet.params import LABELS, SEED, WORKERS, Bool, Bound, Choice, Float, Int, Param, ParamError, Text, check_values

__all__ = ["DECLARED", "LABELS", "SEED", "WORKERS", "Bool", "Bound", "Choice", "Float", "Int", "Param", "ParamError",
           "Text", "check_values", "declared"]

POOLS = ("predicted", "truth")  # attn_rnn's candidate pools (Algorithm 2, or the true labels)
# attn_rnn: an image's labels from its views' 0/1 votes: those that any view emitted (the paper's union), half of
# the views, or all of them; the threshold applies to the mean vote. `view_vote="tune"` picks one on val with γ.
VOTES = {"any": 1e-6, "half": 0.5, "all": 1.0 - 1e-6}
STARTS = ("csra", "paper")  # how attn_rnn's f_R and f_att start without init_from (see AttnRNNHead._fit_start)
TREE_FEATURES = 200  # lgbm: features each tree samples by default (colsample None): per-round cost ~linear in them


class HeadParams:
    """The parameters every head takes (decoding, seed) and the machinery reading the declarations."""

    name: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {  # defaults: the constructor's signature
        **DECODING,  # thresholds, min_labels, max_labels, shrink: declared with decoding (imet.decode.spec)
        "undo_weights": Param(Choice(("tune", "off")),
                              "Undo the BCE class weights before thresholding: p/(p + w^a(1-p)), the power a tuned on "
                              "val (a=0 among the choices); off: threshold the probabilities as trained (the paper)."),
        "seed": Param(Int(0, SEED), "Seed of initialisation and batch order."),
    }

    def __init__(self, *, thresholds: str = Decoding.thresholds, undo_weights: str = "tune",
                 min_labels: int = Decoding.min_labels, max_labels: int | None = Decoding.max_labels,
                 shrink: float = Decoding.shrink, seed: int = 0):
        self.thresholds = thresholds  # calibrated | global (the paper) | per-class | per-kind (threshold, min, max)
        self.undo_weights = undo_weights  # tune: undo the class weights of training by a power tuned on val
        self.min_labels = min_labels  # labels per image at least
        self.max_labels = max_labels  # and at most (None: no limit)
        self.shrink = shrink  # per-class thresholds: pseudo-count pulling rare classes to the global one
        self.seed = seed

    @classmethod
    def param_names(cls) -> list[str]:
        """The keyword-only parameters of the constructors, base class first."""
        return list(cls.param_defaults())

    @classmethod
    def param_defaults(cls) -> dict[str, object]:
        """Each parameter's default, from the constructor signatures (the nearest class's wins)."""
        defaults: dict[str, object] = {}
        for klass in reversed(cls.__mro__):
            if "__init__" in vars(klass) and klass is not object:
                for p in inspect.signature(klass.__init__).parameters.values():
                    if p.kind == p.KEYWORD_ONLY:
                        defaults[p.name] = p.default
        return defaults

    @classmethod
    def param_specs(cls) -> dict[str, Param]:
        """Constraint and help of each parameter, from the `params` of the class and its bases."""
        declared: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            declared.update(vars(klass).get("params", {}))
        missing = [n for n in cls.param_names() if n not in declared]
        if missing:
            raise TypeError(f"head {cls.name}: parameter(s) {', '.join(missing)} not declared in params")
        return {n: declared[n] for n in cls.param_names()}

    @classmethod
    def check_names(cls, params: dict) -> None:
        accepted = cls.param_names()
        wrong = sorted(set(params) - set(accepted))
        if wrong:
            raise ParamError(f"{', '.join(wrong)} does not apply to head {cls.name} (it takes "
                             f"{', '.join(accepted)})", [*wrong, *accepted])

    def get_params(self, deep: bool = True) -> dict:
        """The parameters, as scikit-learn's estimators give them (a head holds no nested estimator)."""
        return {k: getattr(self, k) for k in self.param_names()}

    def set_params(self, **params) -> HeadParams:
        """Change parameters (checked at the next validate or fit); returns the head."""
        self.check_names(params)
        for k, v in params.items():
            setattr(self, k, v)
        return self


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
DEVICE_PARAMS = {  # the parameters of every head that reads maps on a device
    "device": Param(Choice(("auto", "cpu", "cuda")), "Where to train and predict; auto takes CUDA when present."),
    "workers": Param(Int(0, WORKERS), "DataLoader workers reading maps.", none="1 on CPU, 4 on CUDA"),
    "amp": Param(Choice(("bf16", "none")), "Autocast on CUDA: bf16, or none (float32); the CPU computes in float32."),
}


class TrainedParams(HeadParams):
    """The heads trained by `train_epochs`: the loss, declared once for all of them (LOSS_PARAMS)."""

    params = LOSS_PARAMS

    def __init__(self, *, loss: str = "bce", focal_gamma: float = 2.0, asl_gamma_pos: float = 0.0,
                 asl_gamma_neg: float = 4.0, asl_clip: float = 0.05, **base):
        super().__init__(**base)
        self.loss = loss  # bce (the paper) | asl | focal
        self.focal_gamma = focal_gamma  # focal: (1 - p_t)^gamma on every term
        self.asl_gamma_pos = asl_gamma_pos  # ASL's gamma+ (the paper: 0)
        self.asl_gamma_neg = asl_gamma_neg  # ASL's gamma- (the paper: 4)
        self.asl_clip = asl_clip  # ASL's probability margin m on the negatives (the paper: 0.05)


class LinearParams(TrainedParams):
    name = "linear"
    params = TRAINING_PARAMS

    def __init__(self, *, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-5,
                 class_weights: bool = True, patience: int = 0, **base):
        super().__init__(**base)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weights = class_weights  # BCE weight negatives/positives per class, clipped at 10
        self.patience = patience  # stop after this many epochs without a better val F2 (0: never)


class LinearHogParams(LinearParams):
    name = "linear_hog"


class MapParams(TrainedParams):
    """The heads scoring every label from the map cells (and HOG with `hog`)."""

    params = TRAINING_PARAMS | DEVICE_PARAMS | {
        "hog": Param(Bool(), "Add a linear term on the HOG vector to the logits."),
        "hog_decay": Param(Float(0), "Weight decay of the HOG term (undamped, its HOG weights overfit and drown the "
                                     "cells)."),
    }

    def __init__(self, *, epochs: int = 20, batch_size: int = 32, lr: float = 1e-2, weight_decay: float = 1e-5,
                 class_weights: bool = True, patience: int = 0, hog: bool = False, hog_decay: float = 0.01,
                 device: str = "auto", workers: int | None = None, amp: str = "bf16", loss: str = "focal", **base):
        # focal by default (bce: the paper's): csra was ahead on 18 of 18 planted family members (mean +0.03 test
        # F2, the worst +0.004) and +0.03 at 1,103 labels (docs/benchmarks.md, "The loss of the map heads")
        super().__init__(loss=loss, **base)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weights = class_weights  # BCE weight negatives/positives per class, clipped at 10
        self.patience = patience  # stop after this many epochs without a better val F2 (0: never)
        self.hog = hog  # add a linear term on the HOG vector
        self.hog_decay = hog_decay  # weight decay of that term: 0.1 (the first choice) starved the HOG-only labels
        # on the planted family; 0.01 was ahead on 12 of 12 held-out members and at 1,103 labels with 10,368-d HOG
        self.device = device  # auto | cpu | cuda
        self.workers = workers  # DataLoader workers reading maps (None: 1 on CPU, 4 on CUDA)
        self.amp = amp  # bf16 | none: autocast on CUDA (the CPU computes in float32)


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'1,2,inf' -> (1.0, 2.0, inf), refusing anything but positive numbers."""
    try:
        values = tuple(float(x) for x in str(text).split(",") if "_" not in x)
    except ValueError:
        values = ()
    if not values or len(values) != len(str(text).split(",")) or not all(t > 0 for t in values):
        raise ImetError(f"temperatures must be comma-separated positive numbers (inf: max over cells), "
                        f"not {text!r}")
    return values


class CSRAParams(MapParams):
    name = "csra"
    params = {
        "temperatures": Param(Text("comma-separated positive numbers", parse_temperatures),
                              "Comma-separated softmax temperatures of the attention heads; inf: the max over cells."),
        "lam": Param(Float(0), "Weight of the attention-pooled score against the mean-cell score."),
    }

    def __init__(self, *, temperatures: str = "1,2", lam: float = 1.0, **rest):
        super().__init__(**rest)
        self.temperatures = temperatures  # comma-separated softmax temperatures; inf is the max over cells
        self.lam = lam  # weight of the attention-pooled scores against the mean-cell score


class MLDecoderParams(MapParams):
    name = "mldecoder"
    params = {
        "groups": Param(Int(1), "Label queries at most; labels are shared among them beyond that."),
        "width": Param(Int(1), "Embedding width of cells and queries."),
        "heads": Param(Int(1), "Attention heads (must divide width)."),
        "decoder_dropout": Param(Float(0, 1, high_open=True), "Dropout in the attention and the feed-forward block."),
        "start": Param(Choice(("csra", "random")),
                       "csra: fit a csra first (same epochs, loss, hog) and start the attention from its class "
                       "scorers, its logits the csra's plus the decoder's; random: the reference's random start "
                       "(no csra term; its attention stays uniform)."),
        "freeze_start": Param(Bool(), "Keep the csra term of a csra start fixed; train only the decoder term."),
        "init_from": Param(Text("a model file name", path=True),
                           "Start from this fitted csra model file (same hog, a model of this store's labels and "
                           "features) instead of fitting a csra first: the decoder's own epochs only.",
                           none="the start chosen by `start`"),
    }

    def __init__(self, *, lr: float = 1e-3, patience: int = 3, groups: int = 100, width: int = 256, heads: int = 4,
                 decoder_dropout: float = 0.1, start: str = "csra", freeze_start: bool = True,
                 init_from: str | None = None, **rest):
        # patience 3, counted from the csra start's val F2 (its own csra fit keeps csra's patience): the decoder
        # kept its start on twelve of twelve family members and at 1,103 labels, after 20 epochs each
        super().__init__(lr=lr, patience=patience, **rest)
        self.groups = groups  # label queries at most (ML-Decoder's group decoding when labels outnumber them)
        self.width = width  # embedding width E of cells and queries
        self.heads = heads  # attention heads (must divide width)
        self.decoder_dropout = decoder_dropout  # dropout in the attention and the feed-forward block
        self.start = start  # csra: attention started from a csra fitted first in the same fit; random
        self.freeze_start = freeze_start  # keep the csra term of a csra start fixed
        self.init_from = init_from  # a fitted csra model file: the csra start, not fitted again


class AttnRNNParams(TrainedParams):
    name = "attn_rnn"
    params = TRAINING_PARAMS | DEVICE_PARAMS | {
        "hidden": Param(Int(1), "LSTM width."),
        "attention_dim": Param(Int(1), "Hidden width of f_att."),
        "pred_dim": Param(Int(1), "Hidden width of f_pred."),
        "dropout": Param(Float(0, 1, high_open=True), "Dropout in f_pred."),
        "attention": Param(Bool(), "Attention over the map cells; off: the mean of the map as context (ablation)."),
        "residual": Param(Bool(), "p_t = sigmoid(f_pred(h_t) + f_R's logits), not the paper's eq. 5 (off: eq. 5)."),
        "pool": Param(Choice(POOLS), "Candidate pool of Algorithm 2 (predicted), or only the true labels (ablation)."),
        "hog": Param(Bool(), "f_R reads pooled ⊕ HOG (section 3.4); the csra start reads HOG too.",
                     none="when the store has HOG features (with init_from: as that model)"),
        "init_from": Param(Text("a model file name", path=True),
                           "Start f_R and f_att from a fitted linear (with hog: linear_hog) model file, or use a "
                           "fitted csra or mldecoder model (same hog) as f_R, its first v_pred.",
                           none="the start chosen by `start`"),
        "start": Param(Choice(STARTS), "Without init_from: csra fits a csra head (same hog) on the same train "
                                       "views first and starts from it as init_from does (its module is f_R, its "
                                       "class scorers start f_att); paper: f_R linear, f_att random."),
        "start_epochs": Param(Int(1), "Epochs of the csra start (all of them: its val F2 plateaus while its "
                                      "attention still forms; measured, docs/benchmarks.md)."),
        "beam": Param(Int(1, LABELS), "Beam width K (at most the label count).", none="5, or the labels if fewer"),
        "steps": Param(Int(1, LABELS), "Most labels per path T.", none="the most labels of a train image"),
        "view_vote": Param(Choice((*VOTES, "tune")), "An image's labels are those emitted by any (the paper's union), "
                                                     "half or all of its views; tune picks one on val with gamma."),
        "patience": Param(Int(0), "Early stopping: epochs without a better val F2 (decoded at the best gamma) before "
                                  "stopping, keeping the best epoch, or the decoder as started when no epoch beats "
                                  "it (with a start: its csra or init_from; 0: off)."),
    }

    def __init__(self, *, epochs: int = 10, batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-5,
                 class_weights: bool = True, hidden: int = 512, attention_dim: int = 512, pred_dim: int = 512,
                 dropout: float = 0.5, attention: bool = True, residual: bool = True, pool: str = "predicted",
                 hog: bool | None = None, init_from: str | None = None, start: str = "csra", start_epochs: int = 20,
                 beam: int | None = None, steps: int | None = None,
                 view_vote: str = "tune",
                 patience: int = 2,
                 device: str = "auto", workers: int | None = None, amp: str = "bf16", thresholds: str = "global",
                 loss: str = "focal", **base):
        # focal by default, its csra start's too (bce: the paper's): ahead on 6 of 7 planted family members, mean
        # +0.028 test F2, worst -0.007 (docs/benchmarks.md, "attn_rnn with its defaults on the planted family")
        super().__init__(thresholds=thresholds, loss=loss, **base)  # beam search: thresholds global only
        self.epochs = epochs
        self.batch_size = batch_size  # the paper: 32
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weights = class_weights
        self.hidden = hidden  # LSTM width
        self.attention_dim = attention_dim  # hidden width of f_att
        self.pred_dim = pred_dim  # hidden width of f_pred
        self.dropout = dropout  # between the two FC layers of f_pred
        self.attention = attention  # False: uniform attention, the ablation the paper left as future work
        self.residual = residual  # p_t = sigmoid(f_pred(h_t) + f_R's logits): not the paper's eq. 5 (see attn_model)
        self.pool = pool  # predicted (Algorithm 2) | truth (the order-free RNN's pool of true labels)
        self.hog = hog  # f_R reads pooled ⊕ HOG (section 3.4); None: when the store has HOG (see `fit`)
        self.init_from = init_from  # a fitted linear / linear_hog / csra / mldecoder model file to start from
        self.start = start  # without init_from: csra (fit one here and start from it) | paper (random f_att)
        self.start_epochs = start_epochs  # epochs of that csra fit
        self.beam = beam  # K of the beam search (None: DEFAULT_BEAM, or the label count if fewer)
        self.steps = steps  # T, most labels per path (default: most labels of a train image)
        self.view_vote = view_vote  # any (the paper's union) | half | all | tune (the best on val, with γ)
        self.patience = patience  # stop after this many epochs without a better val F2 (at its best γ); 0: never
        self.device = device  # auto | cpu | cuda
        self.workers = workers  # DataLoader workers reading maps (None: 1 on CPU, 4 on CUDA)
        self.amp = amp  # bf16 | none: autocast on CUDA (the CPU computes in float32)


class LgbmParams(HeadParams):
    name = "lgbm"
    params = {
        "num_leaves": Param(Int(2), "Leaves per tree."),
        "learning_rate": Param(Float(0, low_open=True), "Shrinkage of each tree."),
        "rounds": Param(Int(1), "Trees per label at most."),
        "early_stopping_rounds": Param(Int(0), "Stop a label's booster after this many rounds without a better "
                                               "val loss (0: off)."),
        "min_positives": Param(Int(1), "Positive train views a label needs for a booster; others predict their "
                                       "prior."),
        "min_leaf": Param(Int(1), "Train views per leaf at least."),
        "colsample": Param(Float(0, 1, low_open=True), "Fraction of the features each tree may split on.",
                           none=f"{TREE_FEATURES} features per tree, all when fewer"),
        "subsample": Param(Float(0, 1, low_open=True), "Fraction of a label's rows each tree is grown on "
                                                       "(bagging)."),
        "negatives": Param(Int(0), "Negative views sampled per positive for each label's booster, at least "
                                   "min_negatives (odds corrected back; 0: every negative)."),
        "min_negatives": Param(Int(1), "Negative views of a label's booster at least (all when fewer)."),
        "hog_pca": Param(Int(0), "Append this many principal components of HOG to pooled (0: pooled only)."),
        "n_jobs": Param(Int(-1, WORKERS), "Threads (-1 or 0: every core)."),
    }

    def __init__(self, *, num_leaves: int = 15, learning_rate: float = 0.1, rounds: int = 200,
                 early_stopping_rounds: int = 20, min_positives: int = 5, min_leaf: int = 20,
                 colsample: float | None = None, subsample: float = 1.0, negatives: int = 20, min_negatives: int = 500,
                 hog_pca: int = 0, n_jobs: int = -1, **base):
        super().__init__(**base)
        self.num_leaves = num_leaves  # leaves per tree
        self.learning_rate = learning_rate  # shrinkage of each tree
        self.rounds = rounds  # trees per booster at most
        self.early_stopping_rounds = early_stopping_rounds  # rounds without a better val loss to stop (0: off)
        self.min_positives = min_positives  # positive (and negative) train views a label needs for a booster
        self.min_leaf = min_leaf  # train views per leaf at least
        self.colsample = colsample  # fraction of the features each tree may split on (None: TREE_FEATURES)
        self.subsample = subsample  # fraction of a label's rows each tree is grown on (bagging, every round)
        self.negatives = negatives  # negatives sampled per positive for each label's booster (0: all)
        self.min_negatives = min_negatives  # and at least this many (all when the label has fewer)
        self.hog_pca = hog_pca  # HOG principal components appended to pooled (0: pooled only)
        self.n_jobs = n_jobs  # threads (-1 or 0: every core of the machine)


# Every head's declaration by name: what `imet fit` makes its options from (imet.heads.HEADS holds the heads
# themselves, each a subclass of its declaration here; a test checks the two agree).
DECLARED: dict[str, type[HeadParams]] = {c.name: c for c in (LinearParams, LinearHogParams, LgbmParams, CSRAParams,
                                                             MLDecoderParams, AttnRNNParams)}


def declared(name: str) -> type[HeadParams]:
    """The declaration of head `name`, refusing an unknown name with the names there are."""
    if name not in DECLARED:
        raise ImetError(f"unknown head {name!r}; choose from {', '.join(sorted(DECLARED))}")
    return DECLARED[name]
