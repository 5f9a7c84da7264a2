"""Every head on one backbone of each family, at the real input size, through the CLI.

For each backbone: a synthetic dataset (`imet synth`), `imet featurize --backbone B --weights random` at 224 px
(the backbone's own map channels and pooled width, HOG on), then `imet fit` of every head with its defaults
(--epochs N caps the trained heads' epochs and attn_rnn's csra start's), `imet evaluate` of all of them on
test, and `imet predict --data` of the csra model on the Kaggle test images (the kernel path, which builds the
backbone from the model's store). Each command runs in a fresh process; its wall time, peak RSS and return
code are printed as one row, and a failure is shown, not skipped. Random weights: the F2 says the heads run
end to end on that backbone's features, not how good the features are.

    OMP_NUM_THREADS=1 python benchmarks/bench_backbone_heads.py [--backbones resnet50,convnext_tiny,...]
        [--images 60] [--epochs 0] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import HEADS, TRAINED, epoch_cap  # noqa: E402
from peak_rss import run_imet  # noqa: E402

FAMILIES = ("resnet50", "convnext_tiny", "efficientnet_v2_s", "vit_b_16", "swin_v2_t", "regnet_y_16gf")


def commands(backbone: str, data: Path, work: Path, epochs: int) -> list[tuple[str, list[str]]]:
    s = str(work / "store.h5")
    out = [("featurize", ["featurize", str(data), "--out", s, "--backbone", backbone, "--weights", "random",
                          "--quiet"])]
    for head in HEADS:
        cap = epoch_cap(head, epochs) if head in TRAINED else []
        out.append((f"fit {head}", ["fit", "--store", s, "--head", head, *cap, "--out", str(work / f"{head}.pt")]))
    out.append(("evaluate", ["evaluate", "--store", s, "--split", "test", "--json", str(work / "table.json"),
                             "--model", *(str(work / f"{h}.pt") for h in HEADS)]))
    out.append(("predict --data", ["predict", "--data", str(data), "--model", str(work / "csra.pt"), "--out",
                                   str(work / "sub.csv"), "--quiet"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default=",".join(FAMILIES))
    p.add_argument("--images", type=int, default=60, help="labelled synthetic images (a tenth more for Kaggle test)")
    p.add_argument("--epochs", type=int, default=0, help="cap of the trained heads' epochs (0: their defaults)")
    p.add_argument("--work", type=Path, help="scratch dir (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        data = work / "data"
        made = run_imet("synth", str(data), "--images", str(args.images))
        if made.returncode:
            sys.exit(made.output)
        print("| backbone | command | s | peak MiB | rc |\n|---|---|---|---|---|", flush=True)
        f2 = {}
        for backbone in args.backbones.split(","):
            where = work / backbone
            where.mkdir(parents=True, exist_ok=True)
            for name, argv in commands(backbone, data, where, args.epochs):
                run = run_imet(*argv)
                peak = "—" if run.peak_mib is None else f"{run.peak_mib:.0f}"
                print(f"| {backbone} | {name} | {run.seconds:.1f} | {peak} | {run.returncode} |", flush=True)
                if run.returncode:
                    print(run.output[-2000:], file=sys.stderr)
            table = where / "table.json"
            if table.exists():
                f2[backbone] = {Path(r["model"]).stem: r["f2"] for r in json.loads(table.read_text())}
        print("\ntest F2 (random weights):")
        for backbone, row in f2.items():
            print(f"  {backbone}: " + ", ".join(f"{h} {v:.3f}" for h, v in row.items()))


if __name__ == "__main__":
    main()
