"""`imet report`: the paper's section 5 for a set of models, as one static HTML page with PNG figures.

The page holds Table 1 (F2, F1, precision, recall, micro AUC), ROC curves of 8 labels, 2 from each
quartile of train frequency (Figure 3), prediction examples (Figure 5), one label's confusion matrix
(Figure 6), F2 by label group and a per-label section, which the paper does not show. Each model predicts
the split once; everything is computed from its image-level averaged probabilities and decoded labels.

At iMet's 1,103 labels the page stays readable and its cost bounded: the per-label section shows the
`N_LABEL_ROWS` most frequent, best and worst labels and links a CSV of all of them; the micro ROC curve
and the micro AUC come from one sort of the (N x C) pairs (`micro_roc`), and each label's AUC from one sort
of its column with only the positives ranked (`label_aucs`).

The page works offline: relative paths, no scripts, no external resources. Figures are written first,
index.html last, into a temp directory that replaces the output directory in one step at the end, so a
crash or a failure leaves the previous report whole and a page never mixes two runs' figures.
"""

from __future__ import annotations

import difflib
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import imet
from imet.errors import ImetError
from imet.explain import data_dir_of, write_overlays
from imet.files import atomic_dir, atomic_path, check_replaceable
from imet.metrics import COLUMNS, TAIL, roc_auc, score_row, scores, train_frequency
from imet.models import Predictor, open_model
from imet.progress import progress
from imet.store import FeatureStore

N_EXAMPLES = 6  # images in the prediction examples
N_ATTENTION = 3  # of which this many get attention overlays (attention heads: attn_rnn, csra, mldecoder)
ROC_PER_QUARTILE = 2  # labels per train-frequency quartile in the ROC figure
N_LABEL_ROWS = 30  # labels in each table of the per-label section (the CSV holds every label)
DPI = 100


