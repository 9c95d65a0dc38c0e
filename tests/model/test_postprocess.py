"""Post-processing: the depthwise Gaussian blur and NaN outside the valid mask."""

import pytest
import torch

from depthdif_hpc.model.postprocess import (
    gaussian_blur_depthwise,
    gaussian_kernel1d,
    mask_invalid,
)


def test_blur_keeps_channels_separate():
    x = torch.zeros(1, 3, 9, 9)
    x[0, 1, 4, 4] = 1.0
    out = gaussian_blur_depthwise(x, 5, 0.75)
    assert out[0, 0].abs().max() == 0 and out[0, 2].abs().max() == 0
    assert float(out[0, 1].sum()) == pytest.approx(1.0, rel=1e-5)  # mass kept away from borders
    k = gaussian_kernel1d(5, 0.75)
    torch.testing.assert_close(out[0, 1, 2:7, 2:7], torch.outer(k, k))


def test_blur_even_kernel_bumped_and_disabled_cases():
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(gaussian_blur_depthwise(x, 4, 1.0), gaussian_blur_depthwise(x, 5, 1.0))
    assert gaussian_blur_depthwise(x, 1, 1.0) is x
    assert gaussian_blur_depthwise(x, 3, 0.0) is x
    const = torch.full((1, 2, 6, 6), 3.0)  # reflect padding keeps a constant field constant
    torch.testing.assert_close(gaussian_blur_depthwise(const, 5, 2.0), const)


def test_mask_invalid_sets_nan_only_outside():
    v = torch.randn(2, 3, 4, 4)
    m = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    m[0, 2, 1, :] = False
    out = mask_invalid(v, m)
    assert torch.isnan(out[0, 2, 1]).all()
    assert torch.isnan(out).sum() == 4
    torch.testing.assert_close(out[m], v[m])
