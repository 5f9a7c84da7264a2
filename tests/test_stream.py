"""Predicting on images the store has never seen: feature identity, stores of some splits, featurize
--dry-run and `predict --data` (no store), all against featurize-then-predict on the full store."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY
from helpers import cheap_head, make_store, quiet
from torchvision.models import resnet50

from imet import store, stream
from imet.cli import cli
from imet.errors import ImetError
from imet.featurize.pipeline import Options, feature_shapes, featurize
from imet.heads import HEADS, load_model, make_head
from imet.predict import evaluate, predict
from imet.probfiles import read_probs


def fitted(name: str, store_path, out):
    cheap_head(name).fit(store.FeatureStore(store_path), log=quiet).save(out)
    return out


def make(data_dir, out, **changes):
    """A store of the kaggle-test split only, with TINY settings except `changes`."""
    featurize(data_dir, out, Options(**{**TINY, "splits": ("kaggle-test",), **changes}), device="cpu", workers=0,
              progress=False)
    return out


@pytest.fixture(scope="module")
def test_store(data_dir, tmp_path_factory):
    return make(data_dir, tmp_path_factory.mktemp("test-only") / "test.h5")


@pytest.fixture(scope="module")
def linear_model(tiny_store, tmp_path_factory):
    return fitted("linear", tiny_store, tmp_path_factory.mktemp("linear") / "linear.pt")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_same_submission_from_full_store_test_only_store_and_images(name, tiny_store, test_store, data_dir,
                                                                    tmp_path):
    model = fitted(name, tiny_store, tmp_path / "m.pt")
    predict(tiny_store, model, tmp_path / "full.csv", probs_path=tmp_path / "full.h5")
    predict(test_store, model, tmp_path / "test.csv", probs_path=tmp_path / "test.h5")
    done = stream.predict_images(data_dir, model, tmp_path / "data.csv", probs_path=tmp_path / "data.h5",
                                 device="cpu", workers=0, progress=False)
    assert done["images"] == 4 and done["computed"] == 4 and done["probs"] == tmp_path / "data.h5"
    reference = (tmp_path / "full.csv").read_bytes()
    assert reference.count(b"\n") == 5  # header + 4 test images
    assert (tmp_path / "test.csv").read_bytes() == reference
    assert (tmp_path / "data.csv").read_bytes() == reference
    ids, probs, _, _ = read_probs(tmp_path / "full.h5")
    for other in ("test.h5", "data.h5"):
        other_ids, other_probs, _, _ = read_probs(tmp_path / other)
        assert other_ids == ids
        # equal up to float32 rounding: on one thread BLAS may pick another kernel for another batch size
        np.testing.assert_allclose(other_probs, probs, rtol=0, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "data.h5", "full.csv", "full.h5", "m.pt",
                                                          "test.csv", "test.h5"]  # no progress file left


def test_a_killed_stream_resumes_where_it_stopped(linear_model, data_dir, tmp_path, monkeypatch):
    reference = tmp_path / "ref.csv"
    stream.predict_images(data_dir, linear_model, reference, device="cpu", workers=0, progress=False)
    monkeypatch.setattr(stream, "CHUNK_VIEWS", 6)  # predict after each batch: images 0-1, then 2-3
    calls, real = [], stream._predict_chunk

    def dies_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(stream, "_predict_chunk", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        stream.predict_images(data_dir, linear_model, tmp_path / "out.csv", probs_path=tmp_path / "p.h5",
                              device="cpu", workers=0, progress=False)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "p.h5").exists()
    assert (tmp_path / "p.h5.partial").exists()
    monkeypatch.setattr(stream, "_predict_chunk", real)
    done = stream.predict_images(data_dir, linear_model, tmp_path / "out.csv", probs_path=tmp_path / "p.h5",
                                 device="cpu", workers=0, progress=False)
    assert done["computed"] == 2
    assert (tmp_path / "out.csv").read_bytes() == reference.read_bytes()
    assert not (tmp_path / "p.h5.partial").exists() and len(read_probs(tmp_path / "p.h5")[0]) == 4


def test_progress_file_of_another_model_is_refused(linear_model, tiny_store, data_dir, tmp_path, monkeypatch):
    other = fitted("linear_hog", tiny_store, tmp_path / "other.pt")
    monkeypatch.setattr(stream, "_stream", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        stream.predict_images(data_dir, other, tmp_path / "out.csv", device="cpu", workers=0, progress=False)
    with pytest.raises(ImetError, match="another model"):
        stream.predict_images(data_dir, linear_model, tmp_path / "out.csv", device="cpu", workers=0,
                              progress=False)


@pytest.mark.parametrize("change, setting", [
    ({"image_size": 80}, "image_size"),
    ({"normalize": "train"}, "normalize"),
    ({"seed": 1}, "weights"),
    ({"view_seed": 1}, "view_seed"),
])
def test_store_with_other_features_is_refused_by_name(change, setting, linear_model, data_dir, tmp_path):
    other = make(data_dir, tmp_path / "other.h5", **change)
    with pytest.raises(ImetError, match=f"other feature settings .*{setting} is"):
        predict(other, linear_model, tmp_path / "out.csv")
    result = CliRunner().invoke(cli, ["predict", "--store", str(other), "--model", str(linear_model),
                                      "--out", str(tmp_path / "out.csv")])
    assert result.exit_code == 2 and setting in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.csv").exists()


def test_other_hog_settings_matter_only_to_models_that_read_hog(tiny_store, linear_model, data_dir, tmp_path):
    other = make(data_dir, tmp_path / "hog.h5", hog=None)
    predict(other, linear_model, tmp_path / "out.csv")  # linear reads pooled only: accepted
    hog_model = fitted("linear_hog", tiny_store, tmp_path / "hog.pt")
    with pytest.raises(ImetError, match="needs hog"):
        predict(other, hog_model, tmp_path / "out.csv")


def test_identity_is_every_setting_but_plan_and_provenance():
    settings = {"backbone": "resnet50", "image_size": 224, "batch_size": 32, "limit": 5, "splits": ["val"],
                "data_dir": "/x", "imet_version": "1", "split_seed": 3, "min_label_count": 3,
                "hog": {"cell": 16}, "hog_impl": "skimage", "amp": False,
                "weights": {"weights": "imagenet", "name": "IMAGENET1K_V1", "sha256": "ab"}}
    assert store.identity(settings) == {"backbone": "resnet50", "image_size": 224, "hog": {"cell": 16},
                                        "hog_impl": "skimage", "amp": False, "weights": {"sha256": "ab"}}
    same_file = {**settings, "weights": {"weights": "file", "sha256": "ab"}, "batch_size": 8, "splits": None}
    assert store.identity_diff(settings, same_file, ("pooled",)) == []
    new_impl = {**settings, "hog_impl": "fast", "amp": True}
    assert store.identity_diff(settings, new_impl, ("pooled",)) == ["amp"]
    assert store.identity_diff(settings, new_impl, ("pooled", "hog")) == ["amp", "hog_impl"]
    assert store.identity_diff({"mine": 1}, {}, ("pooled",)) == ["mine"]  # hand-written stores: settings as written


def test_old_model_without_identity_asks_for_a_refit(linear_model, tmp_path):
    blob = torch.load(linear_model, weights_only=True)
    del blob["learned"]["store_settings"]
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(ImetError, match="refit it"):
        load_model(tmp_path / "old.pt")
    assert json.loads(torch.load(linear_model, weights_only=True)["learned"]["store_settings"])["image_size"] == 64


def test_splits_store_scores_like_the_full_store(linear_model, tiny_store, data_dir, tmp_path):
    test_only = make(data_dir, tmp_path / "t.h5", splits=("test",))
    assert set(store.FeatureStore(test_only).split) == {"test"}
    [full] = evaluate(tiny_store, [linear_model], "test")
    [part] = evaluate(test_only, [linear_model], "test")
    assert full == part


def test_dry_run_writes_nothing_and_sizes_full_imet(data_dir, tmp_path):
    out = tmp_path / "s.h5"
    result = CliRunner().invoke(cli, ["featurize", str(data_dir), "--out", str(out), "--dry-run", "--image-size",
                                      "64", "--splits", "kaggle-test"])
    assert result.exit_code == 0, result.output
    assert "24 views of 4 images (kaggle-test: 4 images, 24 views)" in result.output
    assert "features/maps" in result.output
    assert list(tmp_path.iterdir()) == []
    sizes = store.array_sizes(feature_shapes(Options()))
    assert sizes["features/maps"][2] * 700_000 == pytest.approx(562e9, rel=1e-3)  # the figure
    assert sizes["features/hog"][2] == 10_368 * 4 and sizes["features/pooled"][2] == 2048 * 4


def test_given_weights_file_must_be_the_models(tmp_path):
    torch.save(resnet50().state_dict(), tmp_path / "w.pth")
    settings = {"backbone": "resnet50", "weights": {"weights": "file", "sha256": "0" * 64}}
    with pytest.raises(ImetError, match="pass that file with --weights"):
        stream.backbone_state(settings, None, tmp_path / "m.pt")
    with pytest.raises(ImetError, match="differ from those"):
        stream.backbone_state(settings, tmp_path / "w.pth", tmp_path / "m.pt")
    with pytest.raises(ImetError, match="not made by `imet featurize`"):
        stream.backbone_state({"test": True}, None, tmp_path / "m.pt")


def test_predict_cli_checks_its_arguments_first(linear_model, data_dir, tmp_path):
    def run(*args):
        return CliRunner().invoke(cli, ["predict", "--model", str(linear_model), *args])

    both = run("--store", "s.h5", "--data", str(data_dir), "--out", str(tmp_path / "o.csv"))
    assert both.exit_code == 2 and "exactly one of --store" in both.output
    split = run("--data", str(data_dir), "--split", "val", "--out", str(tmp_path / "o.csv"))
    assert split.exit_code == 2 and "--split and --attention need --store" in split.output
    missing = run("--data", str(data_dir), "--out", str(tmp_path / "no" / "o.csv"))
    assert missing.exit_code == 2 and "does not exist" in missing.output
    same = run("--data", str(data_dir), "--out", str(tmp_path / "o.csv"), "--probs", str(tmp_path / "o.csv"))
    assert same.exit_code == 2 and "given as both --out and --probs" in same.output
    model = run("--data", str(data_dir), "--out", str(tmp_path / "o.csv"), "--probs", str(linear_model))
    assert model.exit_code == 2 and "would overwrite the input --model" in model.output
    sample = data_dir / "sample_submission.csv"
    before = sample.read_bytes()
    overwrite = run("--data", str(data_dir), "--out", str(sample))
    assert overwrite.exit_code == 2 and "would overwrite the input --data" in overwrite.output
    assert sample.read_bytes() == before
    assert list(tmp_path.iterdir()) == []


def test_predict_data_cli(linear_model, tiny_store, data_dir, tmp_path):
    predict(tiny_store, linear_model, tmp_path / "ref.csv")
    result = CliRunner().invoke(cli, ["predict", "--data", str(data_dir), "--model", str(linear_model),
                                      "--out", str(tmp_path / "out.csv"), "--device", "cpu", "--workers", "0",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert "4 test images" in result.output
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


def _resettle(path, **settings):
    """`path`'s store with its settings attribute replaced (a store made otherwise, in every other byte the same)."""
    with h5py.File(path, "a") as f:
        f.attrs["settings"] = json.dumps(settings)
    return path


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_refuses_a_store_of_other_settings(name, tmp_path):
    mine = make_store(tmp_path / "mine.h5")
    model = fitted(name, mine, tmp_path / "m.pt")
    shutil.copy(mine, tmp_path / "other.h5")
    other = store.FeatureStore(_resettle(tmp_path / "other.h5", test=True, extractor="another"))
    with pytest.raises(ImetError, match="extractor is"):
        load_model(model).predict_labels(other, "test")
    result = CliRunner().invoke(cli, ["evaluate", "--store", str(other.path), "--model", str(model)])
    assert result.exit_code == 2 and "extractor" in result.output


