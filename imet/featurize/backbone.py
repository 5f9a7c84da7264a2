"""Frozen ResNet50 with two last stages sharing one trunk: the standard pooled vector and a 14x14 map.

At 224 px the standard layer4 gives a 7x7 map. The dilated layer4 (torchvision's
`replace_stride_with_dilation=[False, False, True]`) has the same weights and gives a real 14x14 map,
but its global average is not the standard pooled vector; the paper's linear heads use the standard
one. So both layer4s run on the shared layer3 output (about +13% compute).
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from imet.errors import ImetError, WeightsUnavailable
from imet.files import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 20


class TwoBranchResNet50(nn.Module):
    """x (B, 3, S, S) normalised -> maps (B, 2048, S/16, S/16) dilated layer4, pooled (B, 2048) standard."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        standard = resnet50()
        dilated = resnet50(replace_stride_with_dilation=[False, False, True])
        for model in (standard, dilated):
            model.load_state_dict(state_dict)
        self.trunk = nn.Sequential(standard.conv1, standard.bn1, standard.relu, standard.maxpool,
                                   standard.layer1, standard.layer2, standard.layer3)
        self.layer4 = standard.layer4
        self.layer4_dilated = dilated.layer4
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.trunk(x)  # (B, 1024, S/16, S/16)
        pooled = self.layer4(shared).mean(dim=(2, 3))  # (B, 2048), torchvision's avgpool + flatten
        maps = self.layer4_dilated(shared)  # (B, 2048, S/16, S/16)
        return maps, pooled

    def pooled_only(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.trunk(x)).mean(dim=(2, 3))


def _imagenet_file() -> Path:
    """torchvision's ResNet50 ImageNet weights in the torch hub cache, downloaded there if missing."""
    url = ResNet50_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if path.is_file():
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
            f"ResNet50 ImageNet weights are not in the torch cache ({path}) and could not be downloaded "
            f"({type(e).__name__}); pass --weights PATH to a resnet50 state-dict file, or --weights random"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return path


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's advice (weights_only=False) is never right for a weights file
        raise ImetError(f"{path}: not a state dict of plain tensors (it holds pickled objects, which imet never "
                        "loads)") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ImetError(f"{path}: cannot read a PyTorch state dict ({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    expected = resnet50().state_dict()
    if not isinstance(state, dict):
        raise ImetError(f"{path}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"wrong shapes for {wrong[:3]}"
        raise ImetError(f"{path}: not a torchvision ResNet50 state dict ({what})")
    return {k: state[k] for k in expected}


def load_weights(spec: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """`imagenet`, `random` (seeded) or a path -> (state dict, a JSON-able description for the store)."""
    if spec == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = resnet50().state_dict()
        return state, {"weights": "random", "seed": seed}
    if spec == "imagenet":
        path = _imagenet_file()
        return _load_file(path), {"weights": "imagenet", "name": "IMAGENET1K_V1", "sha256": sha256_file(path)}
    path = Path(spec)
    if not path.is_file():
        raise ImetError(f"{path}: weights file not found (use imagenet, random or a state-dict path)")
    return _load_file(path), {"weights": "file", "sha256": sha256_file(path)}
