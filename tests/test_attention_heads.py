"""Attention heads on a planted store, where the answer is known: which labels live in one map cell, which
cell, and what an evidence-aware probe scores."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import quiet
from sklearn.metrics import roc_auc_score

from imet.heads import make_head
from imet.metrics import scores
from imet.planted import probe_labels, recall_by_kind, write_planted_store
from imet.store import FeatureStore

LABELS = {"global": 2, "cell": 4, "hog": 2, "tied": 2}
SMALL_RNN = dict(hidden=64, attention_dim=32, pred_dim=64, workers=0, epochs=8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "p.h5"
    truth = write_planted_store(path, n_images=300, labels=LABELS, grid=6, channels=16, hog=16, seed=1)
    return truth, FeatureStore(path)


@pytest.fixture(scope="module")
def linear_path(planted, tmp_path_factory):
    path = tmp_path_factory.mktemp("lin") / "linear.pt"
    make_head("linear").fit(planted[1], log=quiet).save(path)
    return path


def cell_auc(truth, store, head) -> float:
    views = store.views("test")
    probs, y = head.predict_proba(store, views), store.view_targets(views)
    return float(np.mean([roc_auc_score(y[:, c], probs[:, c]) for c in np.flatnonzero(truth.kinds == "cell")]))


def test_planted_store_holds_what_it_says(planted):
    truth, store = planted
    views = store.views()
    maps = store.read("maps", views).reshape(len(views), -1, 16).astype(np.float32)
    rows, labels = np.nonzero(truth.cell[views] >= 0)
    assert len(rows) and (truth.kinds[labels] == "cell").all()
    at_cell = np.einsum("nd,nd->n", maps[rows, truth.cell[views][rows, labels]], truth.map_dirs[labels])
    assert at_cell.mean() > 4  # strength 5 in the planted cell, N(0, 1) noise elsewhere
    np.testing.assert_allclose(store.read("pooled", views), maps.mean(1), atol=2e-2)
    tied = np.flatnonzero(truth.kinds == "tied")
    assert (store.targets[:, tied] <= store.targets[:, truth.parent[tied]]).all()


def test_the_probe_that_knows_the_evidence_finds_every_kind(planted):
    truth, store = planted
    images, labels = probe_labels(truth, store)
    recall = recall_by_kind(truth, store.targets[images].astype(bool), labels)
    assert scores(store.targets[images], labels)["f2"] > 0.85 and min(recall.values()) > 0.85, recall


def test_csra_finds_one_cell_evidence_that_pooling_dilutes(planted, linear_path):
    truth, store = planted
    from imet.heads import load_model

    csra = make_head("csra", workers=0).fit(store, log=quiet)
    linear = load_model(linear_path)
    assert cell_auc(truth, store, csra) > 0.97 > cell_auc(truth, store, linear) + 0.1
    images, _, labels = csra.predict_labels(store, "test")
    assert recall_by_kind(truth, store.targets[images].astype(bool), labels)["cell"] > 0.9
    # its attention for a true one-cell label peaks on the planted cell
    images, _, labels, rec = csra.explain_split(store, "test")
    hit = truth.cell[rec["view"], rec["label"]]
    planted_here = hit >= 0
    peak = rec["alpha"].reshape(len(hit), -1).argmax(1)
    assert planted_here.sum() > 20 and (peak[planted_here] == hit[planted_here]).mean() > 0.9


def test_attn_rnn_started_from_class_scorers_attends_to_the_evidence(planted, linear_path):
    truth, store = planted
    heads = {a: make_head("attn_rnn", attention=a, init_from=str(linear_path), **SMALL_RNN).fit(store, log=quiet)
             for a in (True, False)}
    views = store.views("test")
    result = heads[True].decode(store, views, return_alpha=True)
    seq, alpha = result.labels.numpy(), result.alpha.numpy()
    rows, steps = np.nonzero(seq >= 0)
    cells = truth.cell[views[rows], seq[rows, steps]]
    own = cells >= 0  # steps that emitted a one-cell label present in the view
    mass = alpha[rows[own], steps[own], cells[own]]
    assert own.sum() > 20 and mass.mean() > 10 / alpha.shape[-1]  # ten times uniform on the label's own cell
    recall = {}
    for a, head in heads.items():
        images, _, labels = head.predict_labels(store, "test")
        recall[a] = recall_by_kind(truth, store.targets[images].astype(bool), labels)["cell"]
    assert recall[True] > recall[False] + 0.05, recall


@pytest.mark.parametrize("module", ["csra", "mldecoder"])
def test_standardisation_folded_into_the_weights_equals_standardising_the_cells(module):
    import torch

    from imet.heads.csra import CSRA
    from imet.heads.mldecoder import MLDecoder

    net = (CSRA(5, 8, 0) if module == "csra" else MLDecoder(5, 8, 0, width=16, heads=2)).eval()
    torch.manual_seed(0)
    mean, std = torch.randn(8), torch.rand(8) + 0.5
    maps, no_hog = 3 * torch.randn(3, 9, 8) + 1, torch.zeros(3, 0)
    plain = net(((maps - mean) / std), no_hog, attention=True)  # unit statistics: the cells as given
    net.map_mean.copy_(mean)
    net.map_std.copy_(std)
    folded = net(maps, no_hog, attention=True)
    for a, b in zip(folded, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_model_fitted_with_device_cuda_loads_and_predicts_without_a_gpu(planted, tmp_path):
    import torch

    from imet.heads import load_model

    _, store = planted
    make_head("csra", epochs=1, workers=0).fit(store, log=quiet).save(tmp_path / "m.pt")
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    blob["params"]["device"] = "cuda"  # as written by `imet fit --device cuda` on a GPU machine
    torch.save(blob, tmp_path / "m.pt")
    head = load_model(tmp_path / "m.pt")
    assert head.device == "auto" and head.predict_proba(store, store.views("test")).shape[0] == len(store.views("test"))


@pytest.mark.parametrize("name", ["csra", "mldecoder"])
def test_attn_rnn_takes_a_map_head_as_its_f_r(planted, tmp_path, name):
    """--init-from csra/mldecoder: that model's module is f_R, so the first v_pred is its probabilities."""
    import torch

    from imet.errors import ImetError
    from imet.heads import load_model

    _, store = planted
    make_head(name, epochs=2, workers=0, hog=True).fit(store, log=quiet).save(tmp_path / "init.pt")
    init = load_model(tmp_path / "init.pt")
    head = make_head("attn_rnn", init_from=str(tmp_path / "init.pt"), hog=True, lr=1e-12, patience=0,
                     **{**SMALL_RNN, "epochs": 1}).fit(store, log=quiet)
    views = store.views("test")
    maps, hog = (torch.from_numpy(store.read(k, views).astype(np.float32)) for k in ("maps", "hog"))
    with torch.no_grad():
        v_prob = head.model_.eval().encode(maps.flatten(1, 2), hog).v_prob.numpy()
    np.testing.assert_allclose(v_prob, init.predict_proba(store, views), atol=1e-4)
    head.save(tmp_path / "attn.pt")
    again = load_model(tmp_path / "attn.pt")
    assert torch.equal(again.decode(store, views).labels, head.decode(store, views).labels)
    with pytest.raises(ImetError, match="fitted with hog=True; fit attn_rnn with hog=True"):
        make_head("attn_rnn", init_from=str(tmp_path / "init.pt"), hog=False, **SMALL_RNN).fit(store, log=quiet)


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole-batch", "one-view-chunks"])
@pytest.mark.parametrize("temperatures", [(1.0, 2.0), (1.0, float("inf")), (0.5, 3.0, float("inf"))])
def test_csra_fused_pooling_equals_the_plain_softmax_formula(temperatures, chunk_bytes, monkeypatch):
    """CSRA's logits and gradients equal the paper's formula written with autograd's softmax (B, C, L),
    whether the pooling takes the batch in one piece or one view at a time."""
    import torch

    from imet.heads import csra
    from imet.heads.csra import CSRA

    if chunk_bytes is not None:
        monkeypatch.setattr(csra, "POOL_CHUNK_BYTES", chunk_bytes)

    torch.manual_seed(0)
    net = CSRA(6, 8, 0, temperatures=temperatures, lam=0.7)
    with torch.no_grad():
        net.mean_term.weight.normal_()
    maps = torch.randn(3, 10, 8) * 3

    def plain(net):
        s = (maps @ net.classifier.weight.T).transpose(1, 2)  # (B, C, L)
        pooled = [s.amax(-1) if t == float("inf") else (torch.softmax(t * s, -1) * s).sum(-1) for t in temperatures]
        own = maps.mean(1) @ net.mean_term.weight.T  # u_c on the mean cell
        return s.mean(-1) + own + 0.7 * torch.stack(pooled).mean(0) + net.classifier.bias

    logits, alpha = net(maps, torch.zeros(3, 0), attention=True)
    want = plain(net)
    torch.testing.assert_close(logits, want)
    torch.testing.assert_close(alpha, torch.softmax((maps @ net.classifier.weight.T).transpose(1, 2), -1))
    params = [net.classifier.weight, net.mean_term.weight]
    g_fused = torch.autograd.grad((logits * torch.arange(6.0)).sum(), params)
    g_plain = torch.autograd.grad((plain(net) * torch.arange(6.0)).sum(), params)
    torch.testing.assert_close(g_fused, g_plain)
    empty = torch.zeros(0, 10, 8, requires_grad=True)  # explain's batch when no view is usable
    logits, _ = net(empty, torch.zeros(0, 0))
    assert logits.shape == (0, 6)
    logits.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.fixture(scope="module", params=[(4.0, (1, 1)), (6.0, (1, 2))], ids=["weak-1x1", "strong-1x1to2x2"])
