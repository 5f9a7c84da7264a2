"""Frozen torchvision backbones, each declared by a `Spec`: a pooled vector and a map from one shared trunk.

The pooled vector is the model's own pre-classifier vector (torchvision's forward with the classifier
removed). The map is taken where a grid of about S/16 cells per side is found without retraining:

- ResNet: the last stage dilated (torchvision's `replace_stride_with_dilation=[False, False, True]`, as the
  paper does for ResNet50). It has the same weights and gives a real 14x14 map at 224 px, but its global
  average is not the standard pooled vector, so both last stages run on the shared stage-3 output (about
  +13% compute for ResNet50);
- ConvNeXt, Swin V2, EfficientNetV2, RegNet: the output of the stride-16 stage (torchvision offers no
  dilation for them); the pooled vector continues from it through the later stages, at no extra cost;
- ViT: the patch tokens of the encoder's output (class token out); the class token is the pooled vector.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from imet.errors import ImetError, WeightsUnavailable
from imet.featurize.options import Spec, get_spec
from imet.files import sha256_file

DOWNLOAD_TIMEOUT_S = 20
CHECKPOINT_KEYS = ("state_dict", "model", "ema")  # where a training checkpoint keeps its state dict


def _model(spec: Spec, image_size: int, **kw) -> nn.Module:
    """torchvision's classifier of `spec`, randomly initialised (never `weights=`: no network)."""
    if spec.family == "vit":
        kw["image_size"] = image_size
    return torchvision.models.get_model(spec.name, weights=None, **kw)


class _Mean(nn.Module):
    def forward(self, x):  # (B, C, h, w) -> (B, C)
        return x.mean(dim=(2, 3))


