"""imet.stack: the second stage's features against a slow loop, its fit, its file, its use as a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from imet import stack as stack_module
from imet.cli import cli
from imet.decode.rule import Rule
from imet.decode.submission import read_submission
from imet.models import open_model
from imet.probfiles import write_probs
from imet.stack import Stack, blend, candidates, choose_k, features, read_stack, stacked


def test_features_match_a_slow_loop():
    rng = np.random.default_rng(0)
    probs = [rng.random((3, 4)), rng.random((3, 4))]
    prior, code = rng.random(4), np.array([0, 0, 1, 1], np.float32)
    x = features(probs, prior, code)
    assert x.shape == (12, 4 * 2 + 2)
    for i in range(3):
        for c in range(4):
            want = []
            for p in probs:
                better = sum(p[i, d] > p[i, c] or (p[i, d] == p[i, c] and d < c) for d in range(4))
                want += [p[i, c], better / 3, max(p[i]), sum(p[i]) / 4]
            np.testing.assert_allclose(x[i * 4 + c], [*want, prior[c], code[c]], rtol=1e-6)


def slow_rows(probs, prior, code, i, labels):
    """The feature rows of image i at `labels`, one (image, label) pair at a time."""
    c = probs[0].shape[1]
    out = []
    for lab in labels:
        want = []
        for p in probs:
            better = sum(p[i, d] > p[i, lab] or (p[i, d] == p[i, lab] and d < lab) for d in range(c))
            want += [p[i, lab], better / (c - 1), max(p[i]), sum(p[i]) / c]
        out.append([*want, prior[lab], code[lab]])
    return np.array(out)


@pytest.mark.parametrize("chunk_rows", [1 << 20, 10])  # one chunk; one image per chunk
def test_candidate_rows_match_a_slow_loop(monkeypatch, chunk_rows):
    monkeypatch.setattr(stack_module, "CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(1)
    n, c, k = 6, 7, 3
    probs = [rng.random((n, c)), rng.random((n, c))]
    probs[0][0], probs[1][0] = 0.5, 0.5  # image 0: every label tied
    prior, code = rng.random(c), (np.arange(c) % 2).astype(np.float32)
    cand = candidates(blend(probs), k)
    x = features(probs, prior, code, cand)
    assert x.shape == (n * k, 4 * 2 + 2)
    for i in range(n):
        mean = [(probs[0][i, d] + probs[1][i, d]) / 2 for d in range(c)]
        top = sorted(sorted(range(c), key=lambda d: (-mean[d], d))[:k])  # ties: the lower label first
        assert cand[i].tolist() == top
        np.testing.assert_allclose(x[i * k:(i + 1) * k], slow_rows(probs, prior, code, i, top), rtol=1e-6)
    np.testing.assert_array_equal(features(probs, prior, code, candidates(blend(probs), c)),
                                  features(probs, prior, code))  # K = C: every label, the version-1 rows


@pytest.mark.parametrize("recall", [0.5, 0.99])
def test_k_is_the_fewest_candidates_holding_the_recall(monkeypatch, recall):
    monkeypatch.setattr(stack_module, "RECALL", recall)
    rng = np.random.default_rng(2)
    mean, truth = rng.random((50, 30)), rng.random((50, 30)) < 0.1
    ranks = [sum(mean[i, d] > mean[i, c] or (mean[i, d] == mean[i, c] and d < c) for d in range(30))
             for i, c in zip(*np.nonzero(truth), strict=True)]
    want = next(k for k in range(1, 31) if np.mean(np.array(ranks) < k) >= recall)
    assert choose_k(mean, truth) == want


class FirstColumn:
    """A stand-in booster: the score of a row is its first feature (the first model's probability) halved."""

    def predict(self, x):
        return x[:, 0] / 2


def test_labels_outside_the_candidates_keep_the_blend_order_below_every_candidate():
    rng = np.random.default_rng(3)
    probs = [rng.random((20, 9)), rng.random((20, 9))]
    prior, code = rng.random(9), np.zeros(9, np.float32)
    out = stacked(FirstColumn(), probs, prior, code, 4)
    mean, cand = blend(probs), candidates(blend(probs), 4)
    for i in range(20):
        inside = np.isin(np.arange(9), cand[i])
        np.testing.assert_allclose(out[i, inside], probs[0][i, inside] / 2, rtol=1e-6)
        assert out[i, ~inside].max() <= out[i, inside].min() + 1e-12
        rest = np.flatnonzero(~inside)
        assert (np.argsort(-out[i, rest], kind="stable") == np.argsort(-mean[i, rest], kind="stable")).all()


def kind_experts(seed, n=120, c=8):
    """Model A knows the culture labels (the first half), model B the tags; each is noise elsewhere."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, c), int)
    y[np.arange(n), rng.integers(0, c // 2, n)] = 1
    for i in range(n):
        y[i, c // 2 + rng.choice(c // 2, rng.integers(1, 3), replace=False)] = 1
    culture = np.arange(c) < c // 2
    a = np.where(culture, np.clip(0.3 * rng.random((n, c)) + 0.6 * y, 0, 1), rng.random((n, c)))
    b = np.where(culture, rng.random((n, c)), np.clip(0.3 * rng.random((n, c)) + 0.6 * y, 0, 1))
    kinds = tuple("culture" if k else "tag" for k in culture)
    return [a, b], y, kinds


def _write(path, probs, y, kinds, sha):
    write_probs(path, [f"i{k}" for k in range(len(y))], probs, np.arange(probs.shape[1]), kinds=kinds, targets=y,
                head="linear", probabilistic=True, threshold=0.2, rule=json.dumps(Rule.global_(0.2).to_json()),
                model=f"/nowhere/{sha}.pt", model_sha256=sha * 64, split="oof")


def test_stack_learns_which_model_to_trust_per_label(tmp_path):
    probs, y, kinds = kind_experts(0)
    for name, p in zip("ab", probs, strict=True):
        _write(tmp_path / f"{name}.h5", p, y, kinds, name)
    runner = CliRunner()
    result = runner.invoke(cli, ["stack", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--out",
                                 str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    stack = open_model(tmp_path / "s.json")
    assert isinstance(stack, Stack)
    blob = json.loads((tmp_path / "s.json").read_text())
    assert blob["val_f2"] > max(m["val_f2"] for m in blob["members"]) + 0.1  # out of fold, each model alone
    test, ty, _ = kind_experts(1)  # new images of the same two models
    for name, p in zip("ab", test, strict=True):
        _write(tmp_path / f"t{name}.h5", p, ty, kinds, name)
    result = runner.invoke(cli, ["blend", "apply", "--blend", str(tmp_path / "s.json"), str(tmp_path / "tb.h5"),
                                 str(tmp_path / "ta.h5"), "--out", str(tmp_path / "sub.csv")])
    assert result.exit_code == 0, result.output
    sub = read_submission(tmp_path / "sub.csv")
    pred = np.array([[c in sub[f"i{k}"] for c in range(ty.shape[1])] for k in range(len(ty))])
    np.testing.assert_array_equal(pred, stack.label_sets(stack.combine(test)))
    from sklearn.metrics import fbeta_score
    assert fbeta_score(ty, pred, beta=2, average="samples") > 0.9


def _stacked(tmp_path, n):
    """Two members' probability files (a.h5, b.h5) stacked into s.json; their inputs and the file's JSON."""
    probs, y, kinds = kind_experts(0, n=n)
    for name, p in zip("ab", probs, strict=True):
        _write(tmp_path / f"{name}.h5", p, y, kinds, name)
    assert CliRunner().invoke(cli, ["stack", str(tmp_path / "a.h5"), str(tmp_path / "b.h5"), "--out",
                                    str(tmp_path / "s.json")]).exit_code == 0
    return probs, y, kinds, json.loads((tmp_path / "s.json").read_text())


def test_damaged_stack_file_is_one_line(tmp_path):
    probs, y, kinds, blob = _stacked(tmp_path, 40)
    runner = CliRunner()
    blob["booster"] = "tree\nnonsense=1\n"
    (tmp_path / "s.json").write_text(json.dumps(blob))
    result = runner.invoke(cli, ["blend", "apply", "--blend", str(tmp_path / "s.json"), str(tmp_path / "a.h5"),
                                 str(tmp_path / "b.h5"), "--out", str(tmp_path / "sub.csv")])
    assert result.exit_code == 2 and "s.json: damaged stack file" in result.output
    assert not (tmp_path / "sub.csv").exists()
    with pytest.raises(Exception, match="too few"):
        from imet.stack import fit_stack
        _write(tmp_path / "few.h5", probs[0][:5], y[:5], kinds, "c")
        fit_stack([tmp_path / "few.h5"], tmp_path / "x.json")


def test_stack_files_of_version_1_read_as_a_row_for_every_label(tmp_path):
    probs, y, kinds, blob = _stacked(tmp_path, 60)
    runner = CliRunner()
    assert blob["version"] == 2 and 1 <= blob["candidates"] <= y.shape[1]
    del blob["candidates"]  # a file as imet wrote it before candidates
    blob["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(blob))
    old = open_model(tmp_path / "v1.json")
    assert old.file.k == y.shape[1]
    f = read_stack(tmp_path / "v1.json")
    np.testing.assert_allclose(old.combine(probs), f.booster.predict(features(probs, f.prior, f.code)).reshape(y.shape))
    blob["version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(blob))
    result = runner.invoke(cli, ["blend", "apply", "--blend", str(tmp_path / "v3.json"), str(tmp_path / "a.h5"),
                                 str(tmp_path / "b.h5"), "--out", str(tmp_path / "sub.csv")])
    assert result.exit_code == 2 and "stack format version 3 is not supported" in result.output
