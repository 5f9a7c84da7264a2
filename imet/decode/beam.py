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
- Work is batched over samples x paths with masks (no per-sample Python loop); samples whose paths have
  all finished are dropped from the batch once they are a quarter of it. The model runs in eval mode
  under inference mode, on its own device and dtype. Greedy decoding is the K = 1 case.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # imet.heads imports this module: no import of it at run time
    from imet.heads.attn_model import AttnRNN, Encoded

NEG_INF = float("-inf")


class BeamResult(NamedTuple):
    """One decoded path per sample."""

    labels: Tensor  # (B, T) long, emission order, padded with -1
    length: Tensor  # (B,) long, number of labels
    score: Tensor  # (B,) float32, normalised log path probability log P_t = S / t
    alpha: Tensor | None  # (B, T, L) float32 attention of the step that emitted each label; 0 in padding


class _Paths(NamedTuple):
    """The W kept paths of every sample (some dead) and their decoder state."""

    h: Tensor  # (B, W, H)
    c: Tensor  # (B, W, H)
    v_pred: Tensor  # (B, W, C) p of the path's last step (v_prob at the root)
    on_path: Tensor  # (B, W, C) bool, y~
    score: Tensor  # (B, W) float64, S
    theta: Tensor  # (B, W) float64, Theta
    labels: Tensor  # (B, W, T) long, -1 padded
    alpha: Tensor | None  # (B, W, T, L) float32
    alive: Tensor  # (B, W) bool


