"""What decides a featurized store, declared without torch: the backbones' specs (plain data), the HOG
parameters and `Options` with each setting's constraint and help. `imet featurize --help` and its argument
errors are made from these alone, so they answer without importing torch, torchvision or scikit-image (a spec's
look-ups of torchvision's weights import it when called); backbone.py, hog.py and pipeline.py import them from
here and hold no copy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from imet import codec
from imet.errors import ParamError
from imet.params import SEED, Bool, Choice, Int, Param, Text, check_values

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Spec:
    """One backbone: its torchvision builder's name, what it gives and where each part comes from."""

    name: str  # torchvision's builder, e.g. convnext_tiny
    family: str  # resnet | convnext | efficientnet | vit | swin | regnet: how the model is cut
    channels: int  # of the map
    pooled: int  # width of the pooled vector
    maps_at: str  # where the map is taken
    imagenet: str  # torchvision's weights member that `--weights imagenet` means
    mean: tuple[float, float, float] = IMAGENET_MEAN  # the pixel normalisation these weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD

    def grid(self, size: int) -> int:
        """Map cells per side for a size x size view (the stride-16 rounding of this family's layers)."""
        if self.family in ("convnext", "vit"):
            return size // 16  # unpadded 4x4 then 2x2 convolutions; 16x16 patches
        if self.family == "swin":
            return math.ceil(size // 4 / 4)  # 4x4 patches, then patch merging pads to even
        return math.ceil(size / 16)  # padded stride-2 convolutions

    def weights_member(self):
        import torchvision  # here, not at the top: the specs are read by --help

        return torchvision.models.get_model_weights(self.name)[self.imagenet]

    def params(self) -> int:
        return int(self.weights_member().meta["num_params"])

    def preprocessing(self) -> dict:
        """torchvision's evaluation transform of these weights (imet cuts its own views; mean/std are used)."""
        keys = self.weights_member().transforms.keywords
        return {"resize": keys.get("resize_size", keys["crop_size"]), "crop": keys["crop_size"],
                "interpolation": getattr(keys.get("interpolation"), "value", "bilinear"),
                "mean": list(self.mean), "std": list(self.std)}


def _specs() -> dict[str, Spec]:
    def resnet(name, imagenet="IMAGENET1K_V2"):
        return Spec(name, "resnet", 2048, 2048, "layer4, dilated (stride 16)", imagenet)

    def convnext(name, c):
        return Spec(name, "convnext", c, 2 * c, "features[5]: stage 3 (stride 16)", "IMAGENET1K_V1")

    def effnet(name, c, **kw):
        return Spec(name, "efficientnet", c, 1280, "features[5]: stage 5 (stride 16)", "IMAGENET1K_V1", **kw)

    def swin(name, c):
        return Spec(name, "swin", c, 2 * c, "features[5]: stage 3 (stride 16)", "IMAGENET1K_V1")

    half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    specs = [resnet("resnet50", "IMAGENET1K_V1"), resnet("resnet101"), resnet("resnet152"),
             convnext("convnext_tiny", 384), convnext("convnext_small", 384), convnext("convnext_base", 512),
             convnext("convnext_large", 768),
             effnet("efficientnet_v2_s", 160), effnet("efficientnet_v2_m", 176),
             effnet("efficientnet_v2_l", 224, **half),
             Spec("vit_b_16", "vit", 768, 768, "encoder output, patch tokens (class token out)", "IMAGENET1K_V1"),
             Spec("vit_l_16", "vit", 1024, 1024, "encoder output, patch tokens (class token out)", "IMAGENET1K_V1"),
             swin("swin_v2_t", 384), swin("swin_v2_s", 384), swin("swin_v2_b", 512),
             Spec("regnet_y_16gf", "regnet", 1232, 3024, "trunk_output[2]: block 3 (stride 16)", "IMAGENET1K_V2")]
    return {s.name: s for s in specs}


BACKBONES = _specs()
POOLED_AS = {"resnet": "layer4 (standard), global mean", "convnext": "stage 4, global mean, LayerNorm",
             "efficientnet": "last 1x1 conv, global mean", "vit": "class token after the encoder's LayerNorm",
             "swin": "stage 4, LayerNorm, global mean", "regnet": "block 4, global mean"}


def get_spec(name: str) -> Spec:
    if name not in BACKBONES:
        raise ParamError(f"backbone {name!r}: choose from {', '.join(BACKBONES)}", ["backbone"])
    return BACKBONES[name]


IMPLS = ("torch", "skimage")


@dataclass(frozen=True)
class HogParams:
    """scikit-image's hog parameters (the paper's by default); hog.py computes them."""

    orientations: int = 8
    cell: int = 16  # pixels per cell (square)
    block: int = 3  # cells per block (square)

    def asdict(self) -> dict:
        return asdict(self)

    def length(self, size: int) -> int:
        """Number of HOG values for a size x size view (0 when the view is too small for one block)."""
        blocks = max(size // self.cell - self.block + 1, 0)
        return blocks * blocks * self.block * self.block * self.orientations


AMP = ("none", "bf16")


@dataclass
class Options:
    """Everything that decides a store's bytes (device and workers do not). Each setting's values and help are
    declared once in `Options.params` (the codec's in `codec.Request.params`); `imet featurize` is made from them."""

    backbone: str = "resnet50"
    weights: str = "imagenet"
    seed: int = 0
    image_size: int = 224
    batch_size: int = 32
    normalize: str = "imagenet"
    maps: bool = True
    hog: HogParams | None = field(default_factory=HogParams)
    limit: int | None = None
    view_seed: int = 0
    split_seed: int = 0
    min_label_count: int = 3
    splits: tuple[str, ...] | None = None  # featurize only these splits' images (None: all)
    hog_impl: str = "torch"
    amp: str = "none"
    maps_dim: int | None = None
    maps_dtype: str = codec.Request.maps_dtype
    hog_dim: int | None = None

    params: ClassVar[dict[str, Param]] = {
        "backbone": Param(Choice(tuple(BACKBONES)), "torchvision classifier whose pooled vector and map are stored "
                          "(see docs/backbones.md)."),
        "weights": Param(Text("imagenet, random or a weights file"),
                         "imagenet (torchvision's, from the torch cache), random (seeded by seed) or a file of the "
                         "backbone's state dict (.pt/.pth: plain, module.-prefixed or in a checkpoint under "
                         "state_dict, model or ema; .safetensors when the safetensors package is installed)."),
        "seed": Param(Int(0, SEED), "Seed of weights random."),
        "image_size": Param(Int(32), "Side of each square view in pixels."),
        "batch_size": Param(Int(1), "Views per backbone batch (part of the settings: batches are fixed for exact "
                            "resumes)."),
        "normalize": Param(Choice(("imagenet", "train")), "Pixel mean/std: those the backbone's ImageNet weights "
                           "were trained with, or the train set's as in the paper."),
        "maps": Param(Bool(), "Write the maps, 14x14 at 224 px (attn_rnn, csra and mldecoder need them)."),
        "hog_impl": Param(Choice(IMPLS), "HOG in torch on the batch's device, or scikit-image's in the workers "
                          "(the reference; equal to float32 rounding) [recorded in the store]."),
        "amp": Param(Choice(AMP), "bf16 autocast of the backbone, for CUDA (maps and pooled vectors then differ from "
                     "fp32 at bf16 precision) [recorded in the store]."),
        **codec.Request.params,
        "limit": Param(Int(1), "At most this many images per split (for a quick try).", none="all images"),
        "view_seed": Param(Int(0, SEED), "Seed of the crops, flips and jitter."),
    }

    def __post_init__(self):
        values = {k: getattr(self, k) for k in self.params}
        check_values("featurize", self.params, values)  # first unbounded: the bounds below read image_size, backbone
        length = self.hog.length(self.image_size) if self.hog else 0
        check_values("featurize", self.params, values, {"channels": self.spec.channels, "hog_length": length or None})
        if self.spec.family == "vit" and self.image_size % 16:
            raise ParamError(f"image_size {self.image_size}: {self.backbone} cuts 16x16 patches; choose a multiple "
                             "of 16", ["image_size"])
        if not self.maps and "maps" in self.request().features():
            raise ParamError("maps_dim and maps_dtype int8 compact the maps: they do not go with maps off",
                             ["maps_dim", "maps_dtype"])
        if not self.hog and self.hog_dim is not None:
            raise ParamError("hog_dim compacts HOG: it does not go with hog off", ["hog_dim"])

    @property
    def spec(self):
        return get_spec(self.backbone)

    def request(self) -> codec.Request:
        """The codec request of these settings: none at the defaults (the paper's)."""
        return codec.Request(self.maps_dim, self.maps_dtype, self.hog_dim)

    def requested(self, weights_desc: dict) -> dict:
        return {
            "backbone": self.backbone, "weights": weights_desc, "image_size": self.image_size,
            "batch_size": self.batch_size, "normalize": self.normalize, "maps": self.maps,
            "hog": self.hog.asdict() if self.hog else None, "limit": self.limit, "view_seed": self.view_seed,
            "split_seed": self.split_seed, "min_label_count": self.min_label_count,
            "splits": sorted(self.splits) if self.splits else None,
            "hog_impl": self.hog_impl if self.hog else None, "amp": self.amp, **self.request().settings(),
        }
