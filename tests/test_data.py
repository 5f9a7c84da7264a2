"""The Kaggle data layer: reading, bad inputs, the rare-label filter, splits and view plans."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_csv

from imet.cli import cli
from imet.data import N_CROPS, crop_box, filter_rare, load_dataset, plan_views, stratified_split
from imet.errors import ImetError


def test_reads_vocabulary_filter_and_test_ids(data_dir):
    ds = load_dataset(data_dir)
    assert ds.vocab.attribute_ids.tolist() == [3, 7, 10, 12, 15]  # 20 is seen once: dropped
    assert ds.vocab.kinds == ("culture", "culture", "tag", "tag", "tag")
    assert ds.dropped_labels == 1 and ds.dropped_images == 1
    assert "img000" not in ds.ids
    assert ds.ids[-4:] == ["t03", "t02", "t01", "t00"]  # sample_submission order
    assert (ds.split[-4:] == "kaggle-test").all()
    assert ds.vocab.decode(ds.vocab.encode([15, 3])).tolist() == [15, 3]
    assert ds.image_path(0).name == f"{ds.ids[0]}.png"


def test_filter_repeats_until_stable():
    # label 2 is seen 3 times, but one of its images carries label 3 (seen once): 2 then drops below 3.
    labels = [np.array(x) for x in ([0, 2], [0, 2], [2, 3], [0, 1], [0, 1], [1], [0], [0])]
    keep_label, keep_image = filter_rare(labels, 4, 3)
    assert keep_label.tolist() == [True, True, False, False]
    assert keep_image.tolist() == [False, False, False, True, True, True, True, True]


def test_split_is_stratified_deterministic_and_keeps_rare_labels_in_train():
    rng = np.random.default_rng(0)
    targets = rng.random((2000, 200)) < np.geomspace(0.1, 0.001, 200)  # long tail, ~5 labels per image
    targets[np.arange(2000), rng.integers(0, 200, 2000)] = True
    a = stratified_split(targets, (0.8, 0.1, 0.1), seed=1)
    assert np.array_equal(a, stratified_split(targets, (0.8, 0.1, 0.1), seed=1))
    assert not np.array_equal(a, stratified_split(targets, (0.8, 0.1, 0.1), seed=2))
    assert abs(np.mean(a == 0) - 0.8) < 0.03 and abs(np.mean(a == 1) - 0.1) < 0.03
    assert targets[a == 0].any(0).all()  # every label appears in train, the rarest included
    frequent = targets.sum(0) >= 50
    share = targets[a == 0][:, frequent].sum(0) / targets[:, frequent].sum(0)
    assert np.all(np.abs(share - 0.8) < 0.12) and abs(share.mean() - 0.8) < 0.03


def test_view_plan_follows_section_4_2(data_dir):
    ds = load_dataset(data_dir)
    plan = plan_views(ds, seed=0)
    assert len(plan) == len(ds.ids) * (1 + N_CROPS)
    culture = ds.vocab.culture
    for i in range(len(ds.ids)):
        rows = plan.image == i
        has_culture, has_tag = ds.targets[i, culture].any(), ds.targets[i, ~culture].any()
        if ds.split[i] == "train":
            expect_crops = 0 if (has_tag and not has_culture) else N_CROPS
            assert plan.crop[rows].sum() == expect_crops
            assert np.array_equal(plan.culture_only[rows], plan.crop[rows])
            assert (plan.jitter[rows] != 1).all()
        else:
            assert plan.crop[rows].sum() == N_CROPS and not plan.culture_only[rows].any()
            assert not plan.flip[rows].any() and (plan.jitter[rows] == 1).all()
    again = plan_views(ds, seed=0)
    assert np.array_equal(plan.offset, again.offset) and np.array_equal(plan.flip, again.flip)
    assert not np.array_equal(plan.offset, plan_views(ds, seed=1).offset)


def test_crop_box_keeps_short_side_300_for_224_and_fits():
    x0, y0, x1, y1 = crop_box(900, 300, 224, True, (1.0, 0.5))
    assert x1 - x0 == pytest.approx(224) and x1 == pytest.approx(900)
    assert crop_box(20, 10, 224, True, (0.5, 0.5))[3] <= 10  # small images are upscaled
    assert crop_box(640, 480, 224, False, (0, 0)) == (0, 0, 640, 480)


BAD = [
    ("train.csv", "id,labels\na,1\n", "missing column(s) attribute_ids"),
    ("train.csv", "id,attribute_ids\na,1 x\n", "line 2: attribute_ids '1 x' must be integers"),
    ("train.csv", "id,attribute_ids\na,99\n", "line 2: attribute id(s) [99] are not in labels.csv"),
    ("train.csv", "id,attribute_ids\na,1\na,2\n", "line 3: duplicate image id 'a'"),
    ("train.csv", "id,attribute_ids\n../x,1\n", "line 2: image id '../x' is not a plain file name"),
    ("train.csv", "id,attribute_ids\na/b,1\n", "image id 'a/b' is not a plain file name"),
    ("train.csv", "id,attribute_ids\na,\n", "line 2: image 'a' has an empty attribute_ids list"),
    ("labels.csv", "attribute_id,attribute_name\nx,culture::a\n", "line 2: attribute_id 'x' is not an integer"),
    ("labels.csv", "attribute_id,attribute_name\n1,thing\n", "must start with 'culture::' or 'tag::'"),
    ("labels.csv", "attribute_id,attribute_name\n1,culture::\n", "must start with 'culture::' or 'tag::'"),
    ("train.csv", "id,attribute_ids\na,1,2\n", "line 2: too many fields"),
    ("sample_submission.csv", "id,attribute_ids\na,0\n", "test image id(s) ['a'] are also in train.csv"),
    ("labels.csv", "attribute_id,attribute_name\n1,tag::a\n1,tag::b\n", "line 3: duplicate attribute_id 1"),
    ("sample_submission.csv", "id,attribute_ids\nt1,0\nt1,0\n", "line 3: duplicate image id 't1'"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, name, text, message):
    write_csv(tmp_path / "labels.csv", ["attribute_id", "attribute_name"], [[1, "culture::a"], [2, "tag::b"]])
    write_csv(tmp_path / "train.csv", ["id", "attribute_ids"], [["a", "1 2"]])
    (tmp_path / name).write_text(text)
    with pytest.raises(ImetError, match="^" + str(tmp_path / name).replace(".", r"\.")):
        load_dataset(tmp_path, min_label_count=1)
    result = CliRunner().invoke(cli, ["summary", str(tmp_path), "--min-label-count", "1"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_files_are_named(tmp_path, data_dir):
    result = CliRunner().invoke(cli, ["summary", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "data dir not found" in result.output
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    (copy / "labels.csv").unlink()
    result = CliRunner().invoke(cli, ["summary", str(copy)])
    assert result.exit_code == 2 and f"{copy / 'labels.csv'}: file not found" in result.output


def test_summary_command(data_dir):
    result = CliRunner().invoke(cli, ["summary", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "5 (2 culture, 3 tag); dropped 1" in result.output
    assert "kaggle-test" in result.output


def test_every_command_has_help():
    for args in (["--help"], ["summary", "--help"], ["synth", "--help"], ["featurize", "--help"],
                 ["store", "--help"], ["store", "info", "--help"], ["store", "verify", "--help"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and "Usage:" in result.output, args
