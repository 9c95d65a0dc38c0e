"""The DepthDif conditional diffusion model: U-Net + coord/date encoder + objective + sampling.

This is the eager reference path of docs/model.md (condition assembly, objectives, ambient
occlusion, samplers, inference). State-dict layout: `model.*` is the U-Net and `coord_mlp.*` the
outer coordinate/date MLP (the reference nests both one level deeper, under `model.`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from depthdif_hpc.config import (
    ModelConfig,
    canonical_parameterization,
)
from depthdif_hpc.data.batch import Batch
from depthdif_hpc.diffusion.ambient import ambient_stats, further_keep_mask
from depthdif_hpc.diffusion.masks import align_mask, binarize, masked_mse
from depthdif_hpc.diffusion.rng import RowGenerators
from depthdif_hpc.diffusion.samplers import DDPMSampler, make_sampler, reverse_diffusion
from depthdif_hpc.diffusion.schedules import NoiseSchedule
from depthdif_hpc.diffusion.x0_skip import SPECTRAL_BINS, GaussianX0Skip
from depthdif_hpc.model.conditioning import build_condition
from depthdif_hpc.model.embeddings import CoordDateEncoder
from depthdif_hpc.model.postprocess import gaussian_blur_depthwise, mask_invalid
from depthdif_hpc.model.unet import UNet
from depthdif_hpc.normalization import GLOBAL, Normalizer

# The denoiser's arithmetic in `DepthDif.predict`. "bf16": under bf16 autocast, while the
# chain's state, the condition and the denormalisation stay fp32. On an H100 (docs/gpu_run.md,
# stage sample) a 50-step DDIM chain of 16 ambient tiles with the Triton kernels and
# channels_last took 1011 ms in bf16 against 1555 ms eager fp32, 0.011 degC RMS (0.060 max) apart.
SamplingPrecision = Literal["fp32", "bf16"]


@dataclass
class Prediction:
    """What `predict` returns for a batch of B samples and G generated bands."""

    y_hat: torch.Tensor  # (B, G, H, W) fp32, normalised units
    y_hat_denorm: torch.Tensor  # (B, G, H, W) fp32 degC, post-processed, NaN off y_valid_mask
    sampler: DDPMSampler | None = None  # the sampler that ran (None: no reverse diffusion)
    denoise_samples: Any = None  # x_t along the reverse chain (return_intermediates)
    x0_denoise_samples: Any = None  # the x0 estimates along the chain (return_intermediates)
    # The condition's validity mask as the model saw it (ambient: after the further drop).
    further_valid_mask: torch.Tensor | None = None
    # Pixels that are the model's output rather than given (set where the condition does not
    # say it, e.g. the autoencoder: every valid pixel).
    generated_mask: torch.Tensor | None = None


@dataclass
class Prepared:
    """One batch turned into what the objective and the sampler need."""

    target: torch.Tensor  # y (standard) or x (ambient), (B, G, H, W)
    data: torch.Tensor  # condition data: x or x * A~
    cond: torch.Tensor  # assembled condition, (B, condition_channels, H, W)
    cond_mask: torch.Tensor | None  # A or A~ aligned to G channels
    loss_mask: torch.Tensor | None  # Y or A n Y (times the land mask), G channels
    noisy_mask: torch.Tensor | None  # A~ when the noisy branch is masked
    stats: dict[str, torch.Tensor]


class DepthDif(nn.Module):
    # Model space <-> degC; build_model sets the one dataset.normalization names.
    normalizer: Normalizer = GLOBAL
    # Tensors a warm start (model.load_checkpoint) may find missing and leave at their initial
    # value: the x0 skip's variance, so weights trained without model.x0_skip (research
    # checkpoints included) can be fine-tuned with it; its likelihood fits it from INIT_VAR
    # (diffusion/x0_skip.py).
    warm_start_fresh: tuple[str, ...] = ("x0_skip.",)

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        self.cfg = model
        self.parameterization = canonical_parameterization(model.parameterization)
        amb = model.ambient_occlusion
        if amb.enabled and amb.require_x0_parameterization and self.parameterization != "x0":
            raise ValueError("ambient occlusion requires the x0 parameterization")
        cc = model.coord_conditioning
        embed_dim = (cc.embed_dim or model.unet.dim) if cc.enabled else None
        self.model = UNet(
            dim=model.unet.dim,
            out_dim=model.generated_channels,
            dim_mults=tuple(model.unet.dim_mults),
            channels=model.generated_channels + model.condition_channels,
            with_time_emb=model.unet.with_time_emb,
            coord_emb_dim=embed_dim,
            output_mean_scale=model.unet.output_mean_scale,
            residual=model.unet.residual,
            upsample=model.unet.upsample,
        )
        self.coord_mlp = (
            CoordDateEncoder(embed_dim, cc.encoding, cc.include_date, cc.date_encoding) if cc.enabled else None
        )
        n = model.noise
        self.schedule = NoiseSchedule(n.schedule, n.num_timesteps, n.beta_start, n.beta_end)
        if model.x0_skip != "none" and self.parameterization != "x0":
            raise ValueError(f"model.x0_skip={model.x0_skip} needs the x0 parameterization")
        # Registered only when on: the default keeps the research state-dict layout.
        self.x0_skip = (None if model.x0_skip == "none" else GaussianX0Skip(
            model.generated_channels, bins=SPECTRAL_BINS if model.x0_skip == "gaussian_spectral" else 1))

    # ------------------------------------------------------------------ pieces

    def coord_embedding(self, batch: Batch) -> torch.Tensor | None:
        if self.coord_mlp is None:
            return None
        return self.coord_mlp(batch.get("coords"), batch.get("date"))

    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                c_emb: torch.Tensor | None, noisy_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction the objective and the samplers use: the U-Net's output, through the
        Gaussian x0 skip when `model.x0_skip` is on (`noisy_mask`: where x_t was not zeroed)."""
        out = self.model(torch.cat((x_t, cond.to(x_t.dtype)), dim=1), t, c_emb)
        if self.x0_skip is None:
            return out
        return self.x0_skip(out, x_t, self.schedule.alphas_cumprod[t], noisy_mask)

    def prepare(self, batch: Batch, *, further_drop: bool,
                generator: RowGenerators = None) -> Prepared:
        """Masks, target and condition for one batch (docs/model.md#loss-supports)."""
        cfg = self.cfg
        g = cfg.generated_channels
        x = require_key(batch, "x")
        if x.ndim != 4:
            raise ValueError(f"batch['x'] must be (B, C, H, W), got {tuple(x.shape)}")
        x = x.float()
        x_valid = batch.get("x_valid_mask")
        y_valid = batch.get("y_valid_mask")
        land = batch.get("land_mask")
        amb = cfg.ambient_occlusion
        stats: dict[str, torch.Tensor] = {}
        observed = align_mask(x_valid, x.shape[1]) if x_valid is not None else None
        if observed is not None:
            stats["masked_fraction"] = 1.0 - observed.mean()

        if amb.enabled:
            if observed is None:
                raise ValueError("ambient occlusion needs batch['x_valid_mask']")
            if x.shape[1] != g:
                raise ValueError(f"ambient mode diffuses x, so x must have generated_channels = {g} "
                                 f"channels, got {x.shape[1]}")
            kept = (further_keep_mask(observed, amb.further_drop_prob,
                                      shared_spatial=amb.shared_spatial_mask,
                                      min_kept=amb.min_kept_observed_pixels, generator=generator)
                    if further_drop else observed)
            stats.update(ambient_stats(observed, kept))
            data, cond_valid, target = x * kept, kept, x
            support = observed if y_valid is None else observed * align_mask(y_valid, g)
        else:
            y = batch.get("y")
            data, cond_valid, target = x, observed, (y.float() if y is not None else None)
            support = align_mask(y_valid, g) if y_valid is not None else None
        if support is not None and land is not None:
            support = support * binarize(land).reshape(land.shape[0], 1, *land.shape[-2:])

        cond = build_condition(
            data, cond_valid, batch.get("eo"),
            include_eo=cfg.condition_include_eo,
            use_valid_mask=cfg.condition_use_valid_mask,
            mask_channels=cfg.condition_mask_channels,
            expected_channels=cfg.condition_channels,
        )
        cond_mask = align_mask(cond_valid, data.shape[1]) if cond_valid is not None else None
        noisy_mask = cond_mask if amb.enabled else None
        loss_mask = support if cfg.mask_loss_with_valid_pixels else None
        if target is not None and target.shape[1] != g:
            raise ValueError(f"target has {target.shape[1]} channels but model.generated_channels = {g}")
        return Prepared(target, data, cond, cond_mask, loss_mask, noisy_mask, stats)

    # ------------------------------------------------------------------ objective

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective; DDP and DeepSpeed wrappers call this."""
        return self.loss(batch, generator)

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """p_loss (docs/model.md#objectives) on a batch; returns the scalar loss and device-side log
        values."""
        p = self.prepare(batch, further_drop=True, generator=generator)
        if p.target is None:
            raise ValueError("standard mode needs batch['y'] as the diffusion target")
        x0 = p.target
        b = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noisy_mask = p.noisy_mask if self.cfg.ambient_occlusion.apply_to_noisy_branch else None
        with torch.no_grad():
            x_t = self.schedule.q_sample(x0, t, noise)
            if noisy_mask is not None:
                x_t = x_t * noisy_mask
        pred = self.denoise(x_t, p.cond, t, self.coord_embedding(batch), noisy_mask)
        goal = x0 if self.parameterization == "x0" else noise
        loss = masked_mse(pred, goal, p.loss_mask)
        logs = {"loss": loss.detach(), **p.stats}
        if self.x0_skip is not None:
            nll = self.x0_skip.nll(pred, x0, self.schedule.alphas_cumprod[t], p.loss_mask)
            logs["x0_skip_nll"] = nll.detach()
            # The value stays the x0 MSE (logs, validation, checkpoint selection and runs without
            # the skip compare alike); the gradient carries the likelihood that fits s^2.
            loss = loss + (nll - nll.detach())
        return loss, logs

    # ------------------------------------------------------------------ sampling

    def make_sampler(self, name: str | None = None, **overrides: float) -> DDPMSampler:
        s = self.cfg.sampling
        n = self.cfg.noise
        kwargs = dict(ddim_num_timesteps=s.ddim_num_timesteps, ddim_eta=s.ddim_eta,
                      ddim_temperature=s.ddim_temperature, ddim_discretization=s.ddim_discretization)
        kwargs.update(overrides)
        return make_sampler(name or s.sampler, schedule=n.schedule, num_timesteps=n.num_timesteps,
                            beta_start=n.beta_start, beta_end=n.beta_end,
                            parameterization=self.parameterization, **kwargs)

    @torch.no_grad()
    def predict(
        self,
        batch: Batch,
        *,
        sampler: DDPMSampler | str | None = None,
        clamp_known_pixels: bool | None = None,
        return_intermediates: bool = False,
        intermediate_step_indices: list[int] | None = None,
        generator: RowGenerators = None,
        should_stop: Callable[[], bool] | None = None,
        precision: SamplingPrecision = "fp32",
    ) -> Prediction:
        """Inference (docs/model.md#inference): condition, sample, denormalise, optional blur, NaN
        outside y_valid_mask. `precision` "bf16" runs the denoiser under bf16 autocast; "fp32"
        leaves it as the caller runs it."""
        if precision not in get_args(SamplingPrecision):
            raise ValueError(f"precision {precision!r}: expected one of {get_args(SamplingPrecision)}")
        for key in ("x", "x_valid_mask", "y_valid_mask"):
            require_key(batch, key)
        amb = self.cfg.ambient_occlusion
        p = self.prepare(batch, further_drop=amb.enabled and amb.drop_at_inference, generator=generator)
        if not isinstance(sampler, DDPMSampler):
            sampler = self.make_sampler(sampler)
        clamp = self.cfg.clamp_known_pixels if clamp_known_pixels is None else clamp_known_pixels
        known = known_mask = None
        if clamp:
            if p.cond_mask is None:
                warnings.warn("clamp_known_pixels skipped: no pixel-space validity mask for the "
                              "generated channels", stacklevel=2)
            elif p.data.shape[1] != self.cfg.generated_channels:
                warnings.warn(f"clamp_known_pixels skipped: condition data has {p.data.shape[1]} "
                              f"channels, generated_channels is {self.cfg.generated_channels}",
                              stacklevel=2)
            else:
                known, known_mask = p.data, p.cond_mask
        c_emb = self.coord_embedding(batch)
        branch_mask = p.cond_mask if amb.enabled and amb.mask_noisy_branch_at_inference else None

        def denoise(x_i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if branch_mask is not None:
                x_i = x_i * branch_mask
            if precision == "fp32":  # as the caller runs it (a trainer's validation: its autocast)
                return self.denoise(x_i, p.cond, t, c_emb, branch_mask)
            with torch.autocast(x_i.device.type, dtype=torch.bfloat16):
                return self.denoise(x_i, p.cond, t, c_emb, branch_mask)

        b, _, h, w = p.cond.shape
        res = reverse_diffusion(
            denoise, sampler, (b, self.cfg.generated_channels, h, w), device=p.cond.device,
            known=known, known_mask=known_mask, return_intermediates=return_intermediates,
            intermediate_step_indices=intermediate_step_indices, generator=generator,
            should_stop=should_stop,
        )
        # fp32 before denormalising: a bf16 sample (autocast) would round ~290 K to 1 degC steps.
        y_hat = self.to_pixels(res.sample).float()
        y_hat_denorm = self.normalizer.denormalize(y_hat)
        blur = self.cfg.post_process.gaussian_blur
        if blur.enabled:
            y_hat_denorm = gaussian_blur_depthwise(y_hat_denorm, blur.kernel_size, blur.sigma)
        y_hat_denorm = mask_invalid(y_hat_denorm, batch["y_valid_mask"])
        return Prediction(y_hat=y_hat, y_hat_denorm=y_hat_denorm, sampler=sampler,
                          denoise_samples=res.denoise_samples, x0_denoise_samples=res.x0_denoise_samples,
                          further_valid_mask=p.cond_mask)


    def to_pixels(self, sample: torch.Tensor) -> torch.Tensor:
        """Generated tensor -> normalised temperature bands (identity in pixel space)."""
        return sample


def require_key(batch: Batch, key: str) -> torch.Tensor:
    if key not in batch or batch[key] is None:
        raise KeyError(f"batch is missing required key {key!r} (has {sorted(batch)})")
    return batch[key]
