"""How attn_rnn's decoding rules turn probabilities into image labels, on a planted store, in one run.

csra --hog is fitted on a planted store (imet/planted.py) and its per-view probabilities are decoded offline
by each rule, as if they were the decoder's p_t: per view the labels in decreasing probability (at most T,
the most labels of a train image), cut by the paper's eq. 6 (stop at the first step whose geometric-mean
path probability falls below that of γ f) or by a per-label rule (stop at the first label with p < γ f);
then the views vote: any view (the paper's union) or all views. γ is picked on val, F2 reported on test;
thresholding the view-averaged probabilities (what csra itself does) is the reference.

    python benchmarks/bench_decode_rules.py [--images 800]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imet.decode.thresholds import apply_thresholds, average_views  # noqa: E402
from imet.heads import make_head  # noqa: E402
from imet.heads.attn_rnn import GAMMAS, VOTES  # noqa: E402
from imet.metrics import scores  # noqa: E402
from imet.planted import write_planted_store  # noqa: E402
from imet.store import FeatureStore  # noqa: E402


def cut(p: np.ndarray, f: np.ndarray, gamma: float, rule: str, steps: int) -> np.ndarray:
    """(n, C) 0/1: each row's labels by decreasing p, at most `steps`, stopped by `rule` ("path" or "label")."""
    order = np.argsort(-p, axis=1, kind="stable")[:, :steps]
    lp = np.log(np.take_along_axis(p, order, 1))
    lt = np.log(np.maximum(gamma * f[order], 1e-12))
    if rule == "path":  # eq. 6: stop at the end of the first step t with S_t < Theta_t; that step's label is kept
        stop = np.cumsum(lp, 1) < np.cumsum(lt, 1)
        stop[:, -1] = True
        keep = stop.argmax(1) + 1
    else:  # per label: keep labels while p >= gamma f (at least one)
        ok = lp >= lt
        keep = np.maximum(np.where(ok.all(1), steps, (~ok).argmax(1)), 1)
    out = np.zeros(p.shape, np.float32)
    rows = np.repeat(np.arange(len(p)), keep)
    out[rows, np.concatenate([o[:k] for o, k in zip(order, keep, strict=True)])] = 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_planted_store(Path(tmp) / "planted.h5", n_images=args.images)
        store = FeatureStore(Path(tmp) / "planted.h5")
        head = make_head("csra", hog=True).fit(store, log=lambda _: None)
        train = np.unique(store.view_image[store.views("train")])
        f, steps = store.targets[train].mean(0), int(store.targets[train].sum(1).max())
        data = {}
        for split in ("val", "test"):
            views = store.views(split)
            data[split] = (head.predict_proba(store, views), store.view_image[views])
        print(f"planted store, {args.images} images; csra --hog's view probabilities; T = {steps}; test split\n")
        print("| rule | views | gamma (val) | test F2 | labels/image |\n|---|---|---|---|---|")
        for rule in ("path", "label"):
            for vote in ("any", "all"):
                def f2(split, gamma, rule=rule, vote=vote):
                    probs, image = data[split]
                    images, votes = average_views(cut(probs, f, gamma, rule, steps), image)
                    labels = apply_thresholds(votes, VOTES[vote])
                    return scores(store.targets[images], labels)["f2"], labels.sum(1).mean()
                gamma = max(GAMMAS, key=lambda g: f2("val", g)[0])
                score, per_image = f2("test", gamma)
                print(f"| {'eq. 6 (path)' if rule == 'path' else 'per label'} | {vote} | {gamma:.3g} | "
                      f"{score:.3f} | {per_image:.1f} |")
        images, labels = head.predict_labels(store, "test")[0::2]
        print(f"| threshold on view-averaged probabilities (csra) | | | "
              f"{scores(store.targets[images], labels)['f2']:.3f} | {labels.sum(1).mean():.1f} |")


if __name__ == "__main__":
    main()
