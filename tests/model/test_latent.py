import pytest
import torch

from depthdif_hpc import build_model, load_config
from depthdif_hpc.config import ConfigError
from depthdif_hpc.model.latent import AutoencoderModel, LatentDepthDif
from tests.helpers import random_batch

AE = "configs/lat_space/ae_config.yaml"
LAT = "configs/lat_space/model_config.yaml"
LAT_TRAIN = "configs/lat_space/training_config.yaml"
SMALL_AE = ["ae.encoder_hidden_channels=[16,16]", "ae.decoder_hidden_channels=[16,16]", "ae.latent_channels=4"]


def _trained_ae(tmp_path, latent_channels=4, steps=5):
    cfg = load_config(AE, overrides=[*SMALL_AE[:2], f"ae.latent_channels={latent_channels}"])
    model = build_model(cfg)
    assert isinstance(model, AutoencoderModel)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = random_batch()
    for _ in range(steps):
        loss, logs = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "ae.pt"
    torch.save({"model": model.state_dict()}, path)
    ae_yaml = tmp_path / "ae.yaml"
    ae_yaml.write_text(
        f"ae:\n  latent_channels: {latent_channels}\n  encoder_hidden_channels: [16, 16]\n"
        "  decoder_hidden_channels: [16, 16]\n")
    return path, ae_yaml


def _latent_cfg(ckpt, ae_yaml, latent=4):
    return load_config(LAT, LAT_TRAIN, overrides=[
        f"model.latent.ae_checkpoint={ckpt}", f"model.latent.ae_config_path={ae_yaml}",
        f"model.latent.latent_channels={latent}", f"model.generated_channels={latent}",
        f"model.condition_channels={latent + 2}", "model.unet.dim=8", "model.unet.dim_mults=[1,2]",
        "model.noise.num_timesteps=10", "model.kernels=eager"])


def test_autoencoder_model_predict_masks_invalid():
    model = build_model(load_config(AE, overrides=SMALL_AE))
    batch = random_batch()
    out = model.predict(batch)
    assert out.y_hat.shape == batch["y"].shape
    assert torch.isnan(out.y_hat_denorm[~batch["y_valid_mask"]]).all()


def test_autoencoder_predict_is_fp32_under_bf16_autocast_and_scores_every_valid_pixel():
    """Validation of the autoencoder: degC in fp32 even under bf16 autocast (a bf16 ~290 K
    intermediate would round to 1 degC steps), and the per-depth profile over all valid pixels,
    profile columns included (the autoencoder has no condition)."""
    from depthdif_hpc.train.validation import reconstruct

    model = build_model(load_config(AE, overrides=SMALL_AE)).eval()
    batch = random_batch()
    ref = model.predict(batch).y_hat_denorm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.predict(batch)
    assert out.y_hat_denorm.dtype == torch.float32
    valid = batch["y_valid_mask"] > 0.5
    # bf16 rounding of the normalised output only (~0.4% of the value), not of the Kelvin sum
    assert (out.y_hat_denorm[valid] - ref[valid]).abs().max() < 0.25
    rec = reconstruct(model, batch, ambient=False, sampler="ddpm", log_intermediates=False, generator=None)
    counted = valid.sum(dim=(0, 2, 3)).tolist()
    assert rec["profile"]["count"].tolist() == counted  # x_valid columns are not left out
    assert (batch["x_valid_mask"] > 0.5).any()


def test_autoencoder_header_command_configs_load():
    """The command in ae_config.yaml's header (ae config + the data config) is a valid config."""
    cfg = load_config(AE, "configs/px_space/data_config.yaml")
    assert cfg.model.model_type == "depth_band_ae"
    assert cfg.dataloader.val_batch_size >= cfg.trainer.full_reconstruction_samples


def test_latent_training_and_predict(tmp_path):
    ckpt, ae_yaml = _trained_ae(tmp_path)
    model = build_model(_latent_cfg(ckpt, ae_yaml))
    assert isinstance(model, LatentDepthDif)
    frozen = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    opt = torch.optim.AdamW(trainable, lr=2e-3)
    batch = random_batch()
    losses = []
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss, _ = model(batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])
    for k, v in model.autoencoder.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # the frozen autoencoder did not move
    out = model.eval().predict(batch, sampler="ddim")
    assert out.y_hat.shape == (2, 50, 16, 16)  # decoded back to the 50 bands
    assert torch.isnan(out.y_hat_denorm[~batch["y_valid_mask"]]).all()
    assert torch.isfinite(out.y_hat_denorm[batch["y_valid_mask"]]).all()


def test_latent_condition_layout(tmp_path):
    ckpt, ae_yaml = _trained_ae(tmp_path, steps=0)
    model = build_model(_latent_cfg(ckpt, ae_yaml))
    batch = random_batch()
    p = model.prepare(batch, further_drop=False)
    assert p.cond.shape == (2, 6, 16, 16)
    torch.testing.assert_close(p.cond[:, :1], batch["eo"])
    torch.testing.assert_close(p.cond[:, 1:5], model.autoencoder.encode(batch["x"]))
    torch.testing.assert_close(p.target, model.autoencoder.encode(batch["y"]))


def test_checkpoint_channel_mismatch_is_refused(tmp_path):
    ckpt, _ = _trained_ae(tmp_path, latent_channels=3, steps=0)
    yaml12 = tmp_path / "ae12.yaml"
    yaml12.write_text("ae:\n  latent_channels: 4\n  encoder_hidden_channels: [16, 16]\n"
                      "  decoder_hidden_channels: [16, 16]\n")
    with pytest.raises(ValueError, match=r"does not match the configured channels.*\(3, 16, 1, 1\)"):
        build_model(_latent_cfg(ckpt, yaml12, latent=4))


def test_latent_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.generated_channels"):
        load_config(LAT, overrides=["model.generated_channels=50"])
    with pytest.raises(ValueError, match="ae_checkpoint is required"):
        build_model(load_config(LAT, LAT_TRAIN, overrides=["model.unet.dim=8"]))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model(load_config(LAT, LAT_TRAIN, overrides=[f"model.latent.ae_checkpoint={tmp_path}/nope.pt"]))
