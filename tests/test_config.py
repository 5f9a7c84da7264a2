"""`--config FILE` (TOML) for fit, featurize, blend fit and stack: the file's keys are the command's options,
flags override them, and a wrong key, type or file is one line naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_store

from imet.cli import cli
from imet.heads import load_model


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("config") / "s.h5", n_images=40)


def run(args: list, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_fit_takes_the_file_and_flags_override_it(store, tmp_path):
    config = toml(tmp_path / "fit.toml", f'head = "csra"\nstore = "{store}"\nepochs = 2\nbatch-size = 8\n'
                                         'lam = 0.5\nclass_weights = false\ntemperatures = "1,inf"\n')
    run(["fit", "--config", config, "--out", tmp_path / "m.pt", "--epochs", "1", "--no-class-weights"])
    params = load_model(tmp_path / "m.pt").get_params()
    assert (params["epochs"], params["batch_size"], params["lam"], params["class_weights"],
            params["temperatures"]) == (1, 8, 0.5, False, "1,inf")
    run(["fit", "--store", store, "--head", "csra", "--out", tmp_path / "flags.pt", "--epochs", "1", "--batch-size",
         "8", "--lam", "0.5", "--no-class-weights", "--temperatures", "1,inf"])
    assert (tmp_path / "m.pt").read_bytes() == (tmp_path / "flags.pt").read_bytes()


@pytest.mark.parametrize("text, message", [
    ("epoch = 2\n", "fit.toml: unknown key 'epoch': `imet fit` takes no such option (did you mean epochs?"),
    ("epochs = 2.5\n", "fit.toml: epochs must be an integer, not 2.5"),
    ("epochs = 0\n", "fit.toml: epochs: 0 is not in the range x>=1"),
    ("class-weights = \"yes\"\n", "fit.toml: class-weights must be true or false, not 'yes'"),
    ("thresholds = \"best\"\n", "fit.toml: thresholds: 'best' is not one of 'global', 'per-class', 'per-kind'"),
    ("lr = true\n", "fit.toml: lr must be a number, not True"),
    ("epochs = \n", "fit.toml: not valid TOML (Invalid value (at line 1, column 10))"),
    ("[fit]\nepochs = 2\n", "fit.toml: unknown key 'fit'"),
])
def test_a_bad_file_is_one_line_naming_it(store, tmp_path, text, message):
    config = toml(tmp_path / "fit.toml", text)
    result = run(["fit", "--config", config, "--store", store, "--head", "linear", "--out", tmp_path / "m.pt"], code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_other_formats_and_missing_files(store, tmp_path):
    for name, message in [("fit.json", "a config file is TOML (.toml) or YAML"), ("none.toml", "cannot read")]:
        result = run(["fit", "--config", tmp_path / name, "--store", store, "--head", "linear", "--out",
                      tmp_path / "m.pt"], code=2)
        assert f"{tmp_path / name}: {message}" in result.output
    try:
        import yaml  # noqa: F401
    except ImportError:
        config = toml(tmp_path / "fit.yaml", "epochs: 2\n")
        result = run(["fit", "--config", config, "--store", store, "--head", "linear", "--out", tmp_path / "m.pt"],
                     code=2)
        assert "fit.yaml: YAML config files need the PyYAML package, which is not installed" in result.output


def test_featurize_reads_its_options_and_arguments_from_the_file(data_dir, tmp_path):
    flags = run(["featurize", data_dir, "--out", tmp_path / "s.h5", "--dry-run", "--no-hog", "--image-size", "64",
                 "--splits", "train,val"])
    config = toml(tmp_path / "f.toml", 'hog = false\nimage-size = 64\nsplits = "train,val"\ndry-run = true\n')
    assert run(["featurize", data_dir, "--out", tmp_path / "s.h5", "--config", config]).output == flags.output
    assert "64" in flags.output


def test_blend_fit_and_stack_take_a_file(store, tmp_path):
    for name in ("a", "b"):
        run(["fit", "--store", store, "--head", "linear", "--epochs", "2", "--seed", str(len(name) + ord(name)),
             "--out", tmp_path / f"{name}.pt"])
    models = [tmp_path / "a.pt", tmp_path / "b.pt"]
    run(["blend", "fit", "--store", store, "--model", models[0], "--model", models[1], "--thresholds", "global",
         "--min-labels", "2", "--out", tmp_path / "flags.json"])
    config = toml(tmp_path / "b.toml", f'store = "{store}"\nmodel = ["{models[0]}", "{models[1]}"]\n'
                                       'thresholds = "global"\nmin_labels = 2\n')
    run(["blend", "fit", "--config", config, "--out", tmp_path / "config.json"])
    assert (tmp_path / "config.json").read_text() == (tmp_path / "flags.json").read_text()
    config = toml(tmp_path / "s.toml", f'prob_files = ["{tmp_path / "missing.h5"}"]\nseed = 3\n')
    result = run(["stack", "--config", config, "--out", tmp_path / "s.json"], code=2)
    assert f"{tmp_path / 'missing.h5'}" in result.output  # the file's argument reached the command
    result = run(["stack", "--config", toml(tmp_path / "s.toml", "seed = -1\n"), "p.h5", "--out", "s.json"], code=2)
    assert "s.toml: seed: -1 is not in the range" in result.output
