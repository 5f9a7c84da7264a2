"""Heads: one registry, one base class with the scikit-learn contract, one model-file format.

`__init__` only stores parameters; `fit(store)` trains on the train views, tunes decoding on the val
views and returns self; learned state ends in `_`; `predict_proba(store, views)` gives one
(n_views, n_labels) array; `predict_labels(store, split)` gives each image's label set. A model file is
one `torch.save` of plain data: the module's state dict, the parameters, the learned decode values,
the label vocabulary, the store's layout and its feature settings — loaded back with `weights_only=True`.
A model refuses a store whose feature identity (`imet.store.identity`) differs from its fitting store's.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

import imet
import imet.heads.ddp as ddp
from imet.codec import Codec
from imet.decode import values
from imet.decode.rule import Rule, search_rule
from imet.decode.spec import PARAMS as DECODING
from imet.decode.spec import Decoding, check_counts
from imet.decode.thresholds import average_views, search_power
from imet.errors import ImetError
from imet.files import atomic_path
from imet.heads.params import SEED, Choice, Int, Param, ParamError, check_values
from imet.labels import Vocabulary
from imet.loader import open_model, register_format, rule_info, vocab_info
from imet.runtime import max_workers, pick_device
from imet.store import PROVENANCE, FeatureStore, identity_diff

FORMAT, FORMAT_VERSION = "imet-model", 1
HEADS: dict[str, type[Head]] = {}


def register(cls: type[Head]) -> type[Head]:
    """Class decorator adding a head to the registry under `cls.name`; refuses duplicate names."""
    if cls.name in HEADS:
        raise ValueError(f"head {cls.name!r} is already registered by {HEADS[cls.name].__qualname__}")
    HEADS[cls.name] = cls
    return cls


def list_heads() -> list[str]:
    """The names of the registered heads (what make_head and `imet fit --head` take)."""
    return sorted(HEADS)


def get_head(name: str) -> type[Head]:
    if name not in HEADS:
        raise ImetError(f"unknown head {name!r}; choose from {', '.join(sorted(HEADS))}")
    return HEADS[name]


class DivergedError(ImetError):
    """Training produced NaN or inf (a learning rate too high, or non-finite features): nothing is saved."""


class NotFittedError(ImetError, SklearnNotFittedError):
    """A head used before `fit` (scikit-learn's NotFittedError, so sklearn code catches it too)."""


class NotAStoreError(ImetError, TypeError):
    """A head fitted on something else than a store: plain arrays (scikit-learn's fit(X, y)) go through
    imet.sklearn.HeadClassifier."""


def make_head(name: str, **params) -> Head:
    """A head from its name and parameters, refusing parameters it does not take (naming them), out of
    range or contradicting each other (before any work)."""
    cls = get_head(name)
    cls.check_names(params)
    head = cls(**params)
    head.validate()
    return head


class Head:
    """Base of every head. Subclasses set `name`, `needs` and implement `_fit`, `_module`, `predict_proba`."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]  # store features the head reads
    probabilistic: ClassVar[bool] = True  # False: predict_proba gives hard 0/1 votes per view
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
        self.thresholds = thresholds  # global (the paper) | per-class | per-kind (threshold, min, max per kind)
        self.undo_weights = undo_weights  # tune: undo the class weights of training by a power tuned on val
        self.min_labels = min_labels  # labels per image at least
        self.max_labels = max_labels  # and at most (None: no limit)
        self.shrink = shrink  # per-class thresholds: pseudo-count pulling rare classes to the global one
        self.seed = seed

    # -- the contract --------------------------------------------------------------------------
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

    def set_params(self, **params) -> Head:
        """Change parameters (checked at the next validate or fit); returns the head."""
        self.check_names(params)
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def validate(self, n_labels: int | None = None) -> None:
        """Refuse parameters out of their declared range or contradicting each other, naming them (called
        by make_head, by fit and by load_model, before any work); bounds on the label count are checked once
        `n_labels` is known, bounds from the machine (workers) always."""
        check_values(self.name, self.param_specs(), self.get_params(), {"labels": n_labels, "workers": max_workers()})
        check_counts(self.name, self.min_labels, self.max_labels)
        if hasattr(self, "device"):
            pick_device(self.device, self.name)

    def fit(self, store: FeatureStore, y: None = None, *, log: Callable[[str], None] | None = None,
            views: tuple[np.ndarray, np.ndarray] | None = None) -> Head:
        """Train on the train views, then tune decoding on the val views (or on the (train, val) view indices
        given: `imet fit --folds` trains each fold's model on the other folds' views); returns the head.

        Each epoch's line (loss, val F2, speed) goes to `log`, by default the `imet.heads` logger at INFO.
        `y` is there only to refuse scikit-learn's fit(X, y) by name (NotAStoreError): the labels live in the store.

        Raises DivergedError, and leaves nothing to save, when the loss or the learned values are not finite.
        """
        self.validate()
        self.require_store(store, y)
        self.validate(len(store.vocab))  # and the bounds the data sets (labels)
        self.decoding_spec().check_search(self.name)
        self.check_store(store, fitted=False)
        train, val = (store.views("train"), store.views("val")) if views is None else views
        if not len(train) or not len(val):
            raise ImetError(f"{store.path}: needs finished train and val views (has {len(train)} and {len(val)})")
        if not store.targets[np.unique(store.view_image[val])].any():  # before training, not after
            raise ImetError(f"{store.path}: the val images carry no true label; decoding cannot be tuned on them")
        log = log or logging.getLogger(f"imet.heads.{self.name}").info
        t0 = time.monotonic()
        self.vocab_, self.layout_ = store.vocab, {k: store.layout()[k] for k in self.needs}
        self.fingerprint_ = store.fingerprint
        self.store_settings_ = {k: v for k, v in store.settings.items() if k not in PROVENANCE}
        self.codecs_ = {k: c for k, c in store.codecs.items() if k in self.needs}  # predict --data encodes with them
        self.loss_weights_ = self.training_weights(store, train)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                self._fit(store, train, val, log)
                self.check_finite()
            except DivergedError as e:
                raise DivergedError(f"{store.path}: {e}") from None
        self.fit_seconds_ = time.monotonic() - t0
        if ddp.current().main:  # under torchrun only rank 0 tunes (and writes) the model
            self.tune(store, val)
        return self

    def require_store(self, store: object, y: object = None) -> None:
        """Refuse anything but a store to fit on (plain arrays X, y: imet.sklearn.HeadClassifier takes those)."""
        if y is not None or not all(hasattr(store, a) for a in ("views", "vocab", "targets")):  # StoreReader's
            given = f"{type(store).__name__}{'' if y is None else ' and labels'}"
            raise NotAStoreError(f"{self.name}.fit takes a feature store (imet.FeatureStore, or imet.ArrayStore over "
                                 f"your arrays), not {given}; for fit(X, y) on plain arrays use "
                                 f"imet.sklearn.HeadClassifier(make_head({self.name!r}))")

    def check_loss(self, epoch: int, loss: float) -> None:
        """Stop training at the first epoch whose loss is NaN or inf (heads call this once per epoch)."""
        if not np.isfinite(loss):
            raise DivergedError(f"{self.name}: the loss is {loss} at epoch {epoch} (training diverged: lower the "
                                "learning rate, or check the store with `imet store verify`); no model written")

    def check_finite(self) -> None:
        """Refuse learned weights holding NaN or inf, whatever the head (run after fit and before save)."""
        module = self._module()
        tensors = {} if module is None else module.state_dict()
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise DivergedError(f"{self.name}: learned weights {', '.join(bad[:3])} hold NaN or inf (training "
                                "diverged; fit again with a lower learning rate)")

    def _finite_probs(self, probs: np.ndarray) -> np.ndarray:
        if not np.isfinite(probs).all():
            raise DivergedError(f"{self.name}: the model gives NaN or inf probabilities (its weights or the "
                                "features are not finite)")
        return probs

    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        raise NotImplementedError

    def predict_proba(self, store: FeatureStore, views: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def training_weights(self, store: FeatureStore, train: np.ndarray) -> np.ndarray | None:
        """(C,) the BCE weight of each class's positives in training (None: unweighted), for decoding to undo;
        heads trained by `train_epochs` weigh them (`TrainedHead`), the others do not."""
        return None

    def _weights_to_undo(self) -> np.ndarray | None:
        """(C,) the class weights decoding may undo: none when `undo_weights` is off, or for a model that records
        none (an older file, a --folds model), which decodes its probabilities as they are."""
        return getattr(self, "loss_weights_", None) if getattr(self, "undo_weights", "off") == "tune" else None

    def tune(self, store: FeatureStore, val: np.ndarray) -> None:
        """The paper's global threshold on (0, 0.5) by grid search on val (or per-class thresholds, or a
        threshold and label counts per label kind, kept only when they beat the global threshold on val),
        on the probabilities with the class weights undone by a power tuned on val (`undo_weights`)."""
        images, probs = average_views(self._finite_probs(self.predict_proba(store, val)), store.view_image[val])
        self.tune_on(probs, store.targets[images], store.vocab.kinds)

    def tune_on(self, probs: np.ndarray, truth: np.ndarray, kinds: tuple[str, ...]) -> None:
        """Tune decoding on image probabilities and their truth (val, or the out-of-fold ones of --folds)."""
        if not np.asarray(truth).any():
            raise ImetError(f"{self.name}: the {len(truth)} images to tune decoding on carry no true label; a "
                            "decoding rule cannot be tuned on them (a val split with positives is needed)")
        found = search_rule(probs, truth, kinds, self.decoding_spec(), weights=self._weights_to_undo())
        self.power_, self.threshold_ = found.power, found.threshold
        self.class_thresholds_ = found.rule.class_thresholds
        self.kind_rule_ = found.rule if found.rule.by_kind else None
        self.val_f2_ = found.f2 if found.rule.by_kind else found.global_f2  # per-class: the global threshold's F2

    def decoding_spec(self) -> Decoding:
        """The decoding this head's parameters ask for."""
        return Decoding(self.thresholds, self.min_labels, self.max_labels, self.shrink)

    def rule(self) -> Rule:
        """The fitted decoding rule (probability files and blends carry it whole)."""
        if getattr(self, "kind_rule_", None) is not None:
            return self.kind_rule_
        power = getattr(self, "power_", 0.0)
        weights = getattr(self, "loss_weights_", None) if power else None
        return Rule.global_(self.threshold_, self.min_labels, self.max_labels, self.class_thresholds_, weights, power)

    def val_score(self, store: FeatureStore, val: np.ndarray) -> float:
        """F2 on val with the best global threshold, on probabilities with the class weights undone as `tune`
        undoes them (at 1,103 labels the weighted ones score near 0 whatever the epoch): the early-stopping
        score of the training loop."""
        images, probs = average_views(self._finite_probs(self.predict_proba(store, val)), store.view_image[val])
        weights = self._weights_to_undo()
        return search_power(probs, store.targets[images], weights, min_labels=self.min_labels,
                            max_labels=self.max_labels)[2]

    def decoding(self) -> str:
        """How the fitted head turns outputs into labels, in a few words (printed by fit)."""
        if self.thresholds == "per-kind" and getattr(self, "kind_rule_", None) is None:
            return f"per-kind search did not beat the global threshold on val: {self.rule().describe()}"
        return self.rule().describe()

    def describe(self) -> dict:
        """What the fitted head is (`imet model info`, see `imet.loader.describe_model`): its parameters, decoding
        rule, the fitting store's feature identity, labels and val F2."""
        self.check_fitted()
        codecs = {k: {"dtype": c.dtype, "dim": c.dim, "text": c.describe()}
                  for k, c in getattr(self, "codecs_", {}).items()}
        return {"head": self.name, "probabilistic": bool(self.probabilistic), "params": self.get_params(),
                "decoding": {**self.decoding_info(), "text": self.decoding()},
                "features": {"fingerprint": self.fingerprint_, "settings": self.store_settings_,
                             "layout": {k: list(v) for k, v in self.layout_.items()}, "codecs": codecs},
                "labels": vocab_info(self.vocab_), "scores": {"val_f2": float(self.val_f2_)}, "members": []}

    def decoding_info(self) -> dict:
        """The fitted decoding rule's facts (`imet.loader.rule_info`); a head decoding otherwise says its own."""
        return rule_info(self.rule())

    def predict_labels(self, store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices, (n, C) averaged view probabilities, (n, C) bool labels) of a split's images."""
        self.check_store(store)
        images, probs = self.image_probs(store, store.views(split))
        return images, probs, self.label_sets(probs)

    def image_probs(self, store: FeatureStore, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, (n, C) probabilities of each image: the mean over its views among `views`)."""
        return average_views(self._finite_probs(self.predict_proba(store, views)), store.view_image[views])

    def label_sets(self, probs: np.ndarray) -> np.ndarray:
        """(n, C) bool labels of images from their (n, C) averaged probabilities, by the tuned thresholds."""
        return self.rule().apply(probs, self.vocab_.kinds)

    # -- persistence ---------------------------------------------------------------------------
    def _module(self) -> torch.nn.Module | None:
        """The trained torch module whose state dict is saved (None for heads without one)."""
        return None

    def _build(self, learned: dict) -> None:
        """Rebuild the (untrained) module from the learned values before its state dict is loaded."""

    def _extra_state(self) -> dict:
        """JSON-able learned values a subclass saves besides its module."""
        return {}

    def check_store(self, store: FeatureStore, fitted: bool = True) -> None:
        missing = [k for k in self.needs if k not in store.features]
        if missing:
            raise ImetError(f"{store.path}: head {self.name} needs {', '.join(missing)}, which this store lacks "
                            f"(it has {', '.join(store.features)}; featurize without --no-{missing[0]})")
        if not fitted:
            return
        self.check_fitted()
        if not np.array_equal(self.vocab_.attribute_ids, store.vocab.attribute_ids):
            raise ImetError(f"{store.path}: the model was made for a store with another label vocabulary "
                            f"({len(self.vocab_)} labels, this store has {len(store.vocab)})")
        self.check_identity(store)
        layout = store.layout()
        for key, shape in self.layout_.items():
            if list(layout.get(key, [])) != list(shape):
                raise ImetError(f"{store.path}: feature layout differs from the model's: {key} is "
                                f"{tuple(layout.get(key, []))} here, {tuple(shape)} in the model")

    def check_identity(self, store: FeatureStore) -> None:
        """Refuse a store whose features were made otherwise than the fitting store's, naming each setting."""
        diff = identity_diff(self.store_settings_, store.settings, tuple(self.layout_))
        if diff:
            what = "; ".join(f"{k} is {_short(store.settings.get(k))} here, {_short(self.store_settings_.get(k))} "
                             "in the model" for k in diff)
            raise ImetError(f"{store.path}: made with other feature settings than the model's store ({what}); "
                            "featurize with the model's settings or refit on this store")

    def save(self, path: Path) -> None:
        """One file, written atomically: plain tensors and JSON-able values only (no pickled objects)."""
        buffer = io.BytesIO()  # torch.save onto a file turns a full disk into an opaque RuntimeError
        torch.save(self.to_blob(), buffer)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def to_blob(self) -> dict:
        """What `save` writes: a dict of plain tensors and JSON-able values. A function of the weights,
        parameters and data only, so a refit with the same seed and data writes the same bytes (the same
        sha256, which blends and stacks pin): no fit time, host or date (`fit_seconds_` stays in memory)."""
        self.check_fitted()
        self.check_finite()
        module = self._module()
        learned = {
            "vocab": {"attribute_ids": self.vocab_.attribute_ids.tolist(), "names": list(self.vocab_.names),
                      "kinds": list(self.vocab_.kinds)},
            "layout": self.layout_, "fingerprint": self.fingerprint_,
            "store_settings": json.dumps(self.store_settings_, sort_keys=True),
            "threshold": self.threshold_, "val_f2": self.val_f2_,
            "class_thresholds": None if self.class_thresholds_ is None else self.class_thresholds_.tolist(),
            "kind_rule": None if getattr(self, "kind_rule_", None) is None else self.kind_rule_.to_json(),
            "loss_weights": None if getattr(self, "loss_weights_", None) is None else self.loss_weights_.tolist(),
            "power": getattr(self, "power_", 0.0),
            **self._extra_state(),
        }
        return {"format": FORMAT, "version": FORMAT_VERSION, "imet_version": imet.__version__, "head": self.name,
                "params": self.get_params(), "learned": learned,
                "state_dict": {} if module is None else {k: v.cpu() for k, v in module.state_dict().items()},
                "codecs": {k: {"dtype": c.dtype, **{a: torch.from_numpy(v) for a, v in c.arrays().items()}}
                           for k, c in getattr(self, "codecs_", {}).items()}}

    def check_fitted(self) -> None:
        if not hasattr(self, "vocab_"):
            raise NotFittedError(f"this {self.name} head is not fitted yet; call fit first")

    def __getattr__(self, name: str):
        """Called only for a missing attribute: a learned one (name_) of an unfitted head is NotFittedError
        (an AttributeError too, so hasattr and getattr with a default still work)."""
        if name.endswith("_") and not name.startswith("__") and "vocab_" not in self.__dict__:
            raise NotFittedError(f"this {type(self).name} head is not fitted yet; call fit first")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def load_model(path: Path) -> Head:
    """A fitted head from a model file written by `Head.save` (or the K fold models of `fit --folds`)."""
    model = open_model(path, "torch")
    assert isinstance(model, Head)  # every torch-archive format is a head's
    return model


