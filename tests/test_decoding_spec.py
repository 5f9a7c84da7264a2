"""imet.decode.spec: each declared decoding bound enforced at its boundary, by heads, blend fit and stack, through
the library and through the CLI (the value just inside passes, just outside is refused naming the parameter);
imet.decode.rule.search_rule, the one search of a rule as a Decoding asks, on hand-made probabilities."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_store
from sklearn.metrics import fbeta_score

from imet.blend import fit_blend
from imet.cli import cli
from imet.decode.rule import Group, Rule, search_rule
from imet.decode.spec import ENSEMBLE, PARAMS, Decoding
from imet.errors import ParamError
from imet.heads import make_head
from imet.predict import write_probs
from imet.stack import fit_stack

C = 6  # labels of the files and the store below
GLOBAL = Decoding(thresholds="global")  # a base on which every count and shrink is allowed
# parameter: (base, just inside, just outside) at each declared bound, written out (not read from the declarations)
BOUNDS = {
    "thresholds": [(Decoding(), "global", "globals"), (Decoding(), "per-kind", "per_kind")],
    "min_labels": [(GLOBAL, 0, -1), (GLOBAL, C, C + 1)],
    "max_labels": [(GLOBAL, 1, 0)],
    "shrink": [(GLOBAL, 0.0, -1e-6)],
}
CASES = [(name, base, inside, outside) for name, cases in BOUNDS.items() for base, inside, outside in cases]
IDS = [f"{name}={inside}|{outside}" for name, _, inside, outside in CASES]


def test_the_table_covers_every_declared_decoding_parameter():
    assert set(BOUNDS) == set(PARAMS) == set(Decoding().values())
    assert Decoding() == Decoding("calibrated", 1, None, 10.0) == ENSEMBLE


@pytest.fixture(scope="module")
def probs(tmp_path_factory):
    """Two labelled probability files of 24 images and C labels (culture and tag), as predict --probs writes."""
    d = tmp_path_factory.mktemp("probs")
    rng = np.random.default_rng(0)
    y = (rng.random((24, C)) < 0.3).astype(np.uint8)
    y[np.arange(24), rng.integers(0, C, 24)] = 1
    kinds = tuple("culture" if c < 2 else "tag" for c in range(C))
    for name in ("a", "b"):
        p = np.clip(0.5 * rng.random((24, C)) + 0.4 * y, 0, 1)
        write_probs(d / f"{name}.h5", [f"i{k}" for k in range(24)], p, np.arange(C) * 2 + 1, kinds=kinds, targets=y,
                    head="linear", probabilistic=True, threshold=0.2, rule=json.dumps(Rule.global_(0.2).to_json()),
                    model=f"/nowhere/{name}.pt", model_sha256=name * 64, split="val")
    return [d / "a.h5", d / "b.h5"]


def sample_f2(y, pred) -> float:
    return fbeta_score(y, pred, beta=2.0, average="samples", zero_division=0.0)


def _flags(decoding: Decoding) -> list[str]:
    return [a for k, v in decoding.values().items() if v is not None for a in (f"--{k.replace('_', '-')}", str(v))]


def _written_group(path) -> dict:
    return json.loads(path.read_text())["rule"]["groups"][0]


@pytest.mark.parametrize("fit", [fit_blend, fit_stack], ids=["blend", "stack"])
@pytest.mark.parametrize("name, base, inside, outside", CASES, ids=IDS)
def test_library_bound(tmp_path, probs, fit, name, base, inside, outside):
    fit(probs, tmp_path / "in.json", decoding=replace(base, **{name: inside}))
    if name in ("min_labels", "max_labels"):  # the written rule decodes with the value given
        assert _written_group(tmp_path / "in.json")[name] == inside
    with pytest.raises(ParamError, match=rf"^{fit.__name__[4:]}: {name} must be .*, not {outside!r}$") as e:
        fit(probs, tmp_path / "out.json", decoding=replace(base, **{name: outside}))
    assert name in e.value.names and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name, base, inside, outside", CASES, ids=IDS)
def test_head_bound(name, base, inside, outside):
    params = {**base.values(), name: inside}
    make_head("linear", **params).validate(C)
    with pytest.raises(ParamError, match=rf"^linear: {name} must be .*, not {outside!r}$") as e:
        make_head("linear", **{**params, name: outside}).validate(C)
    assert name in e.value.names


@pytest.mark.parametrize("command", ["blend fit", "stack"])
@pytest.mark.parametrize("name, base, inside, outside", CASES, ids=IDS)
def test_cli_bound(tmp_path, probs, command, name, base, inside, outside):
    argv = [*command.split(), *map(str, probs), "--out"]
    ok = CliRunner().invoke(cli, [*argv, str(tmp_path / "in.json"), *_flags(replace(base, **{name: inside}))])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, [*argv, str(tmp_path / "out.json"), *_flags(replace(base, **{name: outside}))])
    flag = "--" + name.replace("_", "-")
    assert bad.exit_code == 2 and "Traceback" not in bad.output and flag in bad.output.splitlines()[-1], bad.output
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("command", ["blend fit", "stack"])
def test_min_labels_may_equal_max_labels_not_exceed_it(tmp_path, probs, command):
    argv = [*command.split(), *map(str, probs), "--thresholds", "global", "--out"]
    ok = CliRunner().invoke(cli, [*argv, str(tmp_path / "in.json"), "--min-labels", "2", "--max-labels", "2"])
    assert ok.exit_code == 0, ok.output
    assert _written_group(tmp_path / "in.json") | {"threshold": 0} == {"kind": "*", "threshold": 0, "min_labels": 2,
                                                                      "max_labels": 2}
    bad = CliRunner().invoke(cli, [*argv, str(tmp_path / "out.json"), "--min-labels", "3", "--max-labels", "2"])
    assert bad.exit_code == 2 and bad.output.splitlines()[-1].endswith("--min-labels 3 is more than --max-labels 2")
    with pytest.raises(ParamError, match="^linear: min_labels 3 is more than max_labels 2$"):
        make_head("linear", min_labels=3, max_labels=2)
    with pytest.raises(ParamError, match="^stack: min_labels 3 is more than max_labels 2$"):
        fit_stack(probs, tmp_path / "x.json", decoding=Decoding("global", 3, 2))


@pytest.mark.parametrize("flags", [[], ["--thresholds", "global", "--max-labels", "1"]])
def test_fit_cli_decoding_options_at_their_bounds(tmp_path, flags):
    """fit's decoding options come from the same declarations: the label count bounds min_labels."""
    store = make_store(tmp_path / "s.h5", n_labels=C)
    argv = ["fit", "--store", str(store), "--head", "linear", "--epochs", "1", "--out"]
    ok = CliRunner().invoke(cli, [*argv, str(tmp_path / "in.pt"), *flags, "--min-labels", "1" if flags else str(C)])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, [*argv, str(tmp_path / "out.pt"), "--min-labels", str(C + 1)])
    assert bad.exit_code == 2 and bad.output.splitlines()[-1] == (
        f"Error: linear: --min-labels must be an integer in 0..{C} (at most the {C} labels), not {C + 1}")
    assert not (tmp_path / "out.pt").exists()


