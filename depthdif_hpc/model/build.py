"""`build_model(cfg)`: the model a validated config describes, with its kernels routed."""

from __future__ import annotations

from torch import nn

from depthdif_hpc.config import Config
from depthdif_hpc.data.store import resolve_normalizer
from depthdif_hpc.model.depthdif import DepthDif
from depthdif_hpc.model.latent import AutoencoderModel, LatentDepthDif, load_autoencoder


def build_model(cfg: Config) -> nn.Module:
    """The model for a validated config, with kernels routed per `model.kernels`.

    `model.model_type`: cond_px_dif -> DepthDif; latent_cond_dif -> LatentDepthDif (loads the
    frozen autoencoder); depth_band_ae -> AutoencoderModel. Every one is called as
    `model(batch) -> (loss, logs)` and has `predict(batch, ...)`. Each gets the normaliser of
    `dataset.normalization` (`resolve_normalizer`: per-level statistics are read from the
    store into the config here if it has none, so the saved config records them).
    """
    normalizer = resolve_normalizer(cfg)
    if cfg.model.model_type == "depth_band_ae":
        ae = AutoencoderModel(cfg.ae)
        ae.normalizer = normalizer
        return ae
    if cfg.model.model_type == "latent_cond_dif":
        model = LatentDepthDif(cfg.model, load_autoencoder(cfg))
    else:
        model = DepthDif(cfg.model)
    model.normalizer = normalizer
    model.model.set_kernels(cfg.model.kernels)
    return model
