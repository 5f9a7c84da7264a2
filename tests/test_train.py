"""The one training loop (`imet.heads.train.train_epochs`): early stopping keeps the best epoch's weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from imet.heads import train


@pytest.mark.parametrize(("scores", "patience", "best", "epochs_run"), [
    ([0.2, 0.9, 0.5, 0.4, 0.95], 2, 1, 4),  # two worse epochs after the best: stop there, keep the best
    ([0.3, 0.1, 0.2, 0.6, 0.5, 0.4], 3, 3, 6),  # a later best; the run ends before patience does
    ([0.1, 0.2, 0.3], 2, 2, 3),  # still improving at the last epoch: the last is kept
])
def test_early_stopping_keeps_the_best_epochs_weights(scores, patience, best, epochs_run):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
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
                                 log=lambda _: None)
    assert len(history) == epochs_run
    assert all(not torch.equal(seen[i]["weight"], seen[best]["weight"]) for i in range(len(seen)) if i != best)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, seen[best][k], rtol=0, atol=0)
