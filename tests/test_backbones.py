"""Backbones beyond ResNet50: each family's pooled vector against torchvision's own forward (classifier
removed), its map against torchvision's feature extractor, every spec's shapes at 224 px, weights in every
file form, and the backbone as part of the feature identity (fit, predict, predict --data)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import TINY
from helpers import cheap_head, quiet
from safetensors.torch import save_file
from torchvision.models.feature_extraction import create_feature_extractor

from imet import store, stream
from imet.cli import cli
from imet.errors import ImetError
from imet.featurize.backbone import build_backbone, load_weights
from imet.featurize.options import BACKBONES
from imet.featurize.pipeline import Options, featurize
from imet.heads import HEADS, make_head
from imet.predict import predict
from imet.probfiles import read_probs

# the smallest of each family: (torchvision's classifier to remove, its map node, and whether that node is (B, h, w, C))
FAMILIES = {
    "resnet50": ("fc", None, False),  # maps: the dilated layer4, checked in test_featurize.py
    "convnext_tiny": ("classifier.2", "features.5", False),
    "efficientnet_v2_s": ("classifier", "features.5", False),
    "vit_b_16": ("heads", "encoder", False),
    "swin_v2_t": ("head", "features.5", True),
    "regnet_y_16gf": ("fc", "trunk_output.block3", False),
}


def reference(name: str, state: dict, size: int) -> torch.nn.Module:
    kw = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kw)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pooled_is_torchvisions_pre_classifier_vector_and_maps_its_stride_16_features(name):
    size = 64
    state, _ = load_weights("random", seed=2, backbone=name, image_size=size)
    model = build_backbone(name, state, size)
    x = torch.randn(2, 3, size, size)
    ref = reference(name, state, size)
    classifier, node, channels_last = FAMILIES[name]
    with torch.inference_mode():
        maps, pooled = model(x)
        features = create_feature_extractor(ref, {node: "maps"})(x)["maps"] if node else None
        parent, _, leaf = classifier.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, leaf, torch.nn.Identity())
        expected = ref(x)
    spec = BACKBONES[name]
    assert pooled.shape == (2, spec.pooled) and maps.shape == (2, spec.channels, 4, 4) and spec.grid(size) == 4
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
    if node == "encoder":  # ViT: patch tokens, class token out
        features = features[:, 1:].reshape(2, 4, 4, -1)
        channels_last = True
    if features is not None:
        torch.testing.assert_close(maps, features.permute(0, 3, 1, 2) if channels_last else features, rtol=0, atol=0)
        torch.testing.assert_close(model.pooled_only(x), pooled, rtol=0, atol=0)


def shapes_at_224(name: str) -> tuple[tuple, tuple, int]:
    """(maps shape, pooled shape, torchvision's parameter count) of one 224 px image, on the meta device
    (shapes only, nothing computed); RegNet computes its widths with tensors while built, so it runs for real."""
    try:
        with torch.device("meta"):
            classifier = torchvision.models.get_model(name, weights=None)
            model = build_backbone(name, classifier.state_dict(), 224)
            maps, pooled = model(torch.empty(1, 3, 224, 224))
    except NotImplementedError:
        classifier = torchvision.models.get_model(name, weights=None)
        with torch.inference_mode():
            maps, pooled = build_backbone(name, classifier.state_dict(), 224)(torch.zeros(1, 3, 224, 224))
    return tuple(maps.shape), tuple(pooled.shape), sum(p.numel() for p in classifier.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_spec_gives_a_14x14_map_of_its_channels_at_224_px(name):
    spec = BACKBONES[name]
    maps, pooled, params = shapes_at_224(name)
    assert spec.grid(224) == 14 and maps == (1, spec.channels, 14, 14) and pooled == (1, spec.pooled)
    assert spec.params() == params  # torchvision's count, classifier included
    assert spec.preprocessing()["crop"] in (224, 256, 384, 480)


def test_weights_in_every_file_form_load_the_same_and_a_wrong_architecture_is_named(tmp_path):
    state, _ = load_weights("random", seed=1, backbone="convnext_tiny")
    forms = {"plain.pt": state, "model.pt": {"model": state, "epoch": torch.tensor(3)},
             "ema.pth": {"ema": state}, "module.pt": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))  # the test extra has it
    forms["w.safetensors"] = None
    for name, content in forms.items():
        if content is not None:
            torch.save(content, tmp_path / name)
        loaded, desc = load_weights(str(tmp_path / name), backbone="convnext_tiny")
        assert desc["weights"] == "file" and len(desc["sha256"]) == 64
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name
    with pytest.raises(ImetError, match=r"plain.pt: not a torchvision resnet50 state dict \(missing \['conv1.weight', "
                                        r"'bn1.weight', 'bn1.bias'\] \.\.\.; unexpected \['features.0.0.weight'"):
        load_weights(str(tmp_path / "plain.pt"), backbone="resnet50")
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(ImetError, match="x.safetensors: cannot read a safetensors file"):
        load_weights(str(tmp_path / "x.safetensors"), backbone="convnext_tiny")


def test_vit_weights_for_another_image_size_are_named(tmp_path):
    with pytest.raises(ImetError, match="image_size 72: vit_b_16 cuts 16x16 patches; choose a multiple of 16"):
        Options(backbone="vit_b_16", image_size=72)
    with torch.device("meta"):
        shapes = torchvision.models.get_model("vit_b_16", weights=None, image_size=64).state_dict()
    # every tensor a view of one zero (a file of a few bytes per key), shaped as ViT-B/16 at 64 px
    torch.save({k: torch.zeros(1).expand(v.shape) for k, v in shapes.items()}, tmp_path / "vit64.pt")
    assert load_weights(str(tmp_path / "vit64.pt"), backbone="vit_b_16", image_size=64)[0].keys() == shapes.keys()
    with pytest.raises(ImetError, match=r"wrong shapes for \['encoder.pos_embedding'\]\) .*need image_size 224"):
        load_weights(str(tmp_path / "vit64.pt"), backbone="vit_b_16", image_size=96)


@pytest.fixture(scope="module")
def convnext_store(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("convnext") / "c.h5"
    featurize(data_dir, out, Options(**TINY, backbone="convnext_tiny", limit=6), device="cpu", workers=0,
              progress=False)
    return out


def test_a_store_records_its_backbone_and_models_refuse_another_by_name(convnext_store, tiny_store, tmp_path):
    fs = store.FeatureStore(convnext_store)
    assert fs.settings["backbone"] == "convnext_tiny" and fs.shape("maps") == (4, 4, 384)
    assert fs.shape("pooled") == (768,) and fs.settings["mean"] == [0.485, 0.456, 0.406]
    head = make_head("linear", epochs=2).fit(fs, log=lambda _: None)
    head.save(tmp_path / "m.pt")
    with pytest.raises(ImetError, match='other feature settings .*backbone is "resnet50" here, "convnext_tiny" in'):
        predict(tiny_store, tmp_path / "m.pt", tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_fits_and_predicts_on_another_backbones_store(convnext_store, head, tmp_path):
    fs = store.FeatureStore(convnext_store)  # 384-channel 4x4 maps, 768-wide pooled: no size of ResNet50's
    fitted = cheap_head(head, start_epochs=2).fit(fs, log=quiet)
    fitted.save(tmp_path / "m.pt")
    done = predict(convnext_store, tmp_path / "m.pt", tmp_path / "out.csv", split="test")
    rows = [r.split(",") for r in (tmp_path / "out.csv").read_text().splitlines()]
    assert rows[0] == ["id", "attribute_ids"] and len(rows) == 1 + done["images"] > 1, rows
    known = {str(a) for a in fs.vocab.attribute_ids}
    assert all(r[1] and set(r[1].split()) <= known for r in rows[1:]), rows


def test_predict_data_builds_the_models_backbone(convnext_store, data_dir, tmp_path):
    model = tmp_path / "csra.pt"
    make_head("csra", epochs=2, workers=0).fit(store.FeatureStore(convnext_store), log=lambda _: None).save(model)
    predict(convnext_store, model, tmp_path / "store.csv", probs_path=tmp_path / "store.h5")
    stream.predict_images(data_dir, model, tmp_path / "data.csv", probs_path=tmp_path / "data.h5", device="cpu",
                          workers=0, progress=False)
    assert (tmp_path / "data.csv").read_bytes() == (tmp_path / "store.csv").read_bytes()
    ids, probs, _, _ = read_probs(tmp_path / "store.h5")
    data_ids, data_probs, _, _ = read_probs(tmp_path / "data.h5")
    assert data_ids == ids and len(ids) == 4
    torch.testing.assert_close(torch.from_numpy(data_probs), torch.from_numpy(probs), rtol=0, atol=1e-5)


def test_cli_backbone_choice_and_dry_run_check_the_weights_file(data_dir, tmp_path):
    runner = CliRunner()
    args = ["featurize", str(data_dir), "--out", str(tmp_path / "x.h5"), "--dry-run", "--image-size", "64"]
    result = runner.invoke(cli, [*args, "--backbone", "alexnet"])
    assert result.exit_code == 2 and "'alexnet' is not one of 'resnet50'" in result.output
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    result = runner.invoke(cli, [*args, "--backbone", "swin_v2_t", "--weights", str(tmp_path / "bad.pt")])
    assert result.exit_code == 2 and "not a torchvision swin_v2_t state dict (missing ['features.0.0.weight'" \
        in result.output and "Traceback" not in result.output, result.output
    result = runner.invoke(cli, [*args, "--backbone", "swin_v2_t", "--weights", "random"])
    assert result.exit_code == 0, result.output
    assert "backbone swin_v2_t: pooled 768 (stage 4, LayerNorm, global mean), maps 4x4x384" in result.output
    assert "features/maps    (4, 4, 384)      float16" in result.output
    assert "vit_b_16" in result.output and "at full iMet" in result.output and not (tmp_path / "x.h5").exists()


def test_compact_maps_work_for_another_backbone(data_dir, tmp_path):
    out = tmp_path / "e.h5"
    featurize(data_dir, out, Options(**TINY, backbone="efficientnet_v2_s", maps_dim=8, maps_dtype="int8", limit=4),
              device="cpu", workers=0, progress=False)
    fs = store.FeatureStore(out)
    assert fs.shape("maps") == (4, 4, 8) and fs.shape("pooled") == (1280,)
    assert fs.codecs["maps"].describe() == "PCA 160 -> 8, stored int8 with a per-channel scale"
    with pytest.raises(ImetError, match="maps_dim must be an integer in 1..160 .at most 160, the maps' channels"):
        Options(**TINY, backbone="efficientnet_v2_s", maps_dim=161)
