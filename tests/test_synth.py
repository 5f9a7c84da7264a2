"""The synthetic dataset: the Kaggle layout, determinism, and that it looks like the iMet problem."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imet.cli import cli
from imet.data import load_dataset, read_train, read_vocabulary
from imet.errors import ImetError
from imet.synth import CORRUPT_KINDS, write_synthetic

N_IMAGES = 160


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(data dir, returned summary) of one medium-sized dataset with all five corrupt kinds."""
    root = tmp_path_factory.mktemp("synth") / "data"
    return root, write_synthetic(root, images=N_IMAGES, seed=3, corrupt=5)


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _raw_labels(root):
    """Vocabulary and the per-image label indices of train.csv, before any filter."""
    vocab = read_vocabulary(root / "labels.csv")
    return vocab, read_train(root / "train.csv", vocab)


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_loads_through_the_data_layer(synth):
    root, _ = synth
    labels = _rows(root / "labels.csv")
    ids = np.array([int(r["attribute_id"]) for r in labels])
    kinds = [r["attribute_name"].split("::")[0] for r in labels]
    assert not np.array_equal(np.sort(ids), np.arange(len(ids)))  # iMet ids have gaps
    assert max(i for i, k in zip(ids, kinds, strict=True) if k == "culture") < min(
        i for i, k in zip(ids, kinds, strict=True) if k == "tag"
    )
    train = _rows(root / "train.csv")
    assert len(train) == N_IMAGES + 5
    plain = [r["id"] for r in train if not r["id"].startswith("corrupt-")]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in plain)
    carried = {a for r in train for a in r["attribute_ids"].split()}
    assert len({r["attribute_id"] for r in labels} - carried) >= 1  # listed, never carried

    submission = _rows(root / "sample_submission.csv")
    assert len(submission) == N_IMAGES // 10 and all(r["attribute_ids"] == "0" for r in submission)
    assert all((root / "test" / f"{r['id']}.png").is_file() for r in submission)

    d = load_dataset(root)
    assert d.dropped_labels >= 3 and d.dropped_images >= 1  # the rare-label filter has work to do
    assert set(d.vocab.kinds) == {"culture", "tag"}
    assert set(d.split) == {"train", "val", "test", "kaggle-test"}
    assert (d.split == "kaggle-test").sum() == len(submission)
    assert {f"corrupt-{k}-{i:02d}" for i, k in enumerate(CORRUPT_KINDS)} <= set(d.ids)  # kept by the filter


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_synthetic(tmp_path / name, images=30, seed=seed, corrupt=2)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a["train.csv"] != c["train.csv"]
    assert sorted(a) != sorted(c)


def test_image_geometry(synth):
    root, _ = synth
    ratios = []
    for path in sorted((root / "train").glob("*.png")) + sorted((root / "test").glob("*.png")):
        if path.stem.startswith(("corrupt-truncated", "corrupt-empty")):
            continue
        with Image.open(path) as im:
            assert min(im.size) == 300, path
            ratios.append(max(im.size) / min(im.size))
    ratios = np.array(ratios)
    assert (ratios >= 4).any()
    assert np.mean(ratios <= 2.0) > 0.7
    assert (ratios > 1.05).mean() > 0.5


def test_labels_per_image(synth):
    root, _ = synth
    d = load_dataset(root)
    t = d.targets[d.split != "kaggle-test"]
    cultures = t[:, d.vocab.culture].sum(1)
    tags = t[:, ~d.vocab.culture].sum(1)
    assert set(cultures.tolist()) == {0, 1, 2}
    assert tags.min() >= 1 and tags.max() <= 6
    assert 0.1 <= np.mean(cultures == 0) <= 0.35  # about a fifth is tag-only


