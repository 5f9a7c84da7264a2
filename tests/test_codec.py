"""Compact features: the PCA / int8 codec against numpy's SVD, featurize with a codec (resume, shards, merge),
heads on compact stores, `predict --data` with a compact model, and refusal of mixed codecs."""

from __future__ import annotations

import filecmp
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY
from helpers import ONE_CELL, make_store, quiet

from imet import codec, store, stream
from imet.cli import cli
from imet.errors import ImetError
from imet.featurize import pipeline
from imet.featurize.compact import compact_store
from imet.featurize.pipeline import Options, featurize
from imet.heads import load_model, make_head
from imet.metrics import scores
from imet.planted import write_planted_store
from imet.predict import predict

COMPACT = dict(TINY, maps_dim=8, maps_dtype="int8", hog_dim=3, limit=4)  # 13 images: 4 train views fit the codec


def spectrum_sample(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) rows with a decaying spectrum and an offset, like the cells of a CNN map."""
    rng = np.random.default_rng(seed)
    mixing = np.linalg.qr(rng.normal(size=(d, d)))[0] * np.geomspace(5, 0.05, d)
    return (rng.normal(size=(n, d)) @ mixing.T + rng.normal(size=d)).astype(np.float32)


@pytest.mark.parametrize("n,d", [(600, 24), (20, 50)])  # covariance path (cells), SVD path (HOG)
def test_pca_round_trip_equals_numpys_svd_truncation(n, d):
    x = spectrum_sample(n, d)
    k = 6
    c = codec.fit(x, k, "float16")
    centred = x.astype(np.float64) - x.mean(0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    best = centred - (u[:, :k] * s[:k]) @ vt[:k]  # Eckart-Young: the smallest rank-k error
    ours = x - c.reconstruct(c.encode(x))
    np.testing.assert_allclose(np.linalg.norm(ours), np.linalg.norm(best), rtol=2e-3)
    np.testing.assert_allclose(np.abs(c.basis.T @ vt[:k].T), np.eye(k), atol=1e-3)  # the same directions
    assert c.encode(x).dtype == np.float16 and c.encode(x).shape == (n, k)
    np.testing.assert_allclose(c.decode(c.encode(x)), centred @ c.basis, rtol=1e-2, atol=1e-2)
    assert codec.fit(x[::-1].copy(), k, "float16").sha256() == c.sha256()  # the sample's order does not matter


def test_int8_scales_hold_the_sample_with_headroom():
    x = spectrum_sample(500, 16)
    c = codec.fit(x, None, "int8")
    peak = np.abs(x).max(0)
    np.testing.assert_allclose(c.scale, peak * codec.HEADROOM / 127, rtol=1e-6)
    q = c.encode(x)
    assert q.dtype == np.int8 and np.abs(q).max() == round(127 / codec.HEADROOM)
    assert (np.abs(c.decode(q) - x) <= c.scale / 2 + 1e-6).all()  # rounding, no clipping within the sample
    far = c.encode(x * 10)
    assert far.max() == 127 and far.min() >= -127  # beyond the headroom: clipped, never wrapped around
    with_pca = codec.fit(x, 4, "int8")
    y = (x - with_pca.mean) @ with_pca.basis
    np.testing.assert_allclose(with_pca.decode(with_pca.encode(x)), y, atol=float(with_pca.scale.max()))


def test_a_codec_cannot_keep_more_components_than_the_sample_has():
    with pytest.raises(ImetError, match="maps_dim 40: cannot keep 40 principal components .* .at most 19"):
        codec.fit(spectrum_sample(20, 50), 40, "float16", name="maps_dim")


@pytest.fixture(scope="module")
def compact(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compact") / "c.h5"
    featurize(data_dir, out, Options(**COMPACT), device="cpu", workers=0, progress=False)
    return out


def test_featurize_stores_the_codec_and_readers_return_its_space(compact, tiny_store):
    fs, full = store.FeatureStore(compact), store.FeatureStore(tiny_store)
    assert fs.shape("maps") == (4, 4, 8) and fs.specs["features/maps"][2] == np.int8 and fs.shape("hog") == (3,)
    assert fs.settings["maps_dim"] == 8 and fs.settings["maps_dtype"] == "int8" and fs.settings["hog_dim"] == 3
    assert fs.settings["maps_codec_sha256"] == fs.codecs["maps"].sha256()
    views = fs.views()[::3]
    same = np.searchsorted(full.view_image, [list(full.image_ids).index(i) for i in fs.image_ids[fs.view_image[views]]])
    same += views - np.searchsorted(fs.view_image, fs.view_image[views])  # the same view of the same image
    maps = fs.read("maps", views)
    assert maps.dtype == np.float32
    c = fs.codecs["maps"]
    expected = (full.read("maps", same).astype(np.float32) - c.mean) @ c.basis  # the same backbone features
    np.testing.assert_allclose(maps, expected, atol=float(c.scale.max()) * 0.6 + 1e-2)
    hog = fs.codecs["hog"]
    np.testing.assert_allclose(fs.read("hog", views), (full.read("hog", same) - hog.mean) @ hog.basis, atol=1e-4)
    assert store.verify(compact) == []
    # never compacted; computed again in other batches (limit=4): the convolution rounds per batch (5e-5)
    np.testing.assert_allclose(fs.read("pooled", views), full.read("pooled", same), rtol=1e-3, atol=1e-5)


def test_resume_reuses_the_stored_codec_and_writes_the_same_bytes(compact, data_dir, tmp_path, monkeypatch):
    copy = tmp_path / "c.h5"
    shutil.copy(compact, copy)
    with h5py.File(copy, "r") as f:
        specs = {k: (f[k].id.get_offset(), f[k].shape, f[k].dtype) for k in ("views/status", "features/maps")}
    for offset, shape, dtype in specs.values():  # the last batch undone, as a kill would leave it
        m = np.memmap(copy, dtype=dtype, mode="r+", offset=offset, shape=shape)
        m[-16:] = 0
        m.flush()
        del m
    monkeypatch.setattr(pipeline, "fit_codecs", lambda *a, **k: pytest.fail("a resume refitted the codec"))
    report = featurize(data_dir, copy, Options(**COMPACT), device="cpu", workers=0, progress=False)
    assert 0 < report.computed < report.views
    assert filecmp.cmp(copy, compact, shallow=False)


def test_shards_with_a_codec_merge_into_the_single_process_bytes(compact, data_dir, tmp_path):
    out = tmp_path / "s.h5"
    for i in range(2):
        featurize(data_dir, out, Options(**COMPACT), device="cpu", workers=0, shard=(i, 2), progress=False)
    store.merge([pipeline.shard_path(out, i, 2) for i in range(2)], out)
    assert filecmp.cmp(out, compact, shallow=False)


def test_rerun_with_another_codec_is_refused_by_name(compact, data_dir):
    for change, name in ((dict(maps_dim=4), "maps_dim"), (dict(maps_dtype="float16"), "maps_dtype"),
                         (dict(maps_dim=None, maps_dtype="float16", hog_dim=None), "maps_dim")):
        with pytest.raises(ImetError, match=f"different settings .*{name}"):
            featurize(data_dir, compact, Options(**{**COMPACT, **change}), device="cpu", workers=0, progress=False)


def test_default_settings_hold_no_codec_key(tiny_store):
    settings = store.FeatureStore(tiny_store).settings
    assert not [k for k in settings if k in pipeline.CODEC_KEYS or k.endswith("_codec_sha256")]
    assert store.FeatureStore(tiny_store).codecs == {}


def test_bad_codec_options_are_one_line(data_dir, tmp_path):
    runner = CliRunner()
    for args, message in ((["--maps-dim", "4096"], "--maps-dim must be an integer in 1..2048"),
                          (["--no-maps", "--maps-dtype", "int8"], "do not go with maps off"),
                          (["--hog-dim", "9999"], "at most 288, the HOG values"), (["--maps-dtype", "int4"], "int4")):
        result = runner.invoke(cli, ["featurize", str(data_dir), "--out", str(tmp_path / "x.h5"), "--weights",
                                     "random", "--image-size", "64", *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x.h5").exists()


def test_dry_run_and_info_show_the_codec_and_full_scale_bytes(compact, data_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["featurize", str(data_dir), "--out", str(tmp_path / "x.h5"), "--dry-run",
                                 "--maps-dim", "256", "--maps-dtype", "int8"])
    assert result.exit_code == 0, result.output
    assert "(14, 14, 256)    int8         50,176 B/view" in result.output
    assert "codec maps: PCA 2048 -> 256, stored int8 with a per-channel scale" in result.output
    assert "at full iMet (700,080 views)" in result.output and not (tmp_path / "x.h5").exists()
    info = runner.invoke(cli, ["store", "info", str(compact)]).output
    assert "maps    (4, 4, 8) int8" in info and "128 B/view, 89.6 MB at full iMet" in info
    assert "codec        maps    PCA 2048 -> 8, stored int8 with a per-channel scale" in info
    assert "codec        hog     PCA 288 -> 3, stored float32" in info


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    """A planted store (one-cell evidence in 16 channels) and its compaction to 8 int8 channels."""
    root = tmp_path_factory.mktemp("planted")
    full = root / "full.h5"
    write_planted_store(full, ONE_CELL, n_images=300, cell_strength=5.0)
    done = compact_store(full, root / "small.h5", maps_dim=8, maps_dtype="int8")
    width, maps = done["codecs"]["maps"]
    assert maps.describe(width) == "PCA 16 -> 8, stored int8 with a per-channel scale"
    assert (done["bytes_before"], done["bytes_after"]) == (576, 192)
    return full, root / "small.h5"


def test_compact_store_keeps_the_evidence_and_csra_finds_it(planted_pair, tmp_path):
    full, small = (store.FeatureStore(p) for p in planted_pair)
    assert small.shape("maps") == (4, 4, 8) and small.specs["features/maps"][2] == np.int8
    assert store.verify(planted_pair[1]) == []
    np.testing.assert_array_equal(small.read("pooled", small.views()), full.read("pooled", full.views()))
    f2 = {}
    for name, fs in (("full", full), ("small", small)):
        head = make_head("csra", workers=0, epochs=10).fit(fs, log=quiet)
        images, _, labels = head.predict_labels(fs, "test")
        f2[name] = scores(fs.targets[images], labels)["f2"]
        head.save(tmp_path / f"{name}.pt")
    assert f2["small"] > f2["full"] - 0.03 and f2["full"] > 0.8, f2
    loaded = load_model(tmp_path / "small.pt")
    assert loaded.codecs_["maps"].sha256() == small.settings["maps_codec_sha256"]
    np.testing.assert_array_equal(loaded.predict_proba(small, small.views("test")[:8]),
                                  head.predict_proba(small, small.views("test")[:8]))


def test_models_refuse_a_store_of_another_codec_by_name(planted_pair, tmp_path):
    full, small = (store.FeatureStore(p) for p in planted_pair)
    on_full = make_head("csra", workers=0, epochs=1).fit(full, log=quiet)
    on_small = make_head("csra", workers=0, epochs=1).fit(small, log=quiet)
    with pytest.raises(ImetError, match=r"other feature settings .*maps_codec_sha256 .*maps_dim is 8 here, null"):
        on_full.predict_labels(small, "test")
    with pytest.raises(ImetError, match=r"maps_dim is null here, 8 in the model"):
        on_small.predict_labels(full, "test")
    linear = make_head("linear", epochs=1).fit(full, log=quiet)
    linear.predict_labels(small, "test")  # pooled vectors are not compacted: a pooled-only model reads both
    other = tmp_path / "other.h5"
    compact_store(planted_pair[0], other, maps_dim=8, maps_dtype="int8", seed=1)  # another sample
    with pytest.raises(ImetError, match="other feature settings than the model's store .maps_codec_sha256 is"):
        on_small.predict_labels(store.FeatureStore(other), "test")


def test_compact_refuses_what_it_cannot_do(planted_pair, tmp_path):
    full, small = planted_pair
    runner = CliRunner()
    for args, message in ((["store", "compact", str(small), "--out", str(tmp_path / "a.h5"), "--maps-dim", "4"],
                           "already compact"),
                          (["store", "compact", str(full), "--out", str(full), "--maps-dim", "4"], "overwrite"),
                          (["store", "compact", str(full), "--out", str(tmp_path / "b.h5")], "give --maps-dim"),
                          (["store", "compact", str(full), "--out", str(tmp_path / "c.h5"), "--maps-dim", "99"],
                           "at most 16"),
                          (["store", "compact", str(full), "--out", str(tmp_path / "d.h5"), "--hog-dim", "4"],
                           "has no hog")):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_merge_refuses_shards_with_other_codecs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (lo, hi) in enumerate(((0, 40), (40, 80))):
        src = make_store(tmp_path / f"src{i}.h5", seed=0)
        plan = store.read_plan(src)
        c = codec.fit(rng.normal(size=(200, 8)).astype(np.float32), 4, "int8")  # a basis per shard
        settings = {**plan.settings, "maps_dim": 4, "maps_dtype": "int8", "maps_codec_sha256": c.sha256()}
        path = tmp_path / f"s{i}.h5"
        store.create(path, store.Plan(plan.vocab, plan.image_ids, plan.split, plan.targets, plan.views, settings,
                                      {"maps": c}), {"maps": (3, 3, 4), "pooled": (16,)}, (lo, hi), fingerprint="f")
        paths.append(path)
    with pytest.raises(ImetError, match="settings differ .*maps_codec_sha256"):
        store.merge(paths, tmp_path / "m.h5")


def test_hand_written_int8_store_reads_through_its_scale(tmp_path):
    path = make_store(tmp_path / "h.h5")  # 80 views of (3, 3, 8) maps
    with h5py.File(path, "a") as f:  # rewrite maps as int8 with a scale, as docs/store.md describes
        del f["features/maps"], f["views/checksum_maps"]  # new bytes: their old checksum goes too
        f["features/maps"] = (np.arange(80 * 9 * 8).reshape(80, 3, 3, 8) % 100 - 50).astype(np.int8)
        f.attrs["settings"] = json.dumps({"extractor": "mine"})
    with pytest.raises(ImetError, match="int8 but codec/maps/scale is missing"):
        store.FeatureStore(path)
    with h5py.File(path, "a") as f:
        f["codec/maps/scale"] = np.full(8, 0.5, np.float32)
    fs = store.FeatureStore(path)
    got = fs.read("maps", [3, 1])
    expected = (np.arange(80 * 9 * 8).reshape(80, 3, 3, 8) % 100 - 50)[[3, 1]] * 0.5
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    with h5py.File(path, "a") as f:
        f["codec/maps/mean"] = np.zeros(5, np.float32)
    with pytest.raises(ImetError, match="codec/maps does not fit features/maps"):
        store.FeatureStore(path)


def test_predict_from_images_with_a_compact_model_equals_the_store(compact, data_dir, tmp_path):
    fs = store.FeatureStore(compact)
    model = tmp_path / "m.pt"
    make_head("csra", workers=0, epochs=2, hog=True).fit(fs, log=quiet).save(model)
    predict(compact, model, tmp_path / "store.csv", probs_path=tmp_path / "store.h5")
    stream.predict_images(data_dir, model, tmp_path / "data.csv", device="cpu", workers=0, progress=False)
    assert (tmp_path / "data.csv").read_bytes() == (tmp_path / "store.csv").read_bytes()
    blob = torch.load(model, weights_only=True)
    blob["codecs"] = {}
    torch.save(blob, tmp_path / "bare.pt")
    with pytest.raises(ImetError, match="fitted on compact maps but holds no codec"):
        stream.predict_images(data_dir, tmp_path / "bare.pt", tmp_path / "x.csv", device="cpu", workers=0,
                              progress=False)


def test_scikit_image_hog_from_the_workers_is_encoded_in_the_step():
    """--hog-impl skimage computes HOG in the DataLoader workers: the step encodes it, failed views stay zero."""
    from imet.featurize.backbone import build_backbone, load_weights

    c = codec.fit(spectrum_sample(50, 288), 5, "float32")
    settings = {"maps": False, "mean": [0.5] * 3, "std": [0.25] * 3}
    step = pipeline.Step(build_backbone("resnet50", load_weights("random", 0)[0]), settings, torch.device("cpu"), None,
                         {"hog": c})
    rng = np.random.default_rng(0)
    item = {"ok": np.array([True, False, True]), "box": np.zeros((3, 4), np.float32), "error": np.zeros(3, "S160"),
            "pixels": torch.from_numpy(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)),
            "hog": spectrum_sample(3, 288, seed=1)}
    with torch.inference_mode():
        values = step.fetch(item, step(item))
    assert values["hog"].shape == (3, 5) and values["pooled"].shape == (3, 2048)
    np.testing.assert_array_equal(values["hog"][[0, 2]], c.encode(item["hog"][[0, 2]]))
    assert not values["hog"][1].any()
