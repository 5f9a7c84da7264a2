"""Label sets from an AttnRNN: batched beam search (paper section 3.3, eq. 6) and greedy decoding.

Semantics (tests/reference_beam.py implements the same rules one sample and one path at a time):

- A path is a sequence of distinct labels l_1..l_t. Its score is S = sum_i log p_i[l_i], where p_i is the
  model's output at step i along that path (its own LSTM state, v_pred = p_{i-1}, y~_{i-1} = {l_1..l_{i-1}}),
  and its threshold is Theta = sum_i log(gamma f_{l_i}); `log_threshold` holds log(gamma f) per class.
- Each sample starts with K slots and one root path (step 1 would expand K identical beams: expand one).
  At step t every live path is extended by every label not on it, and the sample keeps the best `slots`
  of all these successors by S (fewer when fewer exist, e.g. C < K at step 1). Ties go to the lower
  parent rank, then the lower label index. Scores are kept in float64.
- Stopping (eq. 6): a kept path of length t stops when log P_t = S / t < Theta / t (tested as S < Theta),
  i.e. when its normalised path probability falls below the geometric mean of gamma f over its labels.
  It keeps its t labels (generation ends "at the end of step t"), is set aside as finished, and its slot
  goes with it: the sample keeps one path fewer at every later step.
- At step T = min(steps, C) every kept path finishes. The answer is the finished path with the highest
  log P_t (on ties the earlier one: by step, then by rank). Every sample has one, because something always
  finishes by step T: a sample whose paths never stop gets its best live path at T, one whose paths all
  stop at step 1 gets a single label.
- `beam_search_rules` runs G stop rules (e.g. a grid of gamma) in one search with the answers of G separate
  ones: a path's decoder state depends on its labels only, so each rule keeps its own beam (slots, live
  paths, answer) over one shared pool of paths, and a path kept by several rules is stepped once.
- Work is batched over samples x paths with masks (no per-sample Python loop); samples whose paths have
  all finished are dropped from the batch once they are a quarter of it. The model runs in eval mode
  under inference mode, on its own device and dtype. Greedy decoding is the K = 1 case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


class Encoded(NamedTuple):
    """What a `Decoder`'s `encode` (AttnRNN's, imet.heads.attn_model) computes once per sample, shared by every
    step and every beam."""

    maps: Tensor  # (B, L, D) the cells v_i, raw
    proj: Tensor | None  # (B, L, A) W_v v_i + b on standardised cells, the encoder side of f_att; None without
    mean: Tensor  # (B, D) standardised mean of the cells (init state; the context z_t without attention)
    v_prob: Tensor  # (B, C) sigmoid(f_R(fr_in)), the first v_pred
    fr_logits: Tensor  # (B, C) f_R(fr_in)
    h0: Tensor  # (B, H)
    c0: Tensor  # (B, H)


class BeamResult(NamedTuple):
    """One decoded path per sample."""

    labels: Tensor  # (B, T) long, emission order, padded with -1
    length: Tensor  # (B,) long, number of labels
    score: Tensor  # (B,) float32, normalised log path probability log P_t = S / t
    alpha: Tensor | None  # (B, T, L) float32 attention of the step that emitted each label; 0 in padding


class _Pool(NamedTuple):
    """The paths kept by any of the G stop rules of every sample, and their decoder state.

    A path's state depends on its labels only, never on gamma: a path kept by several rules is stepped once.
    Per sample the pool is ordered as every rule ranks its own paths (by S, ties to the lower parent, then
    the lower label), so each rule's paths are the pool's in pool order.
    """

    h: Tensor  # (B, P, H)
    c: Tensor  # (B, P, H)
    v_pred: Tensor  # (B, P, C) p of the path's last step (v_prob at the root)
    on_path: Tensor  # (B, P, C) bool, y~
    score: Tensor  # (B, P) float64, S
    theta: Tensor  # (B, P, G) float64, Theta under each rule
    labels: Tensor  # (B, P, T) long, -1 padded
    alpha: Tensor | None  # (B, P, T, L) float32
    member: Tensor  # (B, G, P) bool: the path is live in rule g's beam


class Decoder(Protocol):
    """What beam search needs of a model (imet.heads.attn_model.AttnRNN is one).

    `encode(maps (B, L, D), fr_in (B, F))` returns a per-sample tuple with at least `maps` (B, L, D),
    `v_prob` (B, C) (the first v_pred), `h0` and `c0` (B, H); `step(enc, h, c, v_pred, y_prev, live)` runs one
    step for K paths per sample (h, c (B, K, H); v_pred, y_prev (B, K, C); live (B, K) bool) and returns
    logits (B, K, C), the new h and c, and the attention alpha (B, K, L).
    """

    n_labels: int

    def parameters(self) -> Iterator[Tensor]: ...
    def encode(self, maps: Tensor, fr_in: Tensor) -> Encoded: ...
    def step(self, enc: Encoded, h: Tensor, c: Tensor, v_pred: Tensor, y_prev: Tensor,
             live: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


def beam_search(
    model: Decoder,
    maps: Tensor,
    fr_in: Tensor,
    *,
    beam: int,
    steps: int,
    log_threshold: Tensor,
    return_alpha: bool = False,
) -> BeamResult:
    """Best finished path per sample of a K = `beam` search, at most `steps` labels (module docstring)."""
    return beam_search_rules(model, maps, fr_in, beam=beam, steps=steps,
                             log_thresholds=torch.as_tensor(log_threshold)[None],
                             return_alpha=return_alpha)[0]


@torch.inference_mode()
def beam_search_rules(
    model: Decoder,
    maps: Tensor,
    fr_in: Tensor,
    *,
    beam: int,
    steps: int,
    log_thresholds: Tensor,
    return_alpha: bool = False,
) -> list[BeamResult]:
    """`beam_search` under G stop rules at once (`log_thresholds` (G, C), e.g. log(gamma f) for a grid of
    gamma): the same answers as G separate searches, from one pass in which the paths the rules share are
    stepped once. This is how gamma is tuned on val in one decode.
    """
    if beam < 1 or steps < 1:
        raise ValueError(f"beam and steps must be >= 1, got beam={beam}, steps={steps}")
    with _eval(model):
        enc, log_thr = _encode(model, maps, fr_in, log_thresholds)
        (B, L, _), C, G = enc.maps.shape, enc.v_prob.shape[1], log_thr.shape[0]
        T, dev = (min(steps, C) if B else 0), enc.maps.device  # no samples: no steps
        pool = _root(enc, T, G, return_alpha)
        answers = [_Answer.empty(B, T, L, return_alpha, dev) for _ in range(G)]
        slots = torch.full((B, G), beam, dtype=torch.long, device=dev)  # (B', G) for the B' samples still active
        rows = torch.arange(B, device=dev)  # (B',) their indices in the input
        for t in range(T):
            live = pool.member.any(dim=1)  # (B', P)
            logits, h, c, alpha = model.step(enc, pool.h, pool.c, pool.v_pred, pool.on_path, live)
            succ = (pool.score[..., None] + _log_prob(logits)).masked_fill(pool.on_path | ~live[..., None], NEG_INF)
            n, P = succ.shape[:2]
            k = min(beam, C)  # no rule keeps more than `beam` successors, so none of a parent's beyond its best k
            value, label = _best(succ.reshape(n * P, C), k)
            value, label = value.reshape(n, P * k), label.reshape(n, P * k)  # candidates, by parent then rank
            chosen, mark = [], torch.zeros_like(value, dtype=torch.bool)
            for g in range(G):
                mine = value.masked_fill(~pool.member[:, g].repeat_interleave(k, dim=1), NEG_INF)
                width = min(beam, P * k, int(slots[:, g].max()))
                if width == 0:  # this rule has finished every active sample
                    chosen.append(None)
                    continue
                v, i = _best(mine, width)  # (B', width) rule g's successors by its rank
                kept = (torch.arange(width, device=dev) < slots[:, g, None]) & torch.isfinite(v)
                r, j = kept.nonzero(as_tuple=True)
                mark[r, i[r, j]] = True
                chosen.append((v, i, kept))
            order, place = _union(value, mark)  # (B', P') candidates of the new pool; candidate -> position
            pool = _extend(pool, order // k, label.gather(1, order), value.gather(1, order),
                           (h, c, torch.sigmoid(logits), alpha), log_thr, t)
            member = torch.zeros(n, G, order.shape[1], dtype=torch.bool, device=dev)
            for g, picked in enumerate(chosen):
                if picked is None:
                    continue
                v, i, kept = picked
                pos = place.gather(1, i).clamp_min(0)  # (B', width) positions of rule g's successors
                theta = pool.theta[:, :, g].gather(1, pos)
                stop = kept & ((v < theta) | (t == T - 1))
                answers[g].update(v, pos, stop, t, rows, pool)
                slots[:, g] -= stop.sum(dim=1)
                r, j = (kept & ~stop).nonzero(as_tuple=True)
                member[r, g, pos[r, j]] = True
            pool = _prune(pool._replace(member=member))
            active = pool.member.flatten(1).any(dim=1)  # (B',)
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active <= 0.75 * len(active):  # drop the finished samples: less work in later steps
                keep = active.nonzero().squeeze(1)
                enc, pool = _take(enc, keep), _take(pool, keep)
                slots, rows = slots[keep], rows[keep]
    return [answer.result(steps) for answer in answers]


def _union(value: Tensor, mark: Tensor) -> tuple[Tensor, Tensor]:
    """The marked candidates (B, N) in pool order (by value, ties to the lower index: parent, then label),
    padded with unmarked ones, and each candidate's position among them (-1 for the unmarked)."""
    width = max(int(mark.sum(dim=1).max()), 1)
    order = value.masked_fill(~mark, NEG_INF).sort(dim=1, descending=True, stable=True).indices[:, :width]
    place = torch.full(value.shape, -1, dtype=torch.long, device=value.device)
    ranks = torch.arange(width, device=value.device).expand_as(order)
    place.scatter_(1, order, torch.where(mark.gather(1, order), ranks, -1))
    return order, place