class _Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class _VitTokens(nn.Module):
    """x (B, 3, S, S) -> the encoder's output tokens (B, 1 + (S/16)^2, D), class token first."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        x = self.vit._process_input(x)  # (B, N, D)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, x], dim=1))


class _VitMaps(nn.Module):
    def forward(self, tokens):  # (B, 1 + g*g, D) -> (B, D, g, g)
        b, n, d = tokens.shape
        g = math.isqrt(n - 1)
        return tokens[:, 1:].reshape(b, g, g, d).permute(0, 3, 1, 2)


class _ClassToken(nn.Module):
    def forward(self, tokens):
        return tokens[:, 0]


class Backbone(nn.Module):
    """x (B, 3, S, S) normalised -> maps (B, C, g, g), pooled (B, D): one trunk, then two branches."""

    def __init__(self, spec: Spec, trunk: nn.Module, to_maps: nn.Module, to_pooled: nn.Module):
        super().__init__()
        self.spec = spec
        self.trunk, self.to_maps, self.to_pooled = trunk, to_maps, to_pooled
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.trunk(x)
        return self.to_maps(shared), self.to_pooled(shared)

    def pooled_only(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_pooled(self.trunk(x))


def _loaded(spec: Spec, image_size: int, state: dict[str, torch.Tensor], **kw) -> nn.Module:
    """torchvision's classifier of `spec` holding `state`, built without its random initialisation.

    The initialisation is overwritten by `state` at once, and it costs about as much as a few batches of the
    forward on one thread (0.5 s for ConvNeXt-T): built on the meta device, the modules get uninitialised
    memory and then `state`'s values, the same bytes as before. A model that computes with tensors while it
    is built (RegNet), or that keeps a buffer outside its state dict, is built and initialised for real.
    """
    device = torch.get_default_device()  # where the model would have been built (meta within `torch.device`)
    try:
        with torch.device("meta"):
            m = _model(spec, image_size, **kw)
    except NotImplementedError:
        m = None
    if m is not None and {name for name, _ in m.named_buffers()} <= m.state_dict().keys():
        m = m.to_empty(device=device)
    else:
        m = _model(spec, image_size, **kw)
    m.load_state_dict(state)
    return m


def build_backbone(name: str, state: dict[str, torch.Tensor], image_size: int = 224) -> Backbone:
    """The backbone `name` with the state dict `state` (as `load_weights` returns it), cut as its spec says."""
    spec = get_spec(name)
    m = _loaded(spec, image_size, state)
    if spec.family == "resnet":
        dilated = _loaded(spec, image_size, state, replace_stride_with_dilation=[False, False, True])
        trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)
        return Backbone(spec, trunk, dilated.layer4, nn.Sequential(m.layer4, _Mean()))
    if spec.family == "convnext":  # classifier = LayerNorm2d, Flatten, Linear
        return Backbone(spec, m.features[:6], nn.Identity(),
                        nn.Sequential(m.features[6:], m.avgpool, m.classifier[0], m.classifier[1]))
    if spec.family == "efficientnet":
        return Backbone(spec, m.features[:6], nn.Identity(), nn.Sequential(m.features[6:], m.avgpool, nn.Flatten()))
    if spec.family == "swin":  # features give (B, h, w, C)
        return Backbone(spec, m.features[:6], _Permute(0, 3, 1, 2),
                        nn.Sequential(m.features[6:], m.norm, m.permute, m.avgpool, m.flatten))
    if spec.family == "regnet":
        return Backbone(spec, nn.Sequential(m.stem, m.trunk_output[:3]), nn.Identity(),
                        nn.Sequential(m.trunk_output[3:], m.avgpool, nn.Flatten()))
    return Backbone(spec, _VitTokens(m), _VitMaps(), _ClassToken())


def imagenet_file(spec: Spec, download: bool = True) -> Path:
    """torchvision's ImageNet weights of `spec` in the torch hub cache, downloaded there if missing."""
    url = spec.weights_member().url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if path.is_file() or not download:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImetError(f"{path.parent}: cannot create the torch cache ({e.strerror}); set TORCH_HOME to a "
                        "writable directory, or pass --weights PATH or --weights random") from None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as e:  # any network failure means the same thing to the user
        raise WeightsUnavailable(
            f"{spec.name} ImageNet weights are not in the torch cache ({path}) and could not be downloaded "
            f"({type(e).__name__}); pass --weights PATH to a {spec.name} state-dict file, or --weights random"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def _read(path: Path) -> object:
    """What a weights file holds: a safetensors file's tensors, else torch.load's plain tensors and dicts."""
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise ImetError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)")
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ImetError(f"{path}: cannot read a safetensors file ({type(e).__name__})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's advice (weights_only=False) is never right for a weights file
        raise ImetError(f"{path}: not a state dict of plain tensors (it holds pickled objects, which imet never "
                        "loads)") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ImetError(f"{path}: cannot read a PyTorch state dict ({type(e).__name__}: {first})") from None


def _shapes(spec: Spec, image_size: int) -> dict[str, torch.Tensor]:
    """The state dict `spec` takes, as meta tensors (shapes only: no memory, no initialisation time)."""
    try:
        with torch.device("meta"):
            return _model(spec, image_size).state_dict()
    except NotImplementedError:  # RegNet computes its widths with tensors while it is built: build it for real
        return _model(spec, image_size).to("meta").state_dict()


def _load_file(path: Path, spec: Spec, image_size: int) -> dict[str, torch.Tensor]:
    state = _read(path)
    if isinstance(state, dict):  # a training checkpoint: the state dict under one of its usual keys
        state = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImetError(f"{path}: not a state dict (a mapping of names to tensors, or a checkpoint holding one "
                        f"under {', '.join(CHECKPOINT_KEYS)})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = _shapes(spec, image_size)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        what = "; ".join(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for label, keys in (
            ("missing", missing), ("unexpected", unexpected), ("wrong shapes for", wrong)) if keys)
        hint = (" (a ViT's position embedding is for one image size: torchvision's ImageNet weights need "
                "image_size 224)" if wrong == ["encoder.pos_embedding"] else "")
        raise ImetError(f"{path}: not a torchvision {spec.name} state dict ({what}){hint}")
    return {k: state[k] for k in expected}


def load_weights(weights: str, seed: int = 0, backbone: str = "resnet50",
                 image_size: int = 224) -> tuple[dict[str, torch.Tensor], dict]:
    """`imagenet`, `random` (seeded) or a path -> (state dict, a JSON-able description for the store)."""
    spec = get_spec(backbone)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = _model(spec, image_size).state_dict()
        return state, {"weights": "random", "seed": seed}
    if weights == "imagenet":
        path = imagenet_file(spec)
        return _load_file(path, spec, image_size), {"weights": "imagenet", "name": spec.imagenet,
                                                    "sha256": sha256_file(path)}
    path = Path(weights)
    if not path.is_file():
        raise ImetError(f"{path}: weights file not found (use imagenet, random or a state-dict path)")
    return _load_file(path, spec, image_size), {"weights": "file", "sha256": sha256_file(path)}
