"""Heads that turn store features into label probabilities; importing this package registers them all."""

from imet.heads import attn_rnn, csra, lgbm, linear, mldecoder  # noqa: F401  (registers every head)
from imet.heads.base import HEADS, Head, get_head, load_model, make_head

__all__ = ["HEADS", "Head", "get_head", "load_model", "make_head"]
