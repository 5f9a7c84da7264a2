"""Throughput on a GPU, printed as one table (run by benchmarks/gpu_check.sh; works on the CPU at --small).

- featurize, bare two-branch backbone on ready tensors: fp32 and bf16 autocast, channels_last, 224 px;
- torch HOG per 224 px view on the device;
- featurize end to end (decode in workers, HOG in torch, both layer4s, HDF5 writes) on a synthetic data dir
  whose images are repeated under new ids (hard links) to get enough views: fp32 and bf16;
- attn_rnn training (forward + backward + Adam, bf16 autocast as the head trains on CUDA) and batched beam
  decoding (K = 5, T = 10), at the paper's sizes (L = 196, D = 2048, H = A = P = 512).

    python benchmarks/gpu_bench.py [--device cuda] [--images 250] [--repeat 6] [--batch 128] [--small]
        [--backbone resnet50,convnext_tiny]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.decode.beam import beam_search  # noqa: E402
from imet.featurize.backbone import build_backbone, load_weights  # noqa: E402
from imet.featurize.hog import HogParams, TorchHog  # noqa: E402
from imet.featurize.pipeline import Options, featurize  # noqa: E402
from imet.heads.attn_model import AttnRNN  # noqa: E402
from imet.synth import write_synthetic  # noqa: E402

L, D = 196, 2048


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn, after one warm-up call, synchronising the device around the timed calls."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bare(device: torch.device, backbone: str, batch: int, size: int, amp: bool, repeats: int) -> float:
    state = load_weights("random", backbone=backbone, image_size=size)[0]
    model = build_backbone(backbone, state, size).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            maps, pooled = model(x)
            return maps.half(), pooled.float()

    return batch / timed(step, device, repeats)


def hog_rate(device: torch.device, batch: int, size: int, repeats: int) -> float:
    hog = TorchHog(HogParams())
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    with torch.inference_mode():
        return batch / timed(lambda: hog(x), device, repeats)


def repeated_data(root: Path, images: int, repeat: int) -> Path:
    """A synthetic data dir whose train images appear `repeat` times under new ids (hard links)."""
    write_synthetic(root, images=images, seed=0, test_images=0)
    with open(root / "train.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    out = []
    for k in range(repeat):
        for image_id, labels in rows:
            new = f"{image_id}r{k}" if k else image_id
            if k:
                src = next((root / "train").glob(f"{image_id}.*"))
                os.link(src, src.with_name(new + src.suffix))
            out.append([new, labels])
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *out])
    return root


def end_to_end(data: Path, work: Path, device: torch.device, backbone: str, size: int, batch: int,
               amp: str) -> tuple[float, int]:
    out = work / f"e2e-{backbone}-{amp}.h5"
    report = featurize(data, out, Options(weights="random", backbone=backbone, image_size=size, batch_size=batch,
                                          amp=amp),
                       device=device.type,
                       progress=False)
    out.unlink()
    return report.computed / report.seconds, report.computed


def attn_train(device: torch.device, batch: int, labels: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = AttnRNN(n_labels=labels, map_channels=D, fr_dim=D).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    maps = torch.relu(torch.randn(batch, L, D, device=device))
    targets = (torch.rand(batch, labels, device=device) < 4.5 / labels).float()
    weights = torch.full((labels,), 10.0, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(maps, maps.mean(dim=1), targets, weights, steps=10)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / timed(step, device, repeats)


def beam_decode(device: torch.device, views: int, labels: int, chunk: int) -> float:
    torch.manual_seed(0)
    model = AttnRNN(n_labels=labels, map_channels=D, fr_dim=D).to(device).eval()
    maps = torch.relu(torch.randn(views, L, D, device=device))
    log_thr = torch.full((labels,), float(np.log(4.5 / labels)), device=device)

    def run():
        for i in range(0, views, chunk):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                beam_search(model, maps[i:i + chunk], maps[i:i + chunk].mean(dim=1), beam=5, steps=10,
                            log_threshold=log_thr)

    return views / timed(run, device, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=250, help="synthetic images (before --repeat)")
    parser.add_argument("--repeat", type=int, default=6, help="each image appears this many times")
    parser.add_argument("--batch", type=int, default=128, help="featurize batch size")
    parser.add_argument("--backbone", default="resnet50",
                        help="comma-separated backbones for the featurize rows (docs/backbones.md)")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke run of this script on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = args.small
    size, batch, reps = (64, 4, 1) if small else (224, args.batch, 10)
    backbones = args.backbone.split(",")
    rows = []
    for backbone in backbones:
        for amp in ("none", "bf16"):
            rows.append((f"featurize {backbone} bare backbone {size} px, batch {batch}, {amp}",
                         bare(device, backbone, batch, size, amp == "bf16", reps)))
    rows.append((f"torch HOG per {size} px view, batch {batch}", hog_rate(device, batch, size, reps)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = repeated_data(work / "data", 10 if small else args.images, 1 if small else args.repeat)
        for backbone in backbones:
            for amp in ("none", "bf16"):
                rate, n = end_to_end(data, work, device, backbone, size, batch, amp)
                rows.append((f"featurize {backbone} end to end {n} views, {size} px, batch {batch}, {amp} "
                             "(incl. start-up)", rate))
    labels = 50 if small else 1103
    rows.append((f"attn_rnn training, batch {8 if small else 128}, C={labels}, T=10, bf16 on CUDA",
                 attn_train(device, 8 if small else 128, labels, 1 if small else 5)))
    rows.append((f"attn_rnn beam decoding K=5 T=10, C={labels}",
                 beam_decode(device, 16 if small else 2048, labels, 8 if small else 256)))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n| {name}, torch {torch.__version__}, {os.cpu_count()} cores | views/s |")
    print("|---|---|")
    for what, rate in rows:
        print(f"| {what} | {rate:,.1f} |")


if __name__ == "__main__":
    main()
