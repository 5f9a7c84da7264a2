"""The Python API: docs/api.md's example, ArrayStore against a store file, the scikit-learn estimator
contract of every head, and `imet fit`'s options made from the heads' declarations."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import sklearn.base
import sklearn.exceptions
from click.testing import CliRunner
from helpers import cheap_head, make_store, quiet

import imet
from imet.cli import cli, head_options
from imet.decode.submission import read_submission
from imet.errors import ImetError
from imet.heads import HEADS, NotAStoreError, NotFittedError, ParamError, load_model, make_head
from imet.models import open_model
from imet.store import ArrayStore, FeatureStore

DOC = Path(__file__).parents[1] / "docs" / "api.md"
def test_the_docs_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Ten lines.*?```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})
    assert (tmp_path / "linear.pt").is_file()


def test_the_ensemble_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Ensembles.*?```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})
    assert len(read_submission(tmp_path / "blend.csv")) == 60  # the test split of 300 images
    assert (tmp_path / "blend_from_files.csv").read_bytes() == (tmp_path / "blend.csv").read_bytes()
    assert read_submission(tmp_path / "stack.csv").keys() == read_submission(tmp_path / "blend.csv").keys()


def test_fit_on_plain_arrays_points_to_the_sklearn_adapter():
    X, y = np.zeros((10, 4), np.float32), np.zeros((10, 3), np.uint8)
    for name in sorted(HEADS):
        with pytest.raises(NotAStoreError, match=rf"{name}.fit takes a feature store .* not ndarray and labels; for "
                                                 r"fit\(X, y\) on plain arrays use imet.sklearn.HeadClassifier"):
            make_head(name).fit(X, y)
    with pytest.raises(TypeError, match="not ndarray;"):
        make_head("linear").fit(X)


def test_top_level_names():
    assert imet.list_heads() == ["attn_rnn", "csra", "lgbm", "linear", "linear_hog", "mldecoder"]
    assert dir(imet) == ["ArrayStore", "Blend", "FeatureStore", "FoldedModel", "ImetError", "Stack", "__version__",
                         "describe_model", "fit_blend", "fit_folds", "fit_stack", "list_heads", "load_model",
                         "make_head", "open_model", "read_probs", "read_submission", "write_model_probs",
                         "write_probs", "write_submission"]
    assert (imet.FeatureStore, imet.ArrayStore, imet.make_head, imet.load_model, imet.open_model, imet.ImetError) == (
        FeatureStore, ArrayStore, make_head, load_model, open_model, ImetError)  # the docs example runs them
    from imet.blend import Blend, fit_blend
    from imet.decode.submission import read_submission, write_submission
    from imet.folds import fit_folds
    from imet.heads.folds import FoldedModel
    from imet.models import describe_model
    from imet.probfiles import read_probs, write_model_probs, write_probs
    from imet.stack import Stack, fit_stack
    assert (imet.Blend, imet.fit_blend, imet.Stack, imet.fit_stack, imet.FoldedModel, imet.fit_folds) == (
        Blend, fit_blend, Stack, fit_stack, FoldedModel, fit_folds)  # the ensemble example runs them
    assert (imet.read_probs, imet.write_probs, imet.write_model_probs, imet.write_submission, imet.read_submission,
            imet.describe_model) == (read_probs, write_probs, write_model_probs, write_submission, read_submission,
                                     describe_model)
    with pytest.raises(AttributeError, match="module 'imet' has no attribute 'nope'"):
        imet.nope  # noqa: B018


@pytest.fixture(scope="module")
def file_and_arrays(tmp_path_factory):
    path = make_store(tmp_path_factory.mktemp("api") / "s.h5", n_images=30)
    fs = FeatureStore(path)
    arrays = ArrayStore(pooled=np.asarray(fs.pooled), maps=np.asarray(fs.maps), hog=np.asarray(fs.hog),
                        targets=fs.targets, split=fs.split, view_image=fs.view_image, vocab=fs.vocab,
                        settings=fs.settings)
    return fs, arrays


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_fits_on_arrays_as_on_a_store_file(name, file_and_arrays):
    fs, arrays = file_and_arrays
    from_file = cheap_head(name, epochs=1).fit(fs, log=quiet)
    from_arrays = cheap_head(name, epochs=1).fit(arrays, log=quiet)
    views = fs.views("test")
    np.testing.assert_array_equal(from_arrays.predict_proba(arrays, views), from_file.predict_proba(fs, views))
    np.testing.assert_array_equal(from_arrays.predict_labels(fs, "test")[2], from_file.predict_labels(fs, "test")[2])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "give at least one of pooled, maps and hog"),
    ({"pooled": np.zeros((4, 3), np.float32), "targets": np.ones((3, 2))}, "view_image must give each of the 4"),
    ({"pooled": np.zeros((4, 3), np.float32), "targets": np.full((4, 2), 2)}, "targets must be .* of 0 and 1"),
    ({"pooled": np.zeros((4, 3), np.float32), "targets": np.ones((4, 2)), "split": ["train"] * 3 + ["dev"]},
     "unknown split 'dev'; choose from train"),
    ({"pooled": np.zeros((4, 3, 2), np.float32)}, "pooled must be a float array of 2 dimensions"),
    ({"pooled": np.zeros((4, 3), np.float32), "hog": np.zeros((5, 2), np.float32)}, "hog must be a float array"),
])
def test_array_store_refuses_bad_arrays_by_name(kwargs, message):
    with pytest.raises(ImetError, match=message):
        ArrayStore(**kwargs)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_follow_the_scikit_learn_contract(name):
    head = make_head(name)
    params = head.get_params(deep=True)
    assert set(params) == set(HEADS[name].param_names()) == set(HEADS[name].param_specs())
    twin = sklearn.base.clone(head)  # sklearn's own checks: every parameter round-trips through __init__
    assert type(twin) is type(head) and twin is not head and twin.get_params() == params
    assert head.set_params(seed=7) is head and head.get_params()["seed"] == 7
    with pytest.raises(ParamError, match=f"^nope does not apply to head {name} \\(it takes thresholds, "):
        head.set_params(nope=1)
    with pytest.raises(sklearn.exceptions.NotFittedError, match="not fitted"):
        head.predict_proba(None, np.arange(3))
    assert issubclass(NotFittedError, ImetError)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_parameter_is_checked_against_its_declaration(name):
    for param, spec in HEADS[name].param_specs().items():
        bad = "nonsense" if type(spec.check).__name__ != "Text" else 3
        with pytest.raises(ParamError, match=rf"^{name}: {param} must be ") as caught:
            make_head(name, **{param: bad})
        assert "--" not in str(caught.value) and caught.value.names == (param,)


def test_constraints_live_in_the_head_not_the_cli():
    with pytest.raises(ParamError, match=r"^linear: batch_size must be an integer >= 1, not 0$"):
        make_head("linear", batch_size=0)  # was a ZeroDivisionError in fit
    with pytest.raises(ParamError, match=r"colsample must be a number > 0 and <= 1, or None \(200 features per tree, "
                                         r"all when fewer\), not 1.5"):
        make_head("lgbm", colsample=1.5)
    with pytest.raises(ParamError, match="temperatures must be comma-separated positive numbers, not '1,-2'"):
        make_head("csra", temperatures="1,-2")
    head = make_head("linear")
    head.set_params(lr=-1.0)
    with pytest.raises(ParamError, match=r"lr must be a number > 0 \(and at most float32.s largest, 3.4e38\), "
                                         "not -1.0"):
        head.fit(None)  # refused before the store is looked at
    with pytest.raises(ParamError, match="^mldecoder: heads 3 must divide width 256$"):
        make_head("mldecoder", heads=3)
    with pytest.raises(ParamError, match="^linear: min_labels 5 is more than max_labels 2$"):
        make_head("linear", min_labels=5, max_labels=2)


@pytest.mark.parametrize(("param", "shown"), [
    ("epochs", "[linear, linear_hog: 30; csra, mldecoder: 20; attn_rnn: 10]"),  # defaults that differ, per head
    ("thresholds", "[linear, linear_hog, lgbm, csra, mldecoder: calibrated; attn_rnn: global]"),
    ("shrink", "[10.0]"),
    ("max_labels", "[no limit]"),  # None: what the declaration says it means
    ("colsample", "[200 features per tree, all when fewer]"),
    ("class_weights", "[on]"),
    ("hog", "[csra, mldecoder: off; attn_rnn: when the store has HOG features (with init_from: as that model)]"),
])
def test_fit_option_help_shows_each_heads_default(param, shown):
    option = {o.name: o for o in head_options()}[param]
    assert option.help.endswith(" " + shown)


def test_fit_options_come_from_the_declarations():
    options = {o.name: o for o in head_options()}
    assert set(options) == {p for cls in HEADS.values() for p in cls.param_names()}
    for cls in HEADS.values():
        for param, spec in cls.param_specs().items():
            assert options[param].default is None  # a parameter left out takes the head's own default
            assert spec.help in options[param].help
    text = CliRunner().invoke(cli, ["fit", "--help"], terminal_width=200).output
    for name in options:
        assert f"--{name.replace('_', '-')}" in text
    assert "[linear, linear_hog: 30; csra, mldecoder: 20; attn_rnn: 10]" in text


def test_cli_shows_parameter_errors_as_options(tiny_store, tmp_path):
    result = CliRunner().invoke(cli, ["fit", "--store", str(tiny_store), "--head", "mldecoder", "--heads", "3",
                                      "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2 and "mldecoder: --heads 3 must divide --width 256" in result.output
    assert not (tmp_path / "m.pt").exists()