def _prune(pool: _Pool) -> _Pool:
    """Drop the paths no rule keeps live, keeping pool order."""
    live = pool.member.any(dim=1)  # (B, P)
    width = max(int(live.sum(dim=1).max()), 1)
    keep = (~live).to(torch.uint8).sort(dim=1, stable=True).indices[:, :width]  # the live ones first, in order
    rows = torch.arange(len(keep), device=keep.device)[:, None]
    member = pool.member.gather(2, keep[:, None].expand(-1, pool.member.shape[1], -1))
    return _Pool(*(None if x is None else x[rows, keep] for x in pool[:-1]), member=member)


@torch.inference_mode()
def greedy_decode(
    model: Decoder,
    maps: Tensor,
    fr_in: Tensor,
    *,
    steps: int,
    log_threshold: Tensor,
    return_alpha: bool = False,
) -> BeamResult:
    """Argmax of p_t over the labels not yet emitted at each step, stopped by the same rule (eq. 6)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with _eval(model):
        enc, log_thr = _encode(model, maps, fr_in, torch.as_tensor(log_threshold)[None])
        log_thr = log_thr[0]
        (B, L, _), C = enc.maps.shape, enc.v_prob.shape[1]
        T, dev = (min(steps, C) if B else 0), enc.maps.device  # no samples: no steps
        h, c, v_pred = enc.h0[:, None], enc.c0[:, None], enc.v_prob[:, None]  # (B, 1, .)
        on_path = torch.zeros(B, C, dtype=torch.bool, device=dev)  # (B, C)
        score = torch.zeros(B, dtype=torch.float64, device=dev)  # (B,) S
        theta = torch.zeros_like(score)  # (B,) Theta
        labels = torch.full((B, steps), -1, dtype=torch.long, device=dev)
        alphas = torch.zeros(B, steps, L, device=dev) if return_alpha else None
        length = torch.zeros(B, dtype=torch.long, device=dev)
        alive = torch.ones(B, dtype=torch.bool, device=dev)
        for t in range(T):
            logits, h, c, alpha = model.step(enc, h, c, v_pred, on_path[:, None], alive[:, None])
            succ = (score[:, None] + _log_prob(logits[:, 0])).masked_fill(on_path, NEG_INF)  # (B, C)
            value, label = succ.max(dim=1)  # (B,) first of equals
            labels[:, t] = torch.where(alive, label, -1)
            if alphas is not None:
                alphas[:, t] = alpha[:, 0].float() * alive[:, None]
            score = torch.where(alive, value, score)
            theta = torch.where(alive, theta + log_thr[label], theta)
            length = length + alive.long()
            alive = alive & (score >= theta) & (t < T - 1)
            on_path = on_path.scatter(1, label[:, None], True)
            v_pred = torch.sigmoid(logits)
            if not bool(alive.any()):
                break
    return BeamResult(labels, length, (score / length).float(), alphas)


@dataclass
class _Answer:
    """The best finished path of every input sample so far (updated in place)."""

    score: Tensor  # (B,) float64 log P_t, -inf while none finished
    length: Tensor  # (B,) long
    labels: Tensor  # (B, T) long
    alpha: Tensor | None  # (B, T, L)

    @staticmethod
    def empty(B: int, T: int, L: int, with_alpha: bool, device: torch.device) -> _Answer:
        return _Answer(
            score=torch.full((B,), NEG_INF, dtype=torch.float64, device=device),
            length=torch.zeros(B, dtype=torch.long, device=device),
            labels=torch.full((B, T), -1, dtype=torch.long, device=device),
            alpha=torch.zeros(B, T, L, device=device) if with_alpha else None,
        )

    def update(self, value: Tensor, pos: Tensor, stop: Tensor, t: int, rows: Tensor, pool: _Pool) -> None:
        """Take the best path that stopped at step t+1 where it beats the best so far.

        value, pos, stop (B', W): one rule's successors by its rank (their S, their position in `pool`, whether
        they stopped), for the active samples, whose input indices are `rows` (B',).
        """
        norm = (value / (t + 1)).masked_fill(~stop, NEG_INF)  # (B', W)
        j = norm.argmax(dim=1)  # (B',) first of equals: the better rank
        here = torch.arange(len(j), device=j.device)
        top = norm[here, j]  # (B',)
        better = (top > self.score[rows]).nonzero().squeeze(1)  # positions among the active samples
        dst, at = rows[better], pos[better, j[better]]  # input indices of those samples, and their paths
        self.score[dst] = top[better]
        self.length[dst] = t + 1
        self.labels[dst] = pool.labels[better, at]
        if self.alpha is not None:
            self.alpha[dst] = pool.alpha[better, at]

    def result(self, steps: int) -> BeamResult:
        """Pad to `steps` labels (T is smaller when C < steps)."""
        B, T = self.labels.shape
        labels = F.pad(self.labels, (0, steps - T), value=-1)
        alpha = None if self.alpha is None else F.pad(self.alpha, (0, 0, 0, steps - T))
        return BeamResult(labels, self.length, self.score.float(), alpha)


def _take(batch: Encoded | _Pool, keep: Tensor) -> Encoded | _Pool:
    """The samples `keep` (B',) of every tensor in a per-sample tuple."""
    return type(batch)(*(None if x is None else x[keep] for x in batch))


def _log_prob(logits: Tensor) -> Tensor:
    """log p = log sigmoid(logits), computed in float32 at least, returned in float64 (path scores)."""
    return F.logsigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32))).double()


