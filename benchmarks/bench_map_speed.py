"""Seconds per training epoch of the map heads (csra, mldecoder) side by side, at 32 and 1,103 labels.

On planted stores of iMet's shape (`imet_design`: int8 maps, 1-6 views per image) at each label count and
channel width; each head trains `--epochs` epochs on one thread and the mean epoch time (from the training
log: reading, forward, backward, step) is printed with mldecoder's ratio to csra's (issue 20's target:
<= 2x at equal labels and channels).

    OMP_NUM_THREADS=1 python benchmarks/bench_map_speed.py [--images 300] [--channels 64,256] [--labels 32,1103]
        [--scores-only]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time  # noqa: E402

import torch  # noqa: E402

from imet.heads import make_head  # noqa: E402
from imet.planted import imet_design, write_planted_store  # noqa: E402
from imet.store import FeatureStore  # noqa: E402

EPOCH = re.compile(r"epoch \d+/\d+: .*\(([\d.]+) s,")


def epoch_seconds(name: str, store: FeatureStore, epochs: int, **params) -> float:
    """Mean seconds of the training epochs of one fit (the head's own log lines)."""
    seconds: list[float] = []

    def log(line: str) -> None:
        m = EPOCH.search(line)
        if m and line.startswith(name):
            seconds.append(float(m.group(1)))

    make_head(name, epochs=epochs, workers=0, device="cpu", **params).fit(store, log=log)
    return sum(seconds) / len(seconds)


def pooling_ms(labels: int, channels: int, batch: int = 32, cells: int = 196, repeat: int = 3) -> tuple[float, float]:
    """Milliseconds of one forward + backward of csra's scores on a batch: as before (autograd softmax over a
    (B, C, L) transposed copy, plus the T = 1 attention every call) and now (`CSRA.scores`)."""
    from imet.heads.csra import CSRA

    net = CSRA(labels, channels, 0)
    maps = torch.randn(batch, cells, channels)

    def before() -> torch.Tensor:
        s = net.on_cells(maps, net.classifier.weight).transpose(1, 2)  # (B, C, L)
        pooled = [(torch.softmax(t * s, dim=-1) * s).sum(-1) for t in net.temperatures]
        _ = torch.softmax(s, dim=-1)  # the attention every forward returned
        return s.mean(-1) + torch.stack(pooled).mean(0) + net.classifier.bias

    out = []
    for f in (before, lambda: net.scores(maps)[0]):
        f().sum().backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeat):
            f().sum().backward()
        out.append((time.perf_counter() - t0) / repeat * 1000)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--channels", default="64,256")
    p.add_argument("--labels", default="32,1103")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--scores-only", action="store_true", help="only the forward + backward table")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("csra scores, forward + backward of one batch of 32 views (ms):\n\n| labels | channels | before | now | "
          "before / now |\n|---|---|---|---|---|")
    for labels in (int(x) for x in args.labels.split(",")):
        for channels in (int(x) for x in args.channels.split(",")):
            before, now = pooling_ms(labels, channels)
            print(f"| {labels} | {channels} | {before:.0f} | {now:.0f} | {before / now:.2f}x |", flush=True)
    if args.scores_only:
        return
    print()
    print(f"{args.images} images, int8 maps 14x14, 1 thread, {args.epochs} epochs each, workers 0\n")
    print("| labels | channels | train views | csra s/epoch | mldecoder s/epoch | mldecoder / csra |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for labels in (int(x) for x in args.labels.split(",")):
            for channels in (int(x) for x in args.channels.split(",")):
                path = Path(tmp) / f"s{labels}_{channels}.h5"
                write_planted_store(path, imet_design(args.images, labels=labels, channels=channels, hog=64,
                                                      pooled_dim=channels))
                store = FeatureStore(path)
                csra = epoch_seconds("csra", store, args.epochs)
                ml = epoch_seconds("mldecoder", store, args.epochs, start="random")
                print(f"| {labels} | {channels} | {len(store.views('train'))} | {csra:.2f} | {ml:.2f} | "
                      f"{ml / csra:.2f}x |", flush=True)
                del store
                path.unlink()


if __name__ == "__main__":
    main()