def _two_kinds(separable_by_one_threshold: bool):
    """(probs, truth, kinds) of 40 images, 2 culture and 4 tag labels. Every true label's p is above every false
    one's of its kind; across kinds too when `separable_by_one_threshold`, else a false culture label (0.4) lies
    above every true tag label (0.2), so only a threshold per kind decodes every image exactly."""
    rng = np.random.default_rng(0)
    y = rng.random((40, C)) < 0.4
    y[np.arange(40), rng.integers(0, C, 40)] = True
    culture = np.arange(C) < 2
    if separable_by_one_threshold:
        high, low = 0.6, 0.1
    else:
        high, low = np.where(culture, 0.45, 0.2), np.where(culture, 0.4, 0.05)
    return np.where(y, high, low), y, tuple("culture" if c else "tag" for c in culture)


def test_search_rule_keeps_the_per_kind_rule_only_when_it_beats_the_global_threshold():
    probs, y, kinds = _two_kinds(separable_by_one_threshold=True)
    tie = search_rule(probs, y, kinds, Decoding("per-kind", 0, None))  # both decode exactly: F2 1 each
    assert not tie.rule.by_kind and tie.f2 == tie.global_f2 == 1.0 and tie.power == 0.0
    assert tie.rule.groups == (Group("*", tie.threshold, 0, None),) and 0.1 < tie.threshold <= 0.6
    probs, y, kinds = _two_kinds(separable_by_one_threshold=False)
    won = search_rule(probs, y, kinds, Decoding("per-kind", 0, None))
    assert won.rule.by_kind and won.f2 == 1.0 > won.global_f2
    assert sample_f2(y, won.rule.apply(probs, kinds)) == 1.0
    plain = search_rule(probs, y, kinds, Decoding("global", 2, 3))  # global asked: no per-kind search
    assert plain.rule.groups == (Group("*", plain.threshold, 2, 3),) and plain.f2 == plain.global_f2 < 1.0
    assert plain.f2 == pytest.approx(sample_f2(y, plain.rule.apply(probs, kinds)), abs=1e-12)


