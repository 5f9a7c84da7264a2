"""The featurizer and the store: backbone against torchvision, HOG against scikit-image, resume after
SIGKILL, broken images, reader against h5py, verify, and a store written by hand with plain h5py."""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY
from helpers import make_store
from PIL import Image
from skimage.feature import hog
from torchvision.models import resnet50

from imet import store
from imet.cli import cli
from imet.data import load_dataset
from imet.errors import ImetError
from imet.featurize import pipeline
from imet.featurize.backbone import build_backbone, load_weights
from imet.featurize.options import IMAGENET_MEAN, IMAGENET_STD
from imet.featurize.pipeline import Options, featurize
from imet.featurize.views import load_rgb, render
from imet.runtime import _libc, kept_heap


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_pooled_equals_torchvision_and_maps_are_the_dilated_layer4():
    state, _ = load_weights("random", seed=3)
    model = build_backbone("resnet50", state)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        maps, pooled = model(x)
        reference = resnet50()
        reference.load_state_dict(state)
        reference.fc = torch.nn.Identity()
        expected = reference.eval()(x)
        dilated = resnet50(replace_stride_with_dilation=[False, False, True])
        dilated.load_state_dict(state)
        dilated.eval()
        trunk = torch.nn.Sequential(*list(dilated.children())[:-2])
        expected_maps = trunk(x)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    assert maps.shape == (2, 2048, 4, 4)  # 64 px / 16: twice the standard 2x2 grid
    torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(maps.mean(dim=(2, 3)), pooled, rtol=1e-2)  # not the standard pooled vector


def test_store_holds_torchvision_features_and_scikit_image_hog(tiny_store, data_dir):
    fs = store.FeatureStore(tiny_store)
    assert fs.maps.dtype == np.float16 and fs.shape("maps") == (4, 4, 2048)
    assert fs.pooled.dtype == np.float32 and fs.shape("hog") == (288,)
    ds = load_dataset(data_dir)
    v = int(fs.views("train")[7])
    i = fs.view_image[v]
    plan = fs.plan_arrays
    pixels, box = render(load_rgb(ds.image_path(i)), 64, plan["crop"][v], plan["offset"][v], plan["flip"][v],
                         plan["jitter"][v])
    assert np.allclose(fs.array("box")[v], box)
    expected_hog = hog(pixels, orientations=8, pixels_per_cell=(16, 16), cells_per_block=(3, 3), channel_axis=-1)
    assert fs.settings["hog_impl"] == "torch" and fs.settings["amp"] == "none"
    np.testing.assert_allclose(fs.hog[v], expected_hog, rtol=0, atol=1e-5)
    reference = resnet50()
    reference.load_state_dict(load_weights("random", seed=0)[0])
    reference.fc = torch.nn.Identity()
    with torch.inference_mode():
        expected = reference.eval()(_normalise(pixels[None]))[0].numpy()
    np.testing.assert_allclose(fs.pooled[v], expected, rtol=1e-4, atol=1e-4)


def test_full_hog_length_at_224_is_the_papers():
    from imet.featurize.hog import HogParams, hog_view

    assert HogParams().length(224) == 10368
    assert hog_view(HogParams(), np.zeros((224, 224, 3), np.uint8)).shape == (10368,)


def test_reader_equals_h5py_and_pickles_without_data(tiny_store):
    fs = store.FeatureStore(tiny_store)
    idx = np.array([9, 2, 30, 3, 4])
    with h5py.File(tiny_store, "r") as f:
        for key in ("maps", "pooled", "hog"):
            expected = f[f"features/{key}"][np.sort(idx)][np.argsort(np.argsort(idx))]
            np.testing.assert_array_equal(fs.read(key, idx), expected)
            np.testing.assert_array_equal(fs.read(key, [5, 6, 7]), f[f"features/{key}"][5:8])
    assert isinstance(fs.maps, np.memmap)
    blob = pickle.dumps(fs)
    assert len(blob) < 100_000  # metadata only, no feature bytes
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.read("pooled", idx), fs.read("pooled", idx))


