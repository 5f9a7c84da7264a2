"""`imet model info` on every kind of model file, and blend/stack members found next to the blend file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_store

import imet
from imet.cli import cli
from imet.heads import HEADS, make_head
from imet.store import FeatureStore


def _run(*argv: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    assert result.exit_code == code, result.output
    return result.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """In one folder: a store; linear and lgbm heads and a blend of them on val; the same two heads fitted with
    --folds 2 and a stack of their out-of-fold probabilities."""
    d = tmp_path_factory.mktemp("info") / "models"
    d.mkdir()
    make_store(d / "s.h5", n_images=60)
    heads = {"linear": ["--epochs", "3"], "lgbm": ["--rounds", "5", "--min-leaf", "2"]}
    for head, extra in heads.items():
        _run("-q", "fit", "--store", d / "s.h5", "--head", head, "--out", d / f"{head}.pt", *extra)
        _run("-q", "predict", "--store", d / "s.h5", "--model", d / f"{head}.pt", "--split", "val", "--out",
             d / "x.csv", "--probs", d / f"{head}_val.h5")
        _run("-q", "fit", "--store", d / "s.h5", "--head", head, "--out", d / f"{head}_folds.pt", "--folds", "2",
             "--oof", d / f"{head}_oof.h5", *extra)
    _run("-q", "blend", "fit", d / "linear_val.h5", d / "lgbm_val.h5", "--out", d / "blend.json")
    _run("-q", "blend", "fit", d / "linear_val.h5", d / "lgbm_val.h5", "--out", d / "per-label.json", "--weights",
         "per-label", "--min-positives", "1")
    _run("-q", "stack", d / "linear_oof.h5", d / "lgbm_oof.h5", "--out", d / "stack.json")
    return d


def _info(path: Path) -> dict:
    return json.loads(_run("model", "info", path, "--json"))


def test_a_head_file(fitted):
    info, blob = _info(fitted / "linear.pt"), torch.load(fitted / "linear.pt", weights_only=True)
    assert (info["format"], info["version"], info["head"]) == ("imet-model", 1, "linear")
    assert info["imet_version"] == imet.__version__
    assert info["sha256"] == _sha(fitted / "linear.pt")
    assert info["params"]["epochs"] == 3 and info["params"] == blob["params"]
    assert info["decoding"]["mode"] == "per-class"  # the default --thresholds
    assert info["decoding"]["groups"] == [{"kind": "*", "threshold": blob["learned"]["threshold"], "min_labels": 1,
                                           "max_labels": None}]
    ct = blob["learned"]["class_thresholds"]
    assert info["decoding"]["class_thresholds"] == {"count": 6, "min": min(ct), "max": max(ct)}
    assert info["decoding"]["power"] == (blob["learned"]["power"] if blob["learned"]["loss_weights"] else 0.0)
    store = FeatureStore(fitted / "s.h5")
    assert info["features"]["fingerprint"] == store.fingerprint
    assert info["features"]["layout"] == {"pooled": [16]} and info["features"]["settings"] == {"test": True}
    assert info["labels"] == {"count": 6, "kinds": {"culture": 2, "tag": 4}}
    assert info["scores"] == {"val_f2": blob["learned"]["val_f2"]} and info["members"] == []


def test_a_folds_file(fitted):
    info, blob = _info(fitted / "lgbm_folds.pt"), torch.load(fitted / "lgbm_folds.pt", weights_only=True)
    assert (info["format"], info["head"]) == ("imet-folds", "lgbm")
    assert info["params"]["rounds"] == 5 and (info["params"]["folds"], info["params"]["fold_seed"]) == (2, 0)
    assert info["scores"] == {"oof_f2": blob["oof_f2"]}
    assert [m["fold"] for m in info["members"]] == [1, 2]
    assert sum(m["held_out_images"] for m in info["members"]) == 48  # the 60 images' train and val
    assert [m["val_f2"] for m in info["members"]] == [f["learned"]["val_f2"] for f in blob["folds"]]


@pytest.mark.parametrize("name, members, tag", [("blend.json", ("linear.pt", "lgbm.pt"), "imet-blend"),
                                                 ("stack.json", ("linear_folds.pt", "lgbm_folds.pt"), "imet-stack")])
def test_a_blend_or_stack_file(fitted, name, members, tag):
    info, blob = _info(fitted / name), json.loads((fitted / name).read_text())
    assert (info["format"], info["head"], info["features"]) == (tag, name.split(".")[0], None)
    assert info["sha256"] == _sha(fitted / name)
    assert info["decoding"]["groups"] == blob["rule"]["groups"]
    assert info["labels"] == {"count": 6, "kinds": {"culture": 2, "tag": 4}}
    split = "val" if tag == "imet-blend" else "oof"
    assert info["scores"] == {f"{split}_f2": blob["val_f2"]} and info["params"]["split"] == split
    assert [(Path(m["model"]).name, m["sha256"], m["head"], m["found"]) for m in info["members"]] == [
        (f, _sha(fitted / f), f.split("_")[0].split(".")[0], str(fitted / f)) for f in members]
    if tag == "imet-blend":
        assert sum(m["weight"] for m in info["members"]) == pytest.approx(1)
    else:
        assert info["params"]["candidates"] == blob["candidates"] and info["params"]["trees"] == 150


def test_a_blend_with_weights_per_label(fitted):
    info, blob = _info(fitted / "per-label.json"), json.loads((fitted / "per-label.json").read_text())
    assert blob["version"] == 2 and info["params"] == {"split": "val", "images": 12, "weights": "per-label",
                                                       "min_positives": 1}
    per_label = np.array([m["label_weights"] for m in info["members"]])
    assert per_label.shape == (2, 6) and np.allclose(per_label.sum(axis=0), 1)
    assert [m["weight"] for m in info["members"]] == pytest.approx(per_label.mean(axis=1))
    assert _info(fitted / "blend.json")["params"]["weights"] == "global"
    text = _run("model", "info", fitted / "per-label.json")
    assert f"weight {per_label[0].mean():.2f} on average over labels ({per_label[0].min():.2f}.." in text


def test_text_form(fitted):
    text = _run("model", "info", fitted / "blend.json")
    assert f"sha256: {_sha(fitted / 'blend.json')}" in text and "labels: 6 (culture 2, tag 4)" in text
    assert f"found at {fitted / 'lgbm.pt'}" in text
    text = _run("model", "info", fitted / "linear.pt")
    assert "head linear" in text and "epochs=3" in text and "mode per-class" in text


@pytest.mark.parametrize("name", ["linear.pt", "blend.json"])
def test_store_info_on_a_model_file_points_here(fitted, name):
    output = _run("store", "info", fitted / name, code=2)
    assert output == f"Error: {fitted / name}: a model file, not a store (imet model info looks into it)\n"


@pytest.mark.parametrize("write, said", [
    (lambda p, d: p.write_bytes((d / "linear.pt").read_bytes()[:500]), "not a readable imet model"),
    (lambda p, d: p.write_text('{"format": "imet-blend", "version": 1, "members": 3}'), "damaged blend file"),
    (lambda p, d: None, "model file not found"),
])
def test_a_damaged_file_is_one_line_naming_it(fitted, tmp_path, write, said):
    write(tmp_path / "m.pt", fitted)
    output = _run("model", "info", tmp_path / "m.pt", code=2)
    assert output.startswith(f"Error: {tmp_path / 'm.pt'}: {said}") and output.count("\n") == 1, output


@pytest.mark.parametrize("name", ["blend.json", "stack.json"])
def test_a_moved_folder_predicts_the_same_bytes(fitted, tmp_path, name):
    """The folder of model files and their blend (or stack), moved: members are found next to the blend file."""
    before = tmp_path / "before.csv"
    _run("predict", "--store", fitted / "s.h5", "--model", fitted / name, "--split", "test", "--out", before)
    moved, away = tmp_path / "input" / "models", fitted.with_name("away")
    shutil.copytree(fitted, moved)
    os.rename(fitted, away)  # the recorded paths are gone
    try:
        _run("predict", "--store", moved / "s.h5", "--model", moved / name, "--split", "test", "--out",
             tmp_path / "after.csv")
        assert (tmp_path / "after.csv").read_bytes() == before.read_bytes()
        assert all(m["found"].startswith(str(moved)) for m in _info(moved / name)["members"])
        member = _info(moved / name)["members"][0]["model"]
        os.remove(moved / Path(member).name)
        output = _run("predict", "--store", moved / "s.h5", "--model", moved / name, "--split", "test",
                      "--out", tmp_path / "none.csv", code=2)
        assert output.count("\n") == 1 and f"{moved / name}: its model {Path(member).name}" in output
        assert f"{moved / Path(member).name}: not there; {member}: not there" in output, output
        info = _info(moved / name)["members"][0]
        assert info["found"] is None and [x["path"] for x in info["looked"]] == [str(moved / Path(member).name),
                                                                                member]
    finally:
        os.rename(away, fitted)


def test_a_member_changed_next_to_the_blend_falls_back_to_the_recorded_path(fitted, tmp_path):
    moved = tmp_path / "copy"
    shutil.copytree(fitted, moved)
    shutil.copy(moved / "lgbm.pt", moved / "linear.pt")  # another file under the member's name
    info = _info(moved / "blend.json")["members"][0]
    assert info["found"] == str(fitted / "linear.pt")
    assert info["looked"] == [{"path": str(moved / "linear.pt"),
                               "what": "another file (changed since the blend was tuned: sha256 differs)"}]


SMALL = {"epochs": 1, "hidden": 16, "attention_dim": 8, "pred_dim": 16, "beam": 2, "width": 16, "heads": 2,
         "workers": 0, "rounds": 5}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_describes_itself(fitted, tmp_path, name):
    params = {k: v for k, v in SMALL.items() if k in HEADS[name].param_names()}
    head = make_head(name, **params).fit(FeatureStore(fitted / "s.h5"), log=lambda _: None)
    head.save(tmp_path / "m.pt")
    info = _info(tmp_path / "m.pt")
    assert info["head"] == name and info["params"] == torch.load(tmp_path / "m.pt", weights_only=True)["params"]
    assert set(info["features"]["layout"]) == set(head.needs) and info["scores"]["val_f2"] == head.val_f2_
    if name == "attn_rnn":  # beam search, not thresholds
        assert info["decoding"]["mode"] == "beam" and info["decoding"]["beam"] == 2
    else:
        assert info["decoding"]["mode"] == "per-class"
    _run("model", "info", tmp_path / "m.pt", "--config", tmp_path / "m.toml")  # and its fit, written back
    _run("-q", "fit", "--config", tmp_path / "m.toml", "--store", fitted / "s.h5", "--out", tmp_path / "again.pt")
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "m.pt").read_bytes()


@pytest.mark.parametrize("fit", [["--head", "linear", "--epochs", "2", "--lr", "0.01", "--thresholds", "global",
                                  "--min-labels", "2", "--no-class-weights"],
                                 ["--head", "lgbm", "--rounds", "5", "--min-leaf", "2", "--folds", "2", "--fold-seed",
                                  "3", "--colsample", "0.5"]])
def test_config_written_back_refits_the_same_bytes(fitted, tmp_path, fit):
    _run("-q", "fit", "--store", fitted / "s.h5", "--out", tmp_path / "m.pt", *fit)
    _run("model", "info", tmp_path / "m.pt", "--config", tmp_path / "m.toml")
    text = (tmp_path / "m.toml").read_text()
    assert ("epochs = 2" in text and "lr = 0.01" in text and 'thresholds = "global"' in text
            and "class_weights = false" in text) if "linear" in fit else ("folds = 2" in text and "fold_seed = 3" in
                                                                          text and "colsample = 0.5" in text)
    _run("-q", "fit", "--config", tmp_path / "m.toml", "--store", fitted / "s.h5", "--out", tmp_path / "again.pt")
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "m.pt").read_bytes()


def test_config_of_a_blend_is_refused(fitted, tmp_path):
    output = _run("model", "info", fitted / "blend.json", "--config", tmp_path / "b.toml", code=2)
    assert "blend.json: a blend file; --config writes the settings of imet fit" in output
    assert not (tmp_path / "b.toml").exists()
