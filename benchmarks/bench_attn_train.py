"""Training throughput of AttnRNN.loss (forward + backward) vs the same model doing wasteful work, per label count.

- "projection every step": the public captioning tutorial projects the encoder output inside its attention
  module, i.e. once per decoding step; AttnRNN projects it once per sample in `encode`.
- "gathered y~ input": y~, a C-wide 0/1 vector, enters the LSTM by a dense product; this variant sums the
  weight columns of the labels emitted so far instead (at most t of C). Measured slower at 1,103 labels (its
  backward scatters into the whole weight, transposed): AttnRNN keeps the dense product.

All models share their weights and give the same loss; they run interleaved, so that all see the same
background load. Several label counts (`--labels 32,1103`) run in turn.

    python benchmarks/bench_attn_train.py [--batch 32] [--labels 32,1103] [--channels 256] [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.heads.attn_model import AttnRNN, Encoded  # noqa: E402

L = 196


class RecomputedProjection(AttnRNN):
    """AttnRNN that recomputes the encoder-side attention projection at every step (benchmark only)."""

    def step(self, enc: Encoded, h, c, v_pred, y_prev):
        return super().step(enc._replace(proj=self.project(enc.maps)), h, c, v_pred, y_prev)


class GatheredLabelInput(torch.nn.Module):
    """An nn.LSTMCell on [v_pred, z_t, y~] whose product with the 0/1 part y~ gathers the weight columns of the
    labels set in it instead of multiplying by zeros (benchmark only: replaces a model's `lstm`)."""

    def __init__(self, cell: torch.nn.LSTMCell, n_labels: int):
        super().__init__()
        self.cell, self.n_labels = cell, n_labels

    def forward(self, x, state):
        h, c = state
        w, split = self.cell.weight_ih, x.shape[1] - self.n_labels  # (4H, C + D + C); C + D
        gates = torch.addmm(self.cell.bias_ih + self.cell.bias_hh, x[:, :split], w[:, :split].T)  # (N, 4H)
        gates = torch.addmm(gates, h, self.cell.weight_hh.T)
        row, label = x[:, split:].nonzero(as_tuple=True)  # the emitted labels of every row
        gates = gates.index_add(0, row, w[:, split:].T.index_select(0, label))
        i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTMCell's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def fit_step(model: AttnRNN, batch: tuple, steps: int) -> tuple[float, float]:
    """Seconds for one forward + backward of the loss, and the loss."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = model.loss(*batch, steps=steps)
    loss.backward()
    return time.perf_counter() - start, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="views per batch")
    parser.add_argument("--labels", default="32,1103", help="numbers of classes C, comma-separated")
    parser.add_argument("--channels", type=int, default=2048, help="map channels D (256 on compact stores)")
    parser.add_argument("--steps", type=int, default=10, help="T, decoding steps in the loss")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for labels in (int(x) for x in args.labels.split(",")):
        run(args, labels)


def run(args: argparse.Namespace, labels: int) -> None:
    torch.manual_seed(0)
    D = args.channels
    once = AttnRNN(n_labels=labels, map_channels=D, fr_dim=D, residual=True)
    models = {"AttnRNN": once, "projection every step": RecomputedProjection(**once.config),
              "gathered y~ input": AttnRNN(**once.config)}
    for model in models.values():
        model.load_state_dict(once.state_dict())
    models["gathered y~ input"].lstm = GatheredLabelInput(models["gathered y~ input"].lstm, labels)
    maps = torch.relu(torch.randn(args.batch, L, D) * 0.5 + torch.randn(args.batch, 1, D))
    targets = (torch.rand(args.batch, labels) < 4.5 / labels).float()
    batch = (maps, maps.mean(dim=1), targets, torch.full((labels,), 10.0))
    print(f"batch={args.batch} L={L} D={D} C={labels} H=A=P=512 T={args.steps} threads={torch.get_num_threads()}")
    losses = []
    for model in models.values():  # warm-up, and they must agree
        model.eval()  # no dropout, so that the losses compare
        losses.append(fit_step(model, batch, args.steps)[1])
        model.train()
    print("losses: " + ", ".join(f"{x:.6f}" for x in losses))
    times = dict.fromkeys(models, 0.0)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name] += fit_step(model, batch, args.steps)[0]
    n = args.batch * args.repeats
    for name, seconds in times.items():
        print(f"  {name:<22} {seconds / args.repeats:6.2f} s/batch {n / seconds:6.1f} views/s "
              f"({seconds / times['AttnRNN']:.2f}x AttnRNN's time)")


if __name__ == "__main__":
    main()
