"""`fit --head lgbm --folds 3` and `stack` at iMet's shape: seconds, peak RSS and test F2 against views, the
fitted exponent, and full iMet extrapolated on 2 and 16 cores.

Stores are planted at iMet's shape (`imet.planted.imet_design`: 1,103 labels with a long tail, 1-6 views per
image, pooled vectors 2,048 wide, small int8 maps), written once under --work. Each command runs through the
CLI in a fresh process (`imet -q ...`, OMP_NUM_THREADS=--threads) with the code of --code (a source tree put
first on PYTHONPATH: run once with the code before a change and once after, into the same --work, to compare
them on the same stores). Records go to --work/results.jsonl as they finish; a rerun skips what is there.

    python benchmarks/bench_boost_scale.py --code . --label after [--views 2000,8000] [--threads 2]
                                           [--thread-scaling] [--work bench-out/boost]
    python benchmarks/bench_boost_scale.py --table

The table fits seconds = a * rows^b per command and code (rows: labelled views for the lgbm fit, labelled
images for stack) and extrapolates the largest measured size to full iMet's rows (655,422 labelled views,
109,237 images) on these 2 cores; 16 cores by Amdahl's law from the serial share of 1 against 2 threads
(--thread-scaling, at the smallest size). Timings on a shared machine are noisy: read them as estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peak_rss import run_imet  # noqa: E402

FULL = {"views": 109_237 * 6, "images": 109_237}  # full iMet's labelled (train) views and images
VIEWS_PER_IMAGE = 3.5  # the planted iMet design's mean (1-6 views per image)

# name, imet arguments ({s}: store, {w}: work dir, {t}: threads), the row count its cost is read against
COMMANDS = [
    ("fit lgbm --folds 3", "fit --store {s} --head lgbm --folds 3 --n-jobs {t} --oof {w}/lgbm_oof.h5 --out {w}/g3.pt",
     "views"),
    ("fit linear --folds 3", "fit --store {s} --head linear --folds 3 --oof {w}/linear_oof.h5 --out {w}/l3.pt",
     "views"),
    ("stack", "stack {w}/linear_oof.h5 {w}/lgbm_oof.h5 --out {w}/stack.json", "images"),
    ("evaluate stack", "evaluate --store {s} --model {w}/stack.json --split test", "images"),
]


def planted_store(work: Path, views: int, channels: int) -> Path:
    """A planted iMet-shaped store of about `views` views (written once)."""
    from imet.planted import imet_design, write_planted_store

    path = work / f"planted-{views}-c{channels}.h5"
    if not path.exists():
        write_planted_store(path, imet_design(round(views / VIEWS_PER_IMAGE), channels=channels))
    return path


def test_f2(output: str) -> float | None:
    """The f2 cell of the last table row printed by `fit --folds` or `evaluate` (None if there is none)."""
    lines = output.strip().splitlines()
    heads = [i for i, line in enumerate(lines) if line.split()[:3] == ["model", "head", "f2"]]
    if not heads or heads[-1] + 2 >= len(lines):
        return None
    return float(lines[heads[-1] + 2].split()[2])


def measured(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def run_size(store: Path, work: Path, key: dict, args, results: Path) -> None:
    from imet.store import FeatureStore

    st = FeatureStore(store)
    labelled = np.isin(st.split, ("train", "val"))
    rows = {"views": int(labelled[st.view_image].sum()), "images": int(labelled.sum())}
    env = {**os.environ, "OMP_NUM_THREADS": str(key["threads"]), "PYTHONPATH": str(args.code.resolve())}
    done = measured(results)
    for name, template, per in COMMANDS:
        if any(r["command"] == name and all(r.get(k) == v for k, v in key.items()) for r in done):
            continue
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = run_imet("-q", *shlex.split(template.format(s=store, w=work, t=key["threads"])),
                       timeout=args.timeout, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        record = {"command": name, **key, "rows": rows[per], "per": per, "seconds": round(run.seconds, 2),
                  "cpu_s": round(cpu, 2),
                  "peak_mib": run.peak_mib, "rc": run.returncode, "test_f2": test_f2(run.output)}
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tail = f" | {run.output.strip().splitlines()[-1][:160]}" if run.returncode and run.output.strip() else ""
        print(f"  {name}: {run.seconds:7.1f} s ({cpu:.1f} s CPU) {run.peak_mib or float('nan'):6.0f} MiB test F2 "
              f"{record['test_f2']} rc {run.returncode}{tail}", flush=True)


def synthetic_oof(work: Path, images: int, labels: int = 1103, seed: int = 0) -> list[Path]:
    """Two labelled out-of-fold probability files at iMet's label count: model a sees the culture labels (the
    first third), model b the tags; each is noise elsewhere (~4.4 labels per image, a long tail)."""
    from imet.decode.rule import Rule
    from imet.probfiles import write_probs

    paths = [work / f"oof-{images}-{m}.h5" for m in "ab"]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    freq = 1 / np.arange(1, labels + 1) ** 1.1
    y = rng.random((images, labels)) < np.minimum(freq / freq.sum() * 4.4, 0.5)
    culture = np.arange(labels) < labels // 3
    kinds = tuple("culture" if c else "tag" for c in culture)
    for path, sees in zip(paths, (culture, ~culture), strict=True):
        p = np.where(sees, np.clip(0.1 * rng.random(y.shape) + 0.5 * y * rng.random(y.shape), 0, 1),
                     0.1 * rng.random(y.shape))
        write_probs(path, [f"i{k}" for k in range(images)], p, np.arange(labels), kinds=kinds, targets=y,
                    head="linear", probabilistic=True, threshold=0.2, rule=json.dumps(Rule.global_(0.2).to_json()),
                    model=f"/nowhere/{path.stem}.pt", model_sha256=path.stem[-1] * 64, split="oof")
    return paths


def stack_side_by_side(work: Path, images: int, codes: dict[str, Path], results: Path) -> None:
    """`imet stack` of the same two synthetic files with each code tree, one after the other."""
    paths = synthetic_oof(work, images)
    for label, code in codes.items():
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(code.resolve())}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run = run_imet("-q", "stack", *map(str, paths), "--out", str(work / f"stack-{label}-{images}.json"), env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        f2 = float(run.output.split("out-of-fold F2 there ")[1].split()[0]) if run.returncode == 0 else None
        record = {"command": "stack (synthetic oof)", "code": label, "images": images, "seconds": round(run.seconds, 1),
                  "cpu_s": round(cpu, 1), "peak_mib": run.peak_mib, "oof_f2": f2, "rc": run.returncode}
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def label_rows(n_images: int, negatives: int = 20, floor: int = 500, min_positives: int = 5) -> str:
    """Rows the lgbm boosters of one fold see per round, summed over labels, before and after sampling
    negatives, counted on the planted iMet design's labels (no features made): a fold trains on 2/3 of the
    labelled 80% of the views."""
    from imet.planted import _plan_truth, imet_design

    _, targets, n_views = _plan_truth(imet_design(n_images))
    share = 0.8 * 2 / 3
    pos = (targets.astype(bool) * n_views[:, None]).sum(0) * share  # (C,) a fold's positive train views
    views = n_views.sum() * share
    boosted = (pos >= min_positives) & (views - pos >= min_positives)
    after = (pos + np.minimum(views - pos, np.maximum(negatives * pos, floor)))[boosted].sum()
    before = views * boosted.sum()
    return (f"| {n_images:,} ({n_views.sum():,}) | {boosted.sum()} | {before:,.0f} | {after:,.0f} | "
            f"{before / after:.1f}x |")


def exponent(x, y) -> float:
    """Slope of log y on log x by least squares (nan with fewer than 2 sizes)."""
    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 and np.ptp(x) > 0 else float("nan")


def hours(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "-"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def table(results: Path, threads: int) -> str:
    runs = [r for r in measured(results) if r["rc"] == 0]
    sizes = sorted({r["views"] for r in runs})
    lines = ["| command | code | " + " | ".join(f"{v:,} views: s / MiB / test F2" for v in sizes)
             + " | exponent | full iMet, 2 cores | serial share | full iMet, 16 cores |",
             "|" + "---|" * (len(sizes) + 6)]
    for name in dict.fromkeys(r["command"] for r in runs):
        for code in dict.fromkeys(r["code"] for r in runs if r["command"] == name):
            mine = [r for r in runs if r["command"] == name and r["code"] == code]
            ok = sorted((r for r in mine if r["threads"] == threads), key=lambda r: r["rows"])
            cells = []
            for v in sizes:
                r = next((r for r in ok if r["views"] == v), None)
                f2 = "" if r is None or r["test_f2"] is None else f" / {r['test_f2']:.3f}"
                cells.append("" if r is None else f"{r['seconds']:.0f} / {r['peak_mib']:.0f}{f2}")
            b = exponent([r["rows"] for r in ok], [r["seconds"] for r in ok])
            full2 = ok[-1]["seconds"] * (FULL[ok[-1]["per"]] / ok[-1]["rows"]) ** b if ok and np.isfinite(b) \
                else float("nan")
            one = {r["views"]: r["seconds"] for r in mine if r["threads"] == 1}
            two = [r for r in mine if r["threads"] == 2 and r["views"] in one]
            serial = float(np.clip(2 * two[0]["seconds"] / one[two[0]["views"]] - 1, 0, 1)) if two else float("nan")
            full16 = full2 * (serial + (1 - serial) / 16) / (serial + (1 - serial) / threads) \
                if np.isfinite(serial) else float("nan")
            lines.append(f"| {name} | {code} | " + " | ".join(cells) + f" | {b:.2f} | {hours(full2)} | "
                         f"{serial:.2f} | {hours(full16)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", default="2000,8000", help="comma-separated view counts")
    p.add_argument("--channels", type=int, default=32, help="map channels of the planted stores (int8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--thread-scaling", action="store_true", help="also run the smallest size on 1 thread")
    p.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1], help="imet source tree to run")
    p.add_argument("--label", default="after", help="name of --code in the records (e.g. before, after)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--stack-images", default="", help="comma-separated image counts: stack synthetic oof files "
                                                        "with --code and --before-code side by side, and stop")
    p.add_argument("--label-rows", default="", help="comma-separated image counts: count lgbm label rows per fold "
                                                     "before and after sampling negatives, and stop")
    p.add_argument("--before-code", type=Path, help="the code tree before the change (for --stack-images)")
    p.add_argument("--table", action="store_true", help="print the table from results.jsonl and stop")
    p.add_argument("--work", type=Path, default=Path("bench-out/boost"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    if args.label_rows:
        print("| images (views) | boosted labels | rows before | rows after | fewer |\n|---|---|---|---|---|")
        for n in map(int, args.label_rows.split(",")):
            print(label_rows(n), flush=True)
        return
    if args.stack_images:
        codes = {"before": args.before_code, args.label: args.code} if args.before_code else {args.label: args.code}
        for images in map(int, args.stack_images.split(",")):
            stack_side_by_side(args.work, images, codes, results)
        return
    if not args.table:
        plan = [(int(v), args.threads) for v in filter(None, args.views.split(","))]
        if args.thread_scaling and plan:
            plan.append((plan[0][0], 1))
        for views, threads in plan:
            store = planted_store(args.work, views, args.channels)
            work = args.work / f"{args.label}-{views}-{threads}t"
            work.mkdir(exist_ok=True)
            print(f"{args.label}: {store.name}, {threads} threads", flush=True)
            run_size(store, work, {"code": args.label, "views": views, "threads": threads}, args, results)
    print(table(results, args.threads))


if __name__ == "__main__":
    main()
