"""The planted generator: iMet's shape, the family of designs, the truth it returns, and the probe's parts
against references nobody here wrote (a dense slow lookup, slow class-mean contrasts)."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from imet import store
from imet.metrics import scores
from imet.planted import (
    Design,
    Planted,
    family,
    imet_design,
    learned_planted,
    probe_labels,
    probe_scores,
    recall_by_kind,
    write_planted_store,
)

SMALL_IMET = dict(n_images=200, channels=16, pooled_dim=48, hog=24)


@pytest.fixture(scope="module")
def imet_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "imet.h5"
    truth = write_planted_store(path, imet_design(**SMALL_IMET, seed=3))
    return truth, store.FeatureStore(path), path


def test_imet_shape_has_its_labels_views_tail_and_compact_maps(imet_store):
    truth, st, path = imet_store
    assert len(st.vocab) == 1103 and st.vocab.culture.sum() == 398
    assert (st.targets[:, st.vocab.culture].sum(1) == 1).all()  # one culture per image
    per_image = np.bincount(st.view_image)
    assert per_image.min() >= 1 and per_image.max() <= 6 and len(np.unique(per_image)) > 3
    positives = st.targets[st.split == "train"].sum(0)
    assert (positives < 10).mean() > 0.8 and positives.max() > 10  # a long tail, a few frequent labels
    assert st.shape("maps") == (14, 14, 16) and st.specs["features/maps"][2] == np.int8
    assert st.codecs["maps"].scale is not None and st.shape("pooled") == (48,)
    assert store.verify(path) == []
    assert truth.n_views == len(st.view_image)


def test_objects_sit_where_the_truth_says(imet_store):
    truth, st, _ = imet_store
    views = st.views()
    maps = st.read("maps", views).reshape(len(views), -1, 16)
    o = truth.objects
    assert len(o) and (truth.kinds[o[:, 1]] == "cell").all()
    present = st.view_targets(o[:, 0])[np.arange(len(o)), o[:, 1]]
    assert (present == 1).all()  # an object for a present label only
    at = np.einsum("nd,nd->n", maps[o[:, 0], o[:, 2] * 14 + o[:, 3]], truth.map_dirs[o[:, 1]])
    assert at.mean() > 4  # strength 5 on the object's top-left cell, N(0, 1) noise elsewhere
    pooled = st.read("pooled", views)
    lift = np.linalg.lstsq(maps.mean(1), pooled, rcond=None)[0]  # pooled is an isometric lift of the mean
    np.testing.assert_allclose(maps.mean(1) @ lift, pooled, atol=0.05)


def test_cells_and_on_object_agree_with_a_dense_lookup(imet_store):
    truth, st, _ = imet_store
    g = truth.design.grid
    dense = {}
    for view, label, top, left, size in truth.objects:
        dense[(view, label)] = (top, left, size)
    rng = np.random.default_rng(0)
    views = rng.choice(truth.n_views, 40, replace=False)
    cells = truth.cells(views)
    for k, v in enumerate(views):
        for c in range(len(truth.kinds)):
            want = dense.get((v, c))
            assert cells[k, c] == (-1 if want is None else want[0] * g + want[1])
    keys = list(dense)[:50]
    v, c = np.array([k[0] for k in keys]), np.array([k[1] for k in keys])
    probe = rng.integers(0, g * g, len(keys))
    slow = [dense[k][0] <= p // g < dense[k][0] + dense[k][2] and dense[k][1] <= p % g < dense[k][1] + dense[k][2]
            for k, p in zip(keys, probe, strict=True)]
    assert list(truth.on_object(v, c, probe)) == slow
    assert not truth.on_object(np.array([0]), np.array([0]), np.array([0]))[0]  # a culture has no object


def test_the_same_design_writes_the_same_bytes_and_the_truth_round_trips(imet_store, tmp_path, monkeypatch):
    truth, _, path = imet_store
    monkeypatch.setattr(store.Writer, "RELEASE_BYTES", 1)  # drop the mapped pages after every write: no byte lost
    again = write_planted_store(tmp_path / "again.h5", imet_design(**SMALL_IMET, seed=3))
    assert filecmp.cmp(path, tmp_path / "again.h5", shallow=False)
    truth.save(tmp_path / "truth.npz")
    back = Planted.load(tmp_path / "truth.npz")
    assert back.design == truth.design == again.design
    np.testing.assert_array_equal(back.objects, truth.objects)
    np.testing.assert_array_equal(back.cell, truth.cell)


def test_the_probe_finds_the_planted_evidence_at_imets_shape(imet_store):
    truth, st, _ = imet_store
    images, labels = probe_labels(truth, st)
    y = st.targets[images].astype(bool)
    assert scores(y, labels)["f2"] > 0.5
    recall = recall_by_kind(truth, y, labels, st.targets[st.split == "train"].sum(0))
    assert set(recall) >= {"global", "cell", "hog", "tied", "tail"} and recall["cell"] > 0.5


def test_learned_directions_are_the_class_mean_contrasts_of_a_slow_reference(imet_store):
    """learned_planted's directions, against the contrasts computed view by view from whole arrays: positives'
    mean minus the others' on the mean cell (global), on HOG (hog), and the mean object block minus the mean
    cell of every train view (cell); tied labels and the objects table are the truth's."""
    truth, st, _ = imet_store
    learned = learned_planted(truth, st, chunk=7)  # a chunk size that splits images
    train = st.views("train")
    maps, hog, y = st.read("maps", train).astype(np.float64), st.read("hog", train).astype(np.float64), \
        st.view_targets(train).astype(bool)
    mean_cell = maps.mean((1, 2))
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    checked = set()
    for c, kind in enumerate(truth.kinds):
        if not y[:, c].any() or (kind in checked and c % 5):
            continue  # every kind, a fifth of each kind's labels
        checked.add(kind)
        if kind == "hog":
            want, got = unit(hog[y[:, c]].mean(0) - hog[~y[:, c]].mean(0)), learned.hog_dirs[c]
        elif kind == "cell":
            blocks = [maps[int(np.flatnonzero(train == v)[0]), t:t + z, left:left + z].mean((0, 1))
                      for v, label, t, left, z in truth.objects if label == c and v in train]
            want, got = unit(np.mean(blocks, 0) - mean_cell.mean(0)), learned.map_dirs[c]
        else:
            want, got = unit(mean_cell[y[:, c]].mean(0) - mean_cell[~y[:, c]].mean(0)), learned.map_dirs[c]
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert checked == {"global", "cell", "hog", "tied"}
    np.testing.assert_array_equal(learned.objects, truth.objects)


