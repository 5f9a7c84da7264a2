"""Every imet command at iMet's shape: 1,103 labels and growing views, wall time and peak RSS, fitted cost laws,
and the extrapolation to full iMet (700,080 views).

Stores are planted at iMet's shape (`imet.planted.imet_design`: 1,103 labels with a long tail, 1-6 views per
image, int8 256-channel maps, pooled 2,048 wide, HOG 10,368 wide as iMet's), written once under --work and
reused. Every command runs through the CLI in a fresh process (`imet -q ...`), one after the other, with
OMP_NUM_THREADS=--threads; its wall time and peak RSS (VmHWM) are recorded in --work/results.jsonl as it
finishes, so a killed run keeps what it measured and a rerun skips what is there (--again to redo).

    python benchmarks/bench_scale.py [--views 2000,8000,32000] [--label-sweep 128,1103 --sweep-views 4000]
                                     [--only fit-linear,evaluate] [--timeout 2700] [--thread-scaling]
                                     [--pixels 30,120] [--epochs 2] [--work bench-out/scale]

Then `--table` prints the tables of docs/scale.md from results.jsonl: per command, seconds and MiB per size,
the exponent of time in views (least squares on log-log) and in labels, and full iMet extrapolated on 2 and
16 cores (16 cores by Amdahl's law from the serial share measured with --thread-scaling: 1 against 2 threads).
A command that ran past --timeout at one size is not run at larger ones. `--epochs N` caps the trained heads'
epochs (and their csra starts'); each fit writes `fit --metrics`, and a second table gives seconds per epoch
of each training phase, its exponent in views, and one epoch and the default epochs at full iMet.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peak_rss import run_imet  # noqa: E402

FULL_IMET = 700_080  # views: (109,237 train + 7,443 stage-1 test images) x 6
VIEWS_PER_IMAGE = 3.5  # the planted iMet design's mean (1-6 views per image)
HEADS = ("linear", "linear_hog", "lgbm", "csra", "mldecoder", "attn_rnn")
TRAINED = ("linear", "linear_hog", "csra", "mldecoder", "attn_rnn")  # heads with epochs (fit --metrics rows)
DEFAULT_EPOCHS = {"linear": 30, "linear_hog": 30, "csra": 20, "mldecoder": 20, "attn_rnn": 10}

# name, imet arguments ({s}: the store, {w}: this size's work dir), files it needs from earlier commands
COMMANDS = [
    *((f"fit {h}", f"fit --store {{s}} --head {h} --out {{w}}/{h}.pt", ()) for h in HEADS),
    ("fit linear --thresholds global", "fit --store {s} --head linear --thresholds global --out {w}/gl.pt", ()),
    ("fit linear --thresholds per-kind", "fit --store {s} --head linear --thresholds per-kind --out {w}/pk.pt", ()),
    ("evaluate", "evaluate --store {s} --model {w}/linear.pt {w}/lgbm.pt {w}/csra.pt --split test "
                 "--json {w}/table.json", ("linear.pt", "lgbm.pt", "csra.pt")),
    ("predict --store", "predict --store {s} --model {w}/linear.pt --split test --out {w}/sub.csv "
                        "--probs {w}/linear_test.h5", ("linear.pt",)),
    ("predict --store csra", "predict --store {s} --model {w}/csra.pt --split test --out {w}/sub_csra.csv",
     ("csra.pt",)),
    ("blend fit", "blend fit --store {s} --model {w}/linear.pt --model {w}/csra.pt --model {w}/lgbm.pt "
                  "--out {w}/blend.json", ("linear.pt", "csra.pt", "lgbm.pt")),
    ("fit linear --folds 3", "fit --store {s} --head linear --folds 3 --oof {w}/linear_oof.h5 --out {w}/l3.pt", ()),
    ("fit lgbm --folds 3", "fit --store {s} --head lgbm --folds 3 --oof {w}/lgbm_oof.h5 --out {w}/g3.pt", ()),
    ("stack", "stack {w}/linear_oof.h5 {w}/lgbm_oof.h5 --out {w}/stack.json", ("linear_oof.h5", "lgbm_oof.h5")),
    ("report", "report --store {s} --model {w}/linear.pt {w}/lgbm.pt {w}/csra.pt --split test --out {w}/report",
     ("linear.pt", "lgbm.pt", "csra.pt")),
]
# commands on real pixels (synth images): featurize per view, predict --data, explain
PIXEL_COMMANDS = [
    ("featurize", "featurize {d} --out {w}/px.h5 --weights random", ()),
    ("featurize --maps-dim 256 --maps-dtype int8", "featurize {d} --out {w}/pxc.h5 --weights random --maps-dim 256 "
                                                   "--maps-dtype int8", ()),
    ("fit csra on pixels", "fit --store {w}/pxc.h5 --head csra --epochs 2 --out {w}/pxcsra.pt", ("pxc.h5",)),
    ("predict --data", "predict --data {d} --model {w}/pxcsra.pt --out {w}/pxsub.csv", ("pxcsra.pt",)),
    ("explain", "explain --store {w}/pxc.h5 --model {w}/pxcsra.pt --data {d} --ids {ids} --out {w}/explain",
     ("pxcsra.pt",)),
]


def slug(name: str) -> str:
    return name.replace(" --", "-").replace(" ", "-")


def planted_store(work: Path, views: int, labels: int) -> tuple[Path, int]:
    """The planted store of about `views` views at `labels` labels (written once); its path and view count."""
    from imet.planted import imet_design, write_planted_store
    from imet.store import FeatureStore

    path = work / f"planted-{views}-{labels}.h5"
    if not path.exists():
        t0 = time.monotonic()
        design = imet_design(round(views / VIEWS_PER_IMAGE), labels=labels, hog=10368)
        truth = write_planted_store(path, design)
        truth.save(path.with_suffix(".truth.npz"))
        print(f"wrote {path.name}: {truth.n_views} views in {time.monotonic() - t0:.0f} s", flush=True)
    return path, len(FeatureStore(path).view_image)


def measured(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def run_commands(commands, fmt: dict, work: Path, results: Path, key: dict, args) -> None:
    """Each command once (unless already in results), skipping those whose inputs are missing or that ran
    past the timeout at a smaller size; a record per command appended to results."""
    done = measured(results)
    env = {**os.environ, "OMP_NUM_THREADS": str(key["threads"]), "MKL_NUM_THREADS": str(key["threads"])}
    for name, template, needs in commands:
        if args.only and slug(name) not in args.only:
            continue
        trained = name.split()[0] == "fit" and name.split()[1] in TRAINED
        mine = {**key, "epoch_cap": args.epochs or None} if trained else key
        same = [r for r in done if r["command"] == name and all(r.get(k) == v for k, v in mine.items())]
        if same and not args.again:
            continue
        slow = [r for r in done if r["command"] == name and r["rc"] == -9 and r["labels"] == key["labels"]
                and r["views"] < key["views"] and r["threads"] == key["threads"]]
        missing = [n for n in needs if not (work / n).exists()]
        if slow or missing:
            why = "ran past the timeout at fewer views" if slow else "needs " + ", ".join(missing)
            print(f"  {name}: skipped ({why})")
            continue
        argv = ["-q", *shlex.split(template.format(**fmt, w=work))]
        metrics = None
        if trained:
            argv += epoch_cap(name.split()[1], args.epochs)
            if "--folds" not in name:  # --metrics records one fit; --folds fits several
                metrics = work / f"{slug(name)}.jsonl"
                metrics.unlink(missing_ok=True)
                argv += ["--metrics", str(metrics)]
        run = run_imet(*argv, timeout=args.timeout, env=env)
        record = {"command": name, **mine, "seconds": round(run.seconds, 2), "peak_mib": run.peak_mib,
                  "rc": run.returncode, "when": time.strftime("%Y-%m-%d %H:%M"),
                  "load": round(os.getloadavg()[0], 1)}
        if metrics is not None and metrics.exists():
            record["epochs"] = epoch_seconds(metrics)
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        last = run.output.strip().splitlines()[-1][:160] if run.output.strip() else ""
        tail = f" | {last}" if run.returncode else ""
        print(f"  {name}: {run.seconds:8.1f} s  {run.peak_mib or float('nan'):7.0f} MiB  rc {run.returncode}{tail}",
              flush=True)


def epoch_cap(head: str, epochs: int) -> list[str]:
    """The flags that cap a trained head's epochs (its csra start's too) at `epochs` (0: the defaults)."""
    if not epochs:
        return []
    return ["--epochs", str(epochs)] + (["--start-epochs", str(epochs)] if head == "attn_rnn" else [])


def epoch_seconds(metrics: Path) -> dict:
    """Per training phase (the head's name in the metrics rows: a csra start is its own phase): epochs run
    and the median seconds per epoch."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    phases: dict[str, list[float]] = {}
    for r in rows:
        if r.get("epoch") is not None and r.get("seconds") is not None:
            phases.setdefault(r["head"], []).append(r["seconds"])
    return {h: {"epochs": len(v), "s_per_epoch": round(float(np.median(v)), 2)} for h, v in phases.items()}


def pixel_data(work: Path, images: int) -> tuple[Path, str]:
    data = work / f"synth-{images}"
    if not data.exists():
        r = run_imet("-q", "synth", str(data), "--images", str(images), "--seed", "0")
        if r.returncode:
            raise SystemExit(r.output)
    ids = [line.split(",")[0] for line in (data / "train.csv").read_text().splitlines()[1:3]]
    return data, ",".join(ids)


def fit_exponent(x, y) -> float:
    """Slope of log y on log x by least squares (nan with fewer than 2 points)."""
    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 and np.ptp(x) > 0 else float("nan")


def table(results: Path, threads: int, labels: int) -> str:
    runs = measured(results)
    rows = [r for r in runs if r["rc"] == 0]
    names = list(dict.fromkeys(r["command"] for r in runs if not r.get("pixels")))
    sizes = sorted({r["views"] for r in runs if r["labels"] == labels and r["threads"] == threads
                    and not r.get("pixels")})
    head = "| command | " + " | ".join(f"{v:,} views s / MiB" for v in sizes) + \
           f" | exp. views | exp. labels | full iMet, {threads} thread(s) | serial share | full iMet 16 cores |"
    lines = [head, "|" + "---|" * (len(sizes) + 6)]
    for name in names:
        mine = [r for r in runs if r["command"] == name and r["threads"] == threads]
        if not mine:
            continue
        caps = sorted({r["epoch_cap"] for r in mine if r.get("epoch_cap")})
        shown = name + (f" (epochs capped at {'/'.join(map(str, caps))})" if caps else "")
        cells = []
        for v in sizes:
            r = next((r for r in reversed(mine) if r["views"] == v and r["labels"] == labels), None)  # the last run
            cells.append("" if r is None else "timeout" if r["rc"] == -9 else f"rc {r['rc']}" if r["rc"] else
                         f"{r['seconds']:.0f} / {r['peak_mib']:.0f}")
        ok = sorted((r for r in mine if r["rc"] == 0 and r["labels"] == labels), key=lambda r: r["views"])
        if caps:  # capped fits' totals are not the defaults' (the second table has their epochs)
            ok = []
        bv = fit_exponent([r["views"] for r in ok], [r["seconds"] for r in ok])
        sweep = label_points(rows, name, threads, labels)
        bl = fit_exponent(list(sweep), list(sweep.values()))
        full2 = ok[-1]["seconds"] * (FULL_IMET / ok[-1]["views"]) ** bv if ok and np.isfinite(bv) else float("nan")
        one = [r for r in rows if r["command"] == name and r["threads"] == 1]
        two = [r for r in rows if r["command"] == name and r["threads"] == 2
               and any(o["views"] == r["views"] and o["labels"] == r["labels"] for o in one)]
        serial = float("nan")
        if one and two:
            t1 = next(o["seconds"] for o in one if o["views"] == two[0]["views"] and o["labels"] == two[0]["labels"])
            serial = float(np.clip(2 * two[0]["seconds"] / t1 - 1, 0, 1))
        full16 = full2 * (serial + (1 - serial) / 16) / (serial + (1 - serial) / threads) if np.isfinite(serial) else \
            float("nan")
        lines.append(f"| {shown} | " + " | ".join(cells) + f" | {bv:.2f} | {bl:.2f} | {hours(full2)} | "
                     f"{serial:.2f} | {hours(full16)} |")
    return "\n".join(lines)


def label_points(rows: list[dict], name: str, threads: int, labels: int) -> dict[int, float]:
    """Seconds of a command by label count: each --label-sweep run, and the run at --labels nearest its views."""
    sweep = [r for r in rows if r["command"] == name and r.get("sweep") and r["threads"] == threads]
    main = [r for r in rows if r["command"] == name and not r.get("sweep") and r["labels"] == labels
            and r["threads"] == threads]
    points = {r["labels"]: r["seconds"] for r in sweep}
    if sweep and main:
        near = min(main, key=lambda r: abs(np.log(r["views"] / sweep[0]["views"])))
        points.setdefault(labels, near["seconds"])
    return points


def epoch_table(results: Path, threads: int, labels: int) -> str:
    """Per training phase of each trained head (a csra start is its own phase): seconds per epoch at each size,
    their exponent in views, and one epoch and the default epochs at full iMet, extrapolated from the largest
    size by that exponent."""
    runs = [r for r in measured(results) if r["rc"] == 0 and r.get("epochs") and r["threads"] == threads
            and r["labels"] == labels and not r.get("sweep")]
    sizes = sorted({r["views"] for r in runs})
    lines = ["| fit: phase | " + " | ".join(f"{v:,} views s/epoch" for v in sizes) +
             " | exp. views | one epoch, full iMet: by proportion / by the fitted law | default epochs, full iMet "
             "(by proportion) |", "|" + "---|" * (len(sizes) + 4)]
    for name in dict.fromkeys(r["command"] for r in runs if r["command"] in {f"fit {h}" for h in TRAINED}):
        head = name.split()[1]
        for phase in dict.fromkeys(p for r in runs if r["command"] == name for p in r["epochs"]):
            points = sorted((r["views"], r["epochs"][phase]["s_per_epoch"]) for r in runs
                            if r["command"] == name and phase in r["epochs"])
            cells = [next((f"{s:.1f}" for v2, s in points if v2 == v), "") for v in sizes]
            b = fit_exponent([v for v, _ in points], [s for _, s in points])
            one = points[-1][1] * FULL_IMET / points[-1][0]  # a fixed amount of work per view
            law = points[-1][1] * (FULL_IMET / points[-1][0]) ** b if np.isfinite(b) else float("nan")
            epochs = DEFAULT_EPOCHS["csra" if phase != head else head]
            lines.append(f"| {name}: {phase} | " + " | ".join(cells) + f" | {b:.2f} | {hours(one)} / {hours(law)} | "
                         f"{epochs} x = {hours(one * epochs)} |")
    return "\n".join(lines)


def quality_table(work: Path, labels: int) -> str:
    """Test F2 and tail recall of the heads `evaluate` scored at each size (evaluate --json; trained heads with
    the epochs the run capped them at), beside the probe that knows the planted evidence on the same store
    (computed once per store and kept in --work/probe.json)."""
    from imet.metrics import TAIL, scores, train_frequency
    from imet.planted import Planted, probe_labels
    from imet.store import FeatureStore

    cache = work / "probe.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    lines = ["| views | images (test) | head | test F2 | tail recall | probe test F2 | probe tail recall |",
             "|---|---|---|---|---|---|---|"]
    for store_path in sorted(work.glob(f"planted-*-{labels}.h5"), key=lambda p: int(p.name.split("-")[1])):
        size = store_path.name.split("-")[1]
        tables = sorted(work.glob(f"{size}-{labels}-*t/table.json"))  # one per thread count evaluate ran at
        if not tables:
            continue
        if store_path.name not in known:
            st = FeatureStore(store_path)
            images, pred = probe_labels(Planted.load(store_path.with_suffix(".truth.npz")), st)
            truth = st.targets[images].astype(bool)
            tail = train_frequency(st) < TAIL
            known[store_path.name] = {"views": len(st.view_image), "f2": scores(truth, pred)["f2"],
                                      "tail_recall": float((truth[:, tail] & pred[:, tail]).sum() /
                                                           max(truth[:, tail].sum(), 1))}
            cache.write_text(json.dumps(known, indent=1))
        probe = known[store_path.name]
        for r in (r for rows in tables for r in json.loads(rows.read_text())):
            lines.append(f"| {probe['views']:,} | {r['images']} | {r['head']} | {r['f2']:.3f} | "
                         f"{r.get('tail_recall', float('nan')):.3f} | {probe['f2']:.3f} | {probe['tail_recall']:.3f} |")
    return "\n".join(lines)


