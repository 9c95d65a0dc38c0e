"""Latent workflow (docs/model.md#latent-workflow): train the depth-band autoencoder, then diffuse
in its latent.

Both models keep the package-wide interface: `model(batch) -> (loss, logs)` for training and
`model.predict(batch, ...)` for inference, so the trainer, predict and evaluate need no special
cases.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from depthdif_hpc.config import (
    AEConfig,
    Config,
    ModelConfig,
    load_config,
)
from depthdif_hpc.data.batch import Batch
from depthdif_hpc.diffusion.masks import align_mask, binarize
from depthdif_hpc.model.autoencoder import DepthBandAutoencoder, reconstruction_loss
from depthdif_hpc.model.conditioning import build_condition
from depthdif_hpc.model.depthdif import DepthDif, Prediction, Prepared, require_key
from depthdif_hpc.model.postprocess import mask_invalid
from depthdif_hpc.model.state_file import read_state_file
from depthdif_hpc.normalization import GLOBAL, Normalizer


def autoencoder_from_config(ae: AEConfig) -> DepthBandAutoencoder:
    return DepthBandAutoencoder(ae.in_channels, ae.latent_channels, tuple(ae.encoder_hidden_channels),
                                tuple(ae.decoder_hidden_channels), ae.spatial_downsample)


class AutoencoderModel(nn.Module):
    """Trains the autoencoder on y: L1 + L2 reconstruction (over valid pixels if masked_only)."""

    normalizer: Normalizer = GLOBAL  # set by build_model from dataset.normalization

    def __init__(self, ae: AEConfig) -> None:
        super().__init__()
        self.cfg = ae
        self.autoencoder = autoencoder_from_config(ae)

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        return self.loss(batch, generator)

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Same interface as DepthDif.loss (the generator is unused: the objective is deterministic)."""
        y = require_key(batch, "y").float()
        valid = batch.get("y_valid_mask") if self.cfg.loss.masked_only else None
        loss = reconstruction_loss(self.autoencoder(y), y, valid, self.cfg.loss.recon_l1_weight,
                                   self.cfg.loss.recon_l2_weight)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, batch: Batch, **_: object) -> Prediction:
        """Reconstruct y. `generated_mask`: every valid pixel is the model's output (there is no
        condition), so validation scores all of them."""
        # fp32 before denormalising: under bf16 autocast the ~290 K intermediate would round to
        # about 1 degC steps.
        y_hat = self.autoencoder(require_key(batch, "y").float()).float()
        valid = require_key(batch, "y_valid_mask")
        return Prediction(y_hat=y_hat, y_hat_denorm=mask_invalid(self.normalizer.denormalize(y_hat), valid),
                          generated_mask=valid > 0.5)


def load_autoencoder(cfg: Config) -> DepthBandAutoencoder:
    """Build the autoencoder the latent config points to and load its trained weights.

    Refuses a checkpoint whose channels do not match `model.latent` (or the AE config).
    """
    lat = cfg.model.latent
    ae_cfg = load_config(lat.ae_config_path).ae if lat.ae_config_path else cfg.ae
    if ae_cfg.latent_channels != lat.latent_channels or ae_cfg.spatial_downsample != lat.spatial_downsample:
        raise ValueError(
            f"autoencoder config ({lat.ae_config_path or 'ae section'}) has latent_channels="
            f"{ae_cfg.latent_channels}, spatial_downsample={ae_cfg.spatial_downsample} but model.latent "
            f"asks for {lat.latent_channels}, {lat.spatial_downsample}")
    ae = autoencoder_from_config(ae_cfg)
    if not lat.ae_checkpoint:
        raise ValueError("model.latent.ae_checkpoint is required for latent_cond_dif "
                         "(train one with model.model_type=depth_band_ae first)")
    path = Path(lat.ae_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"model.latent.ae_checkpoint not found: {path}")
    state = _autoencoder_state(path)
    expected = ae.state_dict()
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
           for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in expected if k not in state]
    if bad or missing:
        raise ValueError(f"autoencoder checkpoint {path} does not match the configured channels: "
                         + "; ".join(bad + [f"missing {k}" for k in missing]))
    ae.load_state_dict({k: state[k] for k in expected})
    return ae


def _autoencoder_state(path: Path) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors, from its own state dict or one saved from AutoencoderModel."""
    state = read_state_file(path)
    prefix = "autoencoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


class LatentDepthDif(DepthDif):
    """Conditional diffusion on autoencoder latents: target enc(y), condition [eo | enc(x) | mask]."""

    def __init__(self, model: ModelConfig, autoencoder: DepthBandAutoencoder) -> None:
        if model.ambient_occlusion.enabled:
            raise ValueError("ambient occlusion is not supported in the latent workflow")
        super().__init__(model)
        self.autoencoder = autoencoder
        if model.latent.freeze_autoencoder:
            self.autoencoder.requires_grad_(False)
            self.autoencoder.eval()

    def train(self, mode: bool = True) -> LatentDepthDif:
        super().train(mode)
        if self.cfg.latent.freeze_autoencoder:
            self.autoencoder.eval()
        return self

    def _encode(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.latent.freeze_autoencoder:
            with torch.no_grad():
                return self.autoencoder.encode(t.float())
        return self.autoencoder.encode(t.float())

    def _pool(self, mask: torch.Tensor) -> torch.Tensor:
        f = self.cfg.latent.spatial_downsample
        return mask if f == 1 else F.max_pool2d(mask, f)

    def prepare(self, batch: Batch, *, further_drop: bool, generator: torch.Generator | None = None) -> Prepared:
        cfg = self.cfg
        x = require_key(batch, "x")
        z_x = self._encode(x)
        y = batch.get("y")
        z_y = self._encode(y) if y is not None else None
        x_valid = batch.get("x_valid_mask")
        cond_valid = self._pool(align_mask(x_valid, 1)) if x_valid is not None else None
        cond = build_condition(
            z_x, cond_valid, batch.get("eo"), include_eo=cfg.condition_include_eo,
            use_valid_mask=cfg.condition_use_valid_mask, mask_channels=cfg.condition_mask_channels,
            expected_channels=cfg.condition_channels,
        )
        # A latent channel mixes all depths: supervise latent pixels whose column is ocean.
        support = None
        if batch.get("y_valid_mask") is not None:
            support = self._pool(align_mask(batch["y_valid_mask"], 1))
        if support is not None and batch.get("land_mask") is not None:
            support = support * self._pool(binarize(batch["land_mask"]).reshape(support.shape))
        loss_mask = support.expand(-1, cfg.generated_channels, -1, -1) if (
            support is not None and cfg.mask_loss_with_valid_pixels) else None
        return Prepared(z_y, z_x, cond, None, loss_mask, None, {})

    def to_pixels(self, sample: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.autoencoder.decode(sample)
