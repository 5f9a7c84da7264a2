"""The bad-input table: every class of bad input or fault, through the real CLI.

Each case asserts the exit code, one error line naming the file and the problem, no traceback, and that
every file present before the command is byte-identical afterwards (and that it left no file behind).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_data_dir, make_store

from imet import files, store
from imet.cli import cli

FEATURIZE = ["--weights", "random", "--image-size", "64", "--batch-size", "8", "--workers", "0", "--quiet"]
SHARD_ARGS = [*FEATURIZE, "--limit", "1", "--no-maps", "--no-hog"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs every case starts from: a data dir, stores, models, probabilities, a submission, a shard."""
    d = tmp_path_factory.mktemp("world")
    make_data_dir(d / "data", n_images=24, n_test=3)
    make_store(d / "store.h5")
    make_store(d / "nan.h5")
    _poke(d / "nan.h5", "features/pooled", 5, np.nan)  # a train view
    _poke(d / "nan.h5", "features/pooled", 16, np.inf)  # a test view
    for argv in ("fit --store {d}/store.h5 --head linear --out {d}/linear.pt --epochs 2",
                 "fit --store {d}/store.h5 --head lgbm --out {d}/lgbm.pt --rounds 2 --min-leaf 2 --min-positives 2",
                 "predict --store {d}/store.h5 --model {d}/linear.pt --split test --out {d}/sub.csv --probs {d}/a.h5",
                 "predict --store {d}/store.h5 --model {d}/lgbm.pt --split test --out {d}/other.csv --probs {d}/b.h5",
                 "featurize {d}/data --out {d}/sh.h5 --shard 0/2 " + " ".join(SHARD_ARGS),
                 "stack {d}/a.h5 {d}/b.h5 --out {d}/stack.json",
                 "fit --store {d}/store.h5 --head linear_hog --out {d}/linear_hog.pt --epochs 2",
                 "fit --store {d}/store.h5 --head csra --out {d}/csra.pt --epochs 1 --workers 0",
                 "store compact {d}/store.h5 --out {d}/compact.h5 --maps-dim 4 --maps-dtype int8"):
        result = CliRunner().invoke(cli, argv.format(d=d).split())
        assert result.exit_code == 0, result.output
    return d


def _poke(path: Path, key: str, row: int, value: float) -> None:
    """Write one value into a per-view array in place, as a damaged disk or a hand-written store would."""
    with h5py.File(path, "r") as f:
        offset, shape, dtype = f[key].id.get_offset(), f[key].shape, f[key].dtype
    m = np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)
    m[row].flat[0] = value
    m.flush()


def _flip(path: Path, key: str, row: int) -> None:
    """Flip the lowest bit of the first byte of one row of a feature array (a finite value stays finite)."""
    with h5py.File(path, "r") as f:
        offset, row_bytes = f[key].id.get_offset(), f[key][0].nbytes
    with open(path, "r+b") as f:
        f.seek(offset + row * row_bytes)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def _replace_dataset(path: Path, key: str, make) -> None:
    """Replace a dataset of an HDF5 file by what `make(f, old_values)` puts at `key`."""
    with h5py.File(path, "a") as f:
        old = f[key][()]
        del f[key]
        make(f, old)


def _virtual_copy(f: h5py.File, old: np.ndarray) -> None:
    f["hidden"] = old
    layout = h5py.VirtualLayout(shape=old.shape, dtype=old.dtype)
    layout[:] = h5py.VirtualSource(f["hidden"])
    f.create_virtual_dataset("features/pooled", layout)


def _flip_bit(path: Path) -> None:
    with h5py.File(path, "r") as f:
        offset = f["features/pooled"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 4 * 16 * 3 + 2)  # a float of view 3
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))


def _edit_h5(path: Path, edit) -> None:
    with h5py.File(path, "a") as f:
        edit(f)


def _attribute(path: Path, name: str):
    with h5py.File(path, "r") as f:
        return f.attrs[name]


def _rewrite_probs(path: Path, **changes) -> None:
    """A probability file written again, as imet writes one, with some of its arrays or attributes changed."""
    from imet.probfiles import write_probs

    with h5py.File(path, "r") as f:
        values = {k: f[k][()] for k in ("ids", "probs", "attribute_ids", "kinds", "targets") if k in f}
        meta = {k: v for k, v in f.attrs.items() if k != "content_sha256"}
    values["ids"] = [x.decode() for x in values["ids"]]
    values["kinds"] = tuple(x.decode() for x in values["kinds"])
    values.update({k: v for k, v in changes.items() if k in values})
    meta.update({k: v for k, v in changes.items() if k not in values})
    write_probs(path, values.pop("ids"), values.pop("probs"), values.pop("attribute_ids"), **values, **meta)


def _edit_blend(d: Path, edit) -> None:
    """d/blend.json (a blend of d's two models) with `edit` applied to its JSON."""
    _blend_without(d, "")
    blob = json.loads((d / "blend.json").read_text())
    edit(blob)
    (d / "blend.json").write_text(json.dumps(blob))


def _pickled_object() -> bytes:
    """A torch file holding a pickled object, not plain tensors (what weights_only refuses)."""
    import io

    buffer = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(1), "extra": Path("/")}, buffer)
    return buffer.getvalue()


def _edit_model(path: Path, edit) -> None:
    blob = torch.load(path, weights_only=True)
    edit(blob)
    torch.save(blob, path)


def fix_tree_sizes(text: str) -> str:
    """LightGBM model text with its tree_sizes recomputed from the trees as they now are (so an edit reaches
    the tree's own fields, as a careful forger's would)."""
    start, end = text.find("\nTree="), text.find("\nend of trees")
    if not 0 <= start < end or "\ntree_sizes=" not in text[:start + 1]:
        return text
    starts = [i + 1 for i in range(start, end) if text.startswith("\nTree=", i)]
    sizes = [len(text[a:b].encode()) for a, b in zip(starts, [*starts[1:], end + 1], strict=True)]
    head = text[:start + 1]
    line = next(x for x in head.split("\n") if x.startswith("tree_sizes="))
    return head.replace(line, "tree_sizes=" + " ".join(map(str, sizes))) + text[start + 1:]


def tamper(text: str, field: str, edit) -> str:
    """Model text with `field` of its first tree that has nodes edited by `edit` (a list of value strings ->
    a list of value strings), tree_sizes fixed."""
    lines = text.split("\n")
    first = next(i for i, x in enumerate(lines) if x.startswith("num_leaves=") and x != "num_leaves=1")
    k = next(i for i in range(first, len(lines)) if lines[i].startswith(field + "="))
    lines[k] = field + "=" + " ".join(edit(lines[k].split("=", 1)[1].split(" ")))
    return fix_tree_sizes("\n".join(lines))


def _tamper_model(d: Path, field: str, edit) -> None:
    _edit_model(d / "lgbm.pt", lambda b: b["learned"]["boosters"].__setitem__(
        0, tamper(b["learned"]["boosters"][0], field, edit)))


def _tamper_stack(d: Path, field: str, edit) -> None:
    blob = json.loads((d / "stack.json").read_text())
    blob["booster"] = tamper(blob["booster"], field, edit)
    (d / "stack.json").write_text(json.dumps(blob))


TAMPERED_TREES = [  # (field, edit, what the error says): the tampered trees that aborted LightGBM (rc 134)
    ("split_feature", lambda v: ["99", *v[1:]], "split_feature 99 is outside the"),
    ("left_child", lambda v: ["0", *v[1:]], "child index 0 is outside the tree"),
    ("threshold", lambda v: ["nan", *v[1:]], "threshold is 'nan"),
    ("leaf_value", lambda v: v[:-1], "leaf_value has"),
]


