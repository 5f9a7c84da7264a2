"""What a fit records as it goes: a metrics log (one row per epoch, CSV or JSON lines, optionally TensorBoard
events) and a checkpoint folder (the last finished epoch's whole training state, so the same command resumes).

The command sets both around a fit with `recording(...)`; the one training loop (`heads/train.train_epochs`)
and lgbm read them through `current()`, so no head passes them along. A fit may run the training loop more
than once (attn_rnn and mldecoder first fit their csra start): each run is a phase, numbered in order, with
its own rows (under its own head name) and its own checkpoint file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imet.errors import ImetError
from imet.files import atomic_path, clean_stale

COLUMNS = ("head", "epoch", "loss", "val_f2", "lr", "seconds", "views_per_s")
METRICS_SUFFIXES = (".csv", ".jsonl")
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "imet-checkpoint", 1
MANIFEST = "checkpoint.json"


def check_metrics_path(path: Path) -> None:
    """Refuse a metrics file whose name says neither format (before any work)."""
    if path.suffix.lower() not in METRICS_SUFFIXES:
        raise ImetError(f"{path}: --metrics writes .csv or .jsonl (JSON lines) files; name it so")


def tensorboard_writer_class():
    """torch's SummaryWriter, or a one-line ImetError when the optional `tensorboard` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImetError("--tensorboard needs the optional tensorboard package (pip install tensorboard), which "
                        "is not installed; --metrics FILE.csv records the same values without it") from None
    return SummaryWriter


class MetricsLog:
    """Rows appended to a .csv or .jsonl file and flushed one by one (a fit killed mid-way leaves the rows of
    the epochs it finished), and to TensorBoard event files when a folder is given.

    `resume`: the epochs done per head in the checkpoint a fit resumes (`Checkpoint.epochs_done`); the file then
    keeps the rows of those epochs only, once each, and the fit's rows follow. An epoch's row is written before
    its checkpoint (a kill between the two runs that epoch again, and it writes its row again), so trimming to
    the checkpoint is what holds each (head, epoch) once wherever the kill fell."""

    def __init__(self, path: Path | None, *, resume: dict[str, int] | None = None, tensorboard: Path | None = None):
        self.path, self.resume = path, resume
        self._file = self._csv = None  # opened at the first row: a fit failing before it leaves an old file as it was
        self._board = None if tensorboard is None else tensorboard_writer_class()(str(tensorboard))
        self._steps: dict[str, int] = {}

    def _open(self) -> None:
        if self.resume is not None:
            keep_checkpointed_rows(self.path, self.resume)
        self._file = open(self.path, "w" if self.resume is None else "a", newline="", encoding="utf-8")
        if self.path.suffix.lower() == ".csv":
            self._csv = csv.DictWriter(self._file, COLUMNS)
            if self._file.tell() == 0:
                self._csv.writeheader()

    def write(self, row: dict) -> None:
        row = {k: _plain(row.get(k)) for k in COLUMNS}
        if self.path is not None:
            if self._file is None:
                self._open()
            if self._csv is not None:
                self._csv.writerow({k: "" if v is None else v for k, v in row.items()})
            else:
                self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._board is not None:
            step = row["epoch"] if row["epoch"] is not None else self._steps.get(row["head"], 0) + 1
            self._steps[row["head"]] = step
            for key in ("loss", "val_f2", "lr", "views_per_s"):
                if row[key] is not None:
                    self._board.add_scalar(f"{row['head']}/{key}", row[key], step)
            self._board.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()


def keep_checkpointed_rows(path: Path, done: dict[str, int]) -> None:
    """Rewrite the metrics file `path` (if there is one) with only its rows of epochs 1..done[head], the first of
    each, in their order and bytes (a row cut short by a kill is of an epoch after the checkpoint's: it goes).
    Replaced whole (atomically): a kill while trimming leaves the old file, trimmed at the next resume."""
    if not path.is_file():
        return
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    header = lines[:1] if path.suffix.lower() == ".csv" else []
    names = next(csv.reader(header), None)
    kept, seen = [], set()
    for line in lines[len(header):]:
        key = _row_key(line, names)
        if key is not None and key not in seen and 1 <= key[1] <= done.get(key[0], 0):
            kept.append(line)
            seen.add(key)
    if len(kept) < len(lines) - len(header):
        with atomic_path(path) as tmp:
            tmp.write_bytes("".join(header + kept).encode("utf-8"))


def _row_key(line: str, names: list[str] | None) -> tuple[str, int] | None:
    """(head, epoch) of a CSV row (its columns named by the header `names`) or a JSON line; None if unreadable."""
    try:
        row = dict(zip(names, next(csv.reader([line])), strict=False)) if names else json.loads(line)
        return row["head"], int(row["epoch"])
    except (ValueError, KeyError, TypeError, StopIteration):
        return None


