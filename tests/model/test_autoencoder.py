import pytest
import torch

from depthdif_hpc.model.autoencoder import DepthBandAutoencoder, reconstruction_loss
from tests.helpers import random_batch


@pytest.mark.parametrize("down", [1, 2, 4])
def test_shapes(down):
    ae = DepthBandAutoencoder(50, 12, (16, 24, 32), (32, 24, 16), spatial_downsample=down)
    x = torch.randn(2, 50, 16, 24)
    z = ae.encode(x)
    assert z.shape == (2, 12, 16 // down, 24 // down)
    assert ae.decode(z).shape == x.shape


def test_reference_layout_parameter_count():
    ae = DepthBandAutoencoder()  # defaults of docs/model.md#latent-workflow
    convs = [m for m in ae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (50, 64, 3), (64, 96, 3), (96, 128, 3), (128, 12, 1),
        (12, 128, 1), (128, 96, 3), (96, 64, 3), (64, 50, 3)]


def test_bad_inputs():
    ae = DepthBandAutoencoder(50, 12, (8,), (8,), spatial_downsample=2)
    with pytest.raises(ValueError, match="divisible"):
        ae.encode(torch.randn(1, 50, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 50, H, W\)"):
        ae.encode(torch.randn(1, 49, 16, 16))
    with pytest.raises(ValueError, match="power of two"):
        DepthBandAutoencoder(spatial_downsample=3)


def test_loss_by_hand_and_masking():
    r = torch.tensor([[[[1.0, 3.0]]]])
    t = torch.tensor([[[[0.0, 0.0]]]])
    assert float(reconstruction_loss(r, t)) == pytest.approx((1 + 3) / 2 + 0.5 * (1 + 9) / 2)
    m = torch.tensor([[[[1.0, 0.0]]]])
    assert float(reconstruction_loss(r, t, m, 2.0, 1.0)) == pytest.approx(2 * 1 + 1)
    assert float(reconstruction_loss(r, t, torch.zeros_like(m))) == 0.0


def test_small_overfit():
    torch.manual_seed(0)
    ae = DepthBandAutoencoder(50, 6, (32, 32), (32, 32))
    b = random_batch(b=2, h=16, w=16, seed=3)
    y, valid = b["y"], b["y_valid_mask"]
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = reconstruction_loss(ae(y), y, valid)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10
