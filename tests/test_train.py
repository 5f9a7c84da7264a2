"""The one training loop (`imet.heads.train.train_epochs`): early stopping keeps the best epoch's weights."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from imet.heads import train


def scripted_run(scores: list[float], patience: int, start: float | None = None):
    """train_epochs on a toy net whose val scores are `scores` in turn (`start`: the start's val F2); returns the
    history, the weights each score was taken on, the net and its starting weights."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    first = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []  # the weights each val score was taken on

    def scripted_val_score(store, val):
        seen.append({k: v.clone() for k, v in net.state_dict().items()})
        return scores[len(seen) - 1]

    head = SimpleNamespace(name="toy", epochs=len(scores), batch_size=8, patience=patience, check_loss=lambda *_: None,
                           val_score=scripted_val_score)
    x, y = torch.randn(8, 3), (torch.rand(8, 2) > 0.5).float()
    loss = nn.BCEWithLogitsLoss()
    history = train.train_epochs(head, net, torch.optim.SGD(net.parameters(), lr=0.5), lambda: [(x, y)],
                                 lambda b: loss(net(b[0]), b[1]), n_train=8, store=None, val=None,
                                 log=lambda _: None, start=None if start is None else (start, first))
    return history, seen, net, first


@pytest.mark.parametrize(("scores", "patience", "best", "epochs_run"), [
    ([0.2, 0.9, 0.5, 0.4, 0.95], 2, 1, 4),  # two worse epochs after the best: stop there, keep the best
    ([0.3, 0.1, 0.2, 0.6, 0.5, 0.4], 3, 3, 6),  # a later best; the run ends before patience does
    ([0.1, 0.2, 0.3], 2, 2, 3),  # still improving at the last epoch: the last is kept
])
def test_early_stopping_keeps_the_best_epochs_weights(scores, patience, best, epochs_run):
    history, seen, net, _ = scripted_run(scores, patience)
    assert len(history) == epochs_run
    assert all(not torch.equal(seen[i]["weight"], seen[best]["weight"]) for i in range(len(seen)) if i != best)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, seen[best][k], rtol=0, atol=0)


@pytest.mark.parametrize(("scores", "patience", "best", "epochs_run"), [
    ([0.2, 0.4, 0.3, 0.45], 3, None, 3),  # no epoch beats the start: stop after patience, keep the start
    ([0.2, 0.6, 0.3, 0.1], 2, 1, 4),  # epoch 2 beats it: counted from there
    ([0.2, 0.4, 0.3], 0, "last", 3),  # no early stopping (val not scored): the start plays no part
])
def test_a_start_is_the_best_to_beat_from_the_first_epoch(scores, patience, best, epochs_run):
    """`start` (val F2 0.5 and the weights the net started from): early stopping keeps it when no epoch scores
    above it, and stops `patience` epochs after it."""
    history, seen, net, start = scripted_run(scores, patience, start=0.5)
    assert len(history) == epochs_run
    if best == "last":
        assert not seen and not torch.equal(net.weight, start["weight"])
        return
    kept = start if best is None else seen[best]
    assert not torch.equal(seen[0]["weight"], start["weight"])  # training moved it
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, kept[k], rtol=0, atol=0)


def test_the_epochs_run_in_a_kept_heap(monkeypatch):
    """Every epoch's steps and val scores run inside imet.runtime.kept_heap (CPU training ~10 % faster, with
    a quarter of the page faults: docs/scale.md), left when training ends."""
    events = []

    @contextlib.contextmanager
    def recorded():
        events.append("enter")
        yield
        events.append("exit")

    monkeypatch.setattr(train, "kept_heap", recorded)
    monkeypatch.setattr(train, "progress", lambda **_: (events.append("epoch"), contextlib.nullcontext(
        SimpleNamespace(update=lambda _: None)))[1])
    history, *_ = scripted_run([0.1, 0.2, 0.3], patience=1)
    assert len(history) == 3
    assert events == ["enter", "epoch", "epoch", "epoch", "exit"]
