"""Masks: the masked MSE by hand and the channel alignment rules."""

import pytest
import torch

from depthdif_hpc.diffusion.masks import align_mask, masked_mse


def test_masked_mse_by_hand_and_empty():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    tgt = torch.tensor([[[[0.0, 0.0], [1.0, 10.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert float(masked_mse(pred, tgt, mask)) == pytest.approx((1 + 4) / 2)
    assert float(masked_mse(pred, tgt, torch.zeros_like(mask))) == 0.0
    assert float(masked_mse(pred, tgt, None)) == pytest.approx((1 + 4 + 4 + 36) / 4)


def test_align_mask_rules():
    m = torch.zeros(2, 3, 4, 4)
    m[0, 1, 2, 3] = 0.7
    one = align_mask(m, 1)
    assert one.shape == (2, 1, 4, 4) and one[0, 0, 2, 3] == 1 and one.sum() == 1
    assert align_mask(one, 5).shape == (2, 5, 4, 4)
    assert align_mask(torch.ones(2, 4, 4), 3).shape == (2, 3, 4, 4)
    assert align_mask(torch.full((1, 1, 2, 2), 0.5), 1).sum() == 0  # binarised as > 0.5
    with pytest.raises(ValueError, match="3-channel mask to 5"):
        align_mask(m, 5)
