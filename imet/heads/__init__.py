"""Heads that turn store features into label probabilities; importing this package registers them all."""

from imet.heads import attn_rnn, lgbm, linear  # noqa: F401  (registers attn_rnn, lgbm, linear, linear_hog)
from imet.heads.base import HEADS, Head, get_head, load_model, make_head

__all__ = ["HEADS", "Head", "get_head", "load_model", "make_head"]
