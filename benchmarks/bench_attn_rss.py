"""Peak resident memory of `imet fit --head attn_rnn` on a maps store larger than 2 GB, beside its size.

The head reads 14x14x2048 maps through the memory-mapped reader a batch at a time; its resident memory
must not grow with the store (target < 1.5 GiB, with torch's own ~0.5 GiB included). One epoch at the default
sizes (H = A = P = 512) and --workers 0, so that every read happens in the measured process. The same run prints the
peak of `imet store verify` on the same file as the reader-only baseline.

    python benchmarks/bench_attn_rss.py [--views 2800] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_featurize import big_store  # noqa: E402
from peak_rss import peak_rss_mib  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=2800, help="views of the store (2800: 2.2 GB of maps)")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / "maps.h5"
        if not path.exists():
            big_store(path, args.views, maps=True)
        size = path.stat().st_size / 2**30
        fit = peak_rss_mib("fit", "--store", str(path), "--head", "attn_rnn", "--out", str(work / "attn.pt"),
                           "--epochs", "1", "--workers", "0", "--device", "cpu")
        verify = peak_rss_mib("store", "verify", str(path))
        print(f"store: {size:.2f} GB ({args.views} views of 14x14x2048 float16 maps)")
        print(f"peak RSS, imet fit --head attn_rnn (1 epoch, --workers 0): {fit:6.0f} MiB  (target < 1536 MiB)")
        print(f"peak RSS, imet store verify (reader only):                 {verify:6.0f} MiB")
        print(f"ratio fit peak / store size = {fit / 1024 / size:.2f}")


if __name__ == "__main__":
    main()
