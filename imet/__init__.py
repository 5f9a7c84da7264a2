"""imet: a feature store plus lightweight heads for multi-label classification of museum objects.

The Python API (docs/api.md): `FeatureStore` (a store file), `ArrayStore` (features in numpy arrays),
`make_head`, `list_heads`, `load_model`, `open_model`. They are imported on first use, so `import imet` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {"FeatureStore": "imet.store", "ArrayStore": "imet.store", "make_head": "imet.heads",
        "list_heads": "imet.heads", "load_model": "imet.heads", "open_model": "imet.models",
        "ImetError": "imet.errors"}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'imet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
