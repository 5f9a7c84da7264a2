"""Model files: one registry of formats and one function, `open_model`, that opens any of them as a `Predictor`.

A model file is either a torch archive of plain values (`torch.load(weights_only=True)`) or a JSON object;
both carry their format tag under "format". Each format's module registers a reader under its tag
(`register_format`) when it is imported: `imet.heads` registers the head file (`imet-model`) and the K fold
models of `fit --folds` (`imet-folds`), `imet.blend` the blend file, `imet.stack` the stack file;
`imet.models` imports all of them. A reader gets the decoded file and its path and returns the Predictor;
its errors name the file. `describe_model` says what a file holds (`imet model info`): each Predictor's
`describe()` plus the file's format, version and sha256.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch

from imet.decode.rule import ALL
from imet.errors import ImetError
from imet.files import sha256_file

if TYPE_CHECKING:
    from imet.decode.rule import Rule
    from imet.labels import Vocabulary
    from imet.store import FeatureStore

Container = Literal["torch", "json"]


class Predictor(Protocol):
    """What every opened model file gives: labels of a store's images, or of image probabilities."""

    name: str  # the head's name, or "blend" / "stack"
    probabilistic: bool  # False: its probabilities are 0/1 votes (attn_rnn's beams)
    vocab_: Vocabulary  # the labels it predicts, in column order
    threshold_: float  # the global threshold of its decoding (probability files record it)

    def check_store(self, store: FeatureStore) -> None:
        """Refuse a store of other labels, features or feature settings than the fitting store's (its identity)."""

    def image_probs(self, store: FeatureStore, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, (n, C) image probabilities) from some of a store's views."""

    def predict_labels(self, store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices, (n, C) image probabilities, (n, C) bool labels) of a split's images."""

    def label_sets(self, probs: np.ndarray) -> np.ndarray:
        """(n, C) bool labels from (n, C) image probabilities, by the fitted decoding rule."""

    def rule(self) -> Rule:
        """The fitted decoding rule, whole (probability files carry it)."""

    def decoding(self) -> str:
        """The decoding rule in a few words."""

    def describe(self) -> dict:
        """What the model is, JSON-able: head, params, decoding, features, labels, scores, members (see
        `describe_model`)."""


Reader = Callable[[dict, Path], Predictor]


@dataclass(frozen=True)
class Format:
    tag: str  # the file's "format" value
    container: Container
    reader: Reader


FORMATS: dict[str, Format] = {}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of an HDF5 file (stores, probability files)
JSON_TAKEN = ("a blend or stack file (JSON), not a model file; evaluate, report, predict and blend apply take it, "
              "but this needs a model file from imet fit")


def register_format(tag: str, container: Container, reader: Reader) -> None:
    """Register the reader of one model-file format; refuses a tag registered twice."""
    if tag in FORMATS:
        raise ValueError(f"model format {tag!r} is already registered")
    FORMATS[tag] = Format(tag, container, reader)


def open_model(path: Path, container: Container | None = None) -> Predictor:
    """The Predictor of a model file of any registered format (or only of `container`'s formats), by its tag."""
    blob, fmt = _read(Path(path), container)
    return fmt.reader(blob, Path(path))


def describe_model(path: Path) -> dict:
    """What a model file of any format holds, as JSON-able values (what `imet model info` prints): path,
    format, version, imet_version (the imet that wrote it: head files record it; else None), sha256, then
    its Predictor's `describe()`: head, params, decoding (the fitted rule: mode, thresholds, label counts,
    power), features (the fitting store's identity: fingerprint, settings, layout, codecs; None for a blend
    or stack, whose members carry theirs), labels (count and kinds), scores (F2 on the split its decoding
    was tuned on), members (a blend's or stack's model files, a folds file's fold models; [] for a head)."""
    path = Path(path)
    blob, fmt = _read(path, None)
    model = fmt.reader(blob, path)
    return {"path": str(path), "format": fmt.tag, "version": blob.get("version"),
            "imet_version": blob.get("imet_version"), "sha256": sha256_file(path), **model.describe()}