def _write(path: Path, data: bytes | str, encoding: str = "utf-8") -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode(encoding))


def _blend_without(d: Path, gone: str | None) -> None:
    """A blend of d's two models through their own probability files, then one model removed (or changed)."""
    for model, probs in (("linear", "va.h5"), ("lgbm", "vb.h5")):
        args = f"predict --store {d}/store.h5 --model {d}/{model}.pt --split val --out {d}/x.csv --probs {d}/{probs}"
        assert CliRunner().invoke(cli, args.split()).exit_code == 0
    assert CliRunner().invoke(cli, f"blend fit {d}/va.h5 {d}/vb.h5 --out {d}/blend.json".split()).exit_code == 0
    if gone is None:
        with open(d / "linear.pt", "ab") as f:
            f.write(b"\0")
    elif gone:
        (d / gone).unlink()


def _null_device(path: Path) -> None:
    """A character device like /dev/null (major 1, minor 3), made inside the test's own directory."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")


def _no_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")


LABELS_LATIN1 = "attribute_id,attribute_name\n3,culture::caf\xe9\n7,culture::b\n10,tag::x\n"
# (id, setup(d), argv with {d} for the case's dir, environment, exit code, what the error line must hold)
CASES = [
    # silent wrong results and lost data
    ("fit-diverges", None, "fit --store {d}/store.h5 --head linear --out {d}/linear.pt --lr 1e30 --epochs 4",
     {}, 2, "store.h5: linear: the loss is nan"),
    ("fit-nan-features", None, "fit --store {d}/nan.h5 --head linear --out {d}/linear.pt", {}, 2,
     "nan.h5: features/pooled of view 5 holds NaN"),
    ("fit-lgbm-nan-features", None, "fit --store {d}/nan.h5 --head lgbm --out {d}/lgbm.pt", {}, 2,
     "nan.h5: features/pooled of view 5 holds NaN"),
    ("predict-nan-features", None, "predict --store {d}/nan.h5 --model {d}/linear.pt --split test --out {d}/sub.csv",
     {}, 2, "nan.h5: features/pooled of view 16 holds NaN or inf"),
    ("blend-nan-probs", lambda d: _edit_h5(d / "b.h5", lambda f: f["probs"].__setitem__((0, 0), np.nan)),
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/blend.json", {}, 2, "b.h5: probs holds NaN"),
    ("predict-out-is-store", None, "predict --store {d}/store.h5 --model {d}/linear.pt --out {d}/store.h5", {}, 2,
     "store.h5: --out would overwrite the input --store"),
    ("predict-out-is-model", None, "predict --store {d}/store.h5 --model {d}/linear.pt --out {d}/linear.pt", {}, 2,
     "linear.pt: --out would overwrite the input --model"),
    ("fit-out-is-store", None, "fit --store {d}/store.h5 --head linear --out {d}/store.h5", {}, 2,
     "store.h5: --out would overwrite the input --store"),
    ("blend-out-is-input", None, "blend fit {d}/a.h5 {d}/b.h5 --out {d}/a.h5", {}, 2,
     "a.h5: --out would overwrite the input PROB_FILES"),
    ("blend-out-is-input-by-another-name", None, "blend fit {d}/a.h5 {d}/b.h5 --out {d}/../{n}/b.h5", {}, 2,
     "b.h5: --out would overwrite the input PROB_FILES"),
    ("predict-out-is-probs", None,
     "predict --store {d}/store.h5 --model {d}/linear.pt --split test --out {d}/x --probs {d}/x", {}, 2,
     "x: given as both --out and --probs"),
    ("merge-out-is-shard", None, "store merge {d}/sh.shard-0-of-2.h5 --out {d}/sh.shard-0-of-2.h5", {}, 2,
     "sh.shard-0-of-2.h5: exists"),
    ("report-out-holds-other-files", None, "report --store {d}/store.h5 --model {d}/linear.pt --out {d}/data", {}, 2,
     "data: --out exists and holds files imet did not write"),
    ("report-out-holds-the-store", None, "report --store {d}/store.h5 --model {d}/linear.pt --out {d}", {}, 2,
     "would overwrite the input --store"),
    # every output checked before any work
    ("predict-probs-in-missing-dir", None,
     "predict --store {d}/store.h5 --model {d}/linear.pt --split test --out {d}/sub.csv --probs {d}/no/p.h5", {}, 2,
     "p.h5: --probs: directory"),
    ("featurize-out-in-missing-dir", None, "featurize {d}/data --out {d}/no/s.h5 " + " ".join(FEATURIZE), {}, 2,
     "s.h5: --out: directory"),
    ("fit-out-unwritable", None, "fit --store {d}/store.h5 --head linear --out /proc/imet-model.pt", {}, 2,
     "imet-model.pt: --out: cannot write in directory /proc"),
    ("evaluate-json-is-a-dir", None, "evaluate --store {d}/store.h5 --model {d}/linear.pt --json {d}/data", {}, 2,
     "data' is a directory"),
    ("fit-min-above-max", None, "fit --store {d}/store.h5 --head linear --out {d}/m.pt --min-labels 5 --max-labels 2",
     {}, 2, "--min-labels 5 is more than --max-labels 2"),
    ("blend-min-above-max", None, "blend fit {d}/a.h5 --out {d}/s.json --min-labels 5 --max-labels 2", {}, 2,
     "--min-labels 5 is more than --max-labels 2"),
    ("featurize-cuda-without-gpu", lambda d: _no_cuda(),
     "featurize {d}/data --out {d}/s.h5 --device cuda " + " ".join(FEATURIZE), {}, 2,
     "device cuda: no CUDA device"),
    ("featurize-stray-world-size", None, "featurize {d}/data --out {d}/s.h5 " + " ".join(FEATURIZE),
     {"WORLD_SIZE": "2"}, 2, "WORLD_SIZE=2 is set but RANK"),
    ("featurize-shard-under-torchrun", None, "featurize {d}/data --out {d}/s.h5 --shard 0/2 " + " ".join(FEATURIZE),
     {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}, 2,
     "--shard 0/2 and torchrun (WORLD_SIZE=2) both split the work"),
    ("fit-cuda-without-gpu", lambda d: _no_cuda(), "fit --store {d}/store.h5 --head attn_rnn --out {d}/a.pt "
     "--device cuda", {}, 2, "attn_rnn: device cuda: no CUDA device"),
    ("store-info-bad-schema-version", lambda d: _edit_h5(d / "store.h5", lambda f: f.attrs.__setitem__(
        "schema_version", "one")), "store info {d}/store.h5", {}, 2, "store.h5: store schema version one"),
    ("featurize-unwritable-torch-home", None, "featurize {d}/data --out {d}/s.h5 --weights imagenet --quiet",
     {"TORCH_HOME": "/proc/imet-torch"}, 2, "imet-torch/hub/checkpoints: cannot create the torch cache"),
    ("featurize-more-shards-than-batches", None,
     "featurize {d}/data --out {d}/s.h5 --shard 3/40 " + " ".join(FEATURIZE), {}, 2,
     "--shard 3/40: " + "{d}/data has only 20 batches of 8 views; use at most 20 shards"),
    ("featurize-shard-file-without-shard", None, "featurize {d}/data --out {d}/sh.shard-0-of-2.h5 "
     + " ".join(SHARD_ARGS), {}, 2, "sh.shard-0-of-2.h5: holds views 0..8 of 24, not the views of a whole store"),
    # the data layer
    ("csv-latin-1", lambda d: _write(d / "data/labels.csv", LABELS_LATIN1, "latin-1"), "summary {d}/data", {}, 2,
     "labels.csv, line 2: not UTF-8 text (byte 0xe9)"),
    ("csv-id-beyond-int64", lambda d: _write(d / "data/labels.csv", "attribute_id,attribute_name\n"
                                             "99999999999999999999,tag::x\n"), "summary {d}/data", {}, 2,
     "labels.csv, line 2: attribute_id 99999999999999999999 does not fit a 64-bit integer"),
    ("csv-field-too-long", lambda d: _write(d / "data/train.csv", "id,attribute_ids\na," + "1 " * 70000 + "\n"),
     "summary {d}/data", {}, 2, "train.csv, line 2: not valid CSV (field larger than field limit"),
    ("csv-unreadable", lambda d: ((d / "data/train.csv").unlink(), (d / "data/train.csv").mkdir()),
     "summary {d}/data", {}, 2, "train.csv: file not found"),
    ("data-without-train-dir", lambda d: shutil.rmtree(d / "data/train"), "summary {d}/data", {}, 2,
     "train: image directory not found"),
    ("test-dir-with-a-stray-file", lambda d: ((d / "data/sample_submission.csv").unlink(),
                                              _write(d / "data/test/notes.txt", "hi")),
     "summary {d}/data", {}, 2, "notes.txt: not an image file imet reads"),
    # stores
    ("store-info-missing-dataset", lambda d: _edit_h5(d / "store.h5", lambda f: f.__delitem__("images/split")),
     "store info {d}/store.h5", {}, 2, "store.h5: damaged store: dataset images/split is missing"),
    ("store-verify-missing-datasets", lambda d: _edit_h5(d / "store.h5", lambda f: (
        f.__delitem__("images/split"), f.__delitem__("labels/kind"))),
     "store verify {d}/store.h5", {}, 1, "store.h5: dataset labels/kind is missing"),
    ("store-verify-bad-attribute", lambda d: _edit_h5(d / "store.h5", lambda f: f.attrs.__setitem__(
        "view_range", "all")), "store verify {d}/store.h5", {}, 1, "attribute view_range must be [start, stop]"),
    ("store-verify-flipped-bit", lambda d: _flip_bit(d / "store.h5"), "store verify {d}/store.h5", {}, 1,
     "features of 1 views do not match their checksum (corrupted bytes; views [3])"),
    ("store-verify-nan", None, "store verify {d}/nan.h5", {}, 1,
     "features/pooled: 2 done views hold NaN or inf (first rows [5, 16])"),
    # models and probability files
    ("model-missing-key", lambda d: _edit_model(d / "linear.pt", lambda b: b["learned"].pop("threshold")),
     "predict --store {d}/store.h5 --model {d}/linear.pt --out {d}/sub.csv", {}, 2,
     "linear.pt: damaged imet model file (missing key 'threshold')"),
    ("model-odd-params", lambda d: _edit_model(d / "linear.pt", lambda b: b.update(params=["epochs"])),
     "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2, "linear.pt: damaged imet model file"),
    ("model-nan-weights", lambda d: _edit_model(d / "linear.pt", lambda b: b["state_dict"]["1.weight"].fill_(
        float("nan"))), "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2,
     "linear.pt: linear: learned weights 1.weight hold NaN"),
    ("model-junk-lgbm-text", lambda d: _edit_model(d / "lgbm.pt", lambda b: b["learned"].update(
        boosters=["tree\nnonsense=1\n"] * len(b["learned"]["boosters"]))),
     "evaluate --store {d}/store.h5 --model {d}/lgbm.pt", {}, 2, "lgbm.pt: damaged imet model file"),
    ("model-not-a-model", lambda d: _write(d / "linear.pt", b"\x00" + np.random.default_rng(0).bytes(299)),
     "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2, "linear.pt: not a readable imet model"),
    ("probs-missing-dataset", lambda d: _edit_h5(d / "b.h5", lambda f: f.__delitem__("ids")),
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2, "b.h5: damaged probabilities file (no ids)"),
    ("probs-wrong-shape", lambda d: _edit_h5(d / "b.h5", lambda f: (f.__delitem__("probs"), f.create_dataset(
        "probs", data=np.zeros((2, 2), np.float32)))), "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2,
     "b.h5: probs has shape (2, 2)"),
    ("blend-votes", lambda d: _rewrite_probs(d / "b.h5", head="attn_rnn", probabilistic=False),
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2, "b.h5: holds attn_rnn's 0/1 votes, not probabilities"),
    ("blend-unlabelled", lambda d: _rewrite_probs(d / "a.h5", targets=None),
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2, "a.h5: holds no true labels"),
    ("blend-same-model-twice", None, "blend fit {d}/a.h5 {d}/a.h5 --out {d}/s.json", {}, 2,
     "a.h5: the same model file as another input"),
    ("blend-file-junk", lambda d: _write(d / "j.json", "{junk"), "blend apply --blend {d}/j.json {d}/a.h5 --out "
     "{d}/s.csv", {}, 2, "j.json: not an imet blend file"),
    ("blend-file-as-model-missing-member", lambda d: _blend_without(d, "linear.pt"),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2, "linear.pt: not there"),
    ("blend-file-as-model-changed-member", lambda d: _blend_without(d, None),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2, "changed since the blend was tuned"),
    ("probs-is-a-submission", None, "blend fit {d}/a.h5 {d}/sub.csv --out {d}/s.json", {}, 2,
     "sub.csv: cannot read probabilities"),
    # 1. special files as outputs: written in place (submissions, tables) or refused, never renamed over
    ("fit-out-is-a-fifo", lambda d: os.mkfifo(d / "m.pt"), "fit --store {d}/store.h5 --head linear --out {d}/m.pt",
     {}, 2, "m.pt: --out is not a regular file (a FIFO or a device)"),
    ("fit-out-is-a-device", lambda d: _null_device(d / "m.pt"), "fit --store {d}/store.h5 --head linear --out "
     "{d}/m.pt", {}, 2, "m.pt: --out is not a regular file"),
    ("fit-out-is-a-link-to-a-device", lambda d: (_null_device(d / "null"), os.symlink(d / "null", d / "m.pt")),
     "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2, "m.pt: --out is not a regular file"),
    ("predict-probs-is-a-device", lambda d: _null_device(d / "p.h5"), "predict --store {d}/store.h5 --model "
     "{d}/linear.pt --split test --out {d}/sub.csv --probs {d}/p.h5", {}, 2, "p.h5: --probs is not a regular file"),
    ("fit-out-is-stdout", None, "fit --store {d}/store.h5 --head linear --out -", {}, 2,
     "-: --out is standard output"),
    ("report-out-is-a-fifo", lambda d: os.mkfifo(d / "rep"), "report --store {d}/store.h5 --model {d}/linear.pt "
     "--out {d}/rep", {}, 2, "rep: --out exists and is not a directory"),
    ("predict-data-to-stdout-without-probs", None, "predict --data {d}/data --model {d}/linear.pt --out -", {}, 2,
     "-: predict --data keeps its progress next to --out"),
    # 2. every file an input names is an input: images, CSVs of a data dir
    ("predict-data-out-is-a-test-image", None, "predict --data {d}/data --model {d}/linear.pt --out "
     "{d}/data/test/t00.png", {}, 2, "t00.png: --out would overwrite the input --data"),
    ("featurize-out-is-train-csv", None, "featurize {d}/data --out {d}/data/train.csv " + " ".join(FEATURIZE), {}, 2,
     "train.csv: --out would overwrite the input DATA_DIR"),
    ("explain-out-in-the-images", None, "explain --store {d}/store.h5 --model {d}/linear.pt --data {d}/data --ids i1 "
     "--out {d}/data/train/figs", {}, 2, "figs: --out would overwrite the input --data"),
    ("input-is-a-symlink-loop", lambda d: os.symlink(d / "loop", d / "loop"), "predict --store {d}/loop --model "
     "{d}/linear.pt --out {d}/x.csv", {}, 2, "loop: store not found"),
    ("output-is-a-symlink-loop", lambda d: os.symlink(d / "loop", d / "loop"), "predict --store {d}/store.h5 "
     "--model {d}/linear.pt --split test --out {d}/loop", {}, 2, "loop: cannot be written (Too many levels"),
    # 3. LightGBM model text checked before LightGBM sees it
    *[(f"lgbm-model-tampered-{field}", lambda d, f=field, e=edit: _tamper_model(d, f, e),
       "evaluate --store {d}/store.h5 --model {d}/lgbm.pt", {}, 2,
       "lgbm.pt: damaged imet model file, booster 0: tree 0: " + said) for field, edit, said in TAMPERED_TREES],
    *[(f"stack-file-tampered-{field}", lambda d, f=field, e=edit: _tamper_stack(d, f, e),
       "blend apply --blend {d}/stack.json {d}/a.h5 {d}/b.h5 --out {d}/x.csv", {}, 2,
       "stack.json: damaged stack file, booster: tree ") for field, edit, said in TAMPERED_TREES],
    # 6. bytes that verify sees, now seen by every read: a flipped bit in each feature array, a codec, links
    *[(f"{cmd}-flipped-bit-in-{feature}", lambda d, f=feature, r=row: _flip(d / "store.h5", f"features/{f}", r),
       argv.format(model=model, head=head, more=more), {}, 2, f"store.h5: features/{feature} of view {row} do not "
       "match their checksum")
      for feature, head, model, more in (("pooled", "linear", "linear.pt", "--epochs 1"),
                                         ("hog", "linear_hog", "linear_hog.pt", "--epochs 1"),
                                         ("maps", "csra", "csra.pt", "--epochs 1 --workers 0"))
      for cmd, row, argv in (("fit", 3, "fit --store {{d}}/store.h5 --head {head} --out {{d}}/m.pt {more}"),
                             ("predict", 16, "predict --store {{d}}/store.h5 --model {{d}}/{model} --split test "
                                             "--out {{d}}/sub.csv"),
                             ("evaluate", 12, "evaluate --store {{d}}/store.h5 --model {{d}}/{model}"))],
    ("fit-flipped-bit-read-by-a-worker", lambda d: _flip(d / "store.h5", "features/maps", 3),
     "fit --store {d}/store.h5 --head csra --out {d}/m.pt --epochs 1 --workers 1", {}, 2,
     "store.h5: features/maps of view 3 do not match their checksum"),
    ("fit-codec-scale-zero", lambda d: _edit_h5(d / "compact.h5", lambda f: f["codec/maps/scale"].__setitem__(0, 0)),
     "fit --store {d}/compact.h5 --head csra --out {d}/m.pt --epochs 1 --workers 0", {}, 2,
     "compact.h5: codec/maps holds NaN, inf or a scale that is not positive"),
    ("fit-codec-scale-changed", lambda d: _edit_h5(d / "compact.h5", lambda f: f["codec/maps/scale"].__setitem__(
        0, 2 * f["codec/maps/scale"][0])), "fit --store {d}/compact.h5 --head csra --out {d}/m.pt --epochs 1 "
     "--workers 0", {}, 2, "compact.h5: codec/maps differs from the codec its settings record (maps_codec_sha256)"),
    ("store-verify-codec-scale-zero", lambda d: _edit_h5(d / "compact.h5", lambda f: f["codec/maps/scale"]
                                                         .__setitem__(0, 0)), "store verify {d}/compact.h5", {}, 1,
     "codec/maps holds NaN, inf or a scale that is not positive"),
    ("fit-external-link-as-features", lambda d: _replace_dataset(d / "store.h5", "features/pooled", lambda f, old: (
        f.__setitem__("features/pooled", h5py.ExternalLink(str(d / "nan.h5"), "features/pooled")))),
     "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2,
     "store.h5: damaged store: features/pooled is an external link"),
    ("store-verify-external-link", lambda d: _replace_dataset(d / "store.h5", "features/pooled", lambda f, old: (
        f.__setitem__("features/pooled", h5py.ExternalLink(str(d / "nan.h5"), "features/pooled")))),
     "store verify {d}/store.h5", {}, 1, "features/pooled is an external link"),
    ("predict-virtual-dataset-as-features", lambda d: _replace_dataset(d / "store.h5", "features/pooled",
                                                                       _virtual_copy),
     "predict --store {d}/store.h5 --model {d}/linear.pt --split test --out {d}/sub.csv", {}, 2,
     "store.h5: damaged store: features/pooled is a virtual dataset"),
    ("blend-probs-data-is-an-external-link", lambda d: _replace_dataset(d / "b.h5", "probs", lambda f, old: (
        f.__setitem__("probs", h5py.ExternalLink(str(d / "a.h5"), "probs")))),
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2,
     "b.h5: damaged probabilities file (probs is an external link: its numbers are not in it)"),
    ("blend-apply-probs-claims-another-model", lambda d: _edit_h5(d / "b.h5", lambda f: f.attrs.update(
        model_sha256=_attribute(d / "a.h5", "model_sha256"))),
     "blend apply --blend {d}/stack.json {d}/a.h5 {d}/b.h5 --out {d}/x.csv", {}, 2,
     "b.h5: its numbers or the model it names changed since it was written (content checksum differs)"),
    ("blend-probs-number-edited", lambda d: _edit_h5(d / "b.h5", lambda f: f["probs"].__setitem__((0, 0), 0.5)),
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2, "b.h5: its numbers or the model it names changed"),
    # 4. resource bounds from the machine and the data, refused in one line naming the bound
    ("fit-workers-beyond-the-cores", None, "fit --store {d}/store.h5 --head csra --out {d}/m.pt --workers 100000",
     {}, 2, "csra: --workers must be an integer in 0.."),
    ("featurize-workers-beyond-the-cores", None, "featurize {d}/data --out {d}/s.h5 " + " ".join(FEATURIZE)
     + " --workers 100000", {}, 2, "--workers 100000 is more than"),
    ("predict-data-workers-beyond-the-cores", None, "predict --data {d}/data --model {d}/linear.pt --out {d}/x.csv "
     "--workers 100000", {}, 2, "--workers 100000 is more than"),
    ("fit-beam-beyond-the-labels", None, "fit --store {d}/store.h5 --head attn_rnn --out {d}/m.pt --beam 100000", {},
     2, "attn_rnn: --beam must be an integer in 1..6 (at most the 6 labels), or None"),
    ("fit-steps-beyond-the-labels", None, "fit --store {d}/store.h5 --head attn_rnn --out {d}/m.pt --steps 100000",
     {}, 2, "attn_rnn: --steps must be an integer in 1..6 (at most the 6 labels)"),
    ("fit-lgbm-threads-beyond-the-cores", None, "fit --store {d}/store.h5 --head lgbm --out {d}/m.pt --n-jobs 100000",
     {}, 2, "lgbm: --n-jobs must be an integer in -1.."),
    # 5. decoding values read from files or flags, checked
    ("model-threshold-a-string", lambda d: _edit_model(d / "linear.pt", lambda b: b["learned"].update(threshold="0.3")),
     "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2,
     "linear.pt: damaged imet model file (ValueError: threshold is '0.3', not a finite number)"),
    ("model-threshold-nan", lambda d: _edit_model(d / "linear.pt", lambda b: b["learned"].update(
        threshold=float("nan"))), "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2,
     "linear.pt: damaged imet model file (ValueError: threshold is nan, not a finite number)"),
    ("model-class-thresholds-of-the-wrong-length", lambda d: _edit_model(d / "linear.pt", lambda b: b["learned"].update(
        class_thresholds=[0.1] * 3)), "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2,
     "class_thresholds must be a list of 6 numbers"),
    ("model-min-labels-beyond-the-labels", lambda d: _edit_model(d / "linear.pt", lambda b: b["params"].update(
        min_labels=1000)), "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2,
     "linear.pt: linear: min_labels must be an integer in 0..6 (at most the 6 labels), not 1000"),
    ("model-kind-rule-threshold-a-string", lambda d: _edit_model(d / "linear.pt", lambda b: b["learned"].update(
        kind_rule={"groups": [{"kind": "culture", "threshold": "0.3", "min_labels": 0, "max_labels": None},
                              {"kind": "tag", "threshold": 0.3, "min_labels": 0, "max_labels": None}],
                   "class_thresholds": None})), "evaluate --store {d}/store.h5 --model {d}/linear.pt", {}, 2,
     "group culture: threshold is '0.3', not a finite number"),
    ("blend-weights-all-zero", lambda d: _edit_blend(d, lambda b: [m.update(weight=0) for m in b["members"]]),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2,
     "blend.json: damaged blend file (its weights are all 0"),
    ("blend-weight-a-string", lambda d: _edit_blend(d, lambda b: b["members"][0].update(weight="0.5")),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2, "weight is '0.5', not a finite number"),
    ("blend-v2-without-label-weights", lambda d: _edit_blend(d, lambda b: b.update(version=2)),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2,
     "blend.json: damaged blend file (KeyError: 'label_weights')"),
    ("blend-label-weights-too-few", lambda d: _edit_blend(d, lambda b: [b.update(version=2)] + [
        m.update(label_weights=[0.5] * 5) for m in b["members"]]), "evaluate --store {d}/store.h5 --model "
     "{d}/blend.json", {}, 2, "blend.json: damaged blend file (label weights are 5 per member, not one per label: 6)"),
    ("blend-label-weights-ragged", lambda d: _edit_blend(d, lambda b: [b.update(version=2)] + [
        m.update(label_weights=[0.5] * (5 + k)) for k, m in enumerate(b["members"])]),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2, "blend.json: damaged blend file (ValueError"),
    ("blend-label-weights-negative", lambda d: _edit_blend(d, lambda b: [b.update(version=2)] + [
        m.update(label_weights=[-0.5 if k else 1.5] * 6) for k, m in enumerate(b["members"])]),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2, "member 1: label weight is -0.5, outside [0, inf]"),
    ("blend-label-weights-of-a-label-all-zero", lambda d: _edit_blend(d, lambda b: [b.update(version=2)] + [
        m.update(label_weights=[0.5, 0.5, 0, 0.5, 0.5, 0.5]) for m in b["members"]]),
     "evaluate --store {d}/store.h5 --model {d}/blend.json", {}, 2,
     "blend.json: damaged blend file (every weight of label 5 is 0)"),
    ("blend-fit-weights-unknown", None, "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json --weights local", {}, 2,
     "'local' is not one of 'global', 'per-label'"),
    ("blend-fit-min-positives-zero", None, "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json --weights per-label "
     "--min-positives 0", {}, 2, "0 is not in the range x>=1"),
    ("fit-per-kind-with-max-labels", None, "fit --store {d}/store.h5 --head linear --out {d}/m.pt --thresholds "
     "per-kind --max-labels 3", {}, 2, "linear: --max-labels bounds the global and per-class rules"),
    ("blend-fit-per-kind-with-max-labels", None,
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json --thresholds per-kind --max-labels 3", {}, 2,
     "--max-labels bounds the global and per-class rules"),
    ("fit-min-labels-beyond-the-labels", None, "fit --store {d}/store.h5 --head linear --out {d}/m.pt --min-labels "
     "1000", {}, 2, "linear: --min-labels must be an integer in 0..6 (at most the 6 labels), not 1000"),
    ("blend-fit-min-labels-beyond-the-labels", None, "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json --thresholds global "
     "--min-labels 1000", {}, 2, "blend: --min-labels must be an integer in 0..6 (at most the 6 labels), not 1000"),
    # 7. degenerate inputs: tuning on a split without positives, a second writer of one new store
    ("blend-fit-on-images-without-labels", lambda d: [_rewrite_probs(d / p, targets=np.zeros((8, 6), np.uint8))
                                                      for p in ("a.h5", "b.h5")],
     "blend fit {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2, "a.h5: its 8 images carry no true label"),
    ("stack-on-images-without-labels", lambda d: [_rewrite_probs(d / p, targets=np.zeros((8, 6), np.uint8))
                                                  for p in ("a.h5", "b.h5")],
     "stack {d}/a.h5 {d}/b.h5 --out {d}/s.json", {}, 2, "a.h5: its 8 images carry no true label"),
    ("fit-val-without-labels", lambda d: _edit_h5(d / "store.h5", lambda f: f["images/targets"].write_direct(
        f["images/targets"][()] * (f["images/split"][()] != b"val")[:, None].astype(np.uint8))),
     "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2, "the val images carry no true label"),
    # 8. tracebacks that are one line now
    ("fit-negative-seed", None, "fit --store {d}/store.h5 --head linear --out {d}/m.pt --seed -1", {}, 2,
     "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295"),
    ("featurize-huge-seed", None, "featurize {d}/data --out {d}/s.h5 " + " ".join(FEATURIZE)
     + " --view-seed 99999999999999999999", {}, 2, "99999999999999999999 is not in the range 0<=x<=4294967295"),
    ("fit-weight-decay-beyond-float32", None, "fit --store {d}/store.h5 --head linear --out {d}/m.pt "
     "--weight-decay 1e308", {}, 2, "linear: --weight-decay must be a number >= 0 (and at most float32's largest"),
    ("blend-file-deeply-nested", lambda d: _write(d / "deep.json", "[" * 100000 + "]" * 100000),
     "blend apply --blend {d}/deep.json {d}/a.h5 --out {d}/x.csv", {}, 2, "deep.json: not an imet blend file"),
    ("model-deeply-nested-blend", lambda d: _write(d / "deep.json", '{"a":' * 100000 + "1" + "}" * 100000),
     "evaluate --store {d}/store.h5 --model {d}/deep.json", {}, 2, "deep.json: not an imet blend file"),
    ("store-settings-deeply-nested", lambda d: _edit_h5(d / "store.h5", lambda f: f.attrs.__setitem__(
        "settings", "[" * 100000 + "]" * 100000)), "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2,
     "store.h5: damaged store: attribute settings is not valid JSON (RecursionError"),
    ("predict-data-into-an-unwritable-dir", None, "predict --data {d}/data --model {d}/linear.pt --out "
     "/proc/imet-sub.csv", {}, 2, "imet-sub.csv: --out: cannot write in directory /proc"),
    # 9. messages that name the right thing
    ("predict-data-with-a-stack-of-a-foreign-store", None, "predict --data {d}/data --model {d}/stack.json --out "
     "{d}/x.csv", {}, 2, "stack.json: fitted on a store not made by `imet featurize` (no backbone in its settings)"),
    ("explain-with-a-stack-as-model", None, "explain --store {d}/store.h5 --model {d}/stack.json --ids x --out "
     "{d}/figs", {}, 2, "stack.json: a blend or stack file (JSON), not a model file"),
    ("featurize-weights-with-pickled-objects", lambda d: _write(d / "evil.pth", _pickled_object()),
     "featurize {d}/data --out {d}/s.h5 --weights {d}/evil.pth --image-size 64 --batch-size 8 --workers 0 --quiet",
     {}, 2, "evil.pth: not a state dict of plain tensors (it holds pickled objects, which imet never loads)"),
    # 7. degenerate inputs: fit refuses what verify flags
    ("fit-targets-of-2", lambda d: _edit_h5(d / "store.h5", lambda f: f["images/targets"].__setitem__((0, 0), 2)),
     "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2,
     "store.h5: damaged store: images/targets must be 0/1"),
    ("fit-status-7", lambda d: _edit_h5(d / "store.h5", lambda f: f["views/status"].__setitem__(0, 7)),
     "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2,
     "store.h5: damaged store: views/status has values other than 0"),
    ("fit-split-training", lambda d: _edit_h5(d / "store.h5", lambda f: f["images/split"].__setitem__(0, "training")),
     "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2,
     "store.h5: damaged store: images/split needs one of train"),
    ("fit-fewer-rows-than-views", lambda d: _replace_dataset(d / "store.h5", "features/pooled", lambda f, old: (
        f.__setitem__("features/pooled", old[:-10]))), "fit --store {d}/store.h5 --head linear --out {d}/m.pt", {}, 2,
     "store.h5: damaged store: features/pooled has 70 rows, expected 80"),
    # 7. degenerate inputs
    ("explain-no-ids", None, "explain --store {d}/store.h5 --model {d}/linear.pt --ids , --out {d}/figs", {}, 2,
     "--ids ',': no image id given"),
]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the case's whole world), by relative path; links, FIFOs and
    device nodes by what they are (a link's target, a device's numbers)."""
    out = {}
    for p in sorted(root.rglob("*")):
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            out[str(p.relative_to(root))] = f"link to {os.readlink(p)}"
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            out[str(p.relative_to(root))] = f"{stat.filemode(mode)} {p.lstat().st_rdev}"
        elif stat.S_ISREG(mode):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_refused(result, root: Path, before: dict[str, str], code: int, message: str) -> None:
    """Exit code, one error line holding `message`, no traceback, and nothing changed or left under root."""
    output = result.output
    assert "Traceback" not in output and isinstance(result.exception, SystemExit | type(None)), output
    assert result.exit_code == code, output
    errors = [line for line in output.splitlines() if line.startswith(("Error:", "problem:"))]
    assert errors and any(message in line for line in errors), output
    if code == 2:
        assert len(errors) == 1 and output.strip().endswith(errors[0]), output
    assert snapshot(root) == before


