"""imet.store: a store written from arrays reads back as written; the reader protocol both stores implement."""

from __future__ import annotations

import numpy as np
import pytest

from imet import store
from imet.errors import ImetError
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


def _protocol_members() -> list[str]:
    body = vars(store.StoreReader)
    return sorted({*store.StoreReader.__annotations__,
                   *(k for k, v in body.items() if not k.startswith("_") and (callable(v) or isinstance(v, property)))})


def test_protocol_declares_what_heads_read():
    assert _protocol_members() == [
        "bytes_per_view", "codecs", "culture_only", "features", "fingerprint", "image_ids", "layout", "path", "read",
        "release", "settings", "shape", "split", "status", "targets", "view_image", "view_targets", "views", "vocab"]


def test_a_file_and_its_arrays_answer_every_protocol_member_alike(tmp_path):
    rng = np.random.default_rng(1)
    plan = _plan(6, 2)
    pooled = rng.normal(size=(12, 4)).astype(np.float32)
    maps = rng.normal(size=(12, 2, 2, 3)).astype(np.float16)
    fs = store.FeatureStore(store.write_arrays(tmp_path / "s.h5", plan, {"pooled": (4,), "maps": (2, 2, 3)},
                                               [(0, {"pooled": pooled, "maps": maps})]))
    arrays = store.ArrayStore(pooled=pooled, maps=maps, targets=plan.targets, split=plan.split,
                              view_image=plan.views["image"], vocab=plan.vocab, image_ids=plan.image_ids,
                              settings=plan.settings)
    idx = np.array([7, 2, 3, 11])
    for name in ("image_ids", "split", "targets", "view_image", "culture_only", "status"):
        np.testing.assert_array_equal(getattr(arrays, name), getattr(fs, name), err_msg=name)
    np.testing.assert_array_equal(arrays.vocab.attribute_ids, fs.vocab.attribute_ids)
    assert (arrays.vocab.names, arrays.vocab.kinds) == (fs.vocab.names, fs.vocab.kinds)
    assert arrays.settings == fs.settings and arrays.codecs == fs.codecs == {}
    assert arrays.features == fs.features == ("maps", "pooled")
    assert arrays.layout() == fs.layout() == {"maps": [2, 2, 3], "pooled": [4]}
    assert arrays.bytes_per_view() == fs.bytes_per_view() == {"maps": 24, "pooled": 16}
    for key in ("pooled", "maps"):
        assert arrays.shape(key) == fs.shape(key)
        np.testing.assert_array_equal(arrays.read(key, idx), fs.read(key, idx))
    for split in (None, "train", "val", "test"):
        np.testing.assert_array_equal(arrays.views(split), fs.views(split))
    np.testing.assert_array_equal(arrays.view_targets(idx), fs.view_targets(idx))
    assert str(fs.path).endswith("s.h5") and str(arrays.path) == "<arrays>" and arrays.fingerprint == ""
    arrays.release(), fs.release()


def test_array_store_refuses_nan_features_when_read():
    pooled = np.zeros((4, 2), np.float32)
    pooled[2, 1] = np.nan
    arrays = store.ArrayStore(pooled=pooled, targets=np.eye(2, dtype=np.uint8)[[0, 1, 0, 1]])
    np.testing.assert_array_equal(arrays.read("pooled", [0, 1]), np.zeros((2, 2)))
    with pytest.raises(ImetError, match=r"<arrays>: features/pooled of view 2 holds NaN or inf \(1 of the 3 views"):
        arrays.read("pooled", [0, 2, 3])


def test_merge_refuses_an_existing_output_and_leaves_it_alone(tmp_path):
    shard = store.write_arrays(tmp_path / "s.h5", _plan(3, 1), {"pooled": (2,)},
                               [(0, {"pooled": np.ones((3, 2), np.float32)})])
    out = tmp_path / "out.h5"
    out.write_bytes(b"mine")
    with pytest.raises(ImetError, match=r"out\.h5: exists; merge writes a new store \(remove it or choose another"):
        store.merge([shard], out)
    assert out.read_bytes() == b"mine"
