"""The attn_rnn head on stores: attention pays off where evidence is local, training, init, decoding, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ONE_CELL, make_store, quiet

from imet.cli import cli
from imet.decode.submission import read_submission
from imet.errors import ImetError
from imet.explain import write_overlays
from imet.heads import load_model, make_head
from imet.metrics import scores
from imet.planted import write_planted_store
from imet.store import FeatureStore

SMALL = dict(hidden=64, attention_dim=32, pred_dim=64, workers=0)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> FeatureStore:
    path = tmp_path_factory.mktemp("planted") / "s.h5"
    write_planted_store(path, ONE_CELL)
    return FeatureStore(path)


def test_attention_beats_linear_where_evidence_sits_in_one_cell(planted):
    linear = make_head("linear", epochs=30, batch_size=32, lr=1e-2).fit(planted, log=quiet)
    attn = make_head("attn_rnn", epochs=15, lr=3e-3, **SMALL).fit(planted, log=quiet)
    f2 = {}
    for name, head in (("linear", linear), ("attn_rnn", attn)):
        images, _, labels = head.predict_labels(planted, "test")
        f2[name] = scores(planted.targets[images], labels)["f2"]
    assert f2["attn_rnn"] > f2["linear"] + 0.05, f2
    assert attn.history_[-1] < 0.75 * attn.history_[0]  # the training loss decreases


def test_round_trip_gives_the_same_decode(planted, tmp_path):
    head = make_head("attn_rnn", epochs=2, beam=3, **SMALL).fit(planted, log=quiet)
    head.save(tmp_path / "a.pt")
    again = load_model(tmp_path / "a.pt")
    views = planted.views("test")
    a, b = head.decode(planted, views, return_alpha=True), again.decode(planted, views, return_alpha=True)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.alpha, b.alpha)
    assert again.gamma_ == head.gamma_ and again.steps_ == head.steps_
    used = a.alpha[a.labels >= 0]  # (n, L) attention of each emitted label
    torch.testing.assert_close(used.sum(-1), torch.ones(len(used)))


def test_gamma_and_view_vote_from_one_decode_match_a_grid_search_of_separate_decodes(planted, monkeypatch):
    """The slow obvious tuning: one beam search per gamma, then every vote; the same F2, gamma and vote."""
    from imet.decode.thresholds import apply_thresholds, average_views
    from imet.heads import attn_rnn
    from imet.heads.attn_rnn import GAMMAS, VOTES

    monkeypatch.setattr(attn_rnn, "MAX_EXTENSIONS", 0)  # the grid alone (its extension: the test below)
    head = make_head("attn_rnn", epochs=2, beam=3, patience=0, **SMALL).fit(planted, log=quiet)
    val = planted.views("val")
    best, seen = {name: (-1.0, 0.0, 0.0) for name in (*VOTES, "tune")}, set()
    for gamma in GAMMAS:
        images, votes = average_views(head.votes(head.decode(planted, val, gamma=float(gamma))),
                                      planted.view_image[val])
        for name, vote in VOTES.items():
            labels = apply_thresholds(votes, vote, min_labels=head.min_labels)
            f2 = scores(planted.targets[images], labels)["f2"]
            seen.add(round(f2, 6))
            for rule in (name, "tune"):
                best[rule] = max(best[rule], (f2, float(gamma), vote), key=lambda x: x[0])
    assert len(seen) > 3  # the grid does decode differently
    assert (head.val_f2_, head.gamma_, head.threshold_) == pytest.approx(best["tune"], abs=1e-12)
    for name in VOTES:  # a fixed vote: only gamma is tuned
        head.view_vote = name
        head.tune(planted, val)
        assert (head.val_f2_, head.gamma_, head.threshold_) == pytest.approx(best[name], abs=1e-12)
    with pytest.raises(ImetError, match="view_vote must be one of any, half, all, tune"):
        make_head("attn_rnn", view_vote="some")


def test_gamma_grid_extends_past_a_rising_edge_and_not_along_a_plateau():
    """search_gammas against the obvious search over one wide grid, on F2 curves peaking anywhere."""
    from imet.heads.attn_rnn import GAMMAS, search_gammas

    def curve(peak: float, flat_below: bool = False):
        def rules(gammas):
            return [(-max(np.log10(g / peak), 0 if flat_below else np.log10(peak / g)), float(g), 0.5)
                    for g in gammas]
        return rules

    wide = np.logspace(-9, 9, 73)  # GAMMAS' steps, 3 extensions of 2 decades each side
    for peak in (1e-8, 1e-4, 0.05, 3.0, 1e4, 1e8):
        want = max(curve(peak)(wide), key=lambda r: r[0])
        assert search_gammas(curve(peak)) == pytest.approx(want), peak
    assert search_gammas(curve(1e-20))[1] == pytest.approx(1e-9)  # at most 3 extensions
    # a plateau at the bottom (no path stops below 0.1): not extended, ties to the smaller gamma
    assert search_gammas(curve(0.1, flat_below=True))[1] == pytest.approx(GAMMAS[0])


def test_default_fit_starts_from_its_own_csra_and_beats_linear_on_one_cell_labels(planted, tmp_path):
    """`imet fit --head attn_rnn` without --init-from: a csra start fitted in the same command, recorded in the
    model; every label of this store has its evidence in one cell, where the linear head is blind."""
    model = tmp_path / "attn.pt"
    result = CliRunner().invoke(cli, ["fit", "--store", str(planted.path), "--head", "attn_rnn", "--out", str(model),
                                      "--epochs", "6", "--hidden", "64", "--attention-dim", "32", "--pred-dim", "64",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    head = load_model(model)
    assert head.start_["from"] == "csra" and head.start_["params"]["epochs"] == 20 and head.start_["val_f2"] > 0
    assert head.fr_head_["name"] == "csra" and head.residual and not head.hog_  # this store has no HOG
    linear = make_head("linear", epochs=30, batch_size=32, lr=1e-2).fit(planted, log=quiet)
    f2 = {}
    for name, fitted in (("linear", linear), ("attn_rnn", head)):
        images, _, labels = fitted.predict_labels(planted, "test")
        f2[name] = scores(planted.targets[images], labels)["f2"]
    assert f2["attn_rnn"] > f2["linear"] + 0.1, f2
    paper = make_head("attn_rnn", epochs=1, start="paper", **SMALL).fit(planted, log=quiet)
    assert paper.start_ == {"from": "paper"} and paper.fr_head_ is None


def test_steps_default_to_the_most_labels_of_a_train_image(planted):
    head = make_head("attn_rnn", epochs=1, **SMALL).fit(planted, log=quiet)
    train_images = np.unique(planted.view_image[planted.views("train")])
    assert head.steps_ == planted.targets[train_images].sum(1).max() == 3  # ONE_CELL: the culture + at most 2 tags


def test_ablations_and_hog_variant_train(tmp_path):
    store = FeatureStore(make_store(tmp_path / "s.h5"))
    for params in (dict(attention=False), dict(pool="truth"), dict(hog=True)):
        head = make_head("attn_rnn", epochs=1, **SMALL, **params).fit(store, log=quiet)
        assert head.predict_proba(store, store.views("val")).shape == (len(store.views("val")), len(store.vocab))
    with pytest.raises(ImetError, match="pool must be one of predicted, truth"):
        make_head("attn_rnn", pool="nope", **SMALL).fit(store, log=quiet)


def test_init_from_a_linear_model(tmp_path):
    store = FeatureStore(make_store(tmp_path / "s.h5"))
    make_head("linear", epochs=2).fit(store, log=quiet).save(tmp_path / "lin.pt")
    head = make_head("attn_rnn", epochs=1, lr=1e-9, init_from=str(tmp_path / "lin.pt"), **SMALL)
    head.fit(store, log=quiet)
    linear = load_model(tmp_path / "lin.pt")
    torch.testing.assert_close(head.model_.fr.weight, linear.net_[1].weight, rtol=1e-4, atol=1e-6)
    assert not head.hog_ and "hog" not in head.needs  # hog unset: as the init_from model (linear: none)
    make_head("linear_hog", epochs=1).fit(store, log=quiet).save(tmp_path / "hog.pt")
    with pytest.raises(ImetError, match="init_from needs a linear, csra or mldecoder model"):
        make_head("attn_rnn", epochs=1, hog=False, init_from=str(tmp_path / "hog.pt"), **SMALL).fit(store, log=quiet)
    head = make_head("attn_rnn", epochs=1, init_from=str(tmp_path / "hog.pt"), **SMALL).fit(store, log=quiet)
    assert head.hog_ and "hog" in head.needs


def test_epochs_that_do_not_beat_the_start_on_val_are_not_kept(tmp_path):
    """With early stopping and a start, the decoder as started is the bar (as mldecoder's csra start is): epochs
    at a learning rate too small to change any decode never beat it, so the start's exact weights come back."""
    store = FeatureStore(make_store(tmp_path / "s.h5"))
    make_head("linear", epochs=2).fit(store, log=quiet).save(tmp_path / "lin.pt")
    linear = load_model(tmp_path / "lin.pt")
    lines: list[str] = []
    head = make_head("attn_rnn", epochs=3, lr=1e-9, patience=1, init_from=str(tmp_path / "lin.pt"), **SMALL)
    head.fit(store, log=lines.append)
    assert any("as started, val F2" in line for line in lines), lines
    assert any("keeping its start's" in line for line in lines), lines
    assert len(head.history_) == 1  # stopped after one epoch that did not beat the start
    assert torch.equal(head.model_.fr.weight, linear.net_[1].weight.to(head.model_.fr.weight.dtype))
    lines.clear()
    head = make_head("attn_rnn", epochs=1, patience=0, init_from=str(tmp_path / "lin.pt"), **SMALL)
    head.fit(store, log=lines.append)
    assert not any("as started" in line for line in lines)  # no early stopping: no start to beat


def test_a_store_without_maps_is_refused_with_the_fix(tmp_path):
    path = make_store(tmp_path / "s.h5", features={"pooled": np.zeros((80, 4), np.float32)})
    with pytest.raises(ImetError, match="needs maps, which this store lacks.*without --no-maps"):
        make_head("attn_rnn", **SMALL).fit(FeatureStore(path), log=quiet)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_decode_alike(planted):
    head = make_head("attn_rnn", epochs=2, device="cpu", **SMALL).fit(planted, log=quiet)
    views = planted.views("test")
    cpu = head.decode(planted, views)
    head.device = "cuda"
    gpu = head.decode(planted, views)
    assert (cpu.labels == gpu.labels).float().mean() > 0.99  # bf16 autocast on CUDA may flip a near tie


def test_fit_and_predict_cli(tiny_store, tmp_path):
    model, sub = tmp_path / "attn.pt", tmp_path / "sub.csv"
    runner = CliRunner()
    result = runner.invoke(cli, ["fit", "--store", str(tiny_store), "--head", "attn_rnn", "--out", str(model),
                                 "--epochs", "1", "--hidden", "32", "--beam", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["predict", "--store", str(tiny_store), "--model", str(model), "--out", str(sub)])
    assert result.exit_code == 0, result.output
    assert list(read_submission(sub)) == ["t03", "t02", "t01", "t00"]
    result = runner.invoke(cli, ["fit", "--store", str(tiny_store), "--head", "linear", "--out", str(model),
                                 "--beam", "2"])
    assert result.exit_code == 2 and "--beam does not apply to head linear" in result.output


def test_attention_file_and_explain_overlays(tiny_store, data_dir, tmp_path):
    import h5py
    from PIL import Image

    model, sub, attn = tmp_path / "attn.pt", tmp_path / "sub.csv", tmp_path / "attn.h5"
    make_head("attn_rnn", epochs=1, beam=2, **SMALL).fit(FeatureStore(tiny_store), log=quiet).save(model)
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", "--store", str(tiny_store), "--model", str(model), "--out", str(sub),
                                 "--split", "test", "--attention", str(attn)])
    assert result.exit_code == 0, result.output
    submitted = read_submission(sub)
    with h5py.File(attn) as f:
        pairs = sorted(zip([s.decode() for s in f["image_id"][()]], f["attribute_id"][()].tolist(), strict=True))
        alpha = f["alpha"][()]
    assert pairs == sorted((i, a) for i, ids in submitted.items() for a in ids)  # one map per predicted label
    assert alpha.shape[1:] == (4, 4) and np.allclose(alpha.sum((1, 2)), 1, atol=1e-4)
    ids = list(submitted)[:2]
    result = runner.invoke(cli, ["explain", "--store", str(tiny_store), "--model", str(model), "--data",
                                 str(data_dir), "--ids", ",".join(ids), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    for image_id in ids:
        with Image.open(tmp_path / "figs" / f"{image_id}.png") as img:
            assert img.width > 200
    result = runner.invoke(cli, ["explain", "--store", str(tiny_store), "--model", str(model), "--data",
                                 str(data_dir), "--ids", "nope", "--out", str(tmp_path / "figs")])
    assert result.exit_code == 2 and "no image with id(s) ['nope']" in result.output
    linear = tmp_path / "linear.pt"
    make_head("linear", epochs=1).fit(FeatureStore(tiny_store), log=quiet).save(linear)
    result = runner.invoke(cli, ["predict", "--store", str(tiny_store), "--model", str(linear), "--out", str(sub),
                                 "--attention", str(attn)])
    assert result.exit_code == 2 and "--attention needs an attention head" in result.output


def test_explain_refuses_an_image_without_a_usable_view(tiny_store, data_dir, tmp_path):
    import shutil

    import h5py

    from imet import store as store_module

    broken = tmp_path / "broken.h5"
    shutil.copy(tiny_store, broken)
    fs = FeatureStore(broken)
    image = int(fs.view_image[fs.views("test")[0]])
    with h5py.File(broken, "r+") as f:  # as featurize leaves an image it could not decode
        views = np.flatnonzero(fs.view_image == image)
        f["views/status"][views.min():views.max() + 1] = store_module.FAILED
        f["views/error"][views.min():views.max() + 1] = b"cannot decode x.png: truncated"
    fs = FeatureStore(broken)
    head = make_head("attn_rnn", epochs=1, beam=2, **SMALL).fit(fs, log=quiet)
    assert head.decode(fs, np.array([], dtype=np.int64), return_alpha=True).alpha.shape[0] == 0
    with pytest.raises(ImetError, match=rf"image {fs.image_ids[image]} has no usable view \(cannot decode x.png"):
        write_overlays(fs, head, data_dir, [str(fs.image_ids[image])], tmp_path / "figs")


def test_map_statistics_equal_numpy_over_every_cell(tiny_store):
    from imet.heads.attn_rnn import map_stats

    fs = FeatureStore(tiny_store)
    train = fs.views("train")  # fewer than MAP_STATS_VIEWS: every view is used
    cells = fs.read("maps", train).astype(np.float64).reshape(-1, fs.shape("maps")[-1])
    mean, std = map_stats(fs, train, np.random.default_rng(0))
    np.testing.assert_allclose(mean.numpy(), cells.mean(0), rtol=1e-5, atol=1e-5)
    want = np.where(cells.std(0) > 1e-6, cells.std(0), 1.0)
    np.testing.assert_allclose(std.numpy(), want, rtol=1e-4, atol=1e-5)