def test_reads_stay_right_when_pages_are_dropped_between_them(tiny_store, monkeypatch):
    fs = store.FeatureStore(tiny_store)
    monkeypatch.setattr(fs, "CHECK_BYTES", 1)
    monkeypatch.setattr(fs, "RELEASE_BYTES", -1)  # release after every read
    released = []
    release = fs.release
    monkeypatch.setattr(fs, "release", lambda: (released.append(1), release()))
    rng = np.random.default_rng(0)
    with h5py.File(tiny_store, "r") as f:
        for _ in range(5):
            idx = rng.permutation(len(fs.status))[:7]
            for key in ("maps", "pooled"):
                expected = f[f"features/{key}"][np.sort(idx)][np.argsort(np.argsort(idx))]
                np.testing.assert_array_equal(fs.read(key, idx), expected)
    assert len(released) == 10


def test_view_targets_honour_culture_only(tiny_store):
    fs = store.FeatureStore(tiny_store)
    crops = np.flatnonzero(fs.culture_only)
    assert len(crops)
    t = fs.view_targets(crops)
    assert not t[:, ~fs.vocab.culture].any()
    np.testing.assert_array_equal(t[:, fs.vocab.culture], fs.targets[fs.view_image[crops]][:, fs.vocab.culture])


def _run_featurize(data_dir, out, *extra):
    args = [sys.executable, "-m", "imet", "featurize", str(data_dir), "--out", str(out), "--weights", "random",
            "--image-size", "64", "--batch-size", "16", "--workers", "0", "--quiet", *extra]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _feature_bytes(path):
    fs = store.FeatureStore(path)
    return {k: np.asarray(fs.array(k)).tobytes() for k in (*fs.features, "status", "box", "error")}


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_bytes(data_dir, tiny_store, tmp_path):
    out = tmp_path / "killed.h5"
    proc = _run_featurize(data_dir, out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists():
            done = (store.FeatureStore(out, allow_incomplete=True).status != store.PENDING).sum()
            if done >= 16:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    status = store.FeatureStore(out, allow_incomplete=True).status
    assert (status == store.PENDING).any(), "the run finished before it could be killed"
    with pytest.raises(ImetError, match="incomplete.*rerun the same `imet featurize`"):
        store.FeatureStore(out)
    _, err = _run_featurize(data_dir, out).communicate()
    assert err == "", err
    assert _feature_bytes(out) == _feature_bytes(tiny_store)
    assert out.read_bytes() == tiny_store.read_bytes()  # byte-identical at file level, not only the arrays


def _faults_of_64mib_blocks(n: int = 3) -> int:
    """Minor page faults of allocating, touching and freeing a 64 MiB block n times after a first one."""
    np.ones(64 << 20, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        np.ones(64 << 20, np.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_kept_heap_reuses_freed_pages_and_gives_glibc_its_defaults_back():
    # glibc's default: each block mmapped afresh and its pages faulted in, 32 per block in 2 MiB huge pages
    # (16,384 in 4 KiB pages); kept: the freed block's pages serve the next one
    assert _faults_of_64mib_blocks() > 40
    with kept_heap():
        assert _faults_of_64mib_blocks() < 10
        with kept_heap():  # nested (a val score inside training): leaving it keeps the outer one
            pass
        assert _faults_of_64mib_blocks() < 10
    assert _faults_of_64mib_blocks() > 40


def test_featurize_runs_in_a_kept_heap_and_its_bytes_do_not_depend_on_it(data_dir, tiny_store, tmp_path,
                                                                         monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recorded():
        with kept_heap():
            entered.append(True)
            yield

    monkeypatch.setattr(pipeline, "kept_heap", recorded)
    featurize(data_dir, tmp_path / "kept.h5", Options(**TINY), device="cpu", workers=0, progress=False)
    assert entered, "featurize ran its batches outside the kept heap"
    monkeypatch.setattr(pipeline, "kept_heap", contextlib.nullcontext)
    featurize(data_dir, tmp_path / "glibc.h5", Options(**TINY), device="cpu", workers=0, progress=False)
    assert (tmp_path / "kept.h5").read_bytes() == (tmp_path / "glibc.h5").read_bytes() == tiny_store.read_bytes()


def test_rerun_with_other_settings_is_refused(tiny_store, data_dir, tmp_path):
    out = tmp_path / "s.h5"
    shutil.copy(tiny_store, out)
    before = out.read_bytes()
    result = CliRunner().invoke(cli, ["featurize", str(data_dir), "--out", str(out), "--weights", "random",
                                      "--image-size", "64", "--batch-size", "16", "--no-hog", "--quiet"])
    assert result.exit_code == 2
    assert "exists with different settings (hog:" in result.output
    assert out.read_bytes() == before
    result = CliRunner().invoke(cli, ["featurize", str(data_dir), "--out", str(out), "--weights", "random",
                                      "--image-size", "64", "--batch-size", "16", "--quiet"])
    assert result.exit_code == 0 and "0 computed this run" in result.output


def test_broken_and_odd_images(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    ds = load_dataset(data)
    ids = ds.ids
    png = data / "train" / f"{ids[1]}.png"
    png.write_bytes(png.read_bytes()[:200])  # truncated
    (data / "train" / f"{ids[2]}.png").write_bytes(b"")  # zero bytes
    (data / "train" / f"{ids[3]}.png").unlink()  # missing
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 200), dtype=np.uint8), "L").save(data / "train" / f"{ids[4]}.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8), "RGBA").save(data / "train" / f"{ids[5]}.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(data / "train" / f"{ids[6]}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").convert("P").save(
        data / "train" / f"{ids[7]}.png")
    out = tmp_path / "s.h5"
    report = featurize(data, out, Options(**TINY, limit=12), device="cpu", workers=0, progress=False)
    assert {i for i, _ in report.failed} == {ids[1], ids[2], ids[3]}
    reasons = dict(report.failed)
    assert "cannot decode" in reasons[ids[1]] and "empty file" in reasons[ids[2]]
    assert "missing file" in reasons[ids[3]]
    assert "failed" in str(report)
    fs = store.FeatureStore(out)
    status = fs.status
    for i, image_id in enumerate(fs.image_ids):
        expected = store.FAILED if image_id in reasons else store.DONE
        assert (status[fs.view_image == i] == expected).all(), image_id
    assert store.verify(out) == []


def test_verify_catches_a_broken_store(tiny_store, tmp_path):
    out = tmp_path / "broken.h5"
    shutil.copy(tiny_store, out)
    fs = store.FeatureStore(out)
    offset = fs.specs["features/pooled"][0]
    with open(out, "r+b") as f:
        f.seek(offset + 4 * 2048 * 3)
        f.write(np.array([np.nan], np.float32).tobytes())
    result = CliRunner().invoke(cli, ["store", "verify", str(out)])
    assert result.exit_code == 1
    assert "features/pooled: 1 done views hold NaN or inf (first rows [3])" in result.output
    with h5py.File(out, "a") as f:
        f["images/targets"][0, 0] = 7
    assert any("0/1" in p for p in store.verify(out))
    result = CliRunner().invoke(cli, ["store", "verify", str(tmp_path / "none.h5")])
    assert result.exit_code == 1 and "store not found" in result.output


def test_store_info_and_verify_cli(tiny_store):
    result = CliRunner().invoke(cli, ["store", "info", str(tiny_store)])
    assert result.exit_code == 0
    assert "(complete)" in result.output and "maps    (4, 4, 2048) float16" in result.output
    result = CliRunner().invoke(cli, ["store", "verify", str(tiny_store)])
    assert result.exit_code == 0 and result.output.strip().endswith(": ok")


def test_hand_written_store_with_odd_sizes(tmp_path):
    """docs/store.md: plain h5py, any channel count, grid and HOG length."""
    path = tmp_path / "byo.h5"
    n, m, c = 5, 10, 3
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(m, 7)).astype(np.float32)
    maps = rng.normal(size=(m, 2, 3, 5)).astype(np.float16)
    with h5py.File(path, "w") as f:
        f.attrs["schema"], f.attrs["schema_version"] = "imet-store", 1
        f["labels/attribute_id"] = [4, 8, 9]
        f["labels/name"] = ["culture::x", "tag::y", "tag::z"]
        f["labels/kind"] = ["culture", "tag", "tag"]
        f["images/id"] = [f"a{i}" for i in range(n)]
        f["images/split"] = ["train", "train", "val", "test", "kaggle-test"]
        f["images/targets"] = (rng.random((n, c)) < 0.5).astype(np.uint8)
        f["views/image"] = np.repeat(np.arange(n), 2)
        f["views/status"] = np.ones(m, np.uint8)
        f["features/pooled"] = pooled
        f["features/maps"] = maps
    assert store.verify(path) == []
    fs = store.FeatureStore(path)
    assert fs.layout() == {"pooled": [7], "maps": [2, 3, 5]}
    np.testing.assert_array_equal(fs.read("maps", [3, 1]), maps[[3, 1]])
    assert len(fs.views("train")) == 4 and fs.fingerprint


def test_chunked_arrays_are_refused_with_a_pointer_to_the_docs(tmp_path):
    path = make_store(tmp_path / "s.h5")
    with h5py.File(path, "a") as f:
        del f["features/hog"]
        f.create_dataset("features/hog", data=np.zeros((80, 12), np.float32), chunks=(8, 12), compression="gzip")
    with pytest.raises(ImetError, match="features/hog cannot be memory-mapped.*docs/store.md"):
        store.FeatureStore(path)


def test_weights_file_and_bad_weights(tmp_path):
    state, _ = load_weights("random", seed=1)
    torch.save(state, tmp_path / "w.pt")
    loaded, desc = load_weights(str(tmp_path / "w.pt"))
    assert desc["weights"] == "file" and len(desc["sha256"]) == 64
    torch.testing.assert_close(loaded["conv1.weight"], state["conv1.weight"])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ImetError, match=r"not a torchvision resnet50 state dict .missing \['bn1.weight'.*"
                                        r"wrong shapes for \['conv1.weight'\]"):
        load_weights(str(tmp_path / "bad.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ImetError, match="junk.pt: cannot read a PyTorch state dict"):
        load_weights(str(tmp_path / "junk.pt"))
    with pytest.raises(ImetError, match="weights file not found"):
        load_weights(str(tmp_path / "none.pt"))


def test_imagenet_weights_without_network_give_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ImetError, match="not in the torch cache .* pass --weights PATH"):
        load_weights("imagenet")


def _features(path):
    fs = store.FeatureStore(path)
    return {k: np.asarray(fs.array(k)) for k in (*fs.features, "status", "box", "error")}


def test_skimage_hog_in_the_workers_equals_torch_hog_in_the_main_process(tiny_store, data_dir, tmp_path):
    out = tmp_path / "skimage.h5"
    featurize(data_dir, out, Options(**TINY, hog_impl="skimage"), device="cpu", workers=1, progress=False)
    assert store.FeatureStore(out).settings["hog_impl"] == "skimage"
    reference, torch_hog = _features(out), _features(tiny_store)
    np.testing.assert_allclose(torch_hog.pop("hog"), reference.pop("hog"), rtol=0, atol=1e-5)
    assert {k: v.tobytes() for k, v in torch_hog.items()} == {k: v.tobytes() for k, v in reference.items()}


def test_a_resume_with_another_hog_impl_or_amp_is_refused_by_name(tiny_store, data_dir, tmp_path):
    out = tmp_path / "s.h5"
    shutil.copy(tiny_store, out)
    args = ["featurize", str(data_dir), "--out", str(out), "--weights", "random", "--image-size", "64",
            "--batch-size", "16", "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--hog-impl", "skimage"])
    assert result.exit_code == 2
    assert "exists with different settings (hog_impl: 'torch' in the store, 'skimage' now)" in result.output
    result = CliRunner().invoke(cli, [*args, "--amp", "bf16"])
    assert result.exit_code == 2 and "(amp: 'none' in the store, 'bf16' now)" in result.output



def test_a_store_from_before_hog_impl_counts_as_scikit_image(data_dir, tmp_path, monkeypatch):
    requested = Options.requested
    monkeypatch.setattr(Options, "requested", lambda self, w: {k: v for k, v in requested(self, w).items()
                                                               if k not in ("hog_impl", "amp")})
    out = tmp_path / "old.h5"
    featurize(data_dir, out, Options(**TINY, limit=1, hog_impl="skimage"), device="cpu", workers=0, progress=False)
    monkeypatch.undo()
    assert "hog_impl" not in store.FeatureStore(out).settings
    args = ["featurize", str(data_dir), "--out", str(out), "--weights", "random", "--image-size", "64",
            "--batch-size", "16", "--limit", "1", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "(hog_impl: 'skimage' in the store, 'torch' now)" in result.output
    result = CliRunner().invoke(cli, [*args, "--hog-impl", "skimage"])
    assert result.exit_code == 0 and "0 computed this run" in result.output


def test_bf16_autocast_is_recorded_and_close_to_float32(tiny_store, data_dir, tmp_path):
    out = tmp_path / "bf16.h5"
    featurize(data_dir, out, Options(**TINY, limit=2, amp="bf16"), device="cpu", workers=0, progress=False)
    fs, reference = store.FeatureStore(out), store.FeatureStore(tiny_store)
    assert fs.settings["amp"] == "bf16"
    rows = np.flatnonzero(np.isin(reference.image_ids[reference.view_image], fs.image_ids))
    assert len(rows) == len(fs.status)
    np.testing.assert_array_equal(fs.hog, reference.hog[rows])  # HOG never runs under autocast
    pooled, expected = np.asarray(fs.pooled), reference.pooled[rows]
    assert not np.array_equal(pooled, expected)
    assert np.abs(pooled - expected).max() <= 0.05 * np.abs(expected).max()


def test_workers_and_threads_follow_the_core_count(monkeypatch):
    from imet.featurize.pipeline import resources

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resources(cpu, 2, None, hog_in_workers=False) == (0, 2)
    assert resources(cpu, 2, None, hog_in_workers=True) == (1, 2)
    assert resources(cpu, 8, None, hog_in_workers=False) == (1, 8)
    assert resources(cuda, 16, None, hog_in_workers=False) == (14, 2)
    assert resources(cpu, 8, 3, hog_in_workers=False) == (3, 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resources(cpu, 8, None, hog_in_workers=False)[1] == torch.get_num_threads()


def test_bad_hog_impl_or_amp_is_one_line():
    with pytest.raises(ImetError, match="hog_impl must be one of torch, skimage, not 'cv2'"):
        Options(hog_impl="cv2")
    with pytest.raises(ImetError, match="amp must be one of none, bf16, not 'fp8'"):
        Options(amp="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_store_is_close_to_the_cpu_store(tiny_store, data_dir, tmp_path):
    out = tmp_path / "cuda.h5"
    featurize(data_dir, out, Options(**TINY), device="cuda", progress=False)
    got, expected = _features(out), _features(tiny_store)
    np.testing.assert_allclose(got.pop("hog"), expected.pop("hog"), rtol=0, atol=1e-5)
    for key in ("pooled", "maps"):  # cuDNN may sum in TF32: close relative to the features' scale
        a, e = got.pop(key).astype(np.float32), expected.pop(key).astype(np.float32)
        assert np.abs(a - e).max() <= 1e-2 * np.abs(e).max(), key
    assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in expected.items()}
    bf16 = tmp_path / "bf16.h5"
    featurize(data_dir, bf16, Options(**TINY, amp="bf16"), device="cuda", progress=False)
    assert store.verify(bf16) == []


def test_normalize_train_records_the_train_images_mean_and_std(data_dir, tmp_path):
    """--normalize train: per-channel mean and std of the train images' resize views, against numpy on PIL."""
    from imet.featurize.pipeline import open_or_create

    ds = load_dataset(data_dir)
    pixels = np.stack([np.asarray(Image.open(ds.image_path(i)).convert("RGB").resize((64, 64), Image.BILINEAR))
                       for i in np.flatnonzero(ds.split == "train")]).reshape(-1, 3) / 255.0
    out = tmp_path / "s.h5"
    open_or_create(data_dir, out, Options(**{**TINY, "normalize": "train"}))  # writes the settings, no features
    settings = store.read_header(out)["settings"]
    np.testing.assert_allclose(settings["mean"], pixels.mean(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(settings["std"], pixels.std(0), rtol=0, atol=1e-9)


def test_an_image_whose_views_span_two_batches_is_decoded_once(data_dir, monkeypatch):
    from imet.data import plan_views
    from imet.featurize import pipeline

    ds = load_dataset(data_dir)
    planned = plan_views(ds, seed=0)
    views = {k: getattr(planned, k) for k in ("image", "crop", "offset", "flip", "jitter")}
    ranges = pipeline.batch_ranges(len(views["image"]), 7)
    assert any(views["image"][b - 1] == views["image"][b] for _, b in ranges[:-1])  # some image spans two
    decoded = []
    monkeypatch.setattr(pipeline, "load_rgb", lambda path: decoded.append(path) or load_rgb(path))
    batches = pipeline.ViewBatches([str(ds.image_path(i)) for i in range(len(ds.ids))], views, ranges, 32, None)
    items = [batches[k] for k in range(len(batches))]
    assert len(decoded) == len(set(views["image"].tolist()))
    assert sum(int(item["ok"].sum()) for item in items) == len(views["image"])
