"""The decoding asked for, declared once: which rule family the search tunes (`thresholds`), how many labels an
image gets at least and at most, and how far per-class thresholds are pulled toward the global one.

Each parameter's type, bound and help is one `Param` in `PARAMS`, its default one field of `Decoding`. Heads
take these as parameters (`Head.params`, their defaults from `Decoding`), `fit_blend` and `fit_stack` take a
`Decoding` (`ENSEMBLE` unless told), and the CLI makes the options of `fit`, `blend fit` and `stack` from the
same declarations. `imet.decode.rule.search_rule` is the one search that turns a `Decoding` into a `Rule`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from imet.params import LABELS, Choice, Float, Int, Param, ParamError, check_values

THRESHOLDS = ("global", "per-class", "per-kind", "calibrated")  # the rule families `search_rule` tunes

PARAMS: dict[str, Param] = {
    "thresholds": Param(Choice(THRESHOLDS),
                        "One threshold tuned on the labelled images (the paper), one per class shrunk toward it, "
                        "one threshold and min/max labels per label kind (culture, tag), kept when it beats the "
                        "global one, or one per class from a per-label logistic calibration (Platt) and one "
                        "threshold on the calibrated probabilities."),
    "min_labels": Param(Int(0, LABELS), "At least this many labels per image."),
    "max_labels": Param(Int(1), "At most this many labels per image.", none="no limit"),
    "shrink": Param(Float(0), "Per-class thresholds: positives-equivalent pull toward the global threshold."),
}


@dataclass(frozen=True)
class Decoding:
    """The values of `PARAMS` (the fields' defaults are the parameters' defaults)."""

    thresholds: str = "calibrated"  # per-class until measured at 1,103 labels (docs/scale.md, "Calibrated thresholds")
    min_labels: int = 1
    max_labels: int | None = None  # None: no limit
    shrink: float = 10.0

    def values(self) -> dict[str, object]:
        return asdict(self)

    def check(self, where: str, n_labels: int | None = None) -> None:
        """Refuse a value outside its declared bound (the label count's once `n_labels` is known) or contradicting
        another, naming `where` and the parameters (ParamError, before any work): what blend fit and stack check;
        a head checks its values with its other parameters, then `check_counts` and `check_search`."""
        check_values(where, PARAMS, self.values(), {"labels": n_labels})
        check_counts(where, self.min_labels, self.max_labels)
        self.check_search(where)

    def check_search(self, where: str) -> None:
        """Refuse what the search would silently drop: max_labels under per-kind decoding."""
        if self.thresholds == "per-kind" and self.max_labels is not None:
            raise ParamError(f"{where}: max_labels bounds the global and per-class rules; per-kind decoding searches "
                             "each kind's own label counts: drop max_labels or choose thresholds global",
                             ["max_labels", "thresholds"])


def check_counts(where: str, min_labels: int, max_labels: int | None) -> None:
    """min_labels <= max_labels (the one check of the two together)."""
    if max_labels is not None and min_labels > max_labels:
        raise ParamError(f"{where}: min_labels {min_labels} is more than max_labels {max_labels}",
                         ["min_labels", "max_labels"])


# blend fit and stack decode as the heads (per-kind until calibrated beat it at 1,103 labels: docs/scale.md)
ENSEMBLE = Decoding()

# blend fit's weights (not decoding, declared here so that the CLI builds its options without importing imet.blend):
# one per model, or per label for labels with at least BLEND_MIN_POSITIVES positives on the tuning split
BLEND_WEIGHTINGS = ("global", "per-label")
BLEND_MIN_POSITIVES = 3
