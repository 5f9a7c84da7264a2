"""`imet predict --data`: from test images to a submission with no store — views, backbone, head, CSV.

Views are cut and run through the backbone by the featurizer's own code (`batch_features`), in the fixed
batches a store of the kaggle-test split would hold, with the settings recorded in the model, so the
features and the submission are those of featurize-then-predict. Every CHUNK_VIEWS views, the finished
images go to the head as an `ArrayStore` (every head, attn_rnn included, predicts as from a store). Their
probabilities and labels are written in place into a progress file (the `--probs` file once complete)
through np.memmap, status last, so a killed run resumes where it stopped. Memory holds about one chunk of
views whatever the number of images; no map reaches the disk.

A blend or stack file predicts the same way: its members, fitted on one store's features, read the features of
one pass over the images (`shared_features`), each member predicts each chunk and the blend combines them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from imet import store
from imet.blend import Blend
from imet.data import Dataset, input_paths, plan_views, read_test_ids
from imet.decode.submission import write_submission
from imet.errors import ImetError
from imet.featurize.backbone import load_weights
from imet.featurize.options import BACKBONES
from imet.featurize.pipeline import batch_features, batch_ranges
from imet.files import IN_PLACE, atomic_path, check_free_space, check_paths, target
from imet.heads import Head
from imet.loader import Predictor
from imet.models import open_model
from imet.probfiles import content_sha256, probs_meta
from imet.progress import progress as progress_bar
from imet.runtime import check_workers, pick_device

CHUNK_VIEWS = 128  # views handed to the head at once (at 224 px: 103 MB of float16 maps)
PENDING, DONE, NO_VIEW = 0, 1, 2  # per image in the progress file


def predict_images(data_dir: Path, model_path: Path, out: Path, *, weights: Path | None = None,
                   probs_path: Path | None = None, device: str = "auto", workers: int | None = None,
                   progress: bool = True) -> dict:
    """Write the submission of the test images of DATA_DIR (sample_submission.csv order) from a model file alone
    (a head, the fold models of fit --folds, or a blend or stack of models fitted on one store's features).

    Returns what was written: out, images, data_dir, computed (images predicted by this run, the others
    by an interrupted earlier one), no_view (images written with no labels) and probs (path or None).
    """
    data_dir, model_path, out = Path(data_dir), Path(model_path), Path(out)
    check_paths({"--model": model_path, "--weights": weights, "--data": input_paths(data_dir)},
                {"--out": out, "--probs": probs_path}, streams=("--out",))
    check_workers(workers)
    if target(out)[0] == IN_PLACE and probs_path is None:
        raise ImetError(f"{out}: predict --data keeps its progress next to --out, which is a stream here; give "
                        "--probs P.h5 (the progress is kept next to it) or a file as --out")
    model = open_model(model_path)
    features = shared_features(model, model_path)
    settings = features.settings
    if not data_dir.is_dir():
        raise ImetError(f"{data_dir}: data dir not found")
    ids = read_test_ids(data_dir)
    if not ids:
        raise ImetError(f"{data_dir}: no test images (no sample_submission.csv and no images in test/)")
    state = backbone_state(settings, weights, model_path)
    device = pick_device(device, "predict")  # before the progress file: a refused device leaves nothing
    dataset = Dataset(data_dir, model.vocab_, ids, np.full(len(ids), "kaggle-test", dtype=object),
                      np.zeros((len(ids), len(model.vocab_)), np.uint8), 0, 0)
    plan = plan_views(dataset, seed=settings["view_seed"])
    partial = progress_path(out, probs_path)
    meta = {**probs_meta(model, model_path), "split": "kaggle-test"}
    arrays = open_progress(partial, ids, model.vocab_.attribute_ids, meta)
    todo = np.flatnonzero(arrays["status"] == PENDING)
    if len(todo):
        first = int(np.searchsorted(plan.image, todo[0]))  # views are grouped by image, in image order
        ranges = [r for r in batch_ranges(len(plan), settings.get("batch_size", 32)) if r[1] > first]
        with progress_bar(total=ranges[-1][1] - ranges[0][0], desc=f"predict {data_dir.name}",
                          enabled=progress) as bar:
            _stream(model, features, dataset, plan, ranges, state, device, workers, arrays, bar)
    status = np.array(arrays["status"])
    write_submission(out, ids, arrays["labels"], model.vocab_.attribute_ids)
    if probs_path is not None:
        seal(partial, {"ids": ids, "probs": arrays["probs"], "attribute_ids": model.vocab_.attribute_ids,
                       "status": status}, meta)
    arrays.clear()
    if probs_path is not None:
        os.replace(partial, probs_path)
    else:
        partial.unlink()
    return {"out": out, "images": len(ids), "data_dir": data_dir, "computed": len(todo),
            "no_view": int((status == NO_VIEW).sum()), "probs": probs_path}


@dataclass(frozen=True)
class Features:
    """The features a model file's heads read, made one way for all of them: the settings of the store they were
    fitted on (backbone, weights, views, HOG), the features read and their codecs."""

    settings: dict
    keys: frozenset[str]
    codecs: dict


def shared_features(model: Predictor, model_path: Path) -> Features:
    """The one featurization every head of `model` (itself, or a blend's or stack's members) reads. Members
    fitted on stores whose features differ are refused: one pass over the images cannot serve them."""
    heads = model.heads if isinstance(model, Blend) else [model]
    settings, keys = heads[0].store_settings_, frozenset().union(*(h.layout_ for h in heads))
    for head in heads:
        check_codecs(head, model_path)
        diff = store.identity_diff(head.store_settings_, settings, tuple(keys))
        if diff:
            raise ImetError(f"{model_path}: its members were fitted on stores of other features (they differ in "
                            f"{', '.join(diff)}), which one pass over the images cannot make; run predict --data with "
                            "each member's model file and --probs, then imet blend apply")
    return Features(settings, keys, {k: c for head in heads for k, c in head.codecs_.items()})


def backbone_state(settings: dict, weights: Path | None, model_path: Path) -> dict:
    """The weights of the backbone the model's store was made with; a given file must have their sha256."""
    desc, name, size = settings.get("weights"), settings.get("backbone"), settings.get("image_size")
    if name not in BACKBONES or not isinstance(desc, dict):
        raise ImetError(f"{model_path}: fitted on a store not made by `imet featurize` (no backbone in its "
                        "settings); predict from a store of that kind of features with --store")
    if weights is not None:
        if not Path(weights).is_file():
            raise ImetError(f"{weights}: weights file not found")
        state, got = load_weights(str(weights), backbone=name, image_size=size)
    elif desc.get("weights") == "random":
        return load_weights("random", desc["seed"], name, size)[0]
    elif desc.get("weights") == "imagenet":
        state, got = load_weights("imagenet", backbone=name, image_size=size)
    else:
        raise ImetError(f"{model_path}: its store was featurized with a {name} weights file (sha256 "
                        f"{desc.get('sha256', '?')[:16]}...); pass that file with --weights PATH")
    if got.get("sha256") != desc.get("sha256"):
        raise ImetError(f"{weights or 'imagenet'}: weights sha256 {got['sha256'][:16]}... differ from those the "
                        f"model's store was made with ({str(desc.get('sha256', desc))[:16]}...)")
    return state


def check_codecs(head: Head, model_path: Path) -> None:
    """A model fitted on compact features carries their codec; refuse one whose codec is missing or another."""
    for key in head.layout_:
        sha = head.store_settings_.get(f"{key}_codec_sha256")
        codec = head.codecs_.get(key)
        if sha is not None and (codec is None or codec.sha256() != sha):
            held = "holds no" if codec is None else "holds another"
            raise ImetError(f"{model_path}: fitted on compact {key} but {held} codec for them; refit it with this "
                            "imet to predict from images")


def progress_path(out: Path, probs_path: Path | None) -> Path:
    """Where an unfinished run keeps its per-image results: next to --probs, else next to --out."""
    if probs_path is not None:
        return Path(probs_path).with_name(Path(probs_path).name + ".partial")
    return out.with_name(out.name + ".partial.h5")


def open_progress(path: Path, ids: list[str], attribute_ids: np.ndarray, meta: dict) -> dict[str, np.memmap]:
    """The progress file's probs (N, C), labels (N, C) and status (N,) as writable memmaps; created (all
    pending) when missing, else checked to be this run's (same model, images and labels)."""
    n, c = len(ids), len(attribute_ids)
    if not path.exists():
        check_free_space(path, n * c * 5 + n * (len(max(ids, key=len)) + 17), new_file=True)
        with atomic_path(path) as tmp, h5py.File(tmp, "w", libver="latest") as f:  # whole, or not at all
            f.attrs.update(format="imet-probs", **meta)
            f.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
            f["attribute_ids"] = np.asarray(attribute_ids, np.int64)
            for name, shape, dtype in (("probs", (n, c), np.float32), ("labels", (n, c), np.uint8),
                                       ("status", (n,), np.uint8)):
                store.contiguous(f, name, shape, dtype)
    try:
        with h5py.File(path, "r") as f:
            same = (f.attrs.get("model_sha256") == meta["model_sha256"] and len(f["ids"]) == n
                    and [s.decode() for s in f["ids"][()]] == list(ids)
                    and np.array_equal(f["attribute_ids"][()], attribute_ids))
            specs = {k: (f[k].id.get_offset(), f[k].shape, f[k].dtype) for k in ("probs", "labels", "status")}
    except (OSError, KeyError) as e:
        raise ImetError(f"{path}: unreadable progress file of an earlier run ({e}); remove it") from None
    if not same:
        raise ImetError(f"{path}: left by a run with another model or other test images; remove it to start over")
    return {k: np.memmap(path, dtype=d, mode="r+", offset=o, shape=s) for k, (o, s, d) in specs.items()}


def seal(path: Path, arrays: dict, meta: dict) -> None:
    """Record the finished progress file's content checksum, making it a probability file (`read_probs`)."""
    with h5py.File(path, "a") as f:
        f.attrs["content_sha256"] = content_sha256(arrays, meta)


def _stream(model: Predictor, features: Features, dataset: Dataset, plan, ranges: list[tuple[int, int]], state: dict,
            device, workers, arrays: dict[str, np.memmap], bar) -> None:
    paths = [str(dataset.image_path(i)) for i in range(len(dataset.ids))]
    views = {"image": plan.image, "crop": plan.crop, "offset": plan.offset, "flip": plan.flip,
             "jitter": plan.jitter}
    buffer: list[tuple[int, dict]] = []
    for start, values in batch_features(paths, views, ranges, state, features.settings, device, workers,
                                        maps="maps" in features.keys, hog="hog" in features.keys,
                                        codecs=features.codecs):
        buffer.append((start, values))
        if sum(len(v["status"]) for _, v in buffer) >= CHUNK_VIEWS:
            buffer = _flush(model, features, dataset, plan.image, buffer, arrays, final=False)
        bar.update(len(values["status"]))
    _flush(model, features, dataset, plan.image, buffer, arrays, final=True)


def _flush(model: Predictor, features: Features, dataset: Dataset, image: np.ndarray, buffer: list[tuple[int, dict]],
           arrays: dict[str, np.memmap], final: bool) -> list[tuple[int, dict]]:
    """Predict the images whose views are all in `buffer`; return the views of the unfinished last one."""
    if not buffer:
        return []
    lo = buffer[0][0]
    hi = lo + sum(len(v["status"]) for _, v in buffer)
    cut = hi if final or hi == len(image) else max(lo, int(np.searchsorted(image, image[hi])))  # image boundary
    rows = _concat(buffer)
    buffer.clear()  # the batches' own arrays go now: one copy of the chunk in memory
    first = int(image[lo]) if lo == 0 or image[lo - 1] != image[lo] else int(image[lo]) + 1  # whole images only
    v0 = int(np.searchsorted(image, first))
    if cut > v0:
        chunk = {k: a[v0 - lo:cut - lo] for k, a in rows.items()}
        _predict_chunk(model, features, dataset, image, v0, cut, chunk, arrays)
    return [(cut, {k: a[cut - lo:].copy() for k, a in rows.items()})] if cut < hi else []  # not a view of rows


def _concat(buffer: list[tuple[int, dict]]) -> dict[str, np.ndarray]:
    """The buffer's arrays end to end; a batch whose views all failed has no features: zero rows for it."""
    keys = [k for k in store.FEATURES if any(k in v for _, v in buffer)]
    out = {"status": np.concatenate([v["status"] for _, v in buffer])}
    for key in keys:
        like = next(v[key] for _, v in buffer if key in v)
        out[key] = np.concatenate([v[key] if key in v else np.zeros((len(v["status"]), *like.shape[1:]), like.dtype)
                                   for _, v in buffer])
    return out


def _predict_chunk(model: Predictor, features: Features, dataset: Dataset, image: np.ndarray, v0: int, v1: int,
                   rows: dict[str, np.ndarray], arrays: dict[str, np.memmap]) -> None:
    """The model's predictions for the images of views v0..v1, written into the progress file (status last)."""
    i0, i1 = int(image[v0]), int(image[v1 - 1]) + 1
    status = np.full(i1 - i0, NO_VIEW, np.uint8)
    if (rows["status"] == store.DONE).any():
        mem = store.ArrayStore(**{k: a for k, a in rows.items() if k != "status"}, status=rows["status"],
                               view_image=image[v0:v1] - i0, vocab=model.vocab_, image_ids=dataset.ids[i0:i1],
                               settings=features.settings, name=str(dataset.root), codecs=features.codecs)
        images, probs, labels = model.predict_labels(mem, "kaggle-test")
        arrays["probs"][i0 + images] = probs
        arrays["labels"][i0 + images] = labels
        arrays["probs"].flush()
        arrays["labels"].flush()
        status[images] = DONE
    arrays["status"][i0:i1] = status
    arrays["status"].flush()
