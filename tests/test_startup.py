"""Start-up: `imet --help`, the commands' help and argument errors answer without importing torch and the
other heavy packages (what made them take seconds). Measured by the modules a fresh interpreter has imported,
not by seconds (the machine may be busy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from imet.cli import cli
from imet.heads import HEADS
from imet.heads.params import DECLARED

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "lightgbm", "sklearn", "h5py", "skimage")

# Each command line runs in one fresh interpreter, in this order; the heavy modules are read after each.
RUN = r"""
import json, sys
from imet.cli import cli
heavy = {heavy!r}
rows = []
for args in {cases!r}:
    try:
        cli(args, prog_name="imet")
    except SystemExit as e:
        code = e.code
    rows.append([args, code, sorted(m for m in heavy if m in sys.modules)])
print(json.dumps(rows))
"""


def run_fresh(cases: list[list[str]], cwd: Path) -> list:
    script = RUN.format(heavy=HEAVY, cases=cases)
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_argument_errors_import_no_heavy_module(tmp_path):
    """Every help, the argument errors of the commands that read a store, a model or probabilities, and
    featurize's (a choice click refuses, a combination Options refuses): exit 0 for help, 2 for an error, and no
    heavy module loaded."""
    there = tmp_path / "there.txt"  # an existing file that is not a store: refused later, by the library
    there.write_text("x")
    helps = [["--help"], ["featurize", "--help"], ["fit", "--help"], ["predict", "--help"], ["evaluate", "--help"],
             ["report", "--help"],
             ["explain", "--help"], ["blend", "--help"], ["blend", "fit", "--help"], ["blend", "apply", "--help"],
             ["stack", "--help"], ["store", "--help"], ["store", "info", "--help"], ["store", "compact", "--help"],
             ["store", "merge", "--help"], ["synth", "--help"], ["summary", "--help"],
             ["model", "--help"], ["model", "info", "--help"]]
    errors = [["fit", "--store", "nope.h5", "--head", "linear", "--out", "x.pt"],
              ["fit", "--store", str(there), "--head", "nope", "--out", "x.pt"],
              ["fit", "--store", str(there), "--head", "linear", "--hidden", "8", "--out", "x.pt"],
              ["fit", "--store", str(there), "--head", "attn_rnn", "--init-from", "none.pt", "--out", "x.pt"],
              ["fit", "--store", str(there), "--head", "csra", "--epochs", "0", "--out", "x.pt"],
              ["fit", "--store", str(there), "--head", "csra", "--bogus", "1", "--out", "x.pt"],
              ["predict", "--store", "nope.h5", "--model", "m.pt", "--out", "s.csv"],
              ["evaluate", "--store", str(there), "--model", "none.pt"],
              ["report", "--store", "nope.h5", "--model", "m.pt", "--out", "r"],
              ["explain", "--store", "nope.h5", "--model", "m.pt", "--ids", "a", "--out", "r"],
              ["blend", "fit", "--store", "nope.h5", "--model", "m.pt", "--out", "b.json"],
              ["blend", "apply", "--blend", "nope.json", "a.h5", "--out", "s.csv"],
              ["stack", "a.h5", "b.h5", "--out", "s.json"],
              ["predict", "--data", str(tmp_path), "--model", "m.pt", "--out", "s.csv"],
              ["store", "info", "nope.h5"], ["store", "merge", "a.h5", "b.h5", "--out", "m.h5"],
              ["store", "compact", "nope.h5", "--out", "c.h5"], ["model", "info", "nope.pt"],
              ["featurize", str(tmp_path), "--out", "s.h5", "--backbone", "nope"],
              ["featurize", str(tmp_path), "--out", "s.h5", "--maps-dtype", "float64"],
              ["featurize", str(tmp_path), "--out", "s.h5", "--no-hog", "--hog-dim", "8"],
              ["featurize", str(tmp_path), "--out", "s.h5", "--backbone", "vit_b_16", "--image-size", "40"]]
    rows = run_fresh(helps + errors, tmp_path)
    for args, code, heavy in rows:
        assert heavy == [], f"imet {' '.join(args)} imported {heavy}"
        assert code == (2 if args in errors else 0), (args, code)
    assert not (tmp_path / "x.pt").exists()


def test_argument_errors_say_what_is_wrong(tmp_path):
    """The early refusals keep the library's words (a missing store, an unknown head, an option of another head)."""
    there = tmp_path / "there.txt"
    there.write_text("x")
    runner = CliRunner()
    cases = [(["fit", "--store", "nope.h5", "--head", "linear", "--out", "x.pt"], "nope.h5: store not found"),
             (["evaluate", "--store", str(there), "--model", "none.pt"], "none.pt: model file not found"),
             (["stack", str(there), "b.h5", "--out", "s.json"], "b.h5: probabilities file not found"),
             (["model", "info", str(tmp_path)], f"{tmp_path}: a directory, not a model file"),
             (["fit", "--store", str(tmp_path), "--head", "linear", "--out", "x.pt"],
              f"{tmp_path}: a directory, not a store"),
             (["fit", "--store", str(there), "--head", "nope", "--out", "x.pt"],
              "unknown head 'nope'; choose from attn_rnn, csra, lgbm, linear, linear_hog, mldecoder"),
             (["fit", "--store", str(there), "--head", "linear", "--hidden", "8", "--out", "x.pt"],
              "--hidden does not apply to head linear")]
    for args, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_fit_help_lists_every_heads_options():
    """`imet fit --help`, made from the declarations alone, still offers every parameter of every registered head
    (the heads themselves, imported here, are the reference)."""
    text = CliRunner().invoke(cli, ["fit", "--help"], terminal_width=200).output
    for name, cls in HEADS.items():
        for param in cls.param_names():
            flag = "--" + param.replace("_", "-")
            assert flag in text, f"{name}: {flag} missing from imet fit --help"
    assert "LSTM width. [512]" in " ".join(text.split())  # a head's own option, with its default


def test_declarations_are_the_heads_own():
    """Each registered head is a subclass of its declaration (imet.heads.params) and adds no parameter of its
    own: what --help and the early checks read is what the head takes."""
    assert set(DECLARED) == set(HEADS)
    for name, cls in HEADS.items():
        assert issubclass(cls, DECLARED[name])
        assert cls.param_specs() == DECLARED[name].param_specs()
        assert cls.param_defaults() == DECLARED[name].param_defaults()
