"""Every model-file format registered: `open_model` opens a head, folds, blend or stack file as a Predictor.

Importing this module imports the modules that register the formats (imet.loader): the heads (head files and
the K fold models of `fit --folds`), blends and stacks. Commands that take `--model` open it here.
"""

from imet import blend, heads, stack  # noqa: F401  (importing them registers their formats)
from imet.loader import Predictor, describe_model, fit_config, open_model

__all__ = ["Predictor", "describe_model", "fit_config", "open_model"]
