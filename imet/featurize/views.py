"""Pixels of one view: decode an image robustly, then resize or crop, flip and jitter as planned."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from imet.data import crop_box


class ViewError(Exception):
    """An image that cannot be turned into views; the message is the reason recorded in the store."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16/32-bit grey scaled down, transparency composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        scale = 257.0 if a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(a / scale, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file fully; every failure becomes a ViewError with a short reason."""
    path = Path(path)
    if not path.exists():
        raise ViewError(f"missing file {path.name}")
    if path.stat().st_size == 0:
        raise ViewError(f"empty file {path.name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                rgb = _to_rgb(img)
    except Exception as e:  # PIL raises many types for broken files
        raise ViewError(f"cannot decode {path.name}: {type(e).__name__}: {e}") from None
    if min(rgb.size) < 1:
        raise ViewError(f"image {path.name} has no pixels")
    return rgb


def render(img: Image.Image, size: int, crop: bool, offset, flip: bool, jitter) -> tuple[np.ndarray, tuple]:
    """One view: (size, size, 3) uint8 pixels and its box (x0, y0, x1, y1) in the original image."""
    box = crop_box(img.width, img.height, size, crop, offset)
    view = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        view = ImageOps.mirror(view)
    brightness, contrast, saturation = (float(x) for x in jitter)
    if brightness != 1.0:
        view = ImageEnhance.Brightness(view).enhance(brightness)
    if contrast != 1.0:
        view = ImageEnhance.Contrast(view).enhance(contrast)
    if saturation != 1.0:
        view = ImageEnhance.Color(view).enhance(saturation)
    return np.array(view, dtype=np.uint8), box
