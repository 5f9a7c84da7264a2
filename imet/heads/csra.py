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
- The mean-cell term has weights of its own besides w_c (module layout 2; `mean_term`, started at zero, so the
  head starts as the paper's): its logit is (w_c + u_c) . mean cell. With w_c alone, a label whose evidence
  is spread over the image (a culture, a global tag) gets the attention-pooled noise of its cells added to
  its logit, and w_c cannot silence it without losing the mean term too. w_c still learns from both terms,
  so the attention forms as before. On twelve held-out planted family members (600 images) csra's test F2
  rose from 0.500 to 0.625 (the worst member +0.048), and from 0.464 to 0.492 at 1,103 labels
  (docs/benchmarks.md, "csra's own mean-cell weights").
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from imet.errors import ImetError
from imet.heads.base import register
from imet.heads.maps import ClassAttention, MapHead
from imet.heads.params import CSRAParams, parse_temperatures


class CSRA(ClassAttention):
    """Mean-cell logit plus lambda x class-specific attention pooling at several temperatures."""

    def __init__(self, n_labels: int, channels: int, hog_dim: int, temperatures: tuple[float, ...] = (1.0, 2.0),
                 lam: float = 1.0, mean_term: bool = True):
        super().__init__(n_labels, channels, hog_dim)
        self.classifier = nn.Linear(channels, n_labels)  # w_c and a bias per label
        self.mean_term = nn.Linear(channels, n_labels, bias=False) if mean_term else None  # u_c: mean cell only
        if self.mean_term is not None:
            nn.init.zeros_(self.mean_term.weight)
        self.temperatures, self.lam = tuple(temperatures), lam

    def scores(self, maps: Tensor, attention: bool = False) -> tuple[Tensor, Tensor | None]:
        logits, s = csra_term(self, maps, self.classifier, self.temperatures, self.lam, self.mean_term)
        return logits, torch.softmax(s, dim=1).transpose(1, 2) if attention else None  # (B, C, L) at T = 1


def csra_term(module: ClassAttention, maps: Tensor, classifier: nn.Linear, temperatures: tuple[float, ...],
              lam: float, mean_term: nn.Linear | None = None) -> tuple[Tensor, Tensor]:
    """csra's logits (B, C) from raw maps (B, L, D) with the class scorers `classifier`, and the class scores s
    (B, L, C): one matmul, in float32 under CUDA's bf16 autocast too (the pooling's exp and sums, like
    autocast's softmax, need it). The mean-cell term is the scorers on the mean cell (= s.mean(1)): its
    gradient then reaches the weights through (B, D), not as one more pass over s. With `mean_term` (u_c), the
    mean-cell term is (w_c + u_c) . mean cell."""
    s = module.on_cells(maps, classifier.weight).float()
    w_mean = classifier.weight if mean_term is None else classifier.weight + mean_term.weight
    mean = module.on_cells(maps.mean(1, keepdim=True), w_mean).float()[:, 0]
    return mean + lam * attention_pool(s, temperatures) + classifier.bias, s


def attention_pool(s: Tensor, temperatures: tuple[float, ...]) -> Tensor:
    """Scores s (B, L, C) -> mean over temperatures t of sum_i softmax_i(t s_ic) s_ic (max over i at t = inf),
    (B, C). One exp serves every finite temperature (exp(t (s - max)) = exp(s - max)^t), the softmax runs
    over the cells in place of a (B, C, L) copy, and no (B, L, C) attention is kept for backward (`_Pool`)."""
    finite = tuple(t for t in temperatures if not math.isinf(t))
    total = _Pool.apply(s, finite) if finite else 0
    if len(finite) < len(temperatures):
        total = total + s.amax(1) * (len(temperatures) - len(finite))
    return total / len(temperatures)


POOL_CHUNK_BYTES = 2 << 20  # views of s pooled at once: ~2 MiB stays in this CPU's L2 (1.4 views at 1,103 labels)


def _chunk(s: Tensor) -> int:
    """Views of s (B, L, C) per pass: all on a GPU (one kernel each), POOL_CHUNK_BYTES' worth on the CPU."""
    per_view = s.shape[1] * s.shape[2] * s.element_size()  # s[0] would fail on an empty batch (explain's)
    return max(1, s.shape[0]) if s.is_cuda else max(1, POOL_CHUNK_BYTES // max(1, per_view))


def _powers(e: Tensor, temperatures: tuple[float, ...]) -> Iterator[Tensor]:
    for t in temperatures:
        yield e if t == 1 else e * e if t == 2 else e.pow(t)


class _Pool(torch.autograd.Function):
    """sum over finite temperatures t of sum_i softmax_i(t s) s over the cells of s (B, L, C) -> (B, C).

    At 1,103 labels s is 0.9 MB a view: every whole-batch pass over it went to memory, and the pooling
    was ~65% of a csra step. Here a few views at a time (POOL_CHUNK_BYTES) go through all passes while they
    are in cache, and backward is one fused expression per temperature with (B, C) coefficients: the
    gradient sum_t e_i^t / Z_t (1 + t (s_i - m_t)) is e^t (c0_t + c1_t s_i) with c0_t = g (1 - t m_t) / Z_t,
    c1_t = g t / Z_t (m_t: the pooled value, Z_t: the softmax's sum, both kept from forward). Scores forward
    + backward at 1,103 labels and 256 channels: 4.3x faster than autograd's softmax formula, where the same
    passes over the whole batch were 1.2x (`benchmarks/bench_map_speed.py --scores-only`). Laying s out
    (C, B, L), for contiguous reductions, measured no faster on the whole step and was not kept."""

    @staticmethod
    def forward(ctx, s: Tensor, temperatures: tuple[float, ...]) -> Tensor:
        b = s.shape[0]
        z = s.new_empty((len(temperatures), b, s.shape[2]))  # softmax sums, then pooled values
        m = torch.empty_like(z)
        step = _chunk(s)
        for lo in range(0, b, step):
            part = s[lo:lo + step]
            e = (part - part.amax(1, keepdim=True)).exp_()  # in (0, 1]
            for k, et in enumerate(_powers(e, temperatures)):
                torch.sum(et, 1, out=z[k, lo:lo + step])
                torch.sum(et * part if et is e else et.mul_(part), 1, out=m[k, lo:lo + step])
        m /= z
        ctx.save_for_backward(s, z, m)
        ctx.temperatures = temperatures
        return m.sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        s, z, m = ctx.saved_tensors
        t = torch.tensor(ctx.temperatures, dtype=s.dtype, device=s.device).view(-1, 1, 1)
        a = grad.unsqueeze(0) / z  # (T, B, C)
        c0, c1 = (a * (1 - t * m)).unsqueeze(2), (a * t).unsqueeze(2)  # (T, B, 1, C)
        out = torch.empty_like(s)
        step = _chunk(s)
        for lo in range(0, s.shape[0], step):
            part, o = s[lo:lo + step], out[lo:lo + step]
            e = (part - part.amax(1, keepdim=True)).exp_()  # recomputed: cheaper than keeping it
            for k, et in enumerate(_powers(e, ctx.temperatures)):
                if k == 0:
                    torch.addcmul(c0[k, lo:lo + step], c1[k, lo:lo + step], part, out=o).mul_(et)
                else:
                    o.addcmul_(torch.addcmul(c0[k, lo:lo + step], c1[k, lo:lo + step], part), et)
        return out, None


@register
class CSRAHead(CSRAParams, MapHead):
    """Class-specific residual attention over the map cells (CSRA), optionally plus a linear HOG term."""

    name = "csra"
    module_layout = {"layout": 2}  # 2: the mean-cell term has its own weights u_c; 1: w_c only (still loads)

    def _make(self, n_labels: int, channels: int, hog_dim: int, layout: int = 1) -> CSRA:
        if layout not in (1, 2):
            raise ImetError(f"a csra of module layout {layout}, which this version does not know; refit the model")
        return CSRA(n_labels, channels, hog_dim, temperatures=parse_temperatures(self.temperatures), lam=self.lam,
                    mean_term=layout == 2)

