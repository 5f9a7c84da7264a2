"""Map heads across processes (DDP): epoch time and F2 of `imet fit` in one process against the same fit under
`torchrun --nproc-per-node P` (gloo on the CPU, NCCL on GPUs), side by side in one run, on a planted store.

    python benchmarks/bench_ddp.py [--heads csra,mldecoder] [--images 1500] [--labels 110] [--epochs 3]
                                   [--procs 2] [--threads 1] [--device cpu] [--work bench-out/ddp]
    python benchmarks/bench_ddp.py --compare amp --device cuda    # bf16 autocast against float32, one GPU

Each fit runs in a fresh process with OMP_NUM_THREADS=--threads per process (so P processes use P times the
threads of one: the ratio is what more processes buy). Epoch times are read from the fit's epoch lines (rank
0's under torchrun) and the median over epochs is printed; val F2 is the tuned decoding's on val, test F2
the model's on the held-out test split. The target: the P-process model's val F2 within 0.005 of one
process's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imet.heads import load_model  # noqa: E402
from imet.metrics import evaluate_head  # noqa: E402
from imet.planted import imet_design, write_planted_store  # noqa: E402
from imet.store import FeatureStore  # noqa: E402

EPOCH = re.compile(r"epoch \d+/\d+: loss [^(]*\(([\d.]+) s,")


def fit(store: Path, head: str, out: Path, args: argparse.Namespace, procs: int, amp: str) -> tuple[float, float]:
    """(median epoch seconds, wall seconds) of one `imet fit`, under torchrun when procs > 1."""
    launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(procs)]
    cmd = [*launch, "-m", "imet", "fit", "--store", str(store), "--head", head, "--out", str(out),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device, "--amp", amp,
           *(["--workers", str(args.workers)] if args.workers is not None else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.monotonic()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if result.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    epochs = [float(x) for x in EPOCH.findall(result.stderr)]
    return float(np.median(epochs)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="csra,mldecoder")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--labels", type=int, default=110, help="Labels (iMet's 1,103 kinds scaled).")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process.")
    parser.add_argument("--workers", type=int, help="DataLoader workers per process [the heads': 1 CPU, 4 CUDA].")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compare", default="procs", choices=("procs", "amp"),
                        help="procs: 1 against --procs processes; amp: bf16 against none in one process.")
    parser.add_argument("--work", type=Path, default=Path("bench-out/ddp"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / f"planted-{args.images}-{args.labels}-{args.channels}.h5"
    if not store.exists():
        write_planted_store(store, imet_design(args.images, labels=args.labels, channels=args.channels))
    fs = FeatureStore(store)
    runs = [(1, "bf16"), (args.procs, "bf16")] if args.compare == "procs" else [(1, "bf16"), (1, "none")]
    print(f"store {store.name}: {len(fs.vocab)} labels, {len(fs.views('train'))} train views, maps "
          f"{fs.shape('maps')}; {args.epochs} epochs, batch {args.batch_size}, {args.threads} thread(s) per "
          f"process, device {args.device}")
    print(f"{'head':10} {'run':>12} {'epoch s':>8} {'wall s':>7} {'val F2':>7} {'test F2':>7}")
    for head in args.heads.split(","):
        rows = []
        for procs, amp in runs:
            out = args.work / f"{head}-{procs}-{amp}.pt"
            epoch, wall = fit(store, head, out, args, procs, amp)
            model = load_model(out)
            rows.append((epoch, model.val_f2_, evaluate_head(model, fs, "test")["f2"]))
            what = f"{procs} proc" if args.compare == "procs" else f"amp {amp}"
            print(f"{head:10} {what:>12} {epoch:8.2f} {wall:7.1f} {rows[-1][1]:7.4f} {rows[-1][2]:7.4f}", flush=True)
        (e1, v1, t1), (e2, v2, t2) = rows
        print(f"{head:10} {'ratio':>12} {e1 / e2:8.2f}x {'':7} {v2 - v1:+7.4f} {t2 - t1:+7.4f}  (first / second "
              "epoch time; F2 second - first)")


if __name__ == "__main__":
    main()
