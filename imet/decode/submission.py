"""Kaggle submission CSV: ``id,attribute_ids`` with the original attribute ids, space-separated, ascending.

Writing is atomic (temp file in the same directory, fsync, ``os.replace``): a crash leaves either the
old file or the complete new one, never half a CSV.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from imet.errors import ImetError, where
from imet.files import atomic_path

HEADER = ["id", "attribute_ids"]
_SHOW = 5  # ids named in an error message


def write_submission(
    path: str | os.PathLike,
    image_ids: list[str],
    labels: np.ndarray,
    attribute_ids: np.ndarray,
    *,
    order: list[str] | None = None,
    step: int = 4096,
) -> None:
    """Write predicted label sets (N, C 0/1) as a Kaggle CSV, rows in ``order`` when given.

    Dense label c is written as ``attribute_ids[c]``. With ``order`` (the sample submission's ids) the
    ids must match one to one, so a submission never silently misses or repeats an image. ``labels`` may be
    a memory map: it is read ``step`` rows at a time.
    """
    image_ids = list(image_ids)
    if not isinstance(labels, np.ndarray):  # np.memmap is one: read in steps below, never whole
        labels = np.asarray(labels, dtype=bool)
    attribute_ids = np.asarray(attribute_ids)
    if labels.shape != (len(image_ids), attribute_ids.size):
        raise ValueError(
            f"labels has shape {labels.shape}, expected ({len(image_ids)} ids, {attribute_ids.size} labels)"
        )
    if np.unique(attribute_ids).size != attribute_ids.size:
        raise ValueError("attribute_ids holds duplicates: dense labels must map to distinct ids")
    _refuse_duplicates(path, image_ids, "image ids")
    chunks = (zip(image_ids[lo:lo + step], _label_fields(np.asarray(labels[lo:lo + step]).astype(bool), attribute_ids),
                  strict=True) for lo in range(0, len(image_ids), step))
    if order is None:
        _write_atomic(Path(path), (row for chunk in chunks for row in chunk))
    else:
        rows = _checked_order(path, image_ids, order)  # before any byte is written
        fields = dict(row for chunk in chunks for row in chunk)
        _write_atomic(Path(path), ((i, fields[i]) for i in rows))


def read_submission(path: str | os.PathLike) -> dict[str, list[int]]:
    """Parse a submission CSV into {image id: attribute ids}; refuses malformed rows, naming file and line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            if next(reader, None) != HEADER:
                raise ImetError(f"{where(path, 1)}: expected header {','.join(HEADER)}")
            return _parse_rows(path, reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImetError(f"{path}: cannot read submission: {e}") from e


def _parse_rows(path, reader) -> dict[str, list[int]]:
    """{id: attribute ids} from the data rows of a csv reader; ``reader.line_num`` names the bad line."""
    out: dict[str, list[int]] = {}
    for row in reader:
        at = where(path, reader.line_num)
        if len(row) != 2 or not row[0]:
            raise ImetError(f"{at}: expected 'id,attribute ids', got {row!r}")
        if row[0] in out:
            raise ImetError(f"{at}: id {row[0]!r} appears twice")
        try:
            out[row[0]] = [int(a) for a in row[1].split()]
        except ValueError:
            raise ImetError(f"{at}: attribute ids must be space-separated integers, got {row[1]!r}") from None
    return out


def _label_fields(labels: np.ndarray, attribute_ids: np.ndarray) -> list[str]:
    """One 'id id id' string per row, original attribute ids ascending (empty when nothing is predicted)."""
    if not labels.shape[0]:
        return []
    by_id = np.argsort(attribute_ids, kind="stable")
    rows, cols = np.nonzero(labels[:, by_id])  # row-major, so each row's ids come out ascending
    ids = attribute_ids[by_id][cols].astype(str)
    per_row = np.split(ids, np.cumsum(np.bincount(rows, minlength=labels.shape[0]))[:-1])
    return [" ".join(r) for r in per_row]


def _checked_order(path, image_ids: list[str], order: list[str]) -> list[str]:
    """``order`` itself, after checking that it holds exactly the predicted ids, each once."""
    _refuse_duplicates(path, order, "ids in the sample submission order")
    have, want = set(image_ids), set(order)
    missing = [i for i in order if i not in have]
    extra = [i for i in image_ids if i not in want]
    if missing or extra:
        raise ImetError(
            f"{path}: predictions do not match the sample submission: "
            f"{len(missing)} missing ({_few(missing)}), {len(extra)} extra ({_few(extra)})"
        )
    return order


def _refuse_duplicates(path, ids: list[str], what: str) -> None:
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ImetError(f"{path}: {len(repeated)} duplicate {what} ({_few(repeated)})")


def _few(ids: list[str]) -> str:
    """The first few ids for an error message."""
    shown = ", ".join(repr(i) for i in ids[:_SHOW])
    return shown + (", ..." if len(ids) > _SHOW else "") if ids else "none"


def _write_atomic(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    """Write CSV rows to a temp file next to ``path``, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)