@torch.inference_mode()
def beam_search(
    model: AttnRNN,
    maps: Tensor,
    fr_in: Tensor,
    *,
    beam: int,
    steps: int,
    log_threshold: Tensor,
    return_alpha: bool = False,
) -> BeamResult:
    """Best finished path per sample of a K = `beam` search, at most `steps` labels (module docstring)."""
    if beam < 1 or steps < 1:
        raise ValueError(f"beam and steps must be >= 1, got beam={beam}, steps={steps}")
    with _eval(model):
        enc, log_thr = _encode(model, maps, fr_in, log_threshold)
        (B, L, _), C = enc.maps.shape, enc.v_prob.shape[1]
        T, dev = (min(steps, C) if B else 0), enc.maps.device  # no samples: no steps
        paths = _root(enc, T, return_alpha)
        answer = _Answer.empty(B, T, L, return_alpha, dev)
        slots = torch.full((B,), beam, dtype=torch.long, device=dev)  # (B',) for the B' samples still active
        rows = torch.arange(B, device=dev)  # (B',) their indices in the input
        for t in range(T):
            logits, h, c, alpha = model.step(enc, paths.h, paths.c, paths.v_pred, paths.on_path, paths.alive)
            logp = _log_prob(logits)  # (B', W, C)
            succ = (paths.score[..., None] + logp).masked_fill(paths.on_path | ~paths.alive[..., None], NEG_INF)
            width = min(beam, succ.shape[1] * C, int(slots.max()))
            value, flat = _best(succ.flatten(1), width)  # (B', W')
            paths = _extend(paths, flat // C, flat % C, value, (h, c, torch.sigmoid(logits), alpha), log_thr, t)
            kept = (torch.arange(width, device=dev) < slots[:, None]) & torch.isfinite(value)
            stop = kept & ((paths.score < paths.theta) | (t == T - 1))  # (B', W')
            answer.update(paths, stop, t, rows)
            slots = slots - stop.sum(dim=1)
            paths = paths._replace(alive=kept & ~stop)
            active = paths.alive.any(dim=1)  # (B',)
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active <= 0.75 * len(active):  # drop the finished samples: less work in later steps
                keep = active.nonzero().squeeze(1)
                enc, paths = _take(enc, keep), _take(paths, keep)
                slots, rows = slots[keep], rows[keep]
    return answer.result(steps)


@torch.inference_mode()
def greedy_decode(
    model: AttnRNN,
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
        enc, log_thr = _encode(model, maps, fr_in, log_threshold)
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

    def update(self, paths: _Paths, stop: Tensor, t: int, rows: Tensor) -> None:
        """Take the best path that stopped at step t+1 where it beats the best so far.

        `paths` and `stop` (B', W) cover the active samples, whose input indices are `rows` (B',).
        """
        norm = (paths.score / (t + 1)).masked_fill(~stop, NEG_INF)  # (B', W)
        j = norm.argmax(dim=1)  # (B',) first of equals: the better rank
        here = torch.arange(len(j), device=j.device)
        top = norm[here, j]  # (B',)
        better = (top > self.score[rows]).nonzero().squeeze(1)  # positions among the active samples
        dst, j = rows[better], j[better]  # input indices of those samples, and the paths they take
        self.score[dst] = top[better]
        self.length[dst] = t + 1
        self.labels[dst] = paths.labels[better, j]
        if self.alpha is not None:
            self.alpha[dst] = paths.alpha[better, j]

    def result(self, steps: int) -> BeamResult:
        """Pad to `steps` labels (T is smaller when C < steps)."""
        B, T = self.labels.shape
        labels = F.pad(self.labels, (0, steps - T), value=-1)
        alpha = None if self.alpha is None else F.pad(self.alpha, (0, 0, 0, steps - T))
        return BeamResult(labels, self.length, self.score.float(), alpha)


def _take(batch: Encoded | _Paths, keep: Tensor) -> Encoded | _Paths:
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


def _root(enc: Encoded, T: int, with_alpha: bool) -> _Paths:
    """The single root path of every sample: no labels, state from the encoder."""
    (B, L, _), C = enc.maps.shape, enc.v_prob.shape[1]
    dev = enc.maps.device
    return _Paths(
        h=enc.h0[:, None],
        c=enc.c0[:, None],
        v_pred=enc.v_prob[:, None],
        on_path=torch.zeros(B, 1, C, dtype=torch.bool, device=dev),
        score=torch.zeros(B, 1, dtype=torch.float64, device=dev),
        theta=torch.zeros(B, 1, dtype=torch.float64, device=dev),
        labels=torch.full((B, 1, T), -1, dtype=torch.long, device=dev),
        alpha=torch.zeros(B, 1, T, L, device=dev) if with_alpha else None,
        alive=torch.ones(B, 1, dtype=torch.bool, device=dev),
    )


def _extend(
    paths: _Paths, parent: Tensor, label: Tensor, value: Tensor, out: tuple, log_thr: Tensor, t: int
) -> _Paths:
    """Successor paths: `parent` (B, W') indexes the old paths, `label` (B, W') is the label added.

    `out` = (h, c, p, alpha) of the step just run for the old paths; a successor inherits its parent's.
    """
    h, c, p, alpha = out
    rows = torch.arange(parent.shape[0], device=parent.device)[:, None]  # (B, 1)
    labels = paths.labels[rows, parent]  # (B, W', T) a copy
    labels[:, :, t] = label
    alphas = None
    if paths.alpha is not None:
        alphas = paths.alpha[rows, parent]  # (B, W', T, L)
        alphas[:, :, t] = alpha[rows, parent].float()
    return _Paths(
        h=h[rows, parent],
        c=c[rows, parent],
        v_pred=p[rows, parent],
        on_path=paths.on_path[rows, parent].scatter(2, label[..., None], True),
        score=value,
        theta=paths.theta[rows, parent] + log_thr[label],
        labels=labels,
        alpha=alphas,
        alive=paths.alive,  # replaced by the caller
    )


def _encode(model: AttnRNN, maps: Tensor, fr_in: Tensor, log_threshold: Tensor) -> tuple[Encoded, Tensor]:
    """Move the inputs to the model's device and dtype and encode them; log_threshold to float64."""
    weight = model.fr.weight
    maps = maps.to(device=weight.device, dtype=weight.dtype)
    fr_in = fr_in.to(device=weight.device, dtype=weight.dtype)
    log_thr = torch.as_tensor(log_threshold).to(device=weight.device, dtype=torch.float64)
    if log_thr.shape != (model.n_labels,):
        raise ValueError(f"log_threshold must have shape ({model.n_labels},), got {tuple(log_thr.shape)}")
    return model.encode(maps, fr_in), log_thr


@contextmanager
def _eval(model: AttnRNN) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then the previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
