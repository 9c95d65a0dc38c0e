"""The condition tensor: channel order, the single-band case, and a mismatch naming its sources."""

import pytest
import torch

from depthdif_hpc.model.conditioning import build_condition
from tests.helpers import random_batch


def test_condition_order_and_channels():
    b = random_batch()
    cond = build_condition(b["x"], b["x_valid_mask"], b["eo"], include_eo=True, use_valid_mask=True,
                           mask_channels=1, expected_channels=52)
    assert cond.shape == (2, 52, 16, 16)
    torch.testing.assert_close(cond[:, :1], b["eo"])
    torch.testing.assert_close(cond[:, 1:51], b["x"])
    torch.testing.assert_close(cond[:, 51:], b["x_valid_mask"].any(1, keepdim=True).float())


def test_single_band_condition():
    x = torch.randn(2, 1, 8, 8)
    cond = build_condition(x, None, None, include_eo=False, use_valid_mask=False, mask_channels=1,
                           expected_channels=1)
    assert torch.equal(cond, x)


def test_condition_channel_mismatch_names_sources():
    b = random_batch()
    with pytest.raises(ValueError) as err:
        build_condition(b["x"], b["x_valid_mask"], b["eo"], include_eo=True, use_valid_mask=True,
                        mask_channels=1, expected_channels=51)
    msg = str(err.value)
    assert "52 channels" in msg and "condition_channels = 51" in msg
    assert "eo (1) + x (50) + x_valid_mask (1)" in msg
