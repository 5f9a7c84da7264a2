"""`imet explain`: where an attention head (attn_rnn, csra, mldecoder) looked for each predicted label (Figure 4).

One PNG per image: the original image with its true labels, then one panel per predicted label showing
the view that emitted it with the attention weights α of that step laid over it (blue title: a true
label, red: not). The view's pixels are cut again from the data dir with the store's recorded plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # the object API needs no GUI backend
from PIL import Image

from imet.data import image_file
from imet.errors import ImetError
from imet.featurize.views import ViewError, load_rgb, render
from imet.files import atomic_path
from imet.heads import Head
from imet.store import FeatureStore

MAX_PANELS = 8  # predicted labels shown per image
COLS = 4


def data_dir_of(store: FeatureStore, data_dir: Path | None = None) -> Path:
    """The data dir to redraw views from: the one given, else the one the store was featurized from."""
    if data_dir is None:
        data_dir = store.settings.get("data_dir")
        if not data_dir:
            raise ImetError(f"{store.path}: the store does not record its data dir; pass --data DIR")
    path = Path(data_dir)
    if not path.is_dir():
        raise ImetError(f"{path}: data dir not found; pass --data DIR")
    return path


def find_images(store: FeatureStore, ids: list[str]) -> np.ndarray:
    """Store image indices of `ids`, refusing unknown ids (naming them)."""
    position = {image_id: i for i, image_id in enumerate(store.image_ids)}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ImetError(f"{store.path}: no image with id(s) {missing[:5]}")
    return np.array([position[i] for i in ids], dtype=np.int64)


def view_pixels(store: FeatureStore, data_dir: Path, view: int) -> np.ndarray:
    """(S, S, 3) uint8 pixels of a store view, recut from its image in the data dir."""
    plan, image = store.plan_arrays, int(store.view_image[view])
    if not {"crop", "offset", "flip", "jitter"} <= set(plan) or "image_size" not in store.settings:
        raise ImetError(f"{store.path}: the store records no view plan, so its views cannot be redrawn")
    path = image_file(data_dir, str(store.image_ids[image]), str(store.split[image]))
    try:
        img = load_rgb(path)
    except ViewError as e:
        raise ImetError(f"{path}: {e}") from None
    pixels, _ = render(img, store.settings["image_size"], bool(plan["crop"][view]), plan["offset"][view],
                       bool(plan["flip"][view]), plan["jitter"][view])
    return pixels


def write_overlays(store: FeatureStore, head: Head, data_dir: Path | None, image_ids: list[str], out_dir: Path,
                   split: str | None = None) -> list[Path]:
    """One overlay PNG per image id in `out_dir`; returns their paths. `data_dir` None: the store's own."""
    if not hasattr(head, "explain_split"):
        raise ImetError(f"explain needs an attention head: attn_rnn, csra or mldecoder (this is {head.name})")
    data_dir = data_dir_of(store, data_dir)
    images = find_images(store, image_ids)
    unusable = images[~np.isin(images, store.view_image[store.views()])]
    if len(unusable):
        first = int(np.flatnonzero(store.view_image == unusable[0])[0])
        reason = bytes(store.array("error")[first]).decode(errors="replace").rstrip("\0") or "not featurized"
        raise ImetError(f"{store.path}: image {store.image_ids[unusable[0]]} has no usable view ({reason}); "
                        f"{len(unusable)} of the ids given cannot be explained")
    for i in images:  # before any work: every image must still be readable
        path = image_file(data_dir, str(store.image_ids[i]), str(store.split[i]))
        try:
            load_rgb(path)
        except ViewError as e:
            raise ImetError(f"{path}: cannot redraw image {store.image_ids[i]} ({e})") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split_name in np.unique(store.split[images]) if split is None else [split]:
        chosen = images[store.split[images] == split_name]
        decoded, _, labels, records = head.explain_split(store, str(split_name), images=chosen)
        for i in chosen:
            mine = {k: v[records["image"] == i] for k, v in records.items()}
            predicted = labels[np.searchsorted(decoded, i)] if i in decoded else np.zeros(len(store.vocab), bool)
            paths.append(_figure(store, data_dir, int(i), mine, predicted, out_dir))
    return paths


def _figure(store: FeatureStore, data_dir: Path, image: int, records: dict, predicted: np.ndarray,
            out_dir: Path) -> Path:
    names, truth = store.vocab.names, store.targets[image].astype(bool)
    order = np.argsort(records["step"], kind="stable")[:MAX_PANELS]
    n = 1 + len(order)
    rows = -(-n // COLS)
    fig = Figure(figsize=(3.2 * min(n, COLS), 3.6 * rows))
    axes = fig.subplots(rows, min(n, COLS), squeeze=False)
    image_id = str(store.image_ids[image])
    raw = load_rgb(image_file(data_dir, image_id, str(store.split[image])))
    axes[0, 0].imshow(raw)
    axes[0, 0].set_title(f"{image_id}\n" + "\n".join(n for n, t in zip(names, truth, strict=True) if t),
                         fontsize=7, loc="left")
    for k, r in enumerate(order, start=1):
        ax = axes.flat[k]
        pixels = view_pixels(store, data_dir, int(records["view"][r]))
        alpha = records["alpha"][r] / max(float(records["alpha"][r].max()), 1e-12)
        heat = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).resize(pixels.shape[1::-1],
                                                                                  Image.Resampling.BILINEAR)) / 255
        overlay = colormaps["jet"](heat)  # (S, S, 4): opaque where attention is high, clear where it is low
        overlay[..., 3] = 0.7 * heat
        ax.imshow(pixels)
        ax.imshow(overlay)
        label = int(records["label"][r])
        ax.set_title(f"step {int(records['step'][r]) + 1}: {names[label]}", fontsize=8,
                     color="tab:blue" if truth[label] else "tab:red")
    for ax in axes.flat:
        ax.axis("off")
    extra = [names[c] for c in np.flatnonzero(predicted) if c not in set(records["label"][order].tolist())]
    if extra:
        fig.text(0.01, 0.01, "also predicted: " + ", ".join(extra), fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{image_id}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path