@pytest.mark.parametrize(("setup", "argv", "env", "code", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(world, tmp_path, setup, argv, env, code, message):
    d = tmp_path / "w"
    shutil.copytree(world, d)
    if setup is not None:
        setup(d)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, argv.format(d=d, n="w").split(), env=env)
    check_refused(result, tmp_path, before, code, message.format(d=d))


def test_a_submission_is_written_into_a_fifo_a_device_stdout_or_through_a_link(world, tmp_path, monkeypatch):
    """The same bytes as into a file; the FIFO, the device and the link are still what they were, no temp file is
    left (in the output's directory or in the temp directory), and stdout holds the submission alone."""
    d, scratch = tmp_path / "w", tmp_path / "tmp"
    shutil.copytree(world, d)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    argv = f"predict --store {d}/store.h5 --model {d}/linear.pt --split test --out".split()
    assert CliRunner().invoke(cli, [*argv, str(d / "ref.csv")]).exit_code == 0
    expected = (d / "ref.csv").read_bytes()
    os.mkfifo(d / "fifo")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((d / "fifo").read_bytes()), daemon=True)
    reader.start()
    result = CliRunner().invoke(cli, [*argv, str(d / "fifo")])
    if reader.join(30) or reader.is_alive():
        with open(d / "fifo", "wb"):  # unblock the reader of a run that never wrote
            pass
    assert result.exit_code == 0 and got == [expected], result.output
    _null_device(d / "null")
    assert CliRunner().invoke(cli, [*argv, str(d / "null")]).exit_code == 0
    (d / "real.csv").write_text("old")
    os.symlink(d / "real.csv", d / "link.csv")
    assert CliRunner().invoke(cli, [*argv, str(d / "link.csv")]).exit_code == 0
    assert os.readlink(d / "link.csv") == str(d / "real.csv") and (d / "real.csv").read_bytes() == expected
    result = CliRunner().invoke(cli, [*argv, "-"])
    assert result.exit_code == 0 and result.stdout.encode() == expected and "wrote -" in result.stderr
    assert stat.S_ISFIFO((d / "fifo").lstat().st_mode) and stat.S_ISCHR((d / "null").lstat().st_mode)
    assert (d / "null").lstat().st_rdev == os.makedev(1, 3)
    assert not list(scratch.iterdir()) and not [p for p in d.iterdir() if p.name.endswith(".tmp")]


