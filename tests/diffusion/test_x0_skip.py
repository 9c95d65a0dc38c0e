"""The Gaussian x0 skip (docs/model.md#gaussian-x0-skip): its variance is fitted by the likelihood
of the high-noise residual, and it turns a denoiser that ignores x_t into one whose ensemble
spreads by s."""

from __future__ import annotations

import pytest
import torch

from depthdif_hpc.diffusion.samplers import make_sampler, reverse_diffusion
from depthdif_hpc.diffusion.schedules import NoiseSchedule
from depthdif_hpc.diffusion.x0_skip import GaussianX0Skip, radial_bins

MU = 0.3


def _sampler(name: str, steps: int = 20, discretization: str = "uniform"):
    return make_sampler(name, schedule="cosine", num_timesteps=1000, beta_start=1e-4, beta_end=2e-2,
                        parameterization="x0", ddim_num_timesteps=steps,
                        ddim_discretization=discretization)


def _fit(v: torch.Tensor, steps: int, low_noise_shrink: float = 1.0) -> GaussianX0Skip:
    """Toy problem: the network's output m is exact up to a residual of variance v per channel
    (deep levels under the global z-score ~4e-4, per level up to ~0.25); where the noise is small
    (ab > 0.5) the network also reads x_t and its residual shrinks by `low_noise_shrink`. Only s^2
    is trained, with the demo's optimiser and learning rate, by x0 MSE + likelihood over uniform t."""
    torch.manual_seed(0)
    ab_all = NoiseSchedule("cosine", 1000, 1e-4, 2e-2).alphas_cumprod
    skip = GaussianX0Skip(v.numel())
    opt = torch.optim.AdamW(skip.parameters(), lr=2e-3, weight_decay=0.01)
    c = v.numel()
    for _ in range(steps):
        t = torch.randint(0, 1000, (8,))
        ab = ab_all[t].view(-1, 1, 1, 1)
        x0 = torch.randn(8, c, 1, 1) + v.sqrt().view(1, c, 1, 1) * torch.randn(8, c, 8, 8)
        shrink = torch.where(ab > 0.5, low_noise_shrink, 1.0)
        m = x0 - shrink * (x0 - x0.mean(dim=(2, 3), keepdim=True))
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
        est = skip(m, x_t, ab_all[t])
        loss = ((est - x0) ** 2).mean() + skip.nll(est, x0, ab_all[t])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return skip


def test_the_likelihood_drives_the_variance_to_the_residual_variance():
    v = torch.tensor([4e-4, 1e-2, 0.25])
    ratio = _fit(v, 400).variance().detach() / v
    assert bool(((ratio > 0.8) & (ratio < 1.2)).all()), ratio


def test_the_variance_is_the_high_noise_residual_even_where_the_network_reads_x_t():
    # The network's residual at small noise is 10x smaller; the ensemble must still spread by the
    # error of the estimate made before x_t says anything.
    v = torch.tensor([1e-2, 0.1])
    ratio = _fit(v, 400, low_noise_shrink=0.1 ** 0.5).variance().detach() / v
    assert bool(((ratio > 0.8) & (ratio < 1.2)).all()), ratio


def test_only_the_likelihood_moves_the_variance_and_only_from_noisy_draws():
    skip = GaussianX0Skip(2)
    x0, m = torch.randn(4, 2, 5, 5), torch.zeros(4, 2, 5, 5, requires_grad=True)
    ab = torch.tensor([0.99, 0.9, 0.5, 0.2])  # no draw below HIGH_NOISE_ALPHA_BAR
    est = skip(m, torch.randn_like(x0), ab)
    ((est - x0) ** 2).mean().backward()
    assert m.grad is not None and skip.log_var_scaled.grad is None
    nll = skip.nll(est, x0, ab)
    assert float(nll.detach()) == 0.0
    # one noisy row, channel 1 masked out: the likelihood of channel 0's residual alone
    ab = torch.tensor([0.99, 0.05, 0.5, 0.2])
    mask = torch.zeros(4, 2, 5, 5)
    mask[:, 0] = 1
    est = torch.zeros_like(x0, requires_grad=True)
    nll = skip.nll(est, x0, ab, mask)
    s2 = float(skip.variance()[0])
    r2 = float((x0[1, 0] ** 2).mean())
    assert abs(float(nll) - 0.5 * (torch.log(torch.tensor(s2)).item() + r2 / s2)) < 1e-5
    nll.backward()
    assert est.grad is None
    g = skip.log_var_scaled.grad
    assert float(g[1]) == 0.0 and float(g[0]) != 0.0


