"""γ tuned in one decode (beam_search_rules) against today's grid search (one beam search per γ), in one run.

The realistic-sized random AttnRNN of bench_beam.py (L = 196 cells of D = 2048, C labels, H = A = P = 512,
output biased towards Zipf-like class frequencies f). Both decode the same views under every γ of attn_rnn's
grid (imet.heads.attn_rnn.GAMMAS); the answers must be identical before the times are printed. Chunk by
chunk, interleaved, so that both see the same background load.

    python benchmarks/bench_gamma.py [--views 256] [--labels 500] [--beam 5] [--chunk 64]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_beam import STEPS, make_model, parse_args, views  # noqa: E402

from imet.decode.beam import beam_search, beam_search_rules  # noqa: E402
from imet.heads.attn_rnn import GAMMAS  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, views=256)
    args.labels = args.labels[0]
    model, f = make_model(args.labels)
    maps, fr_in = views(args.views)
    log_thr = torch.log(torch.clamp(torch.as_tensor(GAMMAS)[:, None] * f, min=1e-12))  # (G, C)
    grid_s = one_s = 0.0
    lengths = np.zeros((len(GAMMAS), 0))
    for lo in range(0, args.views, args.chunk):
        part = slice(lo, lo + args.chunk)
        t0 = time.perf_counter()
        grid = [beam_search(model, maps[part], fr_in[part], beam=args.beam, steps=STEPS, log_threshold=row)
                for row in log_thr]
        t1 = time.perf_counter()
        one = beam_search_rules(model, maps[part], fr_in[part], beam=args.beam, steps=STEPS, log_thresholds=log_thr)
        t2 = time.perf_counter()
        grid_s, one_s = grid_s + t1 - t0, one_s + t2 - t1
        for a, b in zip(grid, one, strict=True):
            if not (torch.equal(a.labels, b.labels) and torch.equal(a.length, b.length)):
                raise SystemExit("the one-decode answers differ from the grid's: not timing a wrong answer")
        lengths = np.concatenate([lengths, np.stack([r.length.numpy() for r in one])], axis=1)
    print(f"{args.views} views, C = {args.labels}, beam {args.beam}, {len(GAMMAS)} values of gamma, "
          f"torch threads {torch.get_num_threads()}")
    print("mean labels per view under each gamma: " + " ".join(f"{x:.1f}" for x in lengths.mean(1)))
    n = len(GAMMAS) * args.views
    print(f"grid search (one decode per gamma): {grid_s:7.1f} s  {n / grid_s:7.1f} view-gammas/s")
    print(f"one decode (beam_search_rules):     {one_s:7.1f} s  {n / one_s:7.1f} view-gammas/s")
    print(f"speed-up: {grid_s / one_s:.1f}x (identical answers under every gamma)")


if __name__ == "__main__":
    main()
