"""`imet report`: the page, its numbers, and every figure really loading in a headless browser."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import cheap_head, make_store, quiet

from imet.cli import cli
from imet.errors import ImetError
from imet.metrics import roc_auc
from imet.report import Run, confusion, group_f2, resolve_label, roc_points, table_row, train_frequency
from imet.store import FeatureStore


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny store and three quickly fitted models saved next to it."""
    root = tmp_path_factory.mktemp("report")
    store = make_store(root / "s.h5", n_images=60)
    paths = []
    for name in ("linear", "linear_hog", "lgbm"):
        path = root / f"{name}.pt"
        cheap_head(name).fit(FeatureStore(store), log=quiet).save(path)
        paths.append(path)
    return store, paths


@pytest.fixture(scope="module")
def page(fitted, tmp_path_factory) -> Path:
    store, paths = fitted
    out = tmp_path_factory.mktemp("page") / "rep"
    result = CliRunner().invoke(cli, ["report", "--store", str(store), "--model", str(paths[0]),
                                      *map(str, paths[1:]), "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "index.html")
    return out / "index.html"


class _Refs(HTMLParser):
    """Tags and the resource attributes of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        self.refs += [a[k] for k in ("src", "href", "srcset", "data") if k in a]
        if tag == "img":
            self.images.append(a["src"])


def refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_page_has_every_section_and_model(page, fitted):
    text = page.read_text(encoding="utf-8")
    for heading in ("Table 1", "Figure 3", "Figure 5", "Figure 6", "F2 by label group"):
        assert heading in text
    assert "Figure 4" not in text  # the attention section is empty until attn_rnn overlays exist
    for path in fitted[1]:
        assert text.count(path.name) >= 4  # table, ROC, examples, confusion
    assert not [p for p in page.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_page_is_self_contained(page):
    parsed = refs(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    text = page.read_text(encoding="utf-8")
    assert "url(" not in text and "@import" not in text and "//" not in "".join(parsed.refs)
    assert len(parsed.images) == 3 + 3 + 1  # ROC per model, confusion per model, groups
    for src in parsed.refs:
        assert not re.match(r"^[a-z]+:|^/", src) and (page.parent / src).is_file()


CHECKER = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><pre id="result">waiting</pre>
<iframe id="page" src="index.html" width="1200" height="900"></iframe>
<script>
window.addEventListener("load", function () {
  var lines = [];
  try {
    var images = document.getElementById("page").contentDocument.images;
    lines.push("images " + images.length);
    for (var i = 0; i < images.length; i++) {
      lines.push("img " + images[i].naturalWidth + " " + images[i].getAttribute("src"));
    }
  } catch (e) { lines.push("error " + e); }
  document.getElementById("result").textContent = lines.join("\\n");
});
</script></body></html>
"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed, so no page is checked in a browser (apt-get install chromium; "
                    ".ci/run installs it)")
    return found


def loaded_widths(page: Path, profile: Path) -> dict[str, int]:
    """naturalWidth of every <img> of `page` once loaded in headless Chromium, by src.

    A checker page next to it loads it in an iframe (same directory, so same origin with
    --allow-file-access-from-files) and writes what it finds into its own DOM, which Chromium dumps.
    """
    checker = page.parent / "_checker.html"
    checker.write_text(CHECKER, encoding="utf-8")
    try:
        dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={profile}",
                              "--virtual-time-budget=5000", "--dump-dom", checker.as_uri()],
                             capture_output=True, text=True, timeout=90, check=True).stdout
    finally:
        checker.unlink()
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert found, f"no result in Chromium's DOM: {dom[:500]}"
    lines = html.unescape(found.group(1)).splitlines()
    assert lines and lines[0].startswith("images "), lines
    widths = {src: int(w) for _, w, src in (line.split(" ", 2) for line in lines[1:])}
    assert len(widths) == int(lines[0].split()[1])
    return widths


def test_every_image_loads_in_headless_chromium(page, tmp_path):
    expected = refs(page).images
    widths = loaded_widths(page, tmp_path / "profile")
    assert sorted(widths) == sorted(expected)
    assert all(w > 0 for w in widths.values()), widths
    broken = page.parent / expected[0]  # the check must see a figure that does not decode
    good = broken.read_bytes()
    broken.write_bytes(good[:100])
    try:
        assert loaded_widths(page, tmp_path / "profile2")[expected[0]] == 0
    finally:
        broken.write_bytes(good)


def test_table_row_on_hand_worked_predictions():
    from types import SimpleNamespace

    truth = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 1]])
    labels = np.array([[1, 1, 1], [0, 0, 1], [0, 1, 0]])
    probs = np.array([[0.9, 0.7, 0.6], [0.1, 0.3, 0.5], [0.2, 0.8, 0.4]])
    # per image (tp, fp, fn): (2, 1, 0) P 2/3 R 1, F2 10/11; (0, 1, 1) all 0; (1, 0, 1) P 1 R 1/2, F1 2/3, F2 5/9
    # micro AUC: 15 of the 20 (positive, negative) pairs ranked right
    # train images per label 5, 30, 19: labels 0 and 2 are the tail (< 20); their true pairs (0, 0), (0, 2), (2, 2)
    # of which the first two are predicted: tail recall 2/3
    freq = np.array([5, 30, 19])
    run = Run("m", SimpleNamespace(probabilistic=True), np.arange(3), probs, labels, truth)
    assert table_row(run, "val", freq) == pytest.approx({"split": "val", "images": 3, "f2": (10 / 11 + 5 / 9) / 3,
                                                         "f1": (0.8 + 2 / 3) / 3, "precision": (2 / 3 + 1) / 3,
                                                         "recall": 0.5, "auc_micro": 0.75, "tail_recall": 2 / 3})
    run.head.probabilistic = False
    assert "auc_micro" not in table_row(run, "test", freq)
    assert "tail_recall" not in table_row(run, "test", np.array([30, 30, 30]))  # no tail label: no figure
    # 20 train images is not the tail: label 2 leaves it, and the tail's one true pair (0, 0) is predicted
    assert table_row(run, "test", np.array([5, 30, 20]))["tail_recall"] == 1.0


def test_group_f2_counts_only_the_group_on_images_that_have_it():
    truth = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 0]])
    pred = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 1]])
    # group {0, 1}: image 1 has no true label there and is left out; image 0 tp 1 fp 1 -> 5/6; image 2 fn 1 -> 0
    f2, n = group_f2(truth, pred, np.array([0, 1]))
    assert n == 2 and f2 == pytest.approx((5 / 6 + 0) / 2)
    assert group_f2(truth[:2], pred[:2], np.array([1])) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_roc_points_enclose_the_auc():
    rng = np.random.default_rng(0)
    y = rng.random((200, 3)) < 0.3
    s = np.round(rng.random((200, 3)) + 0.5 * y, 1)  # many ties
    per_class, _ = roc_auc(y, s)
    for c in range(3):
        fpr, tpr = roc_points(y[:, c], s[:, c])
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(per_class[c])


def test_confusion_and_label_choice(fitted):
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    pred = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(confusion(truth, pred, 0), [[1, 1], [1, 1]])
    store = FeatureStore(fitted[0])
    freq = train_frequency(store)
    assert resolve_label(store, None, freq) == np.argmax(freq)
    assert resolve_label(store, store.vocab.names[2], freq) == 2
    assert resolve_label(store, str(store.vocab.attribute_ids[3]), freq) == 3
    with pytest.raises(ImetError, match=r"no label 'tag::l44'.*did you mean 'tag::l4'"):
        resolve_label(store, "tag::l44", freq)


def test_report_cli_refuses_bad_input(fitted, tmp_path):
    store, paths = fitted
    base = ["report", "--store", str(store), "--model", str(paths[0])]
    result = CliRunner().invoke(cli, [*base, "--label", "nope", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no label 'nope'" in result.output
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "file")])
    assert result.exit_code == 2


def test_attn_rnn_models_get_attention_overlays_no_roc_and_escaped_names(tiny_store, tmp_path):
    linear, attn = tmp_path / "linear.pt", tmp_path / "<i>attn.pt"  # markup in a file name, and in a label name
    store = FeatureStore(tiny_store)
    assert "culture::<b>" in store.vocab.names
    cheap_head("linear", epochs=1).fit(store, log=quiet).save(linear)
    cheap_head("attn_rnn", epochs=1).fit(store, log=quiet).save(attn)
    out = tmp_path / "rep"
    result = CliRunner().invoke(cli, ["report", "--store", str(tiny_store), "--model", str(linear), str(attn),
                                      "--split", "test", "--out", str(out)])  # data dir recorded in the store
    assert result.exit_code == 0, result.output
    page = out / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "Figure 4" in text and "&lt;i&gt;attn.pt gives labels, not probabilities: no ROC curve" in text
    assert [src for src in refs(page).images if src.startswith("fig3_")] == ["fig3_roc_0.png"]  # linear's only
    assert "<i>" not in text and "<b>" not in text and text.count("culture::&lt;b&gt;") >= 2  # examples, labels
    overlays = [src for src in refs(page).images if src.startswith("fig4_1/")]
    assert len(overlays) == min(3, int((store.split == "test").sum()))
    widths = loaded_widths(page, tmp_path / "profile")  # skipped, with its reason, without chromium
    assert all(widths[src] > 0 for src in overlays)


def test_micro_auc_from_one_sort_and_label_rows_equal_scikit_learn():
    from types import SimpleNamespace

    from sklearn.metrics import fbeta_score, precision_score, recall_score, roc_auc_score

    from imet.report import label_rows

    rng = np.random.default_rng(3)
    y = rng.random((120, 7)) < 0.2
    y[:, 6] = False  # a label without positives: NaN where nothing is scored
    s = np.round(rng.random((120, 7)) + 0.4 * y, 1)  # ties
    pred = s >= 0.7
    run = Run("m", SimpleNamespace(probabilistic=True), np.arange(120), s, pred, y)
    assert run.micro[2] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-12)
    rows = label_rows(run, tuple("abcdefg"), ("tag",) * 7, np.arange(7))
    for c in range(6):
        assert rows[c][5] == pytest.approx(recall_score(y[:, c], pred[:, c]))
        assert rows[c][6] == pytest.approx(precision_score(y[:, c], pred[:, c], zero_division=np.nan), nan_ok=True)
        assert rows[c][7] == pytest.approx(fbeta_score(y[:, c], pred[:, c], beta=2))
        assert rows[c][8] == pytest.approx(roc_auc_score(y[:, c], s[:, c]))
    assert rows[6][3] == 0 and np.isnan(rows[6][5])


@pytest.mark.parametrize("seed", range(3))
def test_label_aucs_and_micro_roc_equal_scikit_learn(seed):
    from sklearn.metrics import roc_auc_score

    from imet.report import label_aucs, micro_roc

    rng = np.random.default_rng(seed)
    y = rng.random((80, 9)) < 0.25
    y[:, 0], y[:, 1] = False, True  # one-class columns: NaN
    s = np.round(rng.random((80, 9)) + 0.3 * y, 1) / 1.3  # ties, in [0, 1]
    got = label_aucs(y, s)
    assert np.isnan(got[:2]).all()
    for c in range(2, 9):
        assert got[c] == pytest.approx(roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
    fpr, tpr, auc = micro_roc(y, s, points=7)
    assert auc == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-12)
    full_fpr, full_tpr = roc_points(y.ravel(), s.ravel())
    on_curve = {(round(a, 12), round(b, 12)) for a, b in zip(full_fpr, full_tpr, strict=True)}
    assert all((round(a, 12), round(b, 12)) in on_curve for a, b in zip(fpr, tpr, strict=True))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and len(fpr) <= 9