@dataclass
class Run:
    """One model's predictions on the split: image indices, (n, C) probabilities and decoded labels."""

    name: str  # shown on the page
    head: Predictor
    images: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    truth: np.ndarray
    _micro: tuple[np.ndarray, np.ndarray, float] | None = None

    @property
    def micro(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(fpr, tpr, AUC) of all (image, label) pairs pooled: `micro_roc`, computed once."""
        if self._micro is None:
            self._micro = micro_roc(self.truth, self.probs)
        return self._micro


# -- numbers ---------------------------------------------------------------------------------------
def table_row(run: Run, split: str, freq: np.ndarray) -> dict:
    """The row imet.metrics.evaluate_head gives, from the predictions already made (the micro AUC from
    `Run.micro`, the one sort shared with the ROC figure); `freq`: each label's train images."""
    row = score_row(split, run.truth, run.probs, run.labels, False, tail=freq < TAIL)
    if run.head.probabilistic:
        row["auc_micro"] = run.micro[2]
    return row


def quartiles(freq: np.ndarray) -> list[np.ndarray]:
    """Labels in 4 groups of (nearly) equal size by train frequency: Q1 the rarest, Q4 the most frequent."""
    order = np.argsort(freq, kind="stable")
    return [np.sort(q) for q in np.array_split(order, 4)]


def roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score, from (0, 0) to (1, 1)."""
    order = np.argsort(-score, kind="stable")
    y, score = y[order].astype(bool), score[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # last row of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def micro_roc(truth: np.ndarray, probs: np.ndarray, points: int = 2000) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, AUC) of all (image, label) pairs pooled, from one sort of the N x C scores: the AUC from the
    mean ranks of the positives (Mann-Whitney, ties half), the curve at most `points` + 2 of its own points
    (at evenly spaced ranks), so a 1,103-label split costs one np.sort, not a stable argsort and a copy per
    use."""
    t = np.asarray(truth, bool).ravel()
    s = np.asarray(probs, np.float64).ravel()
    ordered = np.sort(s)
    pos = np.sort(s[t])
    n_pos, n_neg = len(pos), len(s) - len(pos)
    below, upto = np.searchsorted(ordered, pos, "left"), np.searchsorted(ordered, pos, "right")
    u = (below + (upto - below + 1) / 2).sum() - n_pos * (n_pos + 1) / 2
    auc = float(u / (n_pos * n_neg)) if n_pos and n_neg else float("nan")
    cuts = np.unique(ordered[np.linspace(0, len(ordered) - 1, min(points, len(ordered))).astype(np.int64)])[::-1]
    above = len(ordered) - np.searchsorted(ordered, cuts, "left")  # scores >= each cut
    tp = n_pos - np.searchsorted(pos, cuts, "left")
    fpr, tpr = np.r_[0, above - tp] / max(n_neg, 1), np.r_[0, tp] / max(n_pos, 1)
    return np.r_[fpr, 1.0], np.r_[tpr, 1.0], auc


def label_aucs(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C,) ROC AUC of each label (NaN where its column is one-class): each column sorted once (offset by
    2 x its index, so the sorted columns form one sorted array) and only the positives ranked in it."""
    t = np.asarray(truth, bool)
    n, c = t.shape
    if probs.size and (probs.min() < 0 or probs.max() > 1):  # not probabilities: the offsets would overlap
        return roc_auc(t, probs)[0]
    offset = 2.0 * np.arange(c)  # scores lie in [0, 1]: column j's keys in [2j, 2j + 1], exact in float64
    keys = (np.sort(np.asarray(probs, np.float64).T, axis=1) + offset[:, None]).ravel()  # (C * N,) sorted
    rows, cols = np.nonzero(t)
    q = np.asarray(probs, np.float64)[rows, cols] + offset[cols]
    start = cols * n
    mean_rank = (np.searchsorted(keys, q, "left") - start
                 + (np.searchsorted(keys, q, "right") - np.searchsorted(keys, q, "left") + 1) / 2)
    n_pos = np.bincount(cols, minlength=c).astype(np.float64)
    u = np.bincount(cols, weights=mean_rank, minlength=c) - n_pos * (n_pos + 1) / 2
    pairs = n_pos * (n - n_pos)
    return np.divide(u, pairs, out=np.full(c, np.nan), where=pairs > 0)


def thin(fpr: np.ndarray, tpr: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most n points of a curve, ends kept: the micro curve of a full split has millions."""
    if len(fpr) <= n:
        return fpr, tpr
    keep = np.unique(np.linspace(0, len(fpr) - 1, n).round().astype(int))
    return fpr[keep], tpr[keep]


def roc_labels(freq: np.ndarray, truth: np.ndarray) -> list[tuple[int, int]]:
    """(label, quartile) pairs: per quartile the most frequent labels in train that the split can score.

    A label can be scored when the split has both images with it and images without it.
    """
    n_pos = truth.sum(0)
    scorable = (n_pos > 0) & (n_pos < len(truth))
    picked = []
    for q, labels in enumerate(quartiles(freq), start=1):
        labels = labels[scorable[labels]]
        best = labels[np.argsort(-freq[labels], kind="stable")][:ROC_PER_QUARTILE]
        picked += [(int(c), q) for c in best]
    return picked


def group_f2(truth: np.ndarray, labels: np.ndarray, group: np.ndarray) -> tuple[float, int]:
    """Sample-averaged F2 on the group's labels only, over the images with a true label in the group.

    Returns (F2, number of images); NaN when no image has a true label in the group.
    """
    keep = truth[:, group].any(1)
    if not keep.any():
        return float("nan"), 0
    return scores(truth[keep][:, group], labels[keep][:, group])["f2"], int(keep.sum())


def label_groups(store: FeatureStore, freq: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(name, description, labels) of the frequency quartiles, then of culture and tag labels; none empty."""
    groups = [(f"Q{q}", f"labels on {freq[labels].min()}–{freq[labels].max()} train images", labels)
              for q, labels in enumerate(quartiles(freq), start=1) if len(labels)]
    culture = store.vocab.culture
    groups += [("culture", "culture labels", np.flatnonzero(culture)), ("tag", "tag labels", np.flatnonzero(~culture))]
    return [g for g in groups if len(g[2])]


def confusion(truth: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """2x2 counts [[TN, FP], [FN, TP]] of label c, the model read as a binary classifier of that label."""
    t, p = truth[:, c].astype(bool), labels[:, c].astype(bool)
    return np.array([[np.sum(~t & ~p), np.sum(~t & p)], [np.sum(t & ~p), np.sum(t & p)]])


def resolve_label(store: FeatureStore, label: str | None, freq: np.ndarray) -> int:
    """Label index of a name ('tag::men') or an attribute id; the most frequent in train by default."""
    if label is None:
        return int(np.argmax(freq))
    names = list(store.vocab.names)
    if label in names:
        return names.index(label)
    if label.strip().isdigit() and int(label) in store.vocab.attribute_ids:
        return int(np.flatnonzero(store.vocab.attribute_ids == int(label))[0])
    close = difflib.get_close_matches(label, names, n=3)
    hint = f"; did you mean {', '.join(repr(n) for n in close)}?" if close else ""
    raise ImetError(f"{store.path}: no label {label!r} (give a label name such as {names[0]!r} or an "
                    f"attribute id){hint}")


# -- figures -----------------------------------------------------------------------------------------
def save_figure(fig: Figure, path: Path) -> str:
    """Write a PNG atomically; returns its name, relative to the page."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path.name


def roc_figure(run: Run, picked: list[tuple[int, int]], names: tuple[str, ...]) -> Figure:
    """Figure 3: ROC curves of the picked labels and the micro-averaged one (all pairs pooled)."""
    fig = Figure(figsize=(5.4, 6.4), layout="constrained")
    ax = fig.add_subplot()
    cols = [c for c, _ in picked]
    per_class = dict(zip(cols, roc_auc(run.truth[:, cols], run.probs[:, cols])[0], strict=True))
    for c, q in picked:
        fpr, tpr = roc_points(run.truth[:, c], run.probs[:, c])
        ax.plot(fpr, tpr, lw=1.2, label=f"Q{q} {names[c]}: AUC {per_class[c]:.2f}, {run.truth[:, c].sum()} pos.")
    fpr, tpr, micro = run.micro
    fpr, tpr = thin(fpr, tpr)
    ax.plot(fpr, tpr, color="black", lw=2.5, label=f"micro-average: AUC {micro:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"{run.name}: ROC on {len(run.images)} images")
    fig.legend(loc="outside lower center", fontsize=7.5, ncols=1, frameon=False)
    return fig


def confusion_figure(run: Run, c: int, name: str) -> Figure:
    """Figure 6: one label's confusion matrix; cells show counts, shaded by their share of the true row."""
    m = confusion(run.truth, run.labels, c)
    shares = m / np.maximum(m.sum(1, keepdims=True), 1)  # row 0: TNR, FPR; row 1: FNR, TPR
    fig = Figure(figsize=(3.4, 3.3), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, f"{['TN', 'FP', 'FN', 'TP'][2 * i + j]}\n{count}\n{shares[i, j]:.0%} of row", ha="center",
                va="center", color="white" if shares[i, j] > 0.5 else "black", fontsize=9)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["0", "1"], yticklabels=["0", "1"],
           xlabel="predicted", ylabel="true", title=f"{run.name}\n{name}")
    return fig


def groups_figure(names: list[str], values: np.ndarray, groups: list[str]) -> Figure:
    """Bars of F2 by label group (x) for each model (colour); values is (models, groups), NaN left out."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for k, name in enumerate(names):
        ax.bar(x + (k - (len(names) - 1) / 2) * width, values[k], width, label=name)
    ax.set_xticks(x, groups)
    ax.set(ylim=(0, 1), ylabel="F2 within the group", title="F2 by label group")
    ax.legend(fontsize=8, loc="upper left")
    return fig


# -- the page --------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 2em auto;
       max-width: 1100px; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f5; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } .figs img { max-width: 100%; border: 1px solid #eee; }
.hit { color: #0b57d0; font-weight: 600; } .miss { color: #b3261e; }
.chip { display: inline-block; white-space: nowrap; margin: 0.1em 0.25em 0.1em 0; padding: 0 0.45em;
        border: 1px solid #ddd; border-radius: 0.8em; background: #fafafa; }
.chip.hit { border-color: #a8c7fa; background: #eef4ff; } .chip.miss { border-color: #f2c4c0; background: #fff6f5; }
table.examples { width: 100%; } table.examples td:first-child { width: 11em; white-space: nowrap; }
.attention figure { margin: 1em 0; } .attention img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _img(src: str, alt: str) -> str:
    return f'<img src="{_e(src)}" alt="{_e(alt)}">'


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _cell(value, numeric: bool) -> str:
    if isinstance(value, (float, np.floating)):
        value = f"{value:.4f}"
    return f"<td{' class=num' if numeric else ''}>{_e(value)}</td>"


def _table(header: list[str], rows: list[list]) -> str:
    """An HTML table; columns holding numbers are right-aligned, header included."""
    numeric = [any(_is_number(row[j]) for row in rows) for j in range(len(header))]
    head = "".join(f"<th{' class=num' if n else ''}>{_e(h)}</th>" for h, n in zip(header, numeric, strict=True))
    body = "".join("<tr>" + "".join(_cell(v, n) for v, n in zip(row, numeric, strict=True)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table_section(runs: list[Run], split: str, freq: np.ndarray) -> str:
    rows = []
    for run in runs:
        row = table_row(run, split, freq)
        rows.append([run.name, run.head.name, row["images"], *(row.get(c, "–") for c in COLUMNS),
                     run.head.decoding()])
    return ("<h2>Table 1: model performance</h2>"
            "<p class='note'>Sample-averaged scores over the split's images: each image's views are averaged, "
            "then decoded as the model decodes (its threshold tuned on val, or the beam search's γ). Micro AUC "
            "pools every (image, label) pair; it needs probabilities.</p>"
            + _table(["model", "head", "images", *COLUMNS, "decoding"], rows))


def _roc_section(runs: list[Run], out: Path, freq: np.ndarray, names: tuple[str, ...]) -> str:
    parts = ["<h2>Figure 3: ROC curves of 2 labels per frequency quartile</h2>",
             "<p class='note'>Two labels from each quartile of train frequency (Q1 rarest, Q4 most frequent): "
             "the most frequent of the quartile that the split can score (it has images with and without "
             "the label). The black curve pools all (image, label) pairs: its area is the micro AUC.</p>"]
    figs = []
    for k, run in enumerate(runs):
        if not run.head.probabilistic:
            parts.append(f"<p class='note'>{_e(run.name)} gives labels, not probabilities: no ROC curve.</p>")
            continue
        picked = roc_labels(freq, run.truth)
        figs.append(_img(save_figure(roc_figure(run, picked, names), out / f"fig3_roc_{k}.png"), f"ROC, {run.name}"))
    return "".join(parts) + f"<div class='figs'>{''.join(figs)}</div>"


def _attention_section(runs: list[Run], store: FeatureStore, out: Path, split: str, data_dir: Path | None) -> str:
    """Figure 4: for attention heads (attn_rnn, csra, mldecoder), `imet explain` overlays of a few examples."""
    attn = [(k, run) for k, run in enumerate(runs) if hasattr(run.head, "explain_split")]
    if not attn:
        return ""
    head = "<h2>Figure 4: where the attention heads looked</h2>"
    try:
        data = data_dir_of(store, data_dir)
    except ImetError as e:
        return head + f"<p class='note'>No overlays: {_e(str(e))}.</p>"
    ids = [str(store.image_ids[i]) for i in example_images(runs)[:N_ATTENTION]]
    figs = []
    for k, run in attn:
        for path in write_overlays(store, run.head, data, ids, out / f"fig4_{k}", split=split):
            figs.append(f"<figure>{_img(f'fig4_{k}/{path.name}', f'attention of {run.name} on {path.stem}')}"
                        f"<figcaption>{_e(run.name)}: {_e(path.stem)}</figcaption></figure>")
    return (head + "<p class='note'>Each predicted label with the view that emitted it and that step's "
            "attention weights α laid over it (red: high). Titles in blue are true labels, in red wrong ones; "
            "the first panel is the whole image with its true labels.</p>"
            f"<div class='attention'>{''.join(figs)}</div>")


def example_images(runs: list[Run]) -> np.ndarray:
    """The images shown as examples: N_EXAMPLES drawn (seed 0) from those every model predicted."""
    common = runs[0].images
    for run in runs[1:]:
        common = np.intersect1d(common, run.images)
    return np.sort(np.random.default_rng(0).choice(common, min(N_EXAMPLES, len(common)), replace=False))


def _chips(names: list[str], hits: set[str] | None = None) -> str:
    """Label names as inline chips; with `hits`, correct ones first and marked, the others in red."""
    if hits is not None:
        names = sorted(names, key=lambda n: n not in hits)
    chips = []
    for n in names:
        kind = "" if hits is None else ("hit" if n in hits else "miss")
        chips.append(f"<span class='chip {kind}'>{'✓ ' if kind == 'hit' else ''}{_e(n)}</span>")
    return "".join(chips) or "<span class='note'>(none)</span>"


def _examples_section(runs: list[Run], store: FeatureStore) -> str:
    chosen = example_images(runs)
    names = np.array(store.vocab.names, dtype=object)
    rows = []
    for i in chosen:
        truth = list(names[store.targets[i].astype(bool)])
        rows.append(f"<tr><th colspan='2'>{_e(store.image_ids[i])}</th></tr>"
                    f"<tr><td>ground truth</td><td>{_chips(truth)}</td></tr>")
        for run in runs:
            predicted = list(names[run.labels[np.searchsorted(run.images, i)]])
            found = len(set(predicted) & set(truth))
            rows.append(f"<tr><td>{_e(run.name)}<br><span class='note'>{found} of {len(truth)} found, "
                        f"{len(predicted)} predicted</span></td><td>{_chips(predicted, set(truth))}</td></tr>")
    return ("<h2>Figure 5: prediction examples</h2>"
            f"<p class='note'>{len(chosen)} images of the split drawn at random (seed 0). Predicted labels in "
            "the ground truth come first, <span class='hit'>✓ in blue</span>; the others are "
            "<span class='miss'>in red</span>.</p>"
            f"<table class='examples'>{''.join(rows)}</table>")


def _confusion_section(runs: list[Run], out: Path, c: int, name: str) -> str:
    figs, rows = [], []
    for k, run in enumerate(runs):
        figs.append(_img(save_figure(confusion_figure(run, c, name), out / f"fig6_confusion_{k}.png"),
                         f"confusion matrix of {name}, {run.name}"))
        (tn, fp), (fn, tp) = confusion(run.truth, run.labels, c)
        rows.append([run.name, tp / max(tp + fn, 1), tn / max(tn + fp, 1), (tp + fn) / max(tn + fp + fn + tp, 1)])
    return (f"<h2>Figure 6: confusion matrix of {_e(name)}</h2>"
            "<p class='note'>The model read as a binary classifier of this one label: 1 when the image has "
            "it (true) or the model predicts it (predicted); the other labels are ignored. Cells are shaded by "
            "their share of the row, so the diagonal reads as the true negative and true positive rates.</p>"
            f"<div class='figs'>{''.join(figs)}</div>"
            + _table(["model", "true positive rate", "true negative rate", "prevalence"], rows))


def _groups_section(runs: list[Run], out: Path, groups: list[tuple[str, str, np.ndarray]]) -> str:
    values = np.array([[group_f2(run.truth, run.labels, g)[0] for _, _, g in groups] for run in runs])
    counts = [group_f2(runs[0].truth, runs[0].labels, g)[1] for _, _, g in groups]
    ticks = [f"{name}\n{len(g)} labels" for name, _, g in groups]
    src = save_figure(groups_figure([r.name for r in runs], values, ticks), out / "groups_f2.png")
    rows = [[name, text, len(g), n, *(float(v) if np.isfinite(v) else "–" for v in values[:, j])]
            for j, ((name, text, g), n) in enumerate(zip(groups, counts, strict=True))]
    return ("<h2>F2 by label group (not in the paper)</h2>"
            "<p class='note'>A group's F2 is the sample-averaged F2 computed on the group's labels only "
            "(every other label removed from both truth and prediction), averaged over the images that have "
            "at least one true label in the group. Images without one are left out, so false positives on "
            "them do not count. Quartiles split the labels into four groups of equal size by the number of "
            "train images carrying them.</p>"
            f"<div class='figs'>{_img(src, 'F2 by label group')}</div>"
            + _table(["group", "", "labels", "images", *(r.name for r in runs)], rows))


LABEL_COLUMNS = ["label", "kind", "train images", "positives", "predicted", "recall", "precision", "F2", "AUC"]


def label_rows(run: Run, names: tuple[str, ...], kinds: tuple[str, ...], freq: np.ndarray) -> list[list]:
    """One row per label (LABEL_COLUMNS): the model read as a binary classifier of that label on the split.
    F2 of a label with no positive and no prediction is NaN (nothing to score)."""
    t, p = run.truth.astype(bool), run.labels.astype(bool)
    tp = (t & p).sum(0)
    pos, pred = t.sum(0), p.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, precision = tp / pos, tp / pred
        f2 = 5 * tp / (4 * pos + pred)
    auc = label_aucs(run.truth, run.probs) if run.head.probabilistic else np.full(len(names), np.nan)
    return [[names[c], kinds[c], int(freq[c]), int(pos[c]), int(pred[c]), recall[c], precision[c], f2[c], auc[c]]
            for c in range(len(names))]


def _num(value) -> object:
    return "–" if isinstance(value, float) and not np.isfinite(value) else value


def _labels_section(runs: list[Run], out: Path, store: FeatureStore, freq: np.ndarray) -> str:
    import csv

    parts = ["<h2>Labels</h2>",
             f"<p class='note'>Each label read as a binary classifier on the split: its {N_LABEL_ROWS} most "
             "frequent in train, and among labels with a positive in the split, the best and the worst by F2 "
             "(ties: more positives first). The CSV holds every label.</p>"]
    for k, run in enumerate(runs):
        rows = label_rows(run, store.vocab.names, store.vocab.kinds, freq)
        with atomic_path(out / f"labels_{k}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(LABEL_COLUMNS)
            writer.writerows([[f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in rows])
        scored = [r for r in rows if r[3] > 0]
        by_f2 = sorted(scored, key=lambda r: (-(r[7] if np.isfinite(r[7]) else -1), -r[3]))
        worst = sorted(scored, key=lambda r: (r[7] if np.isfinite(r[7]) else 2, -r[3]))
        frequent = sorted(rows, key=lambda r: -r[2])
        parts.append(f"<h3>{_e(run.name)}: {len(rows)} labels, {len(scored)} with positives in the split "
                     f"(<a href='labels_{k}.csv'>all labels as CSV</a>)</h3>")
        for title, chosen in (("most frequent in train", frequent), ("best by F2", by_f2), ("worst by F2", worst)):
            table = [[_num(v) for v in row] for row in chosen[:N_LABEL_ROWS]]
            parts.append(f"<h4>{title}</h4>" + (_table(LABEL_COLUMNS, table) if table else "<p>none</p>"))
    return "".join(parts)


def _page(title: str, meta: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
            f"<body><h1>{_e(title)}</h1><p class='meta'>{meta}</p>{''.join(sections)}</body></html>\n")


# -- entry point ---------------------------------------------------------------------------------------
def display_names(paths: list[Path]) -> list[str]:
    """File names, or the paths as given where two models share a file name."""
    names = [p.name for p in paths]
    return [p.name if names.count(p.name) == 1 else str(p) for p in paths]


def predict_runs(store: FeatureStore, paths: list[Path], split: str) -> list[Run]:
    runs = []
    for name, path in progress(list(zip(display_names(paths), paths, strict=True)), desc=f"report: predict {split}",
                               unit="models"):
        head = open_model(path)
        images, probs, labels = head.predict_labels(store, split)
        if not len(images):
            raise ImetError(f"{store.path}: no finished views in split {split!r} for {path}")
        runs.append(Run(name, head, images, probs, labels, store.targets[images]))
    return runs


def write_report(store_path: Path, model_paths: list[Path], out_dir: Path, *, split: str = "val",
                 label: str | None = None, data_dir: Path | None = None) -> Path:
    """Write out_dir/index.html and its figures for the models on a labelled split; returns the page."""
    if split not in ("val", "test"):
        raise ImetError(f"report needs a labelled split, val or test, not {split!r}")
    if not model_paths:
        raise ImetError("report needs at least one model file")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ImetError(f"{out_dir}: exists and is not a directory")
    check_replaceable(out_dir)
    store = FeatureStore(store_path)
    freq = train_frequency(store)
    c = resolve_label(store, label, freq)
    runs = predict_runs(store, [Path(p) for p in model_paths], split)
    names = store.vocab.names
    with atomic_dir(out_dir) as out:  # the whole directory is swapped in at the end: never two runs mixed
        sections = [_table_section(runs, split, freq), _roc_section(runs, out, freq, names),
                    _attention_section(runs, store, out, split, data_dir), _examples_section(runs, store),
                    _confusion_section(runs, out, c, names[c]),
                    _groups_section(runs, out, label_groups(store, freq)), _labels_section(runs, out, store, freq)]
        meta = (f"store {_e(store.path.name)} (fingerprint {_e(store.fingerprint)}), split {_e(split)}, "
                f"{len(store.vocab)} labels; imet {_e(imet.__version__)}")
        with atomic_path(out / "index.html") as tmp:
            tmp.write_text(_page("imet report: the paper's section 5", meta, sections), encoding="utf-8")
    return out_dir / "index.html"