def pixel_table(results: Path) -> str:
    """Commands on synth images: seconds, views per second and peak MiB at each image count."""
    runs = [r for r in measured(results) if r.get("pixels") and r["rc"] == 0]
    lines = ["| command | views | seconds | views/s | peak MiB |", "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["command"], r["views"])):
        lines.append(f"| {r['command']} | {r['views']:,} | {r['seconds']:.0f} | {r['views'] / r['seconds']:.1f} | "
                     f"{r['peak_mib']:.0f} |")
    return "\n".join(lines)


def hours(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "-"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", default="2000,8000,32000", help="comma-separated view counts at --labels")
    p.add_argument("--labels", type=int, default=1103)
    p.add_argument("--label-sweep", default="", help="comma-separated label counts at --sweep-views")
    p.add_argument("--sweep-views", type=int, default=4000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--thread-scaling", action="store_true", help="also run the smallest size on 1 thread")
    p.add_argument("--pixels", default="", help="comma-separated synth image counts for the pixel commands")
    p.add_argument("--only", default="", help="comma-separated command slugs (e.g. fit-linear,evaluate)")
    p.add_argument("--timeout", type=float, default=2700)
    p.add_argument("--epochs", type=int, default=0, help="cap every trained head's epochs (and its csra start's) at "
                   "this many; per-epoch seconds come from fit --metrics (0: the heads' defaults)")
    p.add_argument("--again", action="store_true", help="rerun commands already in results.jsonl")
    p.add_argument("--table", action="store_true", help="print the tables from results.jsonl and stop")
    p.add_argument("--quality", action="store_true", help="with --table: also test F2 and tail recall of the "
                   "evaluated heads against the probe at each size (computes the probe once per store)")
    p.add_argument("--work", type=Path, default=Path("bench-out/scale"))
    args = p.parse_args()
    args.only = set(filter(None, args.only.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    if args.table:
        print("\n\n".join((table(results, args.threads, args.labels), epoch_table(results, args.threads, args.labels),
                            pixel_table(results))))
        if args.quality:
            print("\n" + quality_table(args.work, args.labels))
        return
    plan = [(int(v), args.labels, args.threads, False) for v in filter(None, args.views.split(","))]
    plan += [(args.sweep_views, int(c), args.threads, True) for c in filter(None, args.label_sweep.split(","))]
    if args.thread_scaling and plan:
        plan.append((*plan[0][:2], 1, False))
    for views, labels, threads, sweep in plan:
        path, n = planted_store(args.work, views, labels)
        work = args.work / f"{views}-{labels}-{threads}t"
        work.mkdir(exist_ok=True)
        print(f"{n:,} views, {labels} labels, {threads} threads:", flush=True)
        key = {"views": n, "labels": labels, "threads": threads, **({"sweep": True} if sweep else {})}
        run_commands(COMMANDS, {"s": path}, work, results, key, args)
    for images in filter(None, args.pixels.split(",")):
        data, ids = pixel_data(args.work, int(images))
        work = args.work / f"pixels-{images}"
        work.mkdir(exist_ok=True)
        print(f"pixels: {images} synth images:", flush=True)
        key = {"views": int(images) * 6, "labels": 0, "threads": args.threads, "pixels": True}
        run_commands(PIXEL_COMMANDS, {"d": data, "ids": ids}, work, results, key, args)
    print("\n\n".join((table(results, args.threads, args.labels), epoch_table(results, args.threads, args.labels),
                        pixel_table(results))))


if __name__ == "__main__":
    main()
