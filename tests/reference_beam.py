"""A slow, plain reference for imet.decode.beam: one sample at a time, one path at a time.

Written from the rules in the docstring of imet/decode/beam.py, with Python lists and floats (float64),
calling only `model.encode` and `model.step` with B = 1, K = 1. Used by tests/test_beam.py and
benchmarks/bench_beam.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Path:
    labels: list[int]
    score: float  # S = sum of log p of the labels
    theta: float  # Theta = sum of log(gamma f) of the labels
    state: tuple  # (h, c, v_pred), each (1, 1, .)
    alphas: list[torch.Tensor] = field(default_factory=list)  # (L,) per label


def reference_beam_search(model, maps, fr_in, *, beam: int, steps: int, log_threshold) -> list[dict]:
    """Per sample: {"labels": [...], "score": log P_t, "alpha": (n, L) tensor}."""
    model.eval()
    weight = next(model.parameters())  # device and dtype of the model
    maps = maps.to(device=weight.device, dtype=weight.dtype)
    fr_in = fr_in.to(device=weight.device, dtype=weight.dtype)
    log_thr = [float(x) for x in torch.as_tensor(log_threshold, dtype=torch.float64)]
    with torch.inference_mode():
        return [_one(model, maps[b : b + 1], fr_in[b : b + 1], beam, steps, log_thr) for b in range(len(maps))]


def _one(model, maps, fr_in, beam: int, steps: int, log_thr: list[float]) -> dict:
    enc = model.encode(maps, fr_in)
    n_labels = enc.v_prob.shape[1]
    last = min(steps, n_labels)
    live = [Path([], 0.0, 0.0, (enc.h0[:, None], enc.c0[:, None], enc.v_prob[:, None]))]
    slots = beam
    best, best_norm = None, float("-inf")
    for t in range(1, last + 1):
        candidates = []  # (score, parent rank, label, step output)
        for rank, path in enumerate(live):
            h, c, v_pred = path.state
            y_prev = torch.zeros_like(v_pred)
            y_prev[0, 0, path.labels] = 1
            logits, h, c, alpha = model.step(enc, h, c, v_pred, y_prev)
            logp = F.logsigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32))).double()[0, 0].tolist()
            out = (h, c, torch.sigmoid(logits), alpha[0, 0].float())
            for label in range(n_labels):
                if label not in path.labels:
                    candidates.append((path.score + logp[label], rank, label, out))
        candidates.sort(key=lambda cand: (-cand[0], cand[1], cand[2]))
        parents, live = live, []
        for score, rank, label, (h, c, p, alpha) in candidates[:slots]:
            parent = parents[rank]
            path = Path(parent.labels + [label], score, parent.theta + log_thr[label], (h, c, p),
                        parent.alphas + [alpha])
            if path.score < path.theta or t == last:
                slots -= 1
                if path.score / t > best_norm:
                    best, best_norm = path, path.score / t
            else:
                live.append(path)
        if not live:
            break
    return {"labels": best.labels, "score": best_norm, "alpha": torch.stack(best.alphas)}