def read_head(blob: dict, path: Path) -> Head:
    """The head of a model file's contents (the `imet-model` reader of `imet.loader`); errors name the file."""
    if blob.get("version") != FORMAT_VERSION:
        raise ImetError(f"{path}: model format version {blob.get('version')} is not supported")
    try:
        return head_from_blob(blob)
    except ImetError as e:  # a ParamError (a forged parameter) too
        raise ImetError(f"{path}: {e}") from None
    except Exception as e:  # missing keys, wrong types, junk booster text: a damaged or foreign file
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e).strip()[:160]}"
        raise ImetError(f"{path}: damaged imet model file ({what.splitlines()[0]}); refit the model") from None


def head_from_blob(blob: dict) -> Head:
    params = dict(blob["params"])
    if params.get("device") == "cuda" and not torch.cuda.is_available():
        params["device"] = "auto"  # fitted on a GPU, used where there is none: it predicts on the CPU
    for key in ("workers", "n_jobs"):  # fitted on a bigger machine: this one's bound, not a refusal
        if isinstance(params.get(key), int) and not isinstance(params[key], bool) and params[key] > max_workers():
            params[key] = max_workers()
    head = make_head(blob["head"], **params)
    learned = blob["learned"]
    v = learned["vocab"]
    head.vocab_ = Vocabulary(np.array(v["attribute_ids"], dtype=np.int64), tuple(v["names"]), tuple(v["kinds"]))
    if not len(head.vocab_.names) == len(head.vocab_.kinds) == len(head.vocab_):
        raise ImetError("its label vocabulary is inconsistent")
    head.validate(len(head.vocab_))  # bounds on the label count (min_labels, beam, steps)
    if "store_settings" not in learned:
        raise ImetError("made by an older imet that did not record its store's feature settings; "
                        "refit it with `imet fit`")
    head.layout_, head.fingerprint_ = learned["layout"], learned["fingerprint"]
    head.store_settings_ = json.loads(learned["store_settings"])
    if not isinstance(head.store_settings_, dict):
        raise ImetError("its store settings are not a JSON object")
    head.fit_seconds_ = math.nan  # a fact of the fit run, not of the model: not saved (older files hold one: unread)
    head.threshold_ = values.real(learned["threshold"], "threshold")  # the string "0.3" put every label on
    head.val_f2_ = values.real(learned["val_f2"], "val_f2")
    ct = learned["class_thresholds"]
    head.class_thresholds_ = None if ct is None else values.reals(ct, "class_thresholds", len(head.vocab_))
    head.codecs_ = {k: Codec(*(None if c.get(a) is None else c[a].numpy() for a in ("mean", "basis", "scale")),
                             c["dtype"]) for k, c in blob.get("codecs", {}).items()}
    lw = learned.get("loss_weights")  # absent in files of an older imet: nothing undone (power 0)
    head.loss_weights_ = None if lw is None else values.reals(lw, "loss_weights", len(head.vocab_), 0.0, 1e6)
    head.power_ = values.real(learned.get("power", 0.0), "power", 0.0, 4.0)
    if head.power_ and head.loss_weights_ is None:
        raise ImetError("it undoes class weights (power) it does not record; refit the model")
    kr = learned.get("kind_rule")  # absent in files of an older imet: they decode by the global rule
    head.kind_rule_ = None if kr is None else Rule.from_json(kr, len(head.vocab_))
    head._build(learned)
    module = head._module()
    if module is not None:
        missing, unexpected = module.load_state_dict(blob["state_dict"], strict=False)
        if missing or unexpected:
            raise ImetError(f"its {head.name} weights do not match this imet ({', '.join(missing)} missing"
                            f"{', ' + ', '.join(unexpected) + ' unexpected' if unexpected else ''}); refit the model")
    head.check_finite()
    return head


def _short(value, width: int = 70) -> str:
    """A setting's value for an error message: JSON, cut to `width` characters."""
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 3] + "..."


register_format(FORMAT, "torch", read_head)