def _plain(value):
    """A JSON- and CSV-able value: floats rounded to 6 significant digits, NaN as None."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    return value


class Checkpoint:
    """A folder holding what a fit needs to go on after its last finished epoch: a manifest naming the head,
    its parameters and the store (a resume with others is refused, naming the difference), and one file per
    phase (`phase-K.pt`), each replaced atomically after every epoch."""

    def __init__(self, folder: Path, identity: dict):
        self.folder, self.identity = folder, identity

    @classmethod
    def open(cls, folder: Path, *, head: str, params: dict, store: str, create: bool = True) -> Checkpoint:
        """The checkpoint of this fit in `folder` (created if new, unless `create` is false: a torchrun rank but
        the first), refusing one of another fit."""
        identity = {"head": head, "params": json.loads(json.dumps(params)), "store": store}
        manifest = folder / MANIFEST
        if manifest.exists():
            try:
                saved = json.loads(manifest.read_text())
                assert saved["format"] == CHECKPOINT_FORMAT and isinstance(saved["params"], dict)
            except Exception:
                raise ImetError(f"{manifest}: not an imet checkpoint (or a damaged one); give --checkpoint an "
                                "empty or new folder") from None
            if saved.get("version") != CHECKPOINT_VERSION:
                raise ImetError(f"{manifest}: checkpoint version {saved.get('version')} is not this imet's "
                                f"({CHECKPOINT_VERSION}); start over in a new folder")
            diff = _differences(saved, identity)
            if diff:
                raise ImetError(f"{folder}: this checkpoint is of another fit ({'; '.join(diff)}); resume with "
                                "the same options and store, or give --checkpoint a new folder")
        elif create:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **identity},
                                          sort_keys=True, indent=1))
        for name in {p.name[1:].split(".pt.")[0] for p in folder.glob(".phase-*.pt.*")}:
            clean_stale(folder / f"{name}.pt")  # temp files of a run killed while writing its checkpoint
        return cls(folder, identity)

    def has_state(self) -> bool:
        return any(self.folder.glob("phase-*.pt"))

    def epochs_done(self) -> dict[str, int]:
        """The epochs each phase's head has finished here, by head name (what a resumed metrics log keeps)."""
        phases = sorted(int(p.stem.removeprefix("phase-")) for p in self.folder.glob("phase-*.pt"))
        return {saved["head"]: saved["epochs_done"] for saved in map(self.load, phases)}

    def load(self, phase: int) -> dict | None:
        path = self.folder / f"phase-{phase}.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ImetError(f"{path}: damaged checkpoint ({type(e).__name__}); remove it to start this phase "
                            "again") from None

    def save(self, phase: int, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with atomic_path(self.folder / f"phase-{phase}.pt") as tmp:
            tmp.write_bytes(buffer.getbuffer())


def _differences(saved: dict, wanted: dict) -> list[str]:
    out = []
    if saved.get("head") != wanted["head"]:
        out.append(f"head {saved.get('head')} there, {wanted['head']} here")
    if saved.get("store") != wanted["store"]:
        out.append(f"store fingerprint {saved.get('store')} there, {wanted['store']} here")
    old, new = saved["params"], wanted["params"]
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            out.append(f"{k} {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} here")
    return out


@dataclass
class Recorder:
    """The metrics log and checkpoint of the fit in progress (either may be None), whether val is scored every
    epoch (on every torchrun rank alike, though only rank 0 writes the rows) and the phase count."""

    metrics: MetricsLog | None = None
    checkpoint: Checkpoint | None = None
    scores: bool = False
    phases: int = field(default=0)

    def next_phase(self) -> int:
        self.phases += 1
        return self.phases - 1


_CURRENT: ContextVar[Recorder | None] = ContextVar("imet_recorder", default=None)


@contextlib.contextmanager
def recording(metrics: MetricsLog | None = None, checkpoint: Checkpoint | None = None,
              scores: bool | None = None) -> Iterator[Recorder]:
    """Record the fits run inside: their epochs' rows in `metrics`, their state in `checkpoint`; `scores`: score
    val every epoch (default: when there is a metrics log; torchrun ranks that write none say so too)."""
    recorder = Recorder(metrics, checkpoint, metrics is not None if scores is None else scores)
    token = _CURRENT.set(recorder)
    try:
        yield recorder
    finally:
        _CURRENT.reset(token)
        if metrics is not None:
            metrics.close()


def current() -> Recorder:
    """The recorder set by `recording`, or an empty one (nothing recorded)."""
    return _CURRENT.get() or Recorder()
