"""imet.sklearn.HeadClassifier: the pooled heads on plain arrays, inside GridSearchCV and Pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import fbeta_score, roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from imet.errors import ParamError
from imet.heads import make_head
from imet.sklearn import HeadClassifier


@pytest.fixture(scope="module")
def data():
    """200 rows: 4 labels planted in 16 pooled columns, then 8 HOG-like columns of noise."""
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(np.uint8)
    pooled = rng.normal(size=(200, 16)) + 3 * y @ rng.normal(size=(4, 16))
    return np.concatenate([pooled, rng.random((200, 8))], axis=1).astype(np.float32), y


def test_fit_predict_on_plain_arrays(data):
    X, y = data
    clf = HeadClassifier(make_head("linear", epochs=20, lr=0.05), hog_dim=8).fit(X[:150], y[:150])
    proba, pred = clf.predict_proba(X[150:]), clf.predict(X[150:])
    assert proba.shape == pred.shape == (50, 4) and proba.dtype == np.float32 and pred.dtype == np.uint8
    assert ((proba >= 0) & (proba <= 1)).all() and set(np.unique(pred)) <= {0, 1}
    assert roc_auc_score(y[150:], proba, average="macro") > 0.9  # the planted labels were learned
    assert clf.score(X[150:], y[150:]) == pytest.approx(
        fbeta_score(y[150:], pred, beta=2, average="samples", zero_division=0), abs=1e-12)
    assert len(clf.head_.vocab_) == 4 and clf.head_.layout_ == {"pooled": [16]}  # the 8 HOG columns unread
    with_hog = HeadClassifier(make_head("linear_hog", epochs=1), hog_dim=8).fit(X, y)
    assert with_hog.head_.layout_ == {"pooled": [16], "hog": [8]}
    assert not hasattr(clf.head, "vocab_")  # fit trained a clone: the head given stays unfitted


def test_params_are_nested_as_for_any_estimator():
    clf = HeadClassifier(make_head("linear", epochs=5), val_fraction=0.25)
    params = clf.get_params(deep=True)
    assert params["val_fraction"] == 0.25 and params["head__epochs"] == 5 and params["hog_dim"] == 0
    clf.set_params(head__epochs=7, hog_dim=2)
    assert clf.head.epochs == 7 and clf.hog_dim == 2
    copy = clone(clf)
    assert copy.head is not clf.head and copy.get_params()["head__epochs"] == 7


def test_grid_search_over_a_head_parameter(data):
    X, y = data
    search = GridSearchCV(HeadClassifier(make_head("linear", epochs=4)), {"head__lr": [1e-6, 0.05]}, cv=2).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 2 and scores[1] > scores[0]  # lr 1e-6 learns nothing in 4 epochs
    assert search.best_params_ == {"head__lr": 0.05} and search.best_estimator_.head_.lr == 0.05


def test_pipeline_and_a_grid_over_heads(data):
    X, y = data
    pipe = make_pipeline(StandardScaler(), HeadClassifier(make_head("lgbm", rounds=5, min_leaf=2), hog_dim=8))
    pipe.fit(X[:150], y[:150])
    scaler = StandardScaler().fit(X[:150])  # the reference: the same classifier on scaled arrays, by hand
    alone = HeadClassifier(make_head("lgbm", rounds=5, min_leaf=2), hog_dim=8).fit(scaler.transform(X[:150]), y[:150])
    np.testing.assert_array_equal(pipe.predict_proba(X[150:]), alone.predict_proba(scaler.transform(X[150:])))
    heads = [make_head("linear", epochs=3), make_head("linear_hog", epochs=3)]
    search = GridSearchCV(make_pipeline(StandardScaler(), HeadClassifier(heads[0], hog_dim=8)),
                          {"headclassifier__head": heads}, cv=2).fit(X, y)
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert search.best_estimator_[-1].head_.name in ("linear", "linear_hog")


def test_refusals_name_the_parameter(data):
    X, y = data
    with pytest.raises(ParamError, match="head: HeadClassifier takes a pooled head, .*lgbm, not csra"):
        HeadClassifier(make_head("csra")).fit(X, y)
    with pytest.raises(ParamError, match="lgbm, not 'linear'"):
        HeadClassifier("linear").fit(X, y)
    with pytest.raises(ParamError, match="hog_dim must be in 0..23"):
        HeadClassifier(make_head("linear_hog"), hog_dim=24).fit(X, y)
    with pytest.raises(ParamError, match="val_fraction must be in"):
        HeadClassifier(make_head("linear"), val_fraction=1.0).fit(X, y)
    with pytest.raises(ValueError, match=r"y must be an \(n, C\) 0/1 label matrix"):
        HeadClassifier(make_head("linear")).fit(X, y[:, 0])
    with pytest.raises(NotFittedError):
        HeadClassifier(make_head("linear")).predict(X)
    clf = HeadClassifier(make_head("linear", epochs=1)).fit(X, y)
    with pytest.raises(ValueError, match="X has 20 columns; this classifier was fitted on 24"):
        clf.predict(X[:, :20])


def test_the_docs_example_runs(capsys):
    doc = (Path(__file__).parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    code = re.search(r"## scikit-learn.*?```python\n(.*?)```", doc, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/api.md", "exec"), scope)
    assert scope["labels"].shape == (50, 5)
    assert "held-out F2" in capsys.readouterr().out
