"""Adam's update at a head's shape: PyTorch's default (multi-tensor) Adam against the fused kernel the heads use
(imet.heads.train.adam), side by side in one run.

    python benchmarks/bench_adam.py [--inputs 12416] [--labels 1103] [--batch 64] [--steps 20] [--threads 1]

Prints ms per optimiser update, ms per whole step (forward, backward, update) of a linear layer with the
paper's weighted BCE, and how far the two optimisers' weights are apart after the same steps. The default
shape is linear_hog's at iMet's 1,103 labels (pooled 2,048 + HOG 10,368 inputs).
"""

from __future__ import annotations

import argparse
import time

import torch


def run(fused: bool, args, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Linear(args.inputs, args.labels)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5, **({"fused": True} if fused else {}))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((args.labels,), 10.0))
    update = step = 0.0
    for k in range(args.steps + 2):  # the first two warm up
        t0 = time.perf_counter()
        loss = loss_fn(net(x[k % len(x)]), y[k % len(y)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if k >= 2:
            update, step = update + t2 - t1, step + t2 - t0
    return update / args.steps * 1e3, step / args.steps * 1e3, net.weight.detach().clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=12_416)
    p.add_argument("--labels", type=int, default=1_103)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, args.batch, args.inputs, generator=g)
    y = (torch.rand(4, args.batch, args.labels, generator=g) < 0.01).float()
    default, fused = run(False, args, x, y), run(True, args, x, y)
    print(f"{args.inputs} inputs x {args.labels} labels, batch {args.batch}, {args.steps} steps, "
          f"{args.threads} thread(s)")
    print("| Adam | update ms | whole step ms |\n|---|---|---|")
    for name, (update, step, _) in (("default (foreach)", default), ("fused", fused)):
        print(f"| {name} | {update:.1f} | {step:.1f} |")
    print(f"update {default[0] / fused[0]:.1f}x, whole step {default[1] / fused[1]:.2f}x faster fused; "
          f"weights apart by at most {(default[2] - fused[2]).abs().max().item():.2e} "
          f"(largest weight {default[2].abs().max().item():.3f})")


if __name__ == "__main__":
    main()
