"""Every registered head through one parametrised test, plus the linear heads and the fit/predict CLI."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import cheap_head, make_store, quiet

from imet.cli import cli
from imet.decode.rule import Group, Rule
from imet.decode.submission import read_submission
from imet.decode.thresholds import apply_thresholds
from imet.errors import ImetError
from imet.heads import HEADS, load_model, make_head
from imet.heads.train import class_weights
from imet.metrics import scores
from imet.store import FeatureStore


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    return FeatureStore(make_store(tmp_path_factory.mktemp("heads") / "s.h5"))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_contract(name, random_store, tmp_path):
    head = cheap_head(name)
    assert not any(k.endswith("_") for k in vars(head))  # __init__ only stores parameters
    assert type(head)(**head.get_params()).get_params() == head.get_params()
    views = random_store.views("test")
    with pytest.raises(ImetError, match="not fitted"):
        head.predict_proba(random_store, views)
    assert head.fit(random_store, log=quiet) is head
    probs = head.predict_proba(random_store, views)
    assert probs.shape == (len(views), len(random_store.vocab))
    assert probs.dtype == np.float32 and (probs >= 0).all() and (probs <= 1).all()
    head.save(tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    assert type(again) is type(head) and again.get_params() == head.get_params()
    np.testing.assert_array_equal(again.predict_proba(random_store, views), probs)
    images, _, labels = again.predict_labels(random_store, "test")
    assert labels.shape == (len(images), len(random_store.vocab)) and labels.sum(1).min() >= 1


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_refuses_a_store_it_was_not_made_for(name, random_store, tmp_path):
    head = cheap_head(name).fit(random_store, log=quiet)
    other_labels = FeatureStore(make_store(tmp_path / "labels.h5", n_labels=7))
    with pytest.raises(ImetError, match="another label vocabulary"):
        head.predict_labels(other_labels, "test")
    other_layout = FeatureStore(make_store(tmp_path / "layout.h5", dim=20, channels=5, hog=9))
    with pytest.raises(ImetError, match="feature layout differs"):
        head.predict_labels(other_layout, "test")


class _Payload:
    """Unpickling this runs code: writes a file named in `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_model_file_is_plain_data(random_store, tmp_path):
    cheap_head("linear").fit(random_store, log=quiet).save(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["learned"]["extra"] = _Payload(tmp_path / "ran")  # a model file carrying a pickled object
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(ImetError, match="evil.pt: not a readable imet model"):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()  # loading never unpickles arbitrary objects
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ImetError, match="junk.pt: not a readable imet model"):
        load_model(tmp_path / "junk.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)  # a file from a version with other weights
    blob["state_dict"]["extra"] = blob["state_dict"].pop(next(iter(blob["state_dict"])))
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(ImetError, match=r"old.pt: its linear weights do not match .* missing, extra unexpected"):
        load_model(tmp_path / "old.pt")


def test_unknown_head_and_foreign_options_are_refused():
    with pytest.raises(ImetError, match="unknown head 'nope'; choose from"):
        make_head("nope")
    with pytest.raises(ImetError, match="beam does not apply to head linear"):
        make_head("linear", beam=3)


def test_class_weights_follow_the_formula():
    targets = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    # class 0: 3 pos, 1 neg -> 1/3; class 1: 1 pos, 3 neg -> 3; class 2: never seen -> clip; class 3: 1/3 -> 3
    np.testing.assert_allclose(class_weights(targets.sum(0), len(targets)), [1 / 3, 3, 10, 3], rtol=1e-6)
    many = np.zeros((100, 1))
    many[0] = 1
    assert class_weights(many.sum(0), 100)[0] == 10  # 99 clipped at 10


@pytest.mark.parametrize("name", ["linear", "linear_hog"])
def test_linear_heads_separate_linearly_separable_labels(name, tmp_path):
    rng = np.random.default_rng(1)
    n, c, dim = 300, 6, 12
    image_x = rng.normal(size=(n, dim)).astype(np.float32)
    targets = (rng.random((n, c)) < 0.3).astype(np.uint8)
    targets[targets.sum(1) == 0, 0] = 1
    image_x[:, :c] = np.where(targets, 1, -1) * rng.uniform(0.5, 1.5, (n, c))  # separable with a margin
    views = np.repeat(image_x, 2, axis=0) + rng.normal(scale=0.05, size=(2 * n, dim)).astype(np.float32)
    path = make_store(tmp_path / "sep.h5", targets=targets,
                      features={"pooled": views, "hog": rng.random((2 * n, 5)).astype(np.float32)})
    store = FeatureStore(path)
    head = make_head(name, epochs=40, batch_size=64, lr=3e-2).fit(store, log=quiet)
    images, _, labels = head.predict_labels(store, "test")
    assert scores(store.targets[images], labels)["f2"] > 0.95


def test_fit_predict_evaluate_cli(tiny_store, tmp_path):
    runner = CliRunner()
    model = tmp_path / "linear.pt"
    result = runner.invoke(cli, ["fit", "--store", str(tiny_store), "--head", "linear", "--out", str(model),
                                 "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "val:" in result.output and "f2" in result.output
    sub, probs = tmp_path / "sub.csv", tmp_path / "p.h5"
    result = runner.invoke(cli, ["predict", "--store", str(tiny_store), "--model", str(model), "--out", str(sub),
                                 "--probs", str(probs)])
    assert result.exit_code == 0, result.output
    store = FeatureStore(tiny_store)
    images, _, labels = load_model(model).predict_labels(store, "kaggle-test")
    parsed = read_submission(sub)
    assert list(parsed) == ["t03", "t02", "t01", "t00"]  # sample_submission.csv order
    for i, row in zip(images, labels, strict=True):
        assert parsed[store.image_ids[i]] == sorted(store.vocab.attribute_ids[row].tolist())
    with h5py.File(probs) as f:
        assert f["probs"].shape == (4, len(store.vocab))
    table = tmp_path / "t.csv"
    result = runner.invoke(cli, ["evaluate", "--store", str(tiny_store), "--model", str(model), str(model),
                                 "--split", "test", "--csv", str(table)])
    assert result.exit_code == 0, result.output
    assert result.output.count("linear.pt") == 2 and len(table.read_text().splitlines()) == 3


def test_cli_errors_are_one_line(tiny_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", "--store", str(tiny_store), "--model", str(tmp_path / "none.pt"),
                                 "--out", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "none.pt: model file not found" in result.output
    result = runner.invoke(cli, ["fit", "--store", str(tmp_path / "none.h5"), "--head", "linear",
                                 "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2 and "none.h5: store not found" in result.output
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("name", sorted(n for n, h in HEADS.items() if h.probabilistic))
def test_per_class_thresholds_and_label_counts_survive_a_round_trip(name, random_store, tmp_path):
    head = cheap_head(name, thresholds="per-class", min_labels=2, max_labels=3).fit(random_store, log=quiet)
    assert head.class_thresholds_.shape == (len(random_store.vocab),)
    head.save(tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    np.testing.assert_array_equal(again.class_thresholds_, head.class_thresholds_)
    images, probs, labels = again.predict_labels(random_store, "test")
    assert labels.sum(1).min() >= 2 and labels.sum(1).max() <= 3
    _, _, before = head.predict_labels(random_store, "test")
    np.testing.assert_array_equal(labels, before)
    by_class = apply_thresholds(head.rule().scores(probs), head.class_thresholds_, min_labels=2, max_labels=3)
    np.testing.assert_array_equal(labels, by_class)


def test_per_kind_rule_survives_a_round_trip_and_decodes_kinds_apart(random_store, tmp_path):
    head = cheap_head("linear", thresholds="per-kind").fit(random_store, log=quiet)
    head.kind_rule_ = Rule((Group("culture", 0.9, 1, 1), Group("tag", 0.0, 0, 2)))  # a rule easy to check
    head.save(tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    assert again.rule() == head.rule() and "culture at 0.90" in again.decoding()
    _, probs, labels = again.predict_labels(random_store, "test")
    culture = random_store.vocab.culture
    assert (labels[:, culture].sum(1) == 1).all() and (labels[:, ~culture].sum(1) == 2).all()
    np.testing.assert_array_equal(labels, again.rule().apply(probs, random_store.vocab.kinds))


def test_per_kind_tuning_never_scores_below_the_global_threshold_on_val(random_store):
    glob = cheap_head("linear").fit(random_store, log=quiet)
    kind = cheap_head("linear", thresholds="per-kind").fit(random_store, log=quiet)
    assert kind.val_f2_ >= glob.val_f2_
    images, probs, labels = kind.predict_labels(random_store, "val")
    assert scores(random_store.targets[images], labels)["f2"] == pytest.approx(kind.val_f2_, abs=1e-9)


def test_a_model_fitted_on_a_bigger_machine_loads_with_this_machines_worker_bound(random_store, tmp_path, monkeypatch):
    import imet.heads.base as base

    head = cheap_head("csra", workers=0).fit(random_store)
    head.workers = 64  # as fitted on a 16-core machine
    head.save(tmp_path / "m.pt")
    monkeypatch.setattr(base, "max_workers", lambda: 8)
    assert load_model(tmp_path / "m.pt").workers == 8


def test_class_weights_recorded_undone_and_older_files_decode_as_before(random_store, tmp_path):
    head = cheap_head("linear", thresholds="global").fit(random_store, log=quiet)
    tr = random_store.views("train")
    np.testing.assert_allclose(head.loss_weights_, class_weights(random_store.view_targets(tr).sum(0), len(tr)))
    head.power_, head.threshold_ = 1.0, 0.2  # a rule that undoes the weights
    head.save(tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    _, probs, labels = again.predict_labels(random_store, "test")
    undone = probs / (probs + head.loss_weights_ * (1 - probs))
    np.testing.assert_array_equal(labels, apply_thresholds(undone, 0.2))
    blob = torch.load(tmp_path / "m.pt", weights_only=True)  # as an imet before this change wrote it
    for key in ("loss_weights", "power"):
        del blob["learned"][key]
    del blob["params"]["undo_weights"]
    torch.save(blob, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    assert old.power_ == 0.0 and old.loss_weights_ is None
    np.testing.assert_array_equal(old.predict_labels(random_store, "test")[2], apply_thresholds(probs, 0.2))
    blob["learned"]["power"] = 0.5  # a power without the weights it undoes: refused, one line
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ImetError, match="refit"):
        load_model(tmp_path / "bad.pt")