def test_the_estimate_is_the_gaussian_posterior_mean():
    # Against the conditional mean estimated by least squares on samples of (x0, x_t).
    torch.manual_seed(1)
    s2, ab = 0.04, torch.tensor([0.97])
    skip = GaussianX0Skip(1, init_var=s2)
    x0 = MU + s2**0.5 * torch.randn(1, 1, 200_000, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
    slope = torch.cov(torch.stack([x0.flatten(), x_t.flatten()]))[0, 1] / x_t.var()
    est = skip(torch.full_like(x0, MU), x_t, ab)
    lsq = x0.mean() + slope * (x_t - x_t.mean())
    assert float((est - lsq).detach().abs().max()) < 2e-3
    # noise far above s: the estimate is the network's output; noise far below: it is x_t / sqrt(ab)
    m = torch.full((1, 1, 4, 4), MU)
    x = torch.randn(1, 1, 4, 4)
    assert torch.allclose(skip(m, x, torch.tensor([1e-6])), m, atol=1e-4)
    assert torch.allclose(skip(m, x, torch.tensor([1 - 1e-8])), x, atol=1e-4)


def test_the_skip_leaves_masked_noisy_pixels_to_the_network():
    skip = GaussianX0Skip(2, init_var=0.5)
    m, x_t = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    valid = torch.zeros(1, 2, 3, 3)
    valid[..., 1, 1] = 1
    out = skip(m, x_t, torch.tensor([0.5]), valid).detach()
    assert float(out[..., 1, 1].min()) > 0.3
    assert float(out.abs().sum() - out[..., 1, 1].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="channels"):
        skip(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.tensor([0.5]))


@pytest.mark.parametrize("name,steps,disc,lo,hi", [
    ("ddim", 20, "quadratic", 0.75, 1.05),
    ("ddim", 100, "uniform", 0.85, 1.05),
    ("ddpm", 1000, "uniform", 0.9, 1.1),
])
def test_a_mean_only_network_through_the_skip_spreads_by_s(name, steps, disc, lo, hi):
    # tests/diffusion/test_spread.py: the same network without the skip gives spread 0 exactly.
    s = 0.05
    skip = GaussianX0Skip(1, init_var=s * s)
    smp = _sampler(name, steps, disc)
    ab_all = smp.alphas_cumprod.float()

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return skip(torch.full_like(x, MU), x, ab_all[t])

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out = reverse_diffusion(net, smp, (1, 1, 2000, 1), device=torch.device("cpu"), generator=g).sample
    assert lo < out.std().item() / s < hi
    assert abs(out.mean().item() - MU) < 0.1 * s


# --- the spectral skip (model.x0_skip: gaussian_spectral) -------------------------------------

def _field(n: int, c: int, size: int, length: float, var: float, g: torch.Generator) -> torch.Tensor:
    """Stationary Gaussian fields (periodic): white noise through a Gaussian filter of `length`
    pixels, scaled to `var` per pixel."""
    f = torch.fft.fftfreq(size)
    gain = torch.exp(-((f[:, None] ** 2 + f[None, :] ** 2) * (2 * torch.pi * length) ** 2) / 2)
    x = torch.fft.ifft2(gain * torch.fft.fft2(torch.randn(n, c, size, size, generator=g))).real
    return x * (var / float((gain ** 2).mean())) ** 0.5


def test_a_flat_spectrum_is_the_white_skip():
    white, spectral = GaussianX0Skip(2, init_var=0.3), GaussianX0Skip(2, bins=16, init_var=0.3)
    m, x_t = torch.randn(3, 2, 12, 10), torch.randn(3, 2, 12, 10)
    ab = torch.tensor([0.9, 0.3, 0.01])
    assert torch.allclose(spectral(m, x_t, ab), white(m, x_t, ab), atol=1e-5)
    r = torch.randn(3, 2, 12, 10)
    assert torch.allclose(spectral.nll(m + r, m, ab), white.nll(m + r, m, ab), atol=1e-5)
    assert torch.allclose(spectral.variance((12, 10)), white.variance())
    with pytest.raises(ValueError, match="size"):
        spectral.variance()


def test_whittle_fits_the_spectrum_of_a_correlated_residual():
    g = torch.Generator().manual_seed(3)
    skip = GaussianX0Skip(1, bins=16)
    opt = torch.optim.AdamW(skip.parameters(), lr=2e-3, weight_decay=0.01)
    ab = torch.full((8,), 0.01)
    # The largest scales' power is ~40x the start: from below Adam runs at half speed (0.01
    # nats per step), so this takes ~800 steps where a flat spectrum takes ~400.
    for _ in range(800):
        r = _field(8, 1, 32, length=3.0, var=0.05, g=g)
        nll = skip.nll(torch.zeros_like(r), r, ab)
        opt.zero_grad()
        nll.backward()
        opt.step()
    var = float(skip.variance((32, 32)))
    assert 0.8 < var / 0.05 < 1.25, var
    p = skip.log_power().exp().detach()[0]
    # a 3 px Gaussian holds its power below ~0.1 cycles/px: bins 0-2; the fit knows it
    assert float(p[:2].min()) > 100 * float(p[8:].max())


def test_members_through_the_spectral_skip_are_correlated_in_space():
    # A mean-only network: with the white skip members differ pixel by pixel; with the fitted
    # spectrum they differ like the error field does (neighbours correlated), at the same variance.
    size, var, length = 32, 0.05, 3.0
    g = torch.Generator().manual_seed(4)
    fitted = GaussianX0Skip(1, bins=16)
    with torch.no_grad():
        ref = _field(256, 1, size, length, var, g)
        per_bin = torch.zeros(16).index_add_(0, radial_bins(size, size, 16).flatten(),
                                             (torch.fft.fft2(ref).abs() ** 2).mean(dim=(0, 1)).flatten() / size**2)
        n_b = torch.bincount(radial_bins(size, size, 16).flatten(), minlength=16).clamp_min(1)
        fitted.log_var_scaled.copy_((per_bin / n_b).clamp_min(1e-8).log() / 10.0)
    smp = _sampler("ddim", 20, "quadratic")
    ab_all = smp.alphas_cumprod.float()
    lag1 = {}
    for name, skip in (("white", GaussianX0Skip(1, init_var=var)), ("spectral", fitted)):
        def net(x: torch.Tensor, t: torch.Tensor, skip=skip) -> torch.Tensor:
            return skip(torch.full_like(x, MU), x, ab_all[t])

        with torch.no_grad():
            out = reverse_diffusion(net, smp, (16, 1, size, size), device=torch.device("cpu"),
                                    generator=torch.Generator().manual_seed(5)).sample
        d = out - out.mean(dim=0, keepdim=True)
        assert 0.7 < float(d.var()) * 16 / 15 / var < 1.1, name
        lag1[name] = float((d * d.roll(1, dims=-1)).mean() / (d * d).mean())
    # the reference field's lag-1 correlation is exp(-1 / (4 * 3^2)) = 0.97
    assert abs(lag1["white"]) < 0.1 and lag1["spectral"] > 0.85, lag1