FUZZ_VALUES = ["-1", "0", "1", "2", "99", "-99", "2147483648", "nan", "inf", "1e999", "", "x", "0.5", "1_0", "--1",
               "9" * 30, "Tree=9", "\x00"]
FUZZ_RUNNER = """
import json, sys
import numpy as np, lightgbm as lgb
from imet.booster_text import check_booster_text
from imet.errors import ImetError
refused = loaded = 0
for text, n in json.load(open(sys.argv[1])):
    try:
        check_booster_text(text, n, "fuzz")
    except ImetError:
        refused += 1
        continue
    lgb.Booster(model_str=text).predict(np.random.default_rng(0).normal(size=(8, n)))  # no abort, hang or error
    loaded += 1
print(refused, loaded)
"""


def single_field_edits(text: str, n: int, seed: int) -> list[str]:
    """n random edits of one value of one key=value line (header or tree) of LightGBM model text: a value
    replaced, dropped, repeated, nudged by 1 or 2, or cut; every other edit keeps tree_sizes right."""
    rng = random.Random(seed)
    lines = text.split("\n")
    fields = [i for i, x in enumerate(lines) if "=" in x]
    out = []
    for k in range(n):
        i = rng.choice(fields)
        key, value = lines[i].split("=", 1)
        items = value.split(" ")
        j, r = rng.randrange(len(items)), rng.random()
        if r < 0.5:
            items[j] = rng.choice(FUZZ_VALUES)
        elif r < 0.6:
            del items[j]
        elif r < 0.7:
            items.insert(j, items[j])
        elif items[j].lstrip("-").isdigit():
            items[j] = str(int(items[j]) + rng.choice((-2, -1, 1, 2)))
        else:
            items[j] = items[j][:rng.randrange(len(items[j]) + 1)]
        edited = "\n".join([*lines[:i], key + "=" + " ".join(items), *lines[i + 1:]])
        out.append(fix_tree_sizes(edited) if k % 2 else edited)
    return out