def test_label_frequencies_are_long_tailed(synth):
    root, _ = synth
    vocab, (_, labels) = _raw_labels(root)
    counts = np.bincount(np.concatenate(labels), minlength=len(vocab))
    seen = np.sort(counts[counts > 0])[::-1]
    assert seen[0] >= 5 * np.median(seen)
    assert seen[: len(seen) // 5].sum() >= 0.4 * seen.sum()  # a fifth of the labels, 40% of the mass
    assert ((counts > 0) & (counts < 3)).sum() >= 2


def test_tag_cooccurrence_is_structured(synth):
    root, _ = synth
    d = load_dataset(root)
    tags = d.targets[d.split != "kaggle-test"][:, ~d.vocab.culture].astype(float)  # (N, T)
    n = tags.sum(0)
    conditional = (tags.T @ tags) / np.maximum(n[:, None], 1)  # [a, b] = P(b | a)
    np.fill_diagonal(conditional, 0)
    marginal = n / len(tags)
    strong = (n[:, None] >= 8) & (conditional >= 0.6) & (conditional >= 3 * marginal[None, :])
    assert strong.any()


def test_culture_is_global_appearance(synth):
    """Single-culture images: a nearest-centroid rule on a few colour statistics beats the majority class."""
    root, _ = synth
    d = load_dataset(root)
    culture = d.targets[:, d.vocab.culture]
    single = [i for i in np.flatnonzero(culture.sum(1) == 1) if not d.ids[i].startswith("corrupt-")]
    features = []
    for i in single:
        with Image.open(d.image_path(i)) as im:
            a = np.asarray(im.convert("RGB").resize((32, 32)), dtype=float)
        features.append(np.concatenate([a[0, 0], a.mean((0, 1)), a.std((0, 1))]))
    x, y = np.array(features), culture[single].argmax(1)
    half = len(y) // 2
    centroids = {k: x[:half][y[:half] == k].mean(0) for k in np.unique(y[:half])}
    keys = np.array(list(centroids))
    dist = ((x[half:, None, :] - np.array([centroids[k] for k in keys])[None]) ** 2).sum(-1)
    accuracy = np.mean(keys[dist.argmin(1)] == y[half:])
    assert accuracy >= max(0.6, np.bincount(y).max() / len(y) + 0.2)


def test_corrupt_images(synth):
    root, info = synth
    folder = root / "train"
    for i, kind in enumerate(CORRUPT_KINDS):
        assert f"corrupt-{kind}-{i:02d}" in info
    with pytest.raises(OSError), Image.open(folder / "corrupt-truncated-00.png") as im:
        im.load()
    assert (folder / "corrupt-empty-01.png").stat().st_size == 0
    for name, mode in (("corrupt-gray-02", "L"), ("corrupt-rgba-03", "RGBA"), ("corrupt-16bit-04", "I;16")):
        with Image.open(folder / f"{name}.png") as im:
            im.load()
            assert im.mode == mode and min(im.size) == 300
            if mode == "RGBA":
                assert np.asarray(im)[..., 3].min() < 255
            if mode == "I;16":
                assert np.asarray(im).max() > 255


def test_tiny_datasets_survive_the_filter(tmp_path):
    for seed in range(3):
        root = tmp_path / str(seed)
        write_synthetic(root, images=12, seed=seed)
        assert load_dataset(root).dropped_images == 2  # only the images carrying the planted rare labels


def test_refuses_a_foreign_directory(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ImetError, match=re.escape(str(mine))):
        write_synthetic(mine, images=10, seed=0)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    with pytest.raises(ImetError, match="not a directory"):
        write_synthetic(mine / "notes.txt", images=10, seed=0)


def test_rerun_overwrites_a_previous_output(tmp_path):
    write_synthetic(tmp_path / "out", images=30, seed=0, corrupt=5)
    write_synthetic(tmp_path / "out", images=20, seed=1)
    write_synthetic(tmp_path / "fresh", images=20, seed=1)
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")


def test_cli_synth_then_summary(tmp_path):
    runner = CliRunner()
    out = tmp_path / "data"
    result = runner.invoke(cli, ["synth", str(out), "--images", "30", "--seed", "0", "--corrupt", "2"])
    assert result.exit_code == 0, result.output
    assert "corrupt-truncated-00" in result.output and "corrupt-empty-01" in result.output
    result = runner.invoke(cli, ["summary", str(out)])
    assert result.exit_code == 0, result.output
    assert "kaggle-test" in result.output

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("id\n")
    result = runner.invoke(cli, ["synth", str(tmp_path / "other"), "--images", "10"])
    assert result.exit_code == 2 and "other" in result.output
