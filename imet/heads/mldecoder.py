"""`mldecoder`: label queries cross-attending to the map cells (ML-Decoder, Ridnik et al. 2023; Query2Label).

The standardised cells are embedded to width E; G learnable group queries attend to them in one decoder
layer without self-attention (cross-attention, then a feed-forward block, each with a residual and
LayerNorm), and group g's output gives the logits of its k = ceil(C / G) labels through its own linear map
("group fully-connected"). With G = C every label has its own query (Query2Label's decoder, one layer).
The attention that `explain` draws for a label is its group query's, averaged over the heads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from imet.heads.base import register
from imet.heads.maps import ClassAttention, MapHead
from imet.heads.params import Float, Int, Param, ParamError


class MLDecoder(ClassAttention):
    """One cross-attention decoder layer of G group queries over the cells, then group fully-connected."""

    def __init__(self, n_labels: int, channels: int, hog_dim: int, *, groups: int = 100, width: int = 256,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__(n_labels, channels, hog_dim)
        g = min(groups, n_labels)
        self.per_group = math.ceil(n_labels / g)  # k labels per query
        self.n_labels = n_labels
        self.embed = nn.Linear(channels, width)
        self.queries = nn.Parameter(torch.randn(g, width) * 0.02)  # (G, E)
        self.attend = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * width, width))
        self.group_weight = nn.Parameter(torch.randn(g, width, self.per_group) / math.sqrt(width))  # (G, E, k)
        self.bias = nn.Parameter(torch.zeros(n_labels))

    def scores(self, maps: Tensor) -> tuple[Tensor, Tensor]:
        tokens = torch.relu(self.on_cells(maps, self.embed.weight, self.embed.bias))  # (B, L, E)
        q = self.queries.expand(len(maps), -1, -1)  # (B, G, E)
        out, weights = self.attend(q, tokens, tokens, need_weights=True)  # (B, G, E), (B, G, L)
        x = self.norm1(q + out)
        x = self.norm2(x + self.ffn(x))  # (B, G, E)
        logits = torch.einsum("bge,gek->bgk", x, self.group_weight).flatten(1)[:, :self.n_labels]  # (B, C)
        label_group = torch.arange(self.n_labels, device=maps.device) // self.per_group  # (C,)
        return logits + self.bias, weights[:, label_group]  # (B, C), (B, C, L)


@register
class MLDecoderHead(MapHead):
    """ML-Decoder over the map cells: group label queries, one cross-attention layer, optional HOG term."""

    name = "mldecoder"
    params = {
        "groups": Param(Int(1), "Label queries at most; labels are shared among them beyond that."),
        "width": Param(Int(1), "Embedding width of cells and queries."),
        "heads": Param(Int(1), "Attention heads (must divide width)."),
        "decoder_dropout": Param(Float(0, 1, high_open=True), "Dropout in the attention and the feed-forward block."),
    }

    def __init__(self, *, lr: float = 1e-3, groups: int = 100, width: int = 256, heads: int = 4,
                 decoder_dropout: float = 0.1, **rest):
        super().__init__(lr=lr, **rest)
        self.groups = groups  # label queries at most (ML-Decoder's group decoding when labels outnumber them)
        self.width = width  # embedding width E of cells and queries
        self.heads = heads  # attention heads (must divide width)
        self.decoder_dropout = decoder_dropout  # dropout in the attention and the feed-forward block

    def validate(self, n_labels: int | None = None) -> None:
        super().validate(n_labels)
        if self.width % self.heads:
            raise ParamError(f"mldecoder: heads {self.heads} must divide width {self.width}", ["heads", "width"])

    def _make(self, n_labels: int, channels: int, hog_dim: int) -> MLDecoder:
        return MLDecoder(n_labels, channels, hog_dim, groups=self.groups, width=self.width, heads=self.heads,
                         dropout=self.decoder_dropout)
