"""Training throughput of AttnRNN.loss (forward + backward) vs the same model recomputing W_v v_i every step.

The public captioning tutorial projects the encoder output inside its attention module, i.e. once per
decoding step; AttnRNN projects it once per sample in `encode`. Both models here share their weights and
give the same loss; they run interleaved, so that both see the same background load.

    python benchmarks/bench_attn_train.py [--batch 32] [--labels 300] [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.heads.attn_model import AttnRNN, Encoded  # noqa: E402

L, D = 196, 2048


class RecomputedProjection(AttnRNN):
    """AttnRNN that recomputes the encoder-side attention projection at every step (benchmark only)."""

    def step(self, enc: Encoded, h, c, v_pred, y_prev):
        return super().step(enc._replace(proj=self.project(enc.maps)), h, c, v_pred, y_prev)


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
    parser.add_argument("--labels", type=int, default=300, help="number of classes C")
    parser.add_argument("--steps", type=int, default=10, help="T, decoding steps in the loss")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    once = AttnRNN(n_labels=args.labels, map_channels=D, fr_dim=D)
    every = RecomputedProjection(**once.config)
    every.load_state_dict(once.state_dict())
    maps = torch.relu(torch.randn(args.batch, L, D) * 0.5 + torch.randn(args.batch, 1, D))
    targets = (torch.rand(args.batch, args.labels) < 4.5 / args.labels).float()
    batch = (maps, maps.mean(dim=1), targets, torch.full((args.labels,), 10.0))
    print(f"batch={args.batch} L={L} D={D} C={args.labels} H=A=P=512 T={args.steps} "
          f"threads={torch.get_num_threads()}")

    for model in (once, every):  # warm-up, and the two must agree
        model.eval()  # no dropout, so that the losses compare
        loss = fit_step(model, batch, args.steps)[1]
        print(f"{type(model).__name__}: loss {loss:.6f}")
        model.train()
    times = {once: 0.0, every: 0.0}
    for _ in range(args.repeats):
        for model in times:
            times[model] += fit_step(model, batch, args.steps)[0]
    n = args.batch * args.repeats
    print(f"projection once per sample: {times[once]:7.2f} s  {n / times[once]:7.1f} views/s")
    print(f"projection every step:      {times[every]:7.2f} s  {n / times[every]:7.1f} views/s")
    print(f"speed-up: {times[every] / times[once]:.1f}x")


if __name__ == "__main__":
    main()