def member(request, tmp_path_factory):
    """A small member of the planted family: 8x8 cells (pooling dilutes a 1x1 object 64-fold), two strengths
    and object sizes."""
    strength, size = request.param
    path = tmp_path_factory.mktemp("member") / "m.h5"
    truth = write_planted_store(path, n_images=400, labels=LABELS, grid=8, channels=16, hog=16, seed=2,
                                cell_strength=strength, object_size=size)
    return truth, FeatureStore(path)


def test_map_heads_beat_linear_on_one_cell_labels_and_their_no_attention_counterpart_does_not(member):
    """csra and mldecoder (started from csra) find the objects; csra with lam 0 (its mean-cell logit only,
    no attention: linear on the pooled cells, trained as csra) stays far below them (it edges linear, which
    trains at a tenth of its learning rate); mldecoder's attention peaks on the object."""
    truth, store = member
    fit = {"linear": make_head("linear"), "csra": make_head("csra", workers=0),
           "no attention": make_head("csra", lam=0.0, workers=0),
           "mldecoder": make_head("mldecoder", width=32, workers=0)}
    auc = {name: cell_auc(truth, store, head.fit(store, log=quiet)) for name, head in fit.items()}
    assert auc["csra"] > auc["linear"] + 0.05 and auc["mldecoder"] > auc["linear"] + 0.05, auc
    assert auc["no attention"] < min(auc["csra"], auc["mldecoder"]) - 0.15, auc
    _, _, _, rec = fit["mldecoder"].explain_split(store, "test")
    here = truth.cells(rec["view"])[np.arange(len(rec["view"])), rec["label"]] >= 0
    peak = rec["alpha"].reshape(len(here), -1).argmax(1)
    assert here.sum() > 10 and truth.on_object(rec["view"], rec["label"], peak)[here].mean() >= 0.8


