"""imet: a feature store plus lightweight heads for multi-label classification of museum objects.

The Python API (docs/api.md): `FeatureStore` (a store file), `ArrayStore` (features in numpy arrays),
`make_head`, `list_heads`, `load_model`, `open_model`, `describe_model`; the ensemble layer: `fit_folds` and
`FoldedModel`, `fit_blend` and `Blend`, `fit_stack` and `Stack`, probability files (`write_model_probs`,
`write_probs`, `read_probs`), submissions (`write_submission`, `read_submission`). They are imported on first
use, so `import imet` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {"FeatureStore": "imet.store", "ArrayStore": "imet.store", "make_head": "imet.heads",
        "list_heads": "imet.heads", "load_model": "imet.heads", "open_model": "imet.models",
        "describe_model": "imet.models", "ImetError": "imet.errors",
        "fit_folds": "imet.folds", "FoldedModel": "imet.heads.folds", "fit_blend": "imet.blend", "Blend": "imet.blend",
        "fit_stack": "imet.stack", "Stack": "imet.stack", "write_model_probs": "imet.probfiles",
        "write_probs": "imet.probfiles", "read_probs": "imet.probfiles", "write_submission": "imet.decode.submission",
        "read_submission": "imet.decode.submission"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'imet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