def test_search_rule_scores_its_per_class_rule_as_scikit_learn_does():
    probs, y, kinds = _two_kinds(separable_by_one_threshold=False)
    found = search_rule(probs, y, kinds, Decoding("per-class", 1, None, shrink=0.0))
    assert found.rule.class_thresholds is not None and found.f2 == pytest.approx(
        sample_f2(y, found.rule.apply(probs, kinds)), abs=1e-12)
    assert found.f2 == 1.0 > found.global_f2  # unshrunk, a threshold per class separates every class


def test_search_rule_calibrated_decodes_the_probabilities_as_they_are_and_scores_as_scikit_learn():
    """A calibrated rule holds per-class thresholds on the probabilities as they are (no weights, power 0), so
    a head's rule rebuilt from its fields decodes alike; its F2 is scikit-learn's on its own labels."""
    probs, y, kinds = _two_kinds(separable_by_one_threshold=False)
    found = search_rule(probs, y, kinds, Decoding("calibrated", 1, None), weights=np.full(y.shape[1], 5.0))
    assert found.rule.class_thresholds is not None and found.rule.weights is None and found.power == 0.0
    assert found.f2 == pytest.approx(sample_f2(y, found.rule.apply(probs, kinds)), abs=1e-12)
    assert found.f2 == 1.0 > found.global_f2  # each label's own calibration separates it


def test_fit_and_blend_fit_cli_take_calibrated_thresholds(tmp_path):
    """`imet fit --thresholds calibrated` keeps the thresholds `search_calibrated` finds on the head's own val
    image probabilities; `imet blend fit --thresholds calibrated` writes a blend that predicts."""
    from imet.decode.thresholds import average_views, search_calibrated
    from imet.heads import load_model
    from imet.store import FeatureStore

    store = make_store(tmp_path / "s.h5", n_labels=C)
    model = tmp_path / "m.pt"
    argv = ["fit", "--store", str(store), "--head", "linear", "--epochs", "2", "--thresholds", "calibrated"]
    ok = CliRunner().invoke(cli, [*argv, "--out", str(model)])
    assert ok.exit_code == 0, ok.output
    head, st = load_model(model), FeatureStore(store)
    val = st.views("val")
    images, probs = average_views(head.predict_proba(st, val), st.view_image[val])
    want, _, _ = search_calibrated(probs, st.targets[images], min_labels=head.min_labels)
    np.testing.assert_array_equal(head.rule().class_thresholds, want)
    assert head.rule().weights is None and head.rule().power == 0.0
    out = CliRunner().invoke(cli, ["predict", "--store", str(store), "--model", str(model), "--split", "val",
                                   "--out", str(tmp_path / "val.csv"), "--probs", str(tmp_path / "val.h5")])
    assert out.exit_code == 0, out.output
    blend = CliRunner().invoke(cli, ["blend", "fit", str(tmp_path / "val.h5"), "--thresholds", "calibrated",
                                     "--out", str(tmp_path / "b.json")])
    assert blend.exit_code == 0, blend.output
    assert json.loads((tmp_path / "b.json").read_text())["rule"]["class_thresholds"] is not None
