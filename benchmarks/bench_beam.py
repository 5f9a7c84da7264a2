"""Batched beam search vs the slow per-sample reference (tests/reference_beam.py), side by side in one run.

A realistic-sized AttnRNN (L = 196 cells of D = 2048, C labels, H = A = P = 512) with random weights whose
output layer is biased towards Zipf-like class frequencies f, so paths stop at different steps; gamma is
picked on the first 64 views so that their mean number of labels is near 4.5 (about iMet's). Both decoders
run on the same views; the outputs must be identical before the speeds are printed. The two run chunk by
chunk, interleaved, so that both see the same background load. (A random model stops most paths at step 1
or 2 or runs them to T: the histogram of labels per view is bimodal.)

    python benchmarks/bench_beam.py [--views 512] [--labels 32,1103] [--beam 5] [--chunk 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_beam import reference_beam_search  # noqa: E402

from imet.decode.beam import beam_search  # noqa: E402
from imet.heads.attn_model import AttnRNN  # noqa: E402

L, D, STEPS = 196, 2048, 10


def make_model(n_labels: int, seed: int = 0) -> tuple[AttnRNN, torch.Tensor]:
    """Random AttnRNN with logits biased to logit(f) and spread out; returns it and f (C,)."""
    torch.manual_seed(seed)
    model = AttnRNN(n_labels=n_labels, map_channels=D, fr_dim=D).eval()
    f = 1.0 / torch.arange(1, n_labels + 1, dtype=torch.float64) ** 0.8
    f = (4.5 * f / f.sum()).clamp(max=0.9)  # about 4.5 labels per view
    with torch.no_grad():
        model.pred[-1].weight.mul_(30)
        model.pred[-1].bias.copy_(torch.logit(f).float())
        model.fr.bias.copy_(torch.logit(f).float())
    return model, f


def views(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative maps (n, L, D) with a direction of their own per view, and their mean (n, D) as fr_in."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.relu(torch.randn(n, L, D, generator=g) * 0.5 + torch.randn(n, 1, D, generator=g))
    return maps, maps.mean(dim=1)


def batched(model, maps, fr_in, *, beam, log_thr, chunk):
    out = [beam_search(model, maps[i : i + chunk], fr_in[i : i + chunk], beam=beam, steps=STEPS,
                       log_threshold=log_thr) for i in range(0, len(maps), chunk)]
    return torch.cat([r.labels for r in out]), torch.cat([r.length for r in out]), torch.cat([r.score for r in out])


def pick_gamma(model, maps, fr_in, f, beam: int) -> float:
    """The gamma on a coarse grid whose mean number of labels is closest to 4.5."""
    best = None
    for gamma in (1, 1.25, 1.5, 2, 2.5, 3, 4):
        labels, length, _ = batched(model, maps, fr_in, beam=beam, log_thr=torch.log(gamma * f), chunk=64)
        gap = abs(length.float().mean().item() - 4.5)
        if best is None or gap < best[0]:
            best = (gap, gamma)
    return best[1]


def parse_args(doc: str, views: int) -> argparse.Namespace:
    """The decoding benchmarks' options (bench_beam.py, bench_gamma.py); sets torch's threads."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=views, help="number of views decoded by both")
    parser.add_argument("--labels", type=lambda x: [int(c) for c in x.split(",")], default=[500],
                        help="number of classes C (1,077 in the paper); several, comma-separated, run in turn")
    parser.add_argument("--beam", type=int, default=5, help="beam size K")
    parser.add_argument("--chunk", type=int, default=64, help="views per batched beam_search call")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = parse_args(__doc__, views=512)
    rates = {labels: run(args, labels) for labels in args.labels}
    if len(rates) > 1:
        print("batched views/s by label count: " + ", ".join(f"C={c}: {r:.1f}" for c, r in rates.items())
              + f"; ratio {max(rates.values()) / min(rates.values()):.2f}x")


def run(args: argparse.Namespace, labels: int) -> float:
    """Decode the same views with both at `labels` classes; the batched views/s."""
    args.labels = labels
    model, f = make_model(args.labels)
    maps, fr_in = views(args.views)
    gamma = pick_gamma(model, maps[:64], fr_in[:64], f, args.beam)
    log_thr = torch.log(gamma * f)
    print(f"views={args.views} L={L} D={D} C={args.labels} H=A=P=512 K={args.beam} T={STEPS} gamma={gamma} "
          f"threads={torch.get_num_threads()}")

    fast_s = slow_s = 0.0
    results, reference = [], []
    for i in range(0, args.views, args.chunk):  # interleaved, so that both see the same background load
        part = slice(i, i + args.chunk)
        start = time.perf_counter()
        results.append(batched(model, maps[part], fr_in[part], beam=args.beam, log_thr=log_thr, chunk=args.chunk))
        fast_s += time.perf_counter() - start
        start = time.perf_counter()
        reference += reference_beam_search(model, maps[part], fr_in[part], beam=args.beam, steps=STEPS,
                                           log_threshold=log_thr)
        slow_s += time.perf_counter() - start
    labels, length, score = (torch.cat(x) for x in zip(*results, strict=True))

    same = sum(labels[b, : length[b]].tolist() == ref["labels"] for b, ref in enumerate(reference))
    worst = max(abs(score[b].item() - ref["score"]) for b, ref in enumerate(reference))
    print(f"labels per view: mean {length.float().mean():.2f}, histogram {torch.bincount(length).tolist()}")
    print(f"identical label lists: {same}/{len(reference)}; max |score difference| {worst:.2e}")
    if same != len(reference) or worst > 1e-4:
        sys.exit("outputs differ: no speed reported")
    print(f"batched beam_search: {fast_s:7.2f} s  {args.views / fast_s:8.1f} views/s")
    print(f"reference (1 by 1):  {slow_s:7.2f} s  {args.views / slow_s:8.1f} views/s")
    print(f"speed-up: {slow_s / fast_s:.1f}x")
    return args.views / fast_s


if __name__ == "__main__":
    main()