def fit_config(path: Path) -> str:
    """TOML text of the `imet fit` settings that made a head or folds file: its head, every parameter (None left
    out: the head's default), folds and fold_seed; `imet fit --config FILE --store STORE --out MODEL` refits it
    (the store and outputs are not recorded in a model). A blend or stack file is refused by name."""
    info = describe_model(path)
    if info["format"] not in ("imet-model", "imet-folds"):
        raise ImetError(f"{path}: a {info['head']} file; --config writes the settings of imet fit, which makes head "
                        "and --folds files (blend fit and stack take probability files)")
    lines = [f"# imet fit --config THIS --store STORE --out MODEL refits {Path(path).name} (sha256 "
             f"{info['sha256'][:16]}...), on a store of fingerprint {info['features']['fingerprint']}"]
    for key, value in {"head": info["head"], **info["params"]}.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value, key, path)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object, key: str, path: Path) -> str:
    """One TOML value: a boolean, an integer, a float (inf and nan as TOML writes them), a string or a list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if np.isfinite(value) else "nan" if np.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, key, path) for v in value) + "]"
    raise ImetError(f"{path}: parameter {key} is {type(value).__name__} {value!r}, which a config file cannot hold")


def rule_info(rule: Rule) -> dict:
    """A decoding rule's facts: mode (global, per-class, per-kind), its groups (threshold and label counts per
    label kind, or one group "*" of every label), the per-class thresholds' count and range, the power at
    which class weights are undone (0: none)."""
    ct = rule.class_thresholds
    mode = "per-kind" if rule.groups[0].kind != ALL else "global" if ct is None else "per-class"
    return {"mode": mode, "text": rule.describe(),
            "groups": [{"kind": g.kind, "threshold": float(g.threshold), "min_labels": g.min_labels,
                        "max_labels": g.max_labels} for g in rule.groups],
            "class_thresholds": None if ct is None else {"count": len(ct), "min": float(np.min(ct)),
                                                         "max": float(np.max(ct))},
            "power": float(rule.power) if rule.weights is not None else 0.0}


def vocab_info(vocab: Vocabulary) -> dict:
    """The label count and the count of each label kind (culture, tag)."""
    return {"count": len(vocab), "kinds": dict(sorted(Counter(map(str, vocab.kinds)).items()))}


def _read(path: Path, container: Container | None) -> tuple[dict, Format]:
    """A model file's decoded contents and its registered format; one-line errors name the file."""
    if path.is_dir():
        raise ImetError(f"{path}: a directory, not a model file")
    if not path.is_file():
        raise ImetError(f"{path}: model file not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if head == HDF5_SIGNATURE:
        raise ImetError(f"{path}: an HDF5 file (a feature store or a probability file), not a model file; imet "
                        "store info looks into a store")
    found: Container = "json" if head[:1] == b"{" else "torch"
    if container == "torch" and found == "json":
        raise ImetError(f"{path}: {JSON_TAKEN}")
    if container == "json" and found == "torch":
        raise ImetError(f"{path}: not an imet blend file (a model file; this takes a blend or stack file)")
    blob = _read_json(path) if found == "json" else _read_torch(path)
    fmt = FORMATS.get(blob.get("format")) if isinstance(blob, dict) else None
    if fmt is None or fmt.container != found:
        raise ImetError(f"{path}: not an imet {'blend' if found == 'json' else 'model'} file")
    return blob, fmt


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: [[[[...]]]]
        raise ImetError(f"{path}: not an imet blend file ({type(e).__name__})") from None


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never for a model file
        raise ImetError(f"{path}: not a readable imet model (not a torch file of plain tensors and values)") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ImetError(f"{path}: not a readable imet model ({type(e).__name__}: {first[:200]})") from None
