"""Where attn_rnn loses to its own csra start: the decoder as started (epoch 0) against trained, three decodings.

On each planted family member, `imet fit --head attn_rnn` with its defaults but --epochs and --patience (0 by
default: every epoch trained, the last one kept, so that "trained" is never the start kept back); the
fit's state when its epochs begin (the residual decoder, whose f_pred starts at zero: every step's p is f_R's, the
csra start's) is copied aside and tuned as the fit tunes. Test F2 (one-cell recall, labels per image) of:

- csra: the start itself, with its own decoding;
- eq6: the paper's decoding (beam search, eq. 6's stop rule with γ tuned on val, the view vote);
- emitted: paths run to T (no stop), each emitted label's own step probability (0 for the others), averaged over
  an image's views, decoded by the start's rule tuned again on val (calibrated per-class thresholds);
- final: the same with the last step's probabilities of every label (at epoch 0 exactly the start's: a check).

    python benchmarks/bench_attn_start.py [--seed 1] [--members 0,1,2,3] [--images 600] [--epochs 6] [--patience 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import imet.heads.attn_rnn as attn_rnn  # noqa: E402
from imet.decode.thresholds import average_views  # noqa: E402
from imet.heads import make_head  # noqa: E402
from imet.heads.maps import MapBatches  # noqa: E402
from imet.heads.train import chunks  # noqa: E402
from imet.metrics import scores  # noqa: E402
from imet.planted import family, recall_by_kind, write_planted_store  # noqa: E402
from imet.store import FeatureStore  # noqa: E402

GRAB: dict = {}


def grab_start_and_epoch0() -> None:
    """Wrap attn_rnn's training loop and csra start so that the fit leaves both behind in GRAB."""
    train, start = attn_rnn.train_epochs, attn_rnn.AttnRNNHead._fit_start

    def train_epochs(head, *args, **kwargs):
        GRAB["epoch0"] = copy.deepcopy(head)
        return train(head, *args, **kwargs)

    def fit_start(self, *args, **kwargs):
        GRAB["csra"] = start(self, *args, **kwargs)
        return GRAB["csra"]

    attn_rnn.train_epochs, attn_rnn.AttnRNNHead._fit_start = train_epochs, fit_start


@torch.no_grad()
def step_probs(head, store: FeatureStore, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(emitted, final), each (n, C): paths run to T (γ 0: no stop); the step probability of each emitted label,
    and the last step's probabilities of every label, replayed along each view's decoded path."""
    labels = head.decode_gammas(store, views, [0.0])[0].labels
    model, c = head.model_.eval(), len(head.freq_)
    emitted, final = np.zeros((len(views), c), np.float32), np.zeros((len(views), c), np.float32)
    lo = 0
    for part in chunks(views, 64):
        maps, fr_in, _ = MapBatches(store, head.fr_keys_, [part])[0]
        path = labels[lo:lo + len(part)]
        enc = model.encode(maps.float(), fr_in.float())
        h, cell, v_pred = enc.h0[:, None], enc.c0[:, None], enc.v_prob[:, None]
        on_path = torch.zeros(len(part), c, dtype=torch.bool)
        for t in range(path.shape[1]):
            logits, h, cell, _ = model.step(enc, h, cell, v_pred, on_path[:, None])
            p = torch.sigmoid(logits[:, 0])
            rows = torch.nonzero(path[:, t] >= 0).squeeze(1)
            emitted[lo + rows.numpy(), path[rows, t].numpy()] = p[rows, path[rows, t]].numpy()
            final[lo + rows.numpy()] = p[rows].numpy()
            on_path[rows, path[rows, t]] = True
            v_pred = p[:, None]
        lo += len(part)
    return emitted, final


def measured(store, truth, images, labels) -> tuple[float, float, float]:
    y = store.targets[images].astype(bool)
    return scores(y, labels)["f2"], recall_by_kind(truth, y, labels).get("cell", np.nan), labels.sum(1).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--members", default="0,1,2,3")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--patience", type=int, default=0)
    args = p.parse_args()
    members = [int(m) for m in args.members.split(",")]
    grab_start_and_epoch0()
    designs = family(max(members) + 1, args.seed, n_images=args.images, channels=(64,), labels=(32, 64))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in members:
            path = Path(tmp) / f"m{m}.h5"
            truth = write_planted_store(path, designs[m])
            store = FeatureStore(path)
            head = make_head("attn_rnn", epochs=args.epochs, patience=args.patience, workers=0)
            trained = head.fit(store, log=lambda _: None)
            epoch0, csra = GRAB["epoch0"], GRAB["csra"]
            val, test, kinds = store.views("val"), store.views("test"), store.vocab.kinds
            epoch0.tune(store, val)
            row = {"csra": measured(store, truth, *csra.predict_labels(store, "test")[::2])}
            for name, head in (("epoch 0", epoch0), ("trained", trained)):
                row[f"{name} eq6"] = measured(store, truth, *head.predict_labels(store, "test")[::2])
                on_val, on_test = step_probs(head, store, val), step_probs(head, store, test)
                for k, kind in enumerate(("emitted", "final")):
                    val_images, val_probs = average_views(on_val[k], store.view_image[val])
                    test_images, test_probs = average_views(on_test[k], store.view_image[test])
                    rule = copy.deepcopy(csra)
                    rule.tune_on(val_probs, store.targets[val_images], kinds)
                    row[f"{name} {kind}"] = measured(store, truth, test_images, rule.rule().apply(test_probs, kinds))
            rows.append(row)
            print(f"seed {args.seed} member {m}: " + " | ".join(f"{k} {v[0]:.3f} ({v[1]:.2f}, {v[2]:.1f})"
                                                              for k, v in row.items()), flush=True)
    print("\nmean test F2: " + " | ".join(f"{k} {np.mean([r[k][0] for r in rows]):.3f}" for k in rows[0]))


if __name__ == "__main__":
    main()
