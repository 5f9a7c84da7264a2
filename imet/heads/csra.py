"""`csra`: class-specific residual attention (Zhu & Wu, ICCV 2021) over the frozen 14x14 maps.

Per label c and cell i, a class score s_ic = w_c . v_i (a 1x1 convolution of the standardised cells). The
label's logit is the mean-cell score (what the linear head sees, up to the pooling branch) plus lambda times
attention-pooled scores sum_i softmax_i(T s_ic) s_ic, averaged over the temperatures T. Classifier and
attention share the weights w_c, so whatever the mean term learns about a label also points its attention
at the cells that carry it, and that is how a one-cell object is found.

Choices made here, each measured on a planted store (benchmarks/bench_attention.py):
- The temperature heads share one classifier (the paper gives each its own; sharing costs one 1x1
  convolution) and default to T = 1, 2.
- No T = inf (max over cells) by default, and scores are not normalised by |w_c|: while w_c is still random,
  the max over cells of noise is a positive offset on every negative, so the first thing Adam learns is to
  shrink w_c (to 0.3% of its start), or, normalised, the logit's scale, and the attention never forms. The
  softmax pooling at finite T is second order in w_c near zero, so the mean term leads and the attention
  follows. `--temperatures 1,inf` still gives the paper's max head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from imet.heads.base import register
from imet.heads.maps import ClassAttention, MapHead
from imet.heads.params import CSRAParams, parse_temperatures


class CSRA(ClassAttention):
    """Mean-cell logit plus lambda x class-specific attention pooling at several temperatures."""

    def __init__(self, n_labels: int, channels: int, hog_dim: int, temperatures: tuple[float, ...] = (1.0, 2.0),
                 lam: float = 1.0):
        super().__init__(n_labels, channels, hog_dim)
        self.classifier = nn.Linear(channels, n_labels)  # w_c and a bias per label
        self.temperatures, self.lam = tuple(temperatures), lam

    def scores(self, maps: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        s = self.on_cells(maps, self.classifier.weight).float()  # (B, L, C) class scores: one matmul (float32
        # under CUDA's bf16 autocast too: the pooling's exp and sums, like autocast's softmax, need it)
        logits = s.mean(1) + self.lam * attention_pool(s, self.temperatures) + self.classifier.bias  # (B, C)
        return logits, torch.softmax(s, dim=1).transpose(1, 2) if attention else None  # (B, C, L) at T = 1


def attention_pool(s: Tensor, temperatures: tuple[float, ...]) -> Tensor:
    """Scores s (B, L, C) -> mean over temperatures t of sum_i softmax_i(t s_ic) s_ic (max over i at t = inf),
    (B, C). One exp serves every finite temperature (exp(t (s - max)) = exp(s - max)^t), the softmax runs
    over the cells in place of a (B, C, L) copy, and no (B, C, L) attention is kept for backward: the
    gradient is p_i (1 + t (s_i - pooled)) (`_Pool`), about half the passes of autograd's softmax."""
    finite = tuple(t for t in temperatures if not math.isinf(t))
    total = _Pool.apply(s, finite) if finite else 0
    if len(finite) < len(temperatures):
        total = total + s.amax(1) * (len(temperatures) - len(finite))
    return total / len(temperatures)


class _Pool(torch.autograd.Function):
    """sum over finite temperatures t of sum_i softmax_i(t s) s over the cells of s (B, L, C) -> (B, C)."""

    @staticmethod
    def forward(ctx, s: Tensor, temperatures: tuple[float, ...]) -> Tensor:
        e = torch.exp(s - s.amax(1, keepdim=True))  # (B, L, C) in (0, 1]
        total = torch.zeros_like(s[:, 0])
        pooled = []
        for t in temperatures:
            et = e if t == 1 else e.pow(t)
            pooled.append((et * s).sum(1) / et.sum(1))  # (B, C)
            total += pooled[-1]
        ctx.save_for_backward(s, *pooled)
        ctx.temperatures = temperatures
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        s, *pooled = ctx.saved_tensors
        e = torch.exp(s - s.amax(1, keepdim=True))  # recomputed: cheaper than keeping it
        out = torch.zeros_like(s)
        for t, m in zip(ctx.temperatures, pooled, strict=True):
            et = e if t == 1 else e.pow(t)
            p = et / et.sum(1, keepdim=True)  # (B, L, C) softmax over the cells
            out += p * (1 + t * (s - m.unsqueeze(1))) * grad.unsqueeze(1)
        return out, None


@register
class CSRAHead(CSRAParams, MapHead):
    """Class-specific residual attention over the map cells (CSRA), optionally plus a linear HOG term."""

    name = "csra"
    def _make(self, n_labels: int, channels: int, hog_dim: int) -> CSRA:
        return CSRA(n_labels, channels, hog_dim, temperatures=parse_temperatures(self.temperatures), lam=self.lam)

