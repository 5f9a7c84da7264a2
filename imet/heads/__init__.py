"""Heads that turn store features into label probabilities.

The package itself imports no head (their modules import torch): the first name taken from it (`HEADS`,
`make_head`, `load_model`...) imports every head module, which registers every head and the model-file formats
of heads and of fold models (imet.loader). `imet.heads.params`, the heads' parameter declarations, imports no
torch: `imet fit --help` and its argument errors read it alone.
"""

from __future__ import annotations

import importlib

__all__ = ["HEADS", "Head", "NotAStoreError", "NotFittedError", "ParamError", "get_head", "list_heads", "load_model",
           "make_head"]
MODULES = ("linear", "lgbm", "csra", "mldecoder", "attn_rnn", "folds")  # importing them registers them


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'imet.heads' has no attribute {name!r}")
    for module in MODULES:
        importlib.import_module(f"imet.heads.{module}")
    return getattr(importlib.import_module("imet.errors" if name == "ParamError" else "imet.heads.base"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
