"""The pieces train together: a tiny model memorises one fixed batch."""

import torch

from depthdif_hpc import build_model
from tests.helpers import random_batch, tiny_config


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny_config(overrides=["model.unet.dim=16"])
    model = build_model(cfg)
    batch = random_batch(b=2, h=16, w=16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(120):
        loss, _ = model.loss(batch, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    start = sum(losses[:5]) / 5
    end = sum(losses[-10:]) / 10
    assert end < start / 10, (start, end)
