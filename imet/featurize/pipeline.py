"""`imet featurize`: one pass over every view, writing maps, pooled vectors and HOG into the store.

Views are processed in fixed batches of global view indices ([k*B, (k+1)*B)), so a resumed run, a
shard of a distributed run and an uninterrupted run all feed the backbone the same batches and write
the same bytes. DataLoader workers decode images and cut views; the main process runs the backbone and
HOG in torch (or the workers compute HOG with scikit-image, `--hog-impl skimage`) on the batch's device,
and writes in place. A batch is marked done only after its features are written.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import imet
from imet import codec, store
from imet.data import N_CROPS, SPLITS, Dataset, load_dataset, plan_views
from imet.errors import ImetError
from imet.featurize import backbone as backbones
from imet.featurize.backbone import Backbone, imagenet_file, load_weights
from imet.featurize.hog import TorchHog, hog_view
from imet.featurize.options import BACKBONES, POOLED_AS, HogParams, Options
from imet.featurize.views import ViewError, load_rgb, render
from imet.files import die_with_parent, exclusive
from imet.labels import FULL_IMET_VIEWS
from imet.progress import progress as progress_bar
from imet.runtime import check_workers, identity, kept_heap, pick_device

NORM_SAMPLE = 256  # train images used to estimate the train-set mean/std for --normalize train
LEGACY = {"hog_impl": "skimage", "amp": "none"}  # what stores written before these settings existed used
CODEC_KEYS = tuple(codec.Request.params)  # in the settings only when a feature is compact


def _keep(dataset: Dataset, keep: np.ndarray) -> Dataset:
    return Dataset(dataset.root, dataset.vocab, [i for i, k in zip(dataset.ids, keep, strict=True) if k],
                   dataset.split[keep], dataset.targets[keep], dataset.dropped_labels, dataset.dropped_images)


def limit_images(dataset: Dataset, limit: int | None) -> Dataset:
    """Keep at most `limit` images of each split (the first ones), for quick trials."""
    if limit is None:
        return dataset
    keep = np.zeros(len(dataset.ids), dtype=bool)
    for name in np.unique(dataset.split):
        keep[np.flatnonzero(dataset.split == name)[:limit]] = True
    return _keep(dataset, keep)


def select_splits(dataset: Dataset, splits: tuple[str, ...] | None) -> Dataset:
    """Only the images of `splits` (all when None): a store of some splits, e.g. a new Kaggle test set."""
    if splits is None:
        return dataset
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ImetError(f"--splits: unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    keep = np.isin(dataset.split, list(splits))
    if not keep.any():
        raise ImetError(f"{dataset.root}: no images in split(s) {', '.join(splits)}")
    return _keep(dataset, keep)


def make_plan(dataset: Dataset, opts: Options, settings: dict, codecs: dict | None = None) -> store.Plan:
    views = plan_views(dataset, seed=opts.view_seed)
    return store.Plan(
        vocab=dataset.vocab, image_ids=np.array(dataset.ids, dtype=object), split=dataset.split,
        targets=dataset.targets, settings=settings, codecs=codecs or {},
        views={"image": views.image, "crop": views.crop, "offset": views.offset, "flip": views.flip,
               "jitter": views.jitter, "culture_only": views.culture_only},
    )


def feature_shapes(opts: Options) -> dict[str, tuple]:
    spec, grid = opts.spec, opts.spec.grid(opts.image_size)
    shapes = {"pooled": (spec.pooled,)}
    if opts.maps:
        shapes["maps"] = (grid, grid, opts.maps_dim or spec.channels)
    if opts.hog:
        length = opts.hog.length(opts.image_size)
        if length == 0:
            raise ImetError(f"--image-size {opts.image_size} is too small for one HOG block; use --no-hog")
        shapes["hog"] = (opts.hog_dim or length,)
    return shapes


def fit_codecs(full: Dataset, opts: Options, settings: dict, state: dict, device: torch.device,
               workers: int | None) -> dict[str, codec.Codec]:
    """The codecs of --maps-dim, --maps-dtype int8 and --hog-dim, fitted before the first batch on the resize
    views of a seeded sample of the data dir's train images (all of them, featurized or not, so a store of
    some splits or a shard gets the same codec): every map cell of those views, or their HOG vectors."""
    wanted = opts.request().features()
    if not wanted:
        return {}
    train = np.flatnonzero(full.split == "train")
    if not len(train):
        raise ImetError(f"{full.root}: no train images to fit the maps_dim / hog_dim codec on")
    pick = codec.sample_views(train, opts.view_seed)
    n = len(pick)
    views = {"image": pick, "crop": np.zeros(n, bool), "offset": np.zeros((n, 2), np.float32),
             "flip": np.zeros(n, bool), "jitter": np.ones((n, 3), np.float32)}
    paths = [str(full.image_path(i)) for i in range(len(full.ids))]
    rows: dict[str, list[np.ndarray]] = {k: [] for k in wanted}
    for _, values in batch_features(paths, views, batch_ranges(n, opts.batch_size), state, settings, device, workers,
                                    maps="maps" in wanted, hog="hog" in wanted):
        ok = values["status"] == store.DONE
        for key in wanted:
            if key in values:
                rows[key].append(values[key][ok].reshape(-1, values[key].shape[-1]))
    out = {}
    for key, (dim, dtype) in wanted.items():
        if not rows[key]:
            raise ImetError(f"{full.root}: no train image could be decoded to fit the {key} codec")
        out[key] = codec.fit(np.concatenate(rows[key]), dim, dtype, name=f"{key}_dim")
    return out


def train_mean_std(dataset: Dataset, size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the resize views of up to NORM_SAMPLE train images (section 4.2)."""
    train = np.flatnonzero(dataset.split == "train")
    pick = train[np.linspace(0, len(train) - 1, min(NORM_SAMPLE, len(train))).astype(int)]
    total, total_sq, n = np.zeros(3), np.zeros(3), 0
    for i in pick:
        try:
            pixels, _ = render(load_rgb(dataset.image_path(i)), size, False, (0, 0), False, (1, 1, 1))
        except ViewError:
            continue
        x = pixels.reshape(-1, 3) / 255.0
        total, total_sq, n = total + x.sum(0), total_sq + (x * x).sum(0), n + len(x)
    if n == 0:
        raise ImetError(f"{dataset.root}: no train image could be decoded to compute --normalize train")
    mean = total / n
    return mean.tolist(), np.sqrt(np.maximum(total_sq / n - mean * mean, 1e-12)).tolist()


