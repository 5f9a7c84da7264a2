"""HOG in torch against scikit-image (the reference): random, flat, odd-sized, grayscale and edge-heavy views,
the paper's 224 px / 10,368-d setting, other parameters, and bits that do not depend on threads or batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imet.featurize.hog import HogParams, TorchHog, compute, hog_skimage

ATOL = 1e-5  # the contract is 1e-4; float32 rounding gives about 1e-7


def _views(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    if kind == "flat":
        return np.stack([np.full((64, 64, 3), v, np.uint8) for v in (0, 77, 255)])
    if kind == "odd":
        return rng.integers(0, 256, (2, 71, 101, 3), dtype=np.uint8)  # cells and edges left over
    if kind == "grayscale":
        return rng.integers(0, 256, (3, 67, 67), dtype=np.uint8)
    if kind == "edges":  # 0/255 pixels: most gradients at exactly 0, 45, 90 or 135 degrees (bin edges)
        return (rng.integers(0, 2, (3, 64, 64, 3)) * 255).astype(np.uint8)
    if kind == "low-contrast":  # ties between channels of equal magnitude
        return rng.integers(100, 103, (3, 64, 64, 3), dtype=np.uint8)
    if kind == "hypot-ties":  # per pixel, two channels with g_row**2 + g_col**2 equal but numpy's hypot one
        views = np.zeros((1, 48, 48, 3), np.uint8)  # ulp apart: (28, 47) < (17, 52); skimage takes the second
        for r, c in [(5, 5), (20, 30), (35, 12)]:
            views[0, r + 1, c, :2], views[0, r, c + 1, :2] = (28, 17), (47, 52)
        return views
    if kind == "photo-like":  # smooth gradients and saturated channels
        y, x = np.mgrid[:64, :64]
        base = np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255)
        return np.stack([base, base[::-1], base[:, ::-1]]).astype(np.uint8)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "flat", "odd", "grayscale", "edges", "low-contrast", "hypot-ties",
                                  "photo-like"])
def test_torch_hog_equals_scikit_image(kind):
    views = _views(kind, np.random.default_rng(0))
    params = HogParams()
    expected = hog_skimage(params, views)
    got = TorchHog(params)(torch.from_numpy(views))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ATOL)
    if kind == "flat":
        assert not expected.any() and not got.any()


def test_the_papers_setting_at_224_px():
    views = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    got = compute(HogParams(), views, "torch")
    assert got.shape == (2, 10368)
    np.testing.assert_allclose(got, compute(HogParams(), views, "skimage"), rtol=0, atol=ATOL)


@pytest.mark.parametrize("params", [HogParams(9, 8, 2), HogParams(7, 10, 1), HogParams(12, 5, 3)])
def test_other_parameters(params):
    views = np.random.default_rng(2).integers(0, 256, (2, 43, 50, 3), dtype=np.uint8)
    np.testing.assert_allclose(compute(params, views), hog_skimage(params, views), rtol=0, atol=ATOL)


def test_same_bits_for_any_thread_count_and_batch():
    views = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8))
    hog = TorchHog(HogParams())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hog(views)
        torch.set_num_threads(2)
        two = hog(views)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(hog(views[2:3])[0], one[2])


def test_bad_input_is_refused():
    hog = TorchHog(HogParams())
    with pytest.raises(TypeError, match="uint8"):
        hog(torch.zeros(1, 64, 64, 3))
    with pytest.raises(ValueError, match="too small"):
        hog(torch.zeros(1, 40, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="choose from torch, skimage"):
        compute(HogParams(), np.zeros((1, 64, 64, 3), np.uint8), "cv2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["random", "odd", "grayscale", "edges"])
def test_torch_hog_on_cuda_equals_scikit_image(kind):
    views = _views(kind, np.random.default_rng(4))
    got = TorchHog(HogParams())(torch.from_numpy(views).cuda())
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu().numpy(), hog_skimage(HogParams(), views), rtol=0, atol=ATOL)
