"""`mldecoder`: label queries cross-attending to the map cells (ML-Decoder, Ridnik et al. 2023; Query2Label).

The standardised cells are embedded to width E (Linear, ReLU): these tokens are the keys and values, head j
reading its slice of E/h dims; G learned group queries attend to them in one decoder layer without
self-attention (cross-attention and an output projection, then a feed-forward block, each with a residual
and LayerNorm), and group g's output gives the logits of its k = ceil(C / G) labels through its own linear
map ("group fully-connected"). With G = C every label has its own query (Query2Label's decoder, one layer).
The attention that `explain` draws for a label is its group query's, averaged over the heads; it is built
only when asked (training and prediction never form the (B, C, L) tensor).

Choices made here (measured in benchmarks/bench_map_family.py, bench_map_speed.py):
- Started from a csra fitted first in the same fit (`start=csra`, recorded in the model's parameters):
  token g starts as relu(csra score of group g's labels on the cell) and query g picks that token, so the
  attention peaks on the evidence from the first step. Randomly started (`start=random`, the reference),
  every query's attention is ~uniform and its gradient ~1/L: it stayed uniform on planted stores.
- Residual on the csra start (module layout 3): the logit is a csra term (its classifier, T = 1, 2, lambda 1,
  as csra's defaults) plus the decoder's term, whose group classifier starts at zero, so the head starts
  as its csra start exactly; the csra term is frozen (`freeze_start`, default) and the fit keeps the start
  when the trained head scores below it on val. Without it, the decoder trained 20 epochs after csra lost
  part of csra's start (0.08 F2 below csra on the family). `start=random` has no csra term (zero, frozen).
- `init_from`: a csra model already fitted on this store (the README's recipe fits `csra --hog` anyway) is the
  start instead of a csra fitted here, so the fit is the decoder's own epochs: at iMet's shape the csra start
  is most of mldecoder's time (docs/scale.md).
- The csra term carries its start's own mean-cell weights (module layout 4; imet.heads.csra says why).
- Early stopping from the start (`patience` 3, counted from the csra start's val F2; the csra fitted as the
  start keeps csra's own patience): on the planted family and at 1,103 labels the decoder kept its start after
  all of its 20 epochs, so a decoder that has not beaten its start in three epochs stops there.
- No separate key/value projections (the reference's nn.MultiheadAttention has them): the embedding is
  learned anyway, and the two E x E maps per cell were most of the layer's cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imet.errors import ImetError
from imet.heads.base import load_model, register
from imet.heads.csra import CSRAHead, csra_term
from imet.heads.maps import ClassAttention, MapHead
from imet.heads.params import LOSS_PARAMS, MLDecoderParams, ParamError, parse_temperatures
from imet.heads.train import snapshot
from imet.store import FeatureStore


class MLDecoder(ClassAttention):
    """One cross-attention decoder layer of G group queries over the cells, then group fully-connected; with
    `residual`, added to a csra term (its classifier w_c, temperatures 1 and 2, lambda 1)."""

    TEMPERATURES = (1.0, 2.0)  # the csra term's, csra's defaults (the start is a csra with its defaults)

    def __init__(self, n_labels: int, channels: int, hog_dim: int, *, groups: int = 100, width: int = 256,
                 heads: int = 4, dropout: float = 0.1, residual: bool = True, mean_term: bool = True):
        super().__init__(n_labels, channels, hog_dim)
        self.classifier = nn.Linear(channels, n_labels) if residual else None  # the csra term's w_c and biases
        self.mean_term = nn.Linear(channels, n_labels, bias=False) if residual and mean_term else None  # its u_c
        for layer in (self.classifier, self.mean_term):  # silent until started from a csra
            if layer is not None:
                nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        g = min(groups, n_labels)
        self.per_group = math.ceil(n_labels / g)  # k labels per query
        self.n_labels, self.heads, self.dropout = n_labels, heads, dropout
        self.embed = nn.Linear(channels, width)  # cells -> tokens (B, L, E): keys and values, split among heads
        self.queries = nn.Parameter(torch.randn(g, width) * 0.02)  # (G, E)
        self.out_proj = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * width, width))
        self.group_weight = nn.Parameter(torch.randn(g, width, self.per_group) / math.sqrt(width))  # (G, E, k)
        self.bias = nn.Parameter(torch.zeros(n_labels))

    def scores(self, maps: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        h = self.heads
        tokens = torch.relu(self.on_cells(maps, self.embed.weight, self.embed.bias))  # (B, L, E)
        kv = tokens.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, L, E/h): head j reads its slice of the tokens
        q = self.queries.unflatten(-1, (h, -1)).transpose(0, 1)  # (h, G, E/h)
        if attention:  # explain: the weights themselves
            a = torch.softmax(q @ kv.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, h, G, L)
            pooled = F.dropout(a, self.dropout, self.training) @ kv  # (B, h, G, E/h)
        else:  # training and prediction: the fused kernel, weights never materialised (1.8x faster here)
            pooled = F.scaled_dot_product_attention(q.expand(len(maps), -1, -1, -1), kv, kv,
                                                    dropout_p=self.dropout if self.training else 0.0)
        x = self.norm1(self.queries + self.out_proj(pooled.transpose(1, 2).flatten(2)))  # (B, G, E)
        x = self.norm2(x + self.ffn(x))
        logits = torch.einsum("bge,gek->bgk", x, self.group_weight).flatten(1)[:, :self.n_labels]  # (B, C)
        logits = logits + self.bias
        if self.classifier is not None:  # the csra term, as CSRA.scores
            logits = logits + csra_term(self, maps, self.classifier, self.TEMPERATURES, 1.0, self.mean_term)[0]
        if not attention:
            return logits, None
        label_group = torch.arange(self.n_labels, device=maps.device) // self.per_group  # (C,)
        return logits, a.mean(1)[:, label_group]  # (B, C), (B, C, L)

    @torch.no_grad()
    def start_from(self, weight: Tensor, bias: Tensor, hog: nn.Linear | None, mean_term: nn.Linear | None) -> None:
        """Start the attention where a fitted csra's is: token g = relu(score of group g's labels on the cell)
        (their mean class scorer w (C, D) on standardised cells), group g's query picks that token in its
        head at scale sqrt(E/h), so its attention logits are the csra scores from the first step, not a
        uniform 1/L whose gradient stalls. With the csra term (`residual`), that term is the csra and the
        group classifier and biases start at zero: the head's logits are the csra's exactly. Without it (an
        older layout), the values and group classifier start reading that token and the label biases are
        csra's. The HOG term is csra's. Other token dims keep their random start (more features)."""
        g, width = self.queries.shape
        group = torch.arange(self.n_labels) // self.per_group  # (C,)
        scorer = torch.zeros(g, weight.shape[1]).index_add_(0, group, weight)
        scorer /= torch.bincount(group, minlength=g).clamp_min(1).unsqueeze(1).float()  # (G, D) mean scorer
        self.embed.weight[:g] = scorer
        self.embed.bias[:g] = 0
        self.queries.zero_()
        self.queries[torch.arange(g), torch.arange(g)] = math.sqrt(width / self.heads)
        self.out_proj.weight.copy_(torch.eye(width))
        self.out_proj.bias.zero_()
        if self.classifier is not None:
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)
            if self.mean_term is not None and mean_term is not None:
                self.mean_term.weight.copy_(mean_term.weight)
            self.group_weight.zero_()
        else:
            self.group_weight[group, group, torch.arange(self.n_labels) % self.per_group] += 1.0
            self.bias.copy_(bias)
        if hog is not None and self.hog is not None:
            self.hog.weight.copy_(hog.weight)


@register
class MLDecoderHead(MLDecoderParams, MapHead):
    """ML-Decoder over the map cells: group label queries, one cross-attention layer, optional HOG term."""

    name = "mldecoder"
    module_layout = {"layout": 4}  # 4: residual on a csra term with its own mean-cell weights; 3: the csra term
    # without them; 2: own attention, tokens as keys and values, no csra term (3 and 2 still load);
    # 1: nn.MultiheadAttention (refused)

    def validate(self, n_labels: int | None = None) -> None:
        super().validate(n_labels)
        if self.width % self.heads:
            raise ParamError(f"mldecoder: heads {self.heads} must divide width {self.width}", ["heads", "width"])
        if self.init_from and self.start != "csra":
            raise ParamError(f"mldecoder: init_from is a csra start; it does not apply to start {self.start}",
                             ["init_from", "start"])
        if self.start == "csra" and n_labels is not None and min(self.groups, n_labels) > self.width:
            raise ParamError(f"mldecoder: start csra needs a token per query: min(groups {self.groups}, labels "
                             f"{n_labels}) <= width {self.width}", ["groups", "width", "start"])

    def _make(self, n_labels: int, channels: int, hog_dim: int, layout: int = 1) -> MLDecoder:
        if layout not in (2, 3, 4):
            raise ImetError(f"an mldecoder of module layout {layout} (nn.MultiheadAttention, before the attention "
                            f"started from csra); refit the model")
        return MLDecoder(n_labels, channels, hog_dim, groups=self.groups, width=self.width, heads=self.heads,
                         dropout=self.decoder_dropout, residual=layout >= 3, mean_term=layout == 4)

    def _fit(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        """MapHead's fit, then back to the csra start if the decoder ended below it on val F2."""
        self._start_state = None
        super()._fit(store, train, val, log)
        if self._start_state is not None:
            state, start_f2 = self._start_state
            f2 = self.val_score(store, val)
            if f2 < start_f2:
                self.net_.load_state_dict(state)
                log(f"{self.name}: val F2 {f2:.4f} below its csra start's {start_f2:.4f}; keeping the start")
        del self._start_state
        for p in self.net_.parameters():
            p.requires_grad_(True)

    def _csra_from(self, store: FeatureStore) -> CSRAHead:
        """The fitted csra of `init_from`: a csra model of this store's labels and features, with this hog."""
        path = Path(self.init_from)
        csra = load_model(path)
        if not isinstance(csra, CSRAHead):
            raise ImetError(f"{path}: init_from needs a csra model (this is {csra.name})")
        csra.check_store(store)
        if csra.hog != self.hog:
            raise ImetError(f"{path}: this csra model was fitted with hog={csra.hog}; fit mldecoder with "
                            f"hog={csra.hog} to start from it")
        if parse_temperatures(csra.temperatures) != MLDecoder.TEMPERATURES or csra.lam != 1.0:
            raise ImetError(f"{path}: this csra model pools at temperatures {csra.temperatures} with lam {csra.lam}; "
                            f"mldecoder's csra term is csra's default (temperatures 1,2, lam 1)")
        return csra

    def _start_score(self) -> tuple[float, dict] | None:
        if self._start_state is None:
            return None
        state, f2 = self._start_state
        return f2, state

    def freeze_csra_term(self) -> None:
        for layer in (self.net_.classifier, self.net_.mean_term):
            if layer is not None:
                layer.requires_grad_(False)

    def _start(self, store: FeatureStore, train: np.ndarray, val: np.ndarray, log: Callable[[str], None]) -> None:
        if self.start == "random":
            self.freeze_csra_term()  # no csra term: the reference's decoder alone
            return
        if self.init_from:
            csra = self._csra_from(store)
            log(f"{self.name}: starting from {self.init_from} (no csra fitted)")
        else:
            shared = ("epochs", "batch_size", "weight_decay", "class_weights", "hog", "hog_decay",
                      "device", "workers", "seed", *LOSS_PARAMS)
            csra = CSRAHead(**{k: getattr(self, k) for k in shared})
            csra.fit(store, log=lambda line: log(f"{self.name} start: {line}"), views=(train, val))
        net = csra.net_
        self.net_.start_from(net.classifier.weight, net.classifier.bias, net.hog, net.mean_term)
        if self.freeze_start:
            self.freeze_csra_term()
        self._start_state = (snapshot(self.net_), self.val_score(store, val))
