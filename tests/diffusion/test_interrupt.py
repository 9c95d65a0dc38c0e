"""A reverse chain asked to stop between steps stops (a preempted validation or prediction)."""

from __future__ import annotations

import pytest
import torch

from depthdif_hpc.diffusion.samplers import SamplingInterrupted, make_sampler, reverse_diffusion


def test_should_stop_ends_the_chain_between_steps():
    smp = make_sampler("ddpm", schedule="linear", num_timesteps=50, beta_start=1e-4, beta_end=2e-2,
                       parameterization="epsilon")
    calls = {"denoise": 0, "asked": 0}

    def denoise(x, t):
        calls["denoise"] += 1
        return torch.zeros_like(x)

    def should_stop():
        calls["asked"] += 1
        return calls["asked"] > 3

    with pytest.raises(SamplingInterrupted, match="of 50"):
        reverse_diffusion(denoise, smp, (1, 1, 4, 4), device=torch.device("cpu"), should_stop=should_stop)
    assert calls["denoise"] == 3  # stopped before the 4th step, not after the 50th
    res = reverse_diffusion(denoise, smp, (1, 1, 4, 4), device=torch.device("cpu"),
                            should_stop=lambda: False)
    assert res.sample.shape == (1, 1, 4, 4) and calls["denoise"] == 53