def test_init_from_a_linear_model_of_other_features_is_refused(tmp_path):
    linear = fitted("linear", make_store(tmp_path / "a.h5"), tmp_path / "linear.pt")
    other = store.FeatureStore(_resettle(make_store(tmp_path / "b.h5"), test=True, image_size=5))
    head = make_head("attn_rnn", epochs=1, hidden=8, attention_dim=8, pred_dim=8, workers=0, init_from=str(linear))
    with pytest.raises(ImetError, match="image_size is 5 here"):
        head.fit(other, log=quiet)


def test_a_folds_model_predicts_from_images_as_from_the_store(tiny_store, data_dir, tmp_path):
    """`fit --folds` models in a Kaggle kernel: predict --data equals featurize-then-predict (it lacked codecs_)."""
    from imet.folds import fit_and_save_folds

    fit_and_save_folds(tiny_store, "linear", {"epochs": 2}, 2, tmp_path / "folds.pt", log=quiet)
    predict(tiny_store, tmp_path / "folds.pt", tmp_path / "store.csv")
    stream.predict_images(data_dir, tmp_path / "folds.pt", tmp_path / "data.csv", device="cpu", workers=0,
                          progress=False)
    assert (tmp_path / "data.csv").read_bytes() == (tmp_path / "store.csv").read_bytes()


