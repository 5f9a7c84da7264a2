"""Bare forward rate of each backbone (maps and pooled vector from the shared trunk, as featurize runs it):
views/s at 224 px on this machine's CPU, channels_last, random weights, after one warm-up batch.

    python benchmarks/bench_backbones.py [--backbones resnet50,convnext_tiny] [--batch 8] [--batches 2]

Prints one row per backbone: channels, grid, parameters, views/s (median of --batches timed batches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.featurize.backbone import build_backbone, load_weights  # noqa: E402
from imet.featurize.options import BACKBONES  # noqa: E402


def rate(name: str, batch: int, batches: int) -> float:
    model = build_backbone(name, load_weights("random", backbone=name)[0]).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(batches):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, 224 px, channels_last, median of {args.batches}")
    print(f"{'backbone':<18} {'channels':>8} {'grid':>5} {'pooled':>6} {'params':>8} {'views/s':>8}")
    for name in args.backbones.split(","):
        spec = BACKBONES[name]
        r = rate(name, args.batch, args.batches)
        print(f"{name:<18} {spec.channels:>8} {spec.grid(224):>5} {spec.pooled:>6} {spec.params() / 1e6:>7.1f}M "
              f"{r:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