def test_an_mldecoder_file_of_the_old_module_layout_is_refused_with_refit(planted, tmp_path):
    import torch

    from imet.errors import ImetError
    from imet.heads import load_model

    _, store = planted
    make_head("mldecoder", epochs=1, width=16, workers=0).fit(store, log=quiet).save(tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt").start == "csra"  # how it started is in the model
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    del blob["learned"]["module"]["layout"]  # as written before the layout was recorded
    torch.save(blob, tmp_path / "m.pt")
    with pytest.raises(ImetError, match="module layout 1 .*refit the model"):
        load_model(tmp_path / "m.pt")


def test_a_csra_file_of_layout_1_still_loads_without_the_mean_term(planted, tmp_path):
    """A csra written before the mean-cell term had its own weights (no layout recorded) loads and predicts as
    the same model with those weights at zero."""
    import torch

    from imet.heads import load_model

    _, store = planted
    views = store.views("test")
    head = make_head("csra", epochs=1, workers=0).fit(store, log=quiet)
    blob = head.to_blob()
    del blob["learned"]["module"]["layout"]
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if not k.startswith("mean_term.")}
    torch.save(blob, tmp_path / "c.pt")
    old = load_model(tmp_path / "c.pt")
    assert old.net_.mean_term is None
    with torch.no_grad():
        head.net_.mean_term.weight.zero_()
    np.testing.assert_allclose(old.predict_proba(store, views), head.predict_proba(store, views), atol=1e-6)