def test_predict_data_to_stdout_and_a_refused_device_leave_nothing(linear_model, tiny_store, data_dir, tmp_path):
    """`--out -` with --probs writes the submission to stdout alone; --device cuda on a machine without one is
    refused before the progress file exists (a stray X.partial.h5 was left)."""
    predict(tiny_store, linear_model, tmp_path / "ref.csv")
    argv = ["predict", "--data", str(data_dir), "--model", str(linear_model), "--workers", "0", "--quiet"]
    result = CliRunner().invoke(cli, [*argv, "--out", "-", "--probs", str(tmp_path / "p.h5"), "--device", "cpu"])
    assert result.exit_code == 0 and result.stdout == (tmp_path / "ref.csv").read_text(), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5", "ref.csv"]
    if not torch.cuda.is_available():
        result = CliRunner().invoke(cli, [*argv, "--out", str(tmp_path / "x.csv"), "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA device" in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5", "ref.csv"]


def test_predict_data_with_a_blend_file_is_the_blend_of_the_store(tiny_store, data_dir, tmp_path):
    """`predict --data --model BLEND.json`: one pass over the images feeds both members (linear reads pooled,
    linear_hog pooled and HOG), the blend combines them: the submission of `predict --store` with the blend, and
    its probabilities those of `blend apply` on each member's `predict --data --probs`."""
    members = [fitted(name, tiny_store, tmp_path / f"{name}.pt") for name in ("linear", "linear_hog")]

    def run(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    data = ["--data", data_dir, "--device", "cpu", "--workers", "0", "--quiet"]
    blend = tmp_path / "blend.json"
    run("blend", "fit", "--store", tiny_store, "--model", members[0], "--model", members[1], "--out", blend)
    run("predict", "--store", tiny_store, "--model", blend, "--out", tmp_path / "store.csv")
    run("predict", *data, "--model", blend, "--out", tmp_path / "data.csv", "--probs", tmp_path / "data.h5")
    assert (tmp_path / "data.csv").read_bytes() == (tmp_path / "store.csv").read_bytes()
    for k, member in enumerate(members):
        run("predict", *data, "--model", member, "--out", tmp_path / f"m{k}.csv", "--probs", tmp_path / f"m{k}.h5")
    run("blend", "apply", "--blend", blend, tmp_path / "m0.h5", tmp_path / "m1.h5", "--out", tmp_path / "apply.csv",
        "--probs", tmp_path / "apply.h5")
    ids, probs, _, meta = read_probs(tmp_path / "data.h5")
    applied_ids, applied, _, _ = read_probs(tmp_path / "apply.h5")
    assert ids == applied_ids and meta["head"] == "blend"
    np.testing.assert_allclose(probs, applied, rtol=0, atol=1e-6)


def test_predict_data_refuses_a_blend_of_members_of_other_features(tiny_store, data_dir, tmp_path):
    """Members fitted on stores made otherwise (here another view seed) cannot share one pass over the images:
    one line says so and what to do instead, and nothing is written."""
    other = tmp_path / "other.h5"
    featurize(data_dir, other, Options(**TINY, view_seed=1), device="cpu", workers=0, progress=False)
    for k, (name, where) in enumerate((("linear", tiny_store), ("linear_hog", other))):
        predict(where, fitted(name, where, tmp_path / f"{name}.pt"), tmp_path / f"{k}.csv", split="val",
                probs_path=tmp_path / f"{k}.h5")
    runner = CliRunner()
    fit = runner.invoke(cli, ["blend", "fit", str(tmp_path / "0.h5"), str(tmp_path / "1.h5"), "--out",
                              str(tmp_path / "b.json")])
    assert fit.exit_code == 0, fit.output
    result = runner.invoke(cli, ["predict", "--data", str(data_dir), "--model", str(tmp_path / "b.json"), "--out",
                                 str(tmp_path / "out.csv"), "--device", "cpu", "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "fitted on stores of other features (they differ in view_seed)" in result.output
    assert "predict --data with each member's model file and --probs, then imet blend apply" in result.output
    assert not (tmp_path / "out.csv").exists() and not list(tmp_path.glob("*.partial*"))
