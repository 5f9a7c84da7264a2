"""Heads that turn store features into label probabilities; importing this package registers them all, and
the model-file formats of heads and of fold models (imet.loader)."""

from imet.heads import attn_rnn, csra, folds, lgbm, linear, mldecoder  # noqa: F401  (registers every head)
from imet.heads.base import HEADS, Head, NotAStoreError, NotFittedError, get_head, list_heads, load_model, make_head
from imet.heads.params import ParamError

__all__ = ["HEADS", "Head", "NotAStoreError", "NotFittedError", "ParamError", "get_head", "list_heads", "load_model",
           "make_head"]
