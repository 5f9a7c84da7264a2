"""imet.decode.submission: round trip, id order and checks, atomic writes."""

import os
import re

import numpy as np
import pytest

from imet.decode import submission
from imet.decode.submission import read_submission, write_submission
from imet.errors import ImetError, where

IDS = ["b1", "a2", "c3"]
ATTRIBUTE_IDS = np.array([1092, 13, 500, 7])  # dense label c -> original id, deliberately unsorted
LABELS = np.array(
    [
        [1, 1, 0, 1],
        [0, 0, 0, 0],  # nothing predicted
        [0, 0, 1, 0],
    ],
    dtype=bool,
)


def test_round_trip_original_ids_ascending(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(path, IDS, LABELS, ATTRIBUTE_IDS)
    assert path.read_text() == "id,attribute_ids\nb1,7 13 1092\na2,\nc3,500\n"
    assert read_submission(path) == {"b1": [7, 13, 1092], "a2": [], "c3": [500]}


def test_random_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random((30, 12)) < 0.2
    attribute_ids = rng.permutation(1103)[:12]
    ids = [f"{i:04x}" for i in rng.permutation(1000)[:30]]
    write_submission(tmp_path / "s.csv", ids, labels, attribute_ids)
    back = read_submission(tmp_path / "s.csv")
    assert list(back) == ids
    for i, row in zip(ids, labels, strict=True):
        assert back[i] == sorted(attribute_ids[row].tolist())


def test_order_is_honoured(tmp_path):
    order = ["c3", "b1", "a2"]
    write_submission(tmp_path / "s.csv", IDS, LABELS, ATTRIBUTE_IDS, order=order)
    back = read_submission(tmp_path / "s.csv")
    assert list(back) == order
    assert back["c3"] == [500]


@pytest.mark.parametrize(
    "order, message",
    [
        (["c3", "b1"], r"0 missing \(none\), 1 extra \('a2'\)"),
        (["c3", "b1", "a2", "zz"], r"1 missing \('zz'\), 0 extra"),
        (["c3", "b1", "a2", "b1"], r"duplicate ids in the sample submission order \('b1'\)"),
    ],
)
def test_order_mismatch_refused(tmp_path, order, message):
    path = tmp_path / "s.csv"
    with pytest.raises(ImetError, match=message):
        write_submission(path, IDS, LABELS, ATTRIBUTE_IDS, order=order)
    assert not path.exists()


def test_many_missing_ids_named_briefly(tmp_path):
    order = IDS + [f"x{i}" for i in range(20)]
    with pytest.raises(ImetError, match=r"20 missing \('x0', 'x1', 'x2', 'x3', 'x4', \.\.\.\)"):
        write_submission(tmp_path / "s.csv", IDS, LABELS, ATTRIBUTE_IDS, order=order)


def test_duplicate_image_ids_refused(tmp_path):
    with pytest.raises(ImetError, match=r"duplicate image ids \('b1'\)"):
        write_submission(tmp_path / "s.csv", ["b1", "a2", "b1"], LABELS, ATTRIBUTE_IDS)


def test_shape_mismatch_refused(tmp_path):
    with pytest.raises(ValueError, match="labels has shape"):
        write_submission(tmp_path / "s.csv", IDS[:2], LABELS, ATTRIBUTE_IDS)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "s.csv"
    path.write_text("old content\n")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(submission.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_submission(path, IDS, LABELS, ATTRIBUTE_IDS)
    assert path.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["s.csv"]


def test_overwrite_replaces_whole_file(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("x" * 10_000)
    write_submission(path, IDS[:1], LABELS[:1], ATTRIBUTE_IDS)
    assert path.read_text() == "id,attribute_ids\nb1,7 13 1092\n"
    assert os.listdir(tmp_path) == ["s.csv"]


@pytest.mark.parametrize(
    "text, row",
    [
        ("id,attr\n", 1),
        ("", 1),
        ("id,attribute_ids\nb1,7 13\na2\n", 3),
        ("id,attribute_ids\nb1,7 x\n", 2),
        ("id,attribute_ids\nb1,7\nb1,8\n", 3),
        ("id,attribute_ids\nb1,7,8\n", 2),
    ],
)
def test_read_refuses_malformed_rows(tmp_path, text, row):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ImetError, match=re.escape(where(path, row))):
        read_submission(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(ImetError, match="nope.csv"):
        read_submission(tmp_path / "nope.csv")