class ViewBatches(torch.utils.data.Dataset):
    """Item k = the k-th batch to do: pixels, boxes, failure reasons and (scikit-image) HOG of its views."""

    def __init__(self, paths: list[str], views: dict[str, np.ndarray], ranges: list[tuple[int, int]],
                 size: int, hog: HogParams | None):
        self.paths, self.views, self.ranges, self.size, self.hog = paths, views, ranges, size, hog
        # the last image decoded (or its ViewError), kept for the next batch: an image's views are consecutive,
        # so the first ones may end a batch and the rest begin the next, which need not decode it again
        self.last: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, k: int) -> dict:
        start, stop = self.ranges[k]
        n, v = stop - start, self.views
        out = {"start": start, "pixels": np.zeros((n, self.size, self.size, 3), np.uint8),
               "box": np.zeros((n, 4), np.float32), "ok": np.zeros(n, bool), "error": [""] * n}
        if self.hog:
            out["hog"] = np.zeros((n, self.hog.length(self.size)), np.float32)
        images: dict[int, object] = dict(self.last)
        i = None
        for j, row in enumerate(range(start, stop)):
            i = int(v["image"][row])
            if i not in images:
                try:
                    images[i] = load_rgb(Path(self.paths[i]))
                except ViewError as e:
                    images[i] = e
            if isinstance(images[i], ViewError):
                out["error"][j] = str(images[i])
                continue
            pixels, box = render(images[i], self.size, v["crop"][row], v["offset"][row], v["flip"][row],
                                 v["jitter"][row])
            out["pixels"][j], out["box"][j], out["ok"][j] = pixels, box, True
            if self.hog:
                out["hog"][j] = hog_view(self.hog, pixels)
        self.last = {i: images[i]} if i is not None else {}
        out["error"] = np.array([e.encode()[:store.ERROR_LEN] for e in out["error"]], dtype=f"S{store.ERROR_LEN}")
        out["pixels"] = torch.from_numpy(out["pixels"])  # a tensor, so that the DataLoader can pin it
        return out


def _worker_init(_: int) -> None:
    die_with_parent()  # a killed featurize must not leave its workers running
    torch.set_num_threads(1)


def batch_ranges(n_views: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n_views)) for s in range(0, n_views, batch_size)]


