"""`loss` bce | asl | focal of the trained heads against a slow, obvious per-element reference."""

from __future__ import annotations

import math

import pytest
import torch

from imet.heads import make_head


def reference(logits, targets, weight, gamma_pos: float, gamma_neg: float, clip: float) -> float:
    """The asymmetric loss written out element by element (Ridnik et al. 2021, eq. 7), weighted positives."""
    total, n = 0.0, 0
    for row, y_row in zip(logits.tolist(), targets.tolist(), strict=True):
        for c, (x, y) in enumerate(zip(row, y_row, strict=True)):
            p = 1 / (1 + math.exp(-x))
            if y == 1:
                total += -weight[c] * (1 - p) ** gamma_pos * math.log(p)
            else:
                pm = max(p - clip, 0.0)
                total += -(pm ** gamma_neg) * math.log(1 - pm)
            n += 1
    return total / n


SETTINGS = {  # loss -> (head parameters, the reference's gamma_pos, gamma_neg, clip)
    "bce": ({}, 0.0, 0.0, 0.0),
    "focal": ({"focal_gamma": 1.5}, 1.5, 1.5, 0.0),
    "asl": ({"asl_gamma_pos": 1.0, "asl_gamma_neg": 3.0, "asl_clip": 0.1}, 1.0, 3.0, 0.1),
    "asl-defaults": ({}, 0.0, 4.0, 0.05),
}


@pytest.mark.parametrize("head", ["linear", "csra"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_each_loss_equals_the_slow_reference(head, setting):
    params, gamma_pos, gamma_neg, clip = SETTINGS[setting]
    g = torch.Generator().manual_seed(len(setting))
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64) * 4  # some far beyond |logit| = 10
    targets = (torch.rand(7, 5, generator=g) < 0.4).double()
    weight = torch.rand(5, generator=g, dtype=torch.float64) * 9 + 1
    fn = make_head(head, loss=setting.split("-")[0], **params).loss_fn(weight)
    want = reference(logits, targets, weight.tolist(), gamma_pos, gamma_neg, clip)
    assert float(fn(logits, targets)) == pytest.approx(want, rel=1e-9)


def test_focal_and_asl_weigh_easy_examples_down():
    """Confident right answers cost less under focal and asl than under BCE, a confident wrong one keeps most."""
    logits = torch.tensor([[4.0, -4.0, -4.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    losses = {name: make_head("linear", loss=name).loss_fn(None) for name in ("bce", "focal", "asl")}
    each = {name: [float(fn(logits[:, [c]], targets[:, [c]])) for c in range(3)] for name, fn in losses.items()}
    for name in ("focal", "asl"):
        assert each[name][0] <= each["bce"][0] and each[name][1] < 0.1 * each["bce"][1]
        assert each[name][2] > 0.5 * each["bce"][2]


def test_a_loss_outside_the_choices_is_refused_naming_it():
    from imet.errors import ParamError

    with pytest.raises(ParamError, match="loss must be one of bce, asl, focal"):
        make_head("mldecoder", loss="hinge")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_attn_rnn_takes_its_heads_loss_at_every_step(setting):
    """Algorithm 2's loss with the head's criterion is the mean over steps of that loss on each step's logits;
    with bce it is the paper's weighted BCE the model computes by itself."""
    from test_attn_model import tiny

    model, maps, fr_in, targets = tiny(3, dtype=torch.float32)[:4]
    params, gp, gn, clip = SETTINGS[setting]
    weight = torch.linspace(1.0, 3.0, targets.shape[1])
    criterion = make_head("attn_rnn", loss=setting.split("-")[0], **params).loss_fn(weight)
    steps = []
    got = model.loss(maps, fr_in, targets, weight, steps=3,
                     criterion=lambda x, y: steps.append(reference(x.detach(), y, weight.tolist(), gp, gn, clip))
                     or criterion(x, y))
    assert len(steps) == 3 and got.item() == pytest.approx(sum(steps) / 3, rel=1e-4)
    if setting == "bce":
        assert got.item() == pytest.approx(model.loss(maps, fr_in, targets, weight, steps=3).item(), rel=1e-5)