def test_mldecoder_logits_are_the_same_with_and_without_its_attention_weights():
    import torch

    from imet.heads.mldecoder import MLDecoder

    torch.manual_seed(0)
    net = MLDecoder(7, 8, 0, groups=3, width=16, heads=2).eval()
    maps = torch.randn(4, 9, 8)
    fast, none = net(maps, torch.zeros(4, 0))
    slow, alpha = net(maps, torch.zeros(4, 0), attention=True)
    torch.testing.assert_close(fast, slow)
    assert none is None and alpha.shape == (4, 7, 9)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4, 7))


def test_mldecoder_started_from_a_csra_scores_as_that_csra():
    """At the start (decoder's group classifier and biases zero) the residual mldecoder's logits are its csra
    start's, HOG term and map statistics included, though its decoder attention and tokens are not zero."""
    import torch

    from imet.heads.csra import CSRA
    from imet.heads.mldecoder import MLDecoder

    torch.manual_seed(0)
    csra, dec = CSRA(7, 8, 4).eval(), MLDecoder(7, 8, 4, groups=3, width=16, heads=2).eval()
    with torch.no_grad():
        csra.hog.weight.normal_()
        csra.mean_term.weight.normal_()  # the start's own mean-cell weights travel with it
        for net in (csra, dec):
            net.map_mean.copy_(torch.linspace(-1, 1, 8))
            net.map_std.copy_(torch.linspace(0.5, 2, 8))
            net.hog_mean.fill_(0.3)
            net.hog_std.fill_(1.5)
    dec.start_from(csra.classifier.weight, csra.classifier.bias, csra.hog, csra.mean_term)
    maps, hog = 2 * torch.randn(5, 9, 8) + 1, torch.randn(5, 4)
    torch.testing.assert_close(dec(maps, hog)[0], csra(maps, hog)[0])


def test_a_fitted_mldecoder_keeps_its_csra_start_frozen_and_adds_the_decoder_term(planted):
    """The csra term of a fitted mldecoder is the csra a plain `csra` fit with the same settings gives, and with
    the decoder term's output zeroed the model's probabilities are that csra's."""
    import torch

    _, store = planted
    views = store.views("test")
    csra = make_head("csra", epochs=2, workers=0).fit(store, log=quiet)
    dec = make_head("mldecoder", epochs=2, width=16, workers=0).fit(store, log=quiet)
    torch.testing.assert_close(dec.net_.classifier.weight, csra.net_.classifier.weight)
    torch.testing.assert_close(dec.net_.mean_term.weight, csra.net_.mean_term.weight)
    assert csra.net_.mean_term.weight.abs().max() > 0  # the fit trained it
    with torch.no_grad():
        dec.net_.group_weight.zero_()
        dec.net_.bias.zero_()
    np.testing.assert_allclose(dec.predict_proba(store, views), csra.predict_proba(store, views), atol=1e-6)


