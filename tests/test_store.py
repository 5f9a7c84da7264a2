"""imet.store: a store written from arrays reads back as written; the reader protocol both stores implement."""

from __future__ import annotations

import numpy as np

from imet import store
from imet.labels import Vocabulary


def _plan(n_images: int, views_per_image: int) -> store.Plan:
    vocab = Vocabulary(np.array([2, 5, 9]), ("culture::a", "tag::b", "tag::c"), ("culture", "tag", "tag"))
    split = np.array(["train", "val", "test"] * n_images, dtype=object)[:n_images]
    targets = np.eye(3, dtype=np.uint8)[np.arange(n_images) % 3]
    return store.Plan(vocab, np.array([f"x{i}" for i in range(n_images)], dtype=object), split, targets,
                      {"image": np.repeat(np.arange(n_images), views_per_image)}, {"test": "write_arrays"})


def test_write_arrays_in_chunks_reads_back_done_and_verified(tmp_path):
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(10, 4)).astype(np.float32)
    hog = rng.random((10, 3)).astype(np.float32)
    chunks = [(0, {"pooled": pooled[:6], "hog": hog[:6]}), (6, {"pooled": pooled[6:], "hog": hog[6:]})]
    path = store.write_arrays(tmp_path / "s.h5", _plan(5, 2), {"pooled": (4,), "hog": (3,)}, chunks)
    fs = store.FeatureStore(path)
    assert fs.features == ("pooled", "hog")
    np.testing.assert_array_equal(fs.read("pooled", np.arange(10)), pooled)
    np.testing.assert_array_equal(fs.read("hog", np.arange(10)), hog)
    np.testing.assert_array_equal(fs.status, np.full(10, store.DONE))
    np.testing.assert_array_equal(fs.views("val"), [2, 3, 8, 9])  # images 1 and 4
    assert store.verify(path) == []


def test_write_arrays_leaves_unwritten_views_pending(tmp_path):
    path = store.write_arrays(tmp_path / "s.h5", _plan(3, 2), {"pooled": (2,)},
                              [(2, {"pooled": np.ones((2, 2), np.float32)})])
    fs = store.FeatureStore(path, allow_incomplete=True)
    np.testing.assert_array_equal(fs.status, [store.PENDING, store.PENDING, store.DONE, store.DONE,
                                              store.PENDING, store.PENDING])