def test_the_learned_probe_nears_the_probe_where_positives_are_many(tmp_path):
    """With many positives per label the estimated directions point along the planted ones and the learned
    probe scores as the probe; with few they stray and it scores below the probe."""
    cosine, f2 = {}, {}
    for n_images in (1500, 120):
        path = tmp_path / f"p{n_images}.h5"
        truth = write_planted_store(path, Design(n_images=n_images, hog=32, seed=4))
        st = store.FeatureStore(path)
        learned = learned_planted(truth, st)
        maps_kind, hog_kind = np.isin(truth.kinds, ("global", "cell")), truth.kinds == "hog"
        cosine[n_images] = np.concatenate([(learned.map_dirs * truth.map_dirs).sum(1)[maps_kind],
                                           (learned.hog_dirs * truth.hog_dirs).sum(1)[hog_kind]])
        f2[n_images] = [scores(st.targets[i].astype(bool), labels)["f2"]
                        for i, labels in (probe_labels(truth, st), probe_labels(learned, st))]
    assert cosine[1500].min() > 0.8 and cosine[120].mean() < cosine[1500].mean() - 0.03
    assert abs(f2[1500][1] - f2[1500][0]) < 0.02 and f2[120][1] < f2[120][0] - 0.01


def test_probe_scores_find_an_object_of_any_planted_size():
    d = Design(grid=6, channels=8, object_size=(2, 3), cultures=1, cell_tags=1, hog_tags=0, tied_tags=0)
    rng = np.random.default_rng(1)
    truth = Planted(d, np.array(["global", "cell"], dtype=object), np.array([-1, -1]),
                    np.eye(2, 8, dtype=np.float32), np.zeros((2, 4), np.float32), np.zeros((0, 5), np.int64), 1)
    maps = rng.normal(size=(1, 6, 6, 8)).astype(np.float32) * 0.1
    maps[0, 2:5, 1:4, 1] += 1.0  # a 3x3 object of label 1
    score = probe_scores(truth, maps, np.zeros((1, 4), np.float32))
    slow = max(maps[0, r:r + s, c:c + s, 1].sum() / s for s in (2, 3) for r in range(7 - s) for c in range(7 - s))
    assert score[0, 1] == pytest.approx(slow, rel=1e-5)
    assert score[0, 0] == pytest.approx(maps[0, :, :, 0].mean(), abs=1e-6)


def test_family_is_a_fixed_sample_within_its_ranges(tmp_path):
    designs = family(6, seed=2, n_images=40, channels=(8, 16))
    assert designs == family(6, seed=2, n_images=40, channels=(8, 16))
    assert len({(d.grid, d.channels, d.cell_strength, d.object_size) for d in designs}) == 6
    for d in designs:
        assert 7 <= d.grid <= 14 and d.channels in (8, 16) and 2 <= d.cell_strength <= 6
        assert 1 <= d.object_size[0] <= d.object_size[1] <= 3 and 1 <= d.views[0] <= d.views[1] <= 6
        assert 32 <= d.n_labels <= 140 and d.global_tags >= 1 and d.hog_tags >= 1
    truth = write_planted_store(tmp_path / "f.h5", designs[0])
    assert len(store.FeatureStore(tmp_path / "f.h5").vocab) == designs[0].n_labels == len(truth.kinds)


def test_a_design_that_cannot_be_written_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="object_size"):
        write_planted_store(tmp_path / "x.h5", grid=4, object_size=5)
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(ValueError, match="hog must be >= 0, and >= 1 with hog tags"):
        write_planted_store(tmp_path / "x.h5", hog=0, hog_tags=2)
    with pytest.raises(ValueError, match="pooled_noise must be >= 0"):
        write_planted_store(tmp_path / "x.h5", pooled_noise=-1.0)
    assert not (tmp_path / "x.h5").exists()


def test_pooled_noise_and_no_hog_change_only_the_pooled_vector_and_the_hog_array(tmp_path):
    small = dict(n_images=60, grid=4, channels=8, cultures=1, cell_tags=3, hog_tags=0, tied_tags=0)
    write_planted_store(tmp_path / "a.h5", **small, hog=5)
    write_planted_store(tmp_path / "b.h5", **small, hog=0, pooled_noise=0.5)
    a, b = store.FeatureStore(tmp_path / "a.h5"), store.FeatureStore(tmp_path / "b.h5")
    assert a.features == ("maps", "pooled", "hog") and b.features == ("maps", "pooled")
    views = a.views()
    np.testing.assert_array_equal(b.read("maps", views), a.read("maps", views))
    extra = b.read("pooled", views) - a.read("pooled", views)  # (M, 8) the added noise alone
    assert 0.45 < extra.std() < 0.55 and abs(extra.mean()) < 0.05