def _best(succ: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The `width` largest entries of each row of succ (B, N), largest first, ties to the lower index.

    That is the head of a stable descending sort, found with a top-k (far cheaper than sorting all K*C
    successors); only when equal finite values straddle the cut does it sort the rows.
    """
    value, index = succ.topk(width, dim=1)  # (B, width), descending
    cut = value[:, -1:]  # (B, 1)
    if bool((torch.isfinite(cut) & ((succ >= cut).sum(dim=1, keepdim=True) > width)).any()):
        value, index = succ.sort(dim=1, descending=True, stable=True)
        return value[:, :width], index[:, :width]
    index, order = index.sort(dim=1)  # the chosen ones by index, then stably by value
    value, order = value.gather(1, order).sort(dim=1, descending=True, stable=True)
    return value, index.gather(1, order)


def _root(enc: Encoded, T: int, G: int, with_alpha: bool) -> _Pool:
    """The single root path of every sample, live under every rule: no labels, state from the encoder."""
    (B, L, _), C = enc.maps.shape, enc.v_prob.shape[1]
    dev = enc.maps.device
    return _Pool(
        h=enc.h0[:, None],
        c=enc.c0[:, None],
        v_pred=enc.v_prob[:, None],
        on_path=torch.zeros(B, 1, C, dtype=torch.bool, device=dev),
        score=torch.zeros(B, 1, dtype=torch.float64, device=dev),
        theta=torch.zeros(B, 1, G, dtype=torch.float64, device=dev),
        labels=torch.full((B, 1, T), -1, dtype=torch.long, device=dev),
        alpha=torch.zeros(B, 1, T, L, device=dev) if with_alpha else None,
        member=torch.ones(B, G, 1, dtype=torch.bool, device=dev),
    )


def _extend(pool: _Pool, parent: Tensor, label: Tensor, value: Tensor, out: tuple, log_thr: Tensor, t: int) -> _Pool:
    """Successor paths: `parent` (B, P') indexes the old paths, `label` (B, P') is the label added, `value`
    (B, P') the new S. `out` = (h, c, p, alpha) of the step just run for the old paths; a successor inherits
    its parent's. Membership is left to the caller."""
    h, c, p, alpha = out
    rows = torch.arange(parent.shape[0], device=parent.device)[:, None]  # (B, 1)
    labels = pool.labels[rows, parent]  # (B, P', T) a copy
    labels[:, :, t] = label
    alphas = None
    if pool.alpha is not None:
        alphas = pool.alpha[rows, parent]  # (B, P', T, L)
        alphas[:, :, t] = alpha[rows, parent].float()
    return _Pool(
        h=h[rows, parent],
        c=c[rows, parent],
        v_pred=p[rows, parent],
        on_path=pool.on_path[rows, parent].scatter(2, label[..., None], True),
        score=value,
        theta=pool.theta[rows, parent] + log_thr.T[label],  # (B, P', G)
        labels=labels,
        alpha=alphas,
        member=pool.member,  # replaced by the caller
    )


def _encode(model: Decoder, maps: Tensor, fr_in: Tensor, log_thresholds: Tensor) -> tuple[Encoded, Tensor]:
    """Move the inputs to the model's device and dtype and encode them; log_thresholds (G, C) to float64."""
    weight = next(model.parameters())  # device and dtype of the model
    maps = maps.to(device=weight.device, dtype=weight.dtype)
    fr_in = fr_in.to(device=weight.device, dtype=weight.dtype)
    log_thr = torch.as_tensor(log_thresholds).to(device=weight.device, dtype=torch.float64)
    if log_thr.dim() != 2 or log_thr.shape[1] != model.n_labels:
        raise ValueError(f"log thresholds must have {model.n_labels} per rule, got shape {tuple(log_thr.shape)}")
    return model.encode(maps, fr_in), log_thr


@contextmanager
def _eval(model: Decoder) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