def test_single_field_edits_of_booster_text_never_abort_lightgbm(world, tmp_path):
    """Random single-field edits of real boosters (an lgbm head's and a stack's), run in a subprocess: each is
    refused by the check or loads and predicts; LightGBM never aborts (rc 134), hangs or raises."""
    blob = torch.load(world / "lgbm.pt", weights_only=True)
    stack = json.loads((world / "stack.json").read_text())
    boosters = [(blob["learned"]["boosters"][0], blob["learned"]["layout"]["pooled"][0]),
                (stack["booster"], 4 * len(stack["members"]) + 2)]
    cases = [(t, n) for k, (text, n) in enumerate(boosters) for t in single_field_edits(text, 200, seed=k)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    run = subprocess.run([sys.executable, "-c", FUZZ_RUNNER, str(tmp_path / "cases.json")], capture_output=True,
                         text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    refused, loaded = map(int, run.stdout.split())
    assert refused + loaded == len(cases) and refused > 100 and loaded > 50  # both sides were exercised


# -- faults ------------------------------------------------------------------------------------------
def test_full_disk_is_found_before_writing(world, tmp_path, monkeypatch):
    """A disk too small for the store: featurize and merge say so before writing a byte (no SIGBUS later)."""
    d = tmp_path / "w"
    shutil.copytree(world, d)
    before = snapshot(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    for argv in (["featurize", str(d / "data"), "--out", str(d / "s.h5"), *FEATURIZE],
                 ["store", "merge", str(d / "store.h5"), "--out", str(d / "merged.h5")]):
        check_refused(CliRunner().invoke(cli, argv), tmp_path, before, 2, "more disk space, only 0.0 MiB free")


def test_no_space_while_writing_changes_no_output(world, tmp_path, monkeypatch):
    """ENOSPC while writing the probabilities: the old submission stays, no temp file is left."""
    d = tmp_path / "w"
    shutil.copytree(world, d)
    before = snapshot(tmp_path)

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("imet.probfiles.write_probs", full)  # what predict --probs writes through
    result = CliRunner().invoke(cli, ["predict", "--store", str(d / "store.h5"), "--model", str(d / "linear.pt"),
                                      "--split", "test", "--out", str(d / "sub.csv"), "--probs", str(d / "p.h5")])
    check_refused(result, tmp_path, before, 2, "No space left on device")


FULL_DISK_RUNNER = """
import json, resource, signal, sys
from click.testing import CliRunner
from imet.cli import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
print(json.dumps([(r.exit_code, r.output) for r in (CliRunner().invoke(cli, a) for a in json.loads(sys.argv[2]))]))
"""


def test_every_write_that_fails_names_the_output_and_leaves_nothing(world, tmp_path):
    """Each kind of output (a model, folds and their out-of-fold file, JSON, PNG, CSV, HDF5) written where every file
    is limited to 100 bytes (a write past it fails, as on a full disk): one line naming the user's output, exit 2,
    no temp file left and every file as it was."""
    d = tmp_path / "w"
    shutil.copytree(world, d)
    commands = {
        "new.pt": f"fit --store {d}/store.h5 --head linear --out {d}/new.pt --epochs 1",
        "f.pt": f"fit --store {d}/store.h5 --head linear --out {d}/f.pt --folds 2 --oof {d}/oof.h5 --epochs 1",
        "blend2.json": f"blend fit {d}/a.h5 {d}/b.h5 --out {d}/blend2.json",
        "stack2.json": f"stack {d}/a.h5 {d}/b.h5 --out {d}/stack2.json",
        "rep": f"report --store {d}/store.h5 --model {d}/linear.pt --out {d}/rep",
        "rows.json": f"evaluate --store {d}/store.h5 --model {d}/linear.pt --json {d}/rows.json",
        "sub2.csv": f"predict --store {d}/store.h5 --model {d}/linear.pt --split test --out {d}/sub2.csv",
        "s2.h5": f"featurize {d}/data --out {d}/s2.h5 " + " ".join(FEATURIZE),
        "c2.h5": f"store compact {d}/store.h5 --out {d}/c2.h5 --maps-dim 4",
    }
    before = snapshot(tmp_path)
    run = subprocess.run([sys.executable, "-c", FULL_DISK_RUNNER, "100", json.dumps([c.split() for c in
                                                                                     commands.values()])],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    for (name, argv), (code, output) in zip(commands.items(), json.loads(run.stdout), strict=True):
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in output, (argv, output)
        assert f"{d / name}" in errors[0] and ("File too large" in errors[0] or "ulimit -f" in errors[0]), output
    assert snapshot(tmp_path) == before


def test_a_failed_report_keeps_the_previous_one(world, tmp_path, monkeypatch):
    d = tmp_path / "w"
    shutil.copytree(world, d)
    argv = ["report", "--store", str(d / "store.h5"), "--model", str(d / "linear.pt"), "--out", str(d / "rep")]
    assert CliRunner().invoke(cli, argv).exit_code == 0
    before = snapshot(tmp_path)

    def broken(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "rep" / "groups_f2.png"))
    monkeypatch.setattr("imet.report._groups_section", broken)
    check_refused(CliRunner().invoke(cli, argv), tmp_path, before, 2, "groups_f2.png: No space left on device")


def test_a_second_featurize_on_the_same_store_is_refused(world, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(world, d)
    with files.exclusive(d / "s.h5"):
        before = snapshot(tmp_path)
        result = CliRunner().invoke(cli, ["featurize", str(d / "data"), "--out", str(d / "s.h5"), *FEATURIZE])
        check_refused(result, tmp_path, before, 2, "s.h5: is being written by imet pid")


def test_a_second_compact_or_merge_into_the_same_new_store_is_refused(world, tmp_path):
    """Two `store compact` (or merge) runs to one new --out both succeeded, the later replacing the earlier."""
    d = tmp_path / "w"
    shutil.copytree(world, d)
    other = CliRunner().invoke(cli, ["featurize", str(d / "data"), "--out", str(d / "sh.h5"), "--shard", "1/2",
                                     *SHARD_ARGS])
    assert other.exit_code == 0, other.output
    for argv in (["store", "compact", str(d / "store.h5"), "--out", str(d / "c.h5"), "--maps-dim", "4"],
                 ["store", "merge", str(d / "sh.shard-0-of-2.h5"), str(d / "sh.shard-1-of-2.h5"), "--out",
                  str(d / "c.h5")]):
        with files.exclusive(d / "c.h5"):
            before = snapshot(tmp_path)
            check_refused(CliRunner().invoke(cli, argv), tmp_path, before, 2, "c.h5: is being written by imet pid")


def test_blend_weights_are_normalised_as_the_format_says(world, tmp_path):
    """Weights 5 and 5 (a hand edit) blend as 0.5 and 0.5: they were used raw (12 labels an image, F2 0.56); so
    do weights per label."""
    d = tmp_path / "w"
    shutil.copytree(world, d)
    _blend_without(d, "")
    argv = f"evaluate --store {d}/store.h5 --model {d}/blend.json --split test --json {d}/rows.json".split()
    assert CliRunner().invoke(cli, argv).exit_code == 0
    expected = json.loads((d / "rows.json").read_text())
    blob = json.loads((d / "blend.json").read_text())
    for m in blob["members"]:
        m["weight"] *= 10
    (d / "blend.json").write_text(json.dumps(blob))
    assert CliRunner().invoke(cli, argv).exit_code == 0
    assert json.loads((d / "rows.json").read_text()) == expected
    blob["version"] = 2  # weights per label, each label's scaled by its own factor: the same blend
    for m in blob["members"]:
        m["label_weights"] = [m["weight"] * (1 + c) for c in range(6)]
    (d / "blend.json").write_text(json.dumps(blob))
    assert CliRunner().invoke(cli, argv).exit_code == 0
    assert json.loads((d / "rows.json").read_text()) == expected


def test_a_report_is_drawn_whatever_mplbackend_says(world, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(world, d)
    result = CliRunner().invoke(cli, f"report --store {d}/store.h5 --model {d}/linear.pt --out {d}/rep".split(),
                                env={"MPLBACKEND": "bogus"})
    assert result.exit_code == 0 and (d / "rep" / "index.html").is_file(), result.output


def test_temp_files_of_killed_runs_are_cleaned(world, tmp_path):
    """A temp file whose writer died (kill -9) is removed by the next write of the same output."""
    d = tmp_path / "w"
    shutil.copytree(world, d)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = d / f".sub.csv.{files._HOST}-{dead.pid}.0123456789ab.tmp"
    stale.write_text("half a submission")
    alive = files.temp_name(d / "sub.csv")  # this process is alive: its temp file is kept
    alive.write_text("being written")
    result = CliRunner().invoke(cli, ["predict", "--store", str(d / "store.h5"), "--model", str(d / "linear.pt"),
                                      "--split", "test", "--out", str(d / "sub.csv")])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and alive.exists()


def _children(pid: int) -> list[int]:
    """Live child processes of pid (from /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = proc.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(proc.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_killed_featurize_leaves_no_worker_and_resumes(world, tmp_path):
    """kill -9 mid-run: its DataLoader worker dies with it; the rerun finishes the same store."""
    out = tmp_path / "s.h5"
    cmd = [sys.executable, "-m", "imet", "featurize", str(world / "data"), "--out", str(out), "--weights", "random",
           "--image-size", "64", "--batch-size", "4", "--workers", "1", "--limit", "1", "--quiet"]
    log = open(tmp_path.parent / "killed.log", "w")  # not a pipe: a surviving worker would hold it open
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if workers and out.exists() and (store.FeatureStore(out, allow_incomplete=True).status != 0).any():
            break
        time.sleep(0.05)
    assert workers, "no worker seen before the run ended"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, "a DataLoader worker outlived its killed featurize"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert store.verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no lock or temp file left


# -- odd inputs that have a right answer ------------------------------------------------------------
def test_odd_test_file_names_are_picked_up_without_a_sample_submission(tmp_path):
    from imet.data import load_dataset

    d = make_data_dir(tmp_path / "data", n_images=24, n_test=1)
    (d / "sample_submission.csv").unlink()
    for name in ("odd name.png", "x(1).png", "y.webp", "z.tif"):
        shutil.copy(d / "test" / "t00.png", d / "test" / name)
    (d / "test" / ".DS_Store").write_text("")
    ds = load_dataset(d)
    ids = [i for i, s in zip(ds.ids, ds.split, strict=True) if s == "kaggle-test"]
    assert ids == ["odd name", "t00", "x(1)", "y", "z"]


def test_csv_with_a_bom_or_in_utf16_reads_the_same(tmp_path):
    from imet.data import load_dataset

    d = make_data_dir(tmp_path / "data", n_images=24, n_test=2)
    plain = load_dataset(d)
    labels, train = (d / "labels.csv").read_text(), (d / "train.csv").read_text()
    (d / "labels.csv").write_bytes(b"\xef\xbb\xbf" + labels.encode())
    (d / "train.csv").write_text(train, encoding="utf-16")
    again = load_dataset(d)
    assert again.ids == plain.ids and np.array_equal(again.targets, plain.targets)


def test_explain_of_a_deleted_image_gives_one_line(tiny_store, data_dir, tmp_path):
    """The image was removed after featurizing: explain says which file, before drawing anything."""
    d = tmp_path / "w"
    shutil.copytree(data_dir, d / "data")
    model = d / "attn.pt"
    result = CliRunner().invoke(cli, ["fit", "--store", str(tiny_store), "--head", "attn_rnn", "--out", str(model),
                                      "--epochs", "1", "--hidden", "8", "--attention-dim", "8", "--pred-dim", "8",
                                      "--beam", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    (d / "data" / "test" / "t01.png").unlink()
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["explain", "--store", str(tiny_store), "--model", str(model), "--data",
                                      str(d / "data"), "--ids", "t00,t01", "--out", str(d / "figs")])
    check_refused(result, tmp_path, before, 2, "test/t01.png: cannot redraw image t01 (missing file t01.png)")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_readers_refuse_non_finite_float16_maps(tmp_path, value):
    path = make_store(tmp_path / "s.h5")
    fs = store.FeatureStore(path)
    assert fs.read("maps", [1, 7]).shape[0] == 2  # finite, large and negative float16 values pass
    _poke(path, "features/maps", 7, value)
    with pytest.raises(store.ImetError, match=r"s.h5: features/maps of view 7 holds NaN or inf \(1 of the 2"):
        store.FeatureStore(path).read("maps", [1, 7])


def test_output_directories_are_created_with_their_parents(tmp_path):
    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "new" / "deeper" / "data"), "--images", "10"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "deeper" / "data" / "train.csv").is_file()


def test_row_checksums_equal_a_slow_reference_and_see_every_flipped_bit():
    rng = np.random.default_rng(0)
    for rows in (rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(2, 3, 2, 7)).astype(np.float16),
                 rng.integers(-128, 128, (4, 9), dtype=np.int8)):
        def slow(row: np.ndarray) -> int:
            data = row.tobytes() + b"\0" * (-row.nbytes % 8)
            return sum(int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)) % 2**64
        assert store.row_checksums(rows).tolist() == [slow(r) for r in rows]
        assert store.row_checksums(rows[:0]).shape == (0,)
        flat = rows.reshape(len(rows), -1).view(np.uint8)
        for byte in range(flat.shape[1]):
            for bit in range(8):
                flipped = flat.copy()
                flipped[1, byte] ^= 1 << bit
                assert store.row_checksums(flipped.view(rows.dtype).reshape(rows.shape))[1] != slow(rows[1])


def test_a_store_with_one_legacy_checksum_per_view_is_checked_on_read(tmp_path):
    """Stores written before per-feature checksums hold one crc32 over all features of a view: each view read is
    checked once per process, all its features read for that."""
    path = make_store(tmp_path / "s.h5")
    fs = store.FeatureStore(path)
    legacy = [store.view_checksum({k: fs.array(k) for k in fs.features}, r) for r in range(len(fs.status))]
    with h5py.File(path, "a") as f:
        for key in store.CHECKSUMS.values():
            del f[f"views/{key}"]
        f["views/checksum"] = np.array(legacy, np.uint32)
    assert store.verify(path) == [] and store.FeatureStore(path).read("pooled", [3, 4]).shape == (2, 16)
    _flip(path, "features/hog", 4)
    with pytest.raises(store.ImetError, match=r"features/pooled of view 4 do not match their checksum"):
        store.FeatureStore(path).read("pooled", [3, 4])
    assert "views [4]" in store.verify(path)[0]


@pytest.mark.parametrize(("change", "said"), [
    ({"culture_only": np.zeros(5, bool)}, "views/culture_only has 5 rows, expected 20"),
    ({"status": np.ones(5, np.uint8)}, "views/status has 5 rows, expected 20"),
    ({"status": np.full(20, 7, np.uint8)}, "views/status has values other than"),
    ({"image_ids": ["a"] * 20}, "images/id has duplicates"),
])
def test_an_array_store_whose_rows_disagree_is_refused_as_a_store_file_is(change, said):
    rng = np.random.default_rng(0)
    arrays = {"pooled": rng.normal(size=(20, 4)).astype(np.float32), "targets": np.eye(20, 3, dtype=np.uint8),
              "split": ["train"] * 12 + ["val"] * 4 + ["test"] * 4}
    with pytest.raises(store.ImetError, match=said):  # an IndexError or a broadcast error inside fit before
        store.ArrayStore(**arrays, **change)