@dataclass
class Report:
    """What a featurize run did, printed at its end."""

    path: Path
    views: int
    computed: int
    seconds: float
    failed: list[tuple[str, str]]  # (image id, reason), one per failed image

    def __str__(self) -> str:
        size = self.path.stat().st_blocks * 512 if self.path.exists() else 0
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        lines = [f"store {self.path}: {self.views} views, {self.computed} computed this run in {self.seconds:.1f} s "
                 f"({rate:.1f} views/s), {len(self.failed)} image(s) failed, {size / 2**20:.1f} MiB on disk"]
        lines += [f"  failed {image_id}: {reason}" for image_id, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more (see `imet store info`)")
        return "\n".join(lines)


def shard_path(out: Path, index: int, count: int) -> Path:
    """Where shard `index` of `count` lives: next to the output, e.g. store.shard-0-of-4.h5."""
    out = Path(out)
    return out if count == 1 else out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")


def shard_ranges(n_views: int, batch_size: int, index: int, count: int) -> list[tuple[int, int]]:
    """The contiguous run of whole batches that shard `index` of `count` does (none padded or repeated)."""
    ranges = batch_ranges(n_views, batch_size)
    lo, hi = len(ranges) * index // count, len(ranges) * (index + 1) // count
    return ranges[lo:hi]


def _check_same(path: Path, header: dict, requested: dict, plan: store.Plan, shapes: dict) -> None:
    stored = header["settings"]
    stored = {**{k: v for k, v in LEGACY.items() if k not in stored and (k != "hog_impl" or stored.get("hog"))},
              **stored}
    keys = list(requested) + [k for k in CODEC_KEYS if k in stored and k not in requested]
    diff = [k for k in keys if stored.get(k) != requested.get(k)]
    if diff:
        what = "; ".join(f"{k}: {stored.get(k)!r} in the store, {requested.get(k)!r} now" for k in diff)
        raise ImetError(f"{path}: exists with different settings ({what}); use another --out or remove it")
    if header["fingerprint"] != plan.fingerprint(shapes):
        raise ImetError(f"{path}: exists but its images, labels or views differ from the data dir now; "
                        "use another --out or remove it")


def open_or_create(data_dir: Path, path: Path, opts: Options, shard: tuple[int, int] = (0, 1), *,
                   device: torch.device | None = None,
                   workers: int | None = None) -> tuple[store.Plan, dict, Dataset, dict]:
    """The plan of this data dir and options; creates the store (or shard) or checks the existing one.

    A new store with a compact feature gets its codec fitted first (on `device`); an existing one keeps its own.
    """
    full = limit_images(load_dataset(data_dir, min_label_count=opts.min_label_count,
                                     split_seed=opts.split_seed), opts.limit)
    dataset = select_splits(full, opts.splits)
    n_batches = len(batch_ranges(len(dataset.ids) * (1 + N_CROPS), opts.batch_size))
    if shard[1] > n_batches:
        raise ImetError(f"--shard {shard[0]}/{shard[1]}: {data_dir} has only {n_batches} batches of "
                        f"{opts.batch_size} views; use at most {n_batches} shards")
    state, desc = load_weights(opts.weights, opts.seed, opts.backbone, opts.image_size)
    requested = opts.requested(desc)
    shapes = feature_shapes(opts)
    if path.exists():
        header = store.read_header(path)
        plan = make_plan(dataset, opts, header["settings"], header["codecs"])
        _check_same(path, header, requested, plan, shapes)
        ranges = shard_ranges(plan.n_views, opts.batch_size, *shard)
        if header["view_range"] != (ranges[0][0], ranges[-1][1]):
            start, stop = header["view_range"]
            raise ImetError(f"{path}: holds views {start}..{stop} of {plan.n_views}, not the views of "
                            f"{'--shard ' + '/'.join(map(str, shard)) if shard[1] > 1 else 'a whole store'}; "
                            "rerun with the --shard it was made with")
        return plan, state, dataset, shapes
    settings = dict(requested, imet_version=imet.__version__, torch_version=torch.__version__,
                    data_dir=str(Path(data_dir).resolve()))
    if opts.normalize == "train":
        settings["mean"], settings["std"] = train_mean_std(full, opts.image_size)  # train even if not featurized
    else:
        settings["mean"], settings["std"] = list(opts.spec.mean), list(opts.spec.std)
    codecs = fit_codecs(full, opts, settings, state, device or torch.device("cpu"), workers)
    settings.update(codec.codec_settings(codecs))
    plan = make_plan(dataset, opts, settings, codecs)
    ranges = shard_ranges(plan.n_views, opts.batch_size, *shard)
    start = ranges[0][0] if ranges else 0
    store.create(path, plan, shapes, (start, ranges[-1][1] if ranges else start))
    return plan, state, dataset, shapes


def dry_run(data_dir: Path, out: Path, opts: Options) -> str:
    """`featurize --dry-run`: the views and bytes per array a store would take, computing and writing nothing."""
    dataset = select_splits(limit_images(load_dataset(data_dir, min_label_count=opts.min_label_count,
                                                      split_seed=opts.split_seed), opts.limit), opts.splits)
    image = plan_views(dataset, seed=opts.view_seed).image
    n = len(image)
    per_split = "; ".join(f"{name}: {int((dataset.split == name).sum()):,} images, "
                          f"{int((dataset.split[image] == name).sum()):,} views" for name in SPLITS
                          if (dataset.split == name).any())
    lines = [f"{out}: {n:,} views of {len(dataset.ids):,} images ({per_split}) at {opts.image_size} px"]
    arrays = store.array_sizes(feature_shapes(opts), {"maps_dtype": opts.maps_dtype})
    total = 0
    for key, (shape, dtype, size) in arrays.items():
        kind = np.dtype(dtype)
        name = kind.name if kind.kind != "S" else f"S{kind.itemsize}"
        lines.append(f"  {key:<16} {str(shape):<16} {name:<8} {size:>10,} B/view {_gb(size * n):>12}")
        total += size * n
    lines.append(f"  {'total':<60} {_gb(total):>12}")
    per_view = sum(size for _, _, size in arrays.values())
    lines.append(f"  {'at full iMet (' + format(FULL_IMET_VIEWS, ',') + ' views)':<60} "
                 f"{_gb(per_view * FULL_IMET_VIEWS):>12}")
    full = {"maps": opts.spec.channels, "hog": opts.hog.length(opts.image_size) if opts.hog else 0}
    for key, (dim, dtype) in opts.request().features().items():
        lines.append(f"  codec {key}: {f'PCA {full[key]} -> {dim}' if dim else 'no projection'}, stored {dtype}"
                     f"{' with a per-channel scale' if dtype == 'int8' else ''}; fitted before the first batch "
                     f"on the resize views of up to {codec.SAMPLE} train images, kept in the store")
    lines += [_backbone_line(opts), _weights_line(opts), "  every backbone at these settings:",
              *[f"    {line}" for line in _per_backbone(opts)]]
    if Path(out).exists():
        lines.append(f"  {out} exists: featurize would resume it, or refuse it if its settings differ")
    where = next((p for p in (Path(out).resolve(), *Path(out).resolve().parents) if p.is_dir()), None)
    if where is not None:
        lines.append(f"  free on {where}: {_gb(shutil.disk_usage(where).free)}")
    return "\n".join(lines)


_gb = store.human_bytes


def _backbone_line(opts: Options) -> str:
    spec, grid = opts.spec, opts.spec.grid(opts.image_size)
    return (f"  backbone {spec.name}: pooled {spec.pooled} ({POOLED_AS[spec.family]}), maps {grid}x{grid}x"
            f"{spec.channels} ({spec.maps_at}), {spec.params():,} parameters")


def _weights_line(opts: Options) -> str:
    """What --weights would load, the file opened and checked (nothing is downloaded)."""
    if opts.weights == "random":
        return f"  weights random (seed {opts.seed})"
    if opts.weights == "imagenet":
        path = imagenet_file(opts.spec, download=False)
        if not path.is_file():
            return f"  weights imagenet ({opts.spec.imagenet}): not in the torch cache, featurize downloads {path}"
    _, desc = load_weights(opts.weights, opts.seed, opts.backbone, opts.image_size)
    return f"  weights {opts.weights}: a {opts.backbone} state dict, sha256 {desc['sha256']}"


def _per_backbone(opts: Options) -> list[str]:
    """Bytes per view and at full iMet of each backbone's store at these settings (maps_dim where it fits)."""
    out = []
    for name, spec in BACKBONES.items():
        try:
            other = replace(opts, backbone=name, maps_dim=opts.maps_dim and min(opts.maps_dim, spec.channels))
        except ImetError as e:
            out.append(f"{name:<18} not at these settings: {e}")
            continue
        per_view = sum(size for _, _, size in store.array_sizes(feature_shapes(other),
                                                                {"maps_dtype": opts.maps_dtype}).values())
        out.append(f"{name:<18} {per_view:>10,} B/view {_gb(per_view * FULL_IMET_VIEWS):>12} at full iMet")
    return out


def featurize(data_dir: Path, out: Path, opts: Options, *, device: str = "auto", workers: int | None = None,
              shard: tuple[int, int] = (0, 1), progress: bool = True) -> Report:
    """Featurize every view of DATA_DIR into OUT (or shard `shard` of it), resuming an unfinished run."""
    path = shard_path(Path(out), *shard)
    where = pick_device(device, "featurize")  # before anything is written
    check_workers(workers)
    with exclusive(path):
        plan, state, dataset, shapes = open_or_create(Path(data_dir), path, opts, shard, device=where,
                                                      workers=workers)
        t0 = time.monotonic()
        ranges = shard_ranges(plan.n_views, opts.batch_size, *shard)
        computed = _run(path, plan, ranges, state, dataset, where, workers, progress)
    return Report(path, sum(b - a for a, b in ranges), computed, time.monotonic() - t0, failures(path))


def failures(path: Path) -> list[tuple[str, str]]:
    """(image id, reason) of each image whose views failed in the store or shard at `path`."""
    fs = store.FeatureStore(path, allow_incomplete=True)
    start = fs.view_range[0]
    bad = np.flatnonzero(fs.status == store.FAILED)
    errors = fs.array("error")
    seen: dict[str, str] = {}
    for row in bad:
        image_id = str(fs.image_ids[fs.view_image[row + start]])
        seen.setdefault(image_id, errors[row].decode(errors="replace"))
    return list(seen.items())


def _run(path: Path, plan: store.Plan, ranges: list[tuple[int, int]], state: dict, dataset: Dataset,
         device: torch.device, workers: int | None, progress: bool) -> int:
    writer = store.Writer(path)
    status = writer.status()
    todo = [(a, b) for a, b in ranges if (status[a - writer.start:b - writer.start] == store.PENDING).any()]
    if not todo:
        writer.close()
        return 0
    paths = [str(dataset.image_path(i)) for i in range(len(dataset.ids))]
    last_flush = time.monotonic()
    with progress_bar(total=sum(b - a for a, b in todo), desc=f"featurize {path.name}", enabled=progress) as bar:
        for start, values in batch_features(paths, plan.views, todo, state, plan.settings, device, workers,
                                            codecs=plan.codecs):
            writer.write(start, values)
            if time.monotonic() - last_flush > 30:
                writer.flush()
                last_flush = time.monotonic()
            bar.update(len(values["status"]))
    writer.close()
    return sum(b - a for a, b in todo)


def batch_features(paths: list[str], views: dict[str, np.ndarray], ranges: list[tuple[int, int]], state: dict,
                   settings: dict, device: torch.device, workers: int | None, *, maps: bool | None = None,
                   hog: bool = True, codecs: dict[str, codec.Codec] | None = None
                   ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(first view, arrays) of each batch of views in `ranges`, made as `settings` say: box, error, status,
    pooled, and maps and HOG when the settings have them (`maps=False`, `hog=False`: skip them), encoded by
    `codecs` (a compact store's, or a model's) where given.

    The one path from pixels to features: `featurize` writes what it yields, `predict --data` feeds it to a
    head. DataLoader workers decode and cut views (and compute scikit-image HOG); this process runs the
    backbone and torch HOG. On CUDA batch k is handed out while batch k + 1 runs.
    """
    hog_params = HogParams(**settings["hog"]) if settings["hog"] and hog else None
    in_torch = hog_params is not None and settings.get("hog_impl", LEGACY["hog_impl"]) == "torch"
    workers, threads = resources(device, os.cpu_count() or 1, workers,
                                 hog_in_workers=hog_params is not None and not in_torch)
    model = backbones.build_backbone(settings["backbone"], state, settings["image_size"])
    step = Step(model, {**settings, "maps": settings["maps"] if maps is None else maps}, device,
                TorchHog(hog_params) if in_torch else None, codecs)
    loader = torch.utils.data.DataLoader(
        ViewBatches(paths, views, ranges, settings["image_size"], None if in_torch else hog_params), batch_size=None,
        shuffle=False, num_workers=workers, collate_fn=identity, worker_init_fn=_worker_init,
        prefetch_factor=max(2, 8 // workers) if workers else None, pin_memory=device.type == "cuda")
    lag = 1 if device.type == "cuda" else 0
    pending: list[tuple[dict, dict]] = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with kept_heap():  # each batch's activations reuse the last batch's pages (CPU)
            for item in loader:
                with torch.inference_mode():
                    pending.append((item, step(item)))
                while len(pending) > lag:
                    item, out = pending.pop(0)
                    yield int(item["start"]), step.fetch(item, out)
            while pending:
                item, out = pending.pop(0)
                yield int(item["start"]), step.fetch(item, out)
    finally:
        torch.set_num_threads(previous_threads)


def resources(device: torch.device, cores: int, workers: int | None, hog_in_workers: bool) -> tuple[int, int]:
    """(DataLoader workers, intra-op threads of the main process) for this machine.

    On the CPU the backbone takes nearly all the time: with HOG in torch one worker decodes and cuts views
    for it (none on 2 cores or fewer, where that worker's time is taken from the backbone's threads, see
    docs/benchmarks.md), and the backbone and HOG get every core. With scikit-image HOG, one worker does
    the HOG too. On CUDA the CPU's work is decoding: all cores but two decode, the main process keeps
    two. OMP_NUM_THREADS, when set (torchrun sets it per rank), is kept: the bytes depend on it.
    """
    check_workers(workers, cores)
    if device.type == "cuda":
        chosen = max(1, min(16, cores - 2))
        threads = min(2, cores)
    else:
        chosen = 1 if hog_in_workers or cores > 2 else 0
        threads = cores
    if os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
    return (chosen if workers is None else workers), threads


class Step:
    """One batch through the backbone (and HOG in torch) on the device; `fetch` brings it back as numpy."""

    def __init__(self, model: Backbone, settings: dict, device: torch.device, hog: TorchHog | None,
                 codecs: dict[str, codec.Codec] | None = None):
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.encoders = {k: c.encoder(device) for k, c in (codecs or {}).items()}
        self.device, self.hog, self.maps = device, hog, settings["maps"]
        self.amp = settings.get("amp", LEGACY["amp"]) == "bf16"
        self.mean = torch.tensor(settings["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(settings["std"], device=device).view(1, 3, 1, 1)

    def __call__(self, item: dict) -> dict[str, torch.Tensor]:
        """Start the batch's work: features of the decodable views, on the device (asynchronous on CUDA)."""
        ok = item["ok"]
        if not ok.any():
            return {}
        pixels = item["pixels"].to(self.device, non_blocking=True)  # (B, S, S, 3) uint8
        if not ok.all():
            pixels = pixels[torch.from_numpy(ok).to(self.device)]
        out = {}
        x = pixels.permute(0, 3, 1, 2).float().div_(255)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.maps:
                maps, out["pooled"] = self.model(x)
                out["maps"] = maps.permute(0, 2, 3, 1)  # (B, h, w, C)
            else:
                out["pooled"] = self.model.pooled_only(x)
        out["pooled"] = out["pooled"].float()
        if self.maps:  # the codec's one matmul, in float32 outside autocast; else the paper's float16
            out["maps"] = self.encoders["maps"].encode(out["maps"]) if "maps" in self.encoders else out["maps"].half()
        if self.hog:
            out["hog"] = self.hog(pixels)
        elif "hog" in item and "hog" in self.encoders:  # scikit-image HOG from the workers, to be encoded here
            out["hog"] = torch.from_numpy(item["hog"][ok]).to(self.device)
        if "hog" in out and "hog" in self.encoders:
            out["hog"] = self.encoders["hog"].encode(out["hog"])
        if self.device.type == "cuda":  # copies into pinned memory, waited for in fetch
            out = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
            out["ready"] = torch.cuda.Event()
            out["ready"].record()
        return out

    def fetch(self, item: dict, out: dict) -> dict[str, np.ndarray]:
        """The batch's rows for the store: zero features for the views that failed to decode."""
        ok = item["ok"]
        if "ready" in out:
            out.pop("ready").synchronize()
        values = {"box": item["box"], "error": item["error"],
                  "status": np.where(ok, store.DONE, store.FAILED).astype(np.uint8)}
        if "hog" in item and "hog" not in self.encoders:
            values["hog"] = item["hog"]
        for key, tensor in out.items():
            rows = tensor.numpy()
            if ok.all():
                values[key] = rows
            else:
                values[key] = np.zeros((len(ok), *rows.shape[1:]), rows.dtype)
                values[key][ok] = rows
        return values