def test_mldecoder_init_from_a_csra_file_starts_from_it_without_fitting_one(planted, tmp_path):
    """`init_from` a fitted csra: the csra term is that file's (frozen), no csra is fitted in this fit; a model
    of another head, another hog, other pooling (its term would not be that csra), or with start random is
    refused, naming the file or the parameters."""
    import torch

    from imet.errors import ImetError, ParamError

    _, store = planted
    csra = make_head("csra", epochs=2, seed=3, workers=0).fit(store, log=quiet)
    csra.save(tmp_path / "csra.pt")
    lines: list[str] = []
    dec = make_head("mldecoder", epochs=1, width=16, workers=0, init_from=str(tmp_path / "csra.pt")).fit(
        store, log=lines.append)
    torch.testing.assert_close(dec.net_.classifier.weight, csra.net_.classifier.weight)
    torch.testing.assert_close(dec.net_.mean_term.weight, csra.net_.mean_term.weight)
    assert not any("start: " in line for line in lines)  # no csra fit logged its epochs
    lines.clear()  # a decoder that cannot beat its start (lr ~0) stops after `patience` epochs, keeping it
    dec = make_head("mldecoder", epochs=6, patience=2, lr=1e-12, width=16, workers=0,
                    init_from=str(tmp_path / "csra.pt")).fit(store, log=lines.append)
    assert sum(line.startswith("mldecoder epoch ") for line in lines) == 2
    assert any("no better val F2 for 2 epochs; keeping its start's" in line for line in lines)
    assert not dec.net_.group_weight.any()  # the start's decoder term, zero
    make_head("linear", epochs=1).fit(store, log=quiet).save(tmp_path / "linear.pt")
    with pytest.raises(ImetError, match="linear.pt: init_from needs a csra model"):
        make_head("mldecoder", epochs=1, width=16, workers=0, init_from=str(tmp_path / "linear.pt")).fit(
            store, log=quiet)
    with pytest.raises(ImetError, match="csra.pt: this csra model was fitted with hog=False"):
        make_head("mldecoder", epochs=1, width=16, workers=0, hog=True,
                  init_from=str(tmp_path / "csra.pt")).fit(store, log=quiet)
    make_head("csra", epochs=1, temperatures="1,inf", workers=0).fit(store, log=quiet).save(tmp_path / "max.pt")
    with pytest.raises(ImetError, match="max.pt: this csra model pools at temperatures 1,inf"):
        make_head("mldecoder", epochs=1, width=16, workers=0, init_from=str(tmp_path / "max.pt")).fit(
            store, log=quiet)
    with pytest.raises(ParamError, match="does not apply to start random"):
        make_head("mldecoder", start="random", init_from=str(tmp_path / "csra.pt"))


@pytest.mark.parametrize("layout, dropped", [(2, ("classifier.", "mean_term.")), (3, ("mean_term.",))])
def test_an_mldecoder_file_of_an_older_layout_still_loads(planted, tmp_path, layout, dropped):
    """Layout 2 (before the csra term) and 3 (its csra term without its own mean-cell weights) load and predict
    as today's model with those weights at zero."""
    import torch

    from imet.heads import load_model

    _, store = planted
    views = store.views("test")
    head = make_head("mldecoder", epochs=1, width=16, workers=0).fit(store, log=quiet)
    blob = head.to_blob()
    blob["learned"]["module"]["layout"] = layout
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if not k.startswith(dropped)}
    torch.save(blob, tmp_path / "m.pt")
    old = load_model(tmp_path / "m.pt")
    assert old.net_.mean_term is None and (old.net_.classifier is None) == (layout == 2)
    with torch.no_grad():  # a zero term adds 0 to every logit
        head.net_.mean_term.weight.zero_()
        if layout == 2:
            head.net_.classifier.weight.zero_()
            head.net_.classifier.bias.zero_()
    np.testing.assert_allclose(old.predict_proba(store, views), head.predict_proba(store, views), atol=1e-6)


def test_map_heads_predict_and_attn_rnn_decodes_in_a_kept_heap(planted, monkeypatch):
    """Prediction over a store runs inside imet.runtime.kept_heap (as training does): csra's and mldecoder's
    chunks, attn_rnn's beam search."""
    import contextlib

    from imet.heads import attn_rnn, maps

    _, store = planted
    fitted = {name: make_head(name, epochs=1, workers=0, **({"start_epochs": 1} if name == "attn_rnn" else {}))
              .fit(store, log=quiet) for name in ("csra", "attn_rnn")}
    inside = []

    @contextlib.contextmanager
    def recorded():
        inside.append(True)
        yield

    for module in (maps, attn_rnn):
        monkeypatch.setattr(module, "kept_heap", recorded)
    test = store.views("test")
    assert fitted["csra"].predict_proba(store, test).shape == (len(test), store.targets.shape[1])
    assert inside == [True]
    fitted["attn_rnn"].decode(store, test)
    assert inside == [True, True]
