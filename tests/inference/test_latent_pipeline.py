"""The latent workflow through the real trainer, predict and evaluate, on the tiny store."""

from pathlib import Path

import numpy as np
import zarr

from depthdif_hpc.checkpoint.loading import load_model
from depthdif_hpc.inference.evaluate import evaluate
from depthdif_hpc.inference.predict import predict_split
from depthdif_hpc.model.latent import LatentDepthDif
from depthdif_hpc.train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["dataloader.batch_size=4", "dataloader.num_workers=0", "dataloader.pin_memory=false",
          "trainer.ema.enabled=false", "trainer.limit_val_batches=1", "model.kernels=eager",
          "model.sampling.sampler=ddim", "model.sampling.ddim_num_timesteps=2",
          "trainer.full_reconstruction_samples=1"]


def test_autoencoder_then_latent_diffusion_then_predict_and_evaluate(tiny_store, tmp_path):
    ae_run = tmp_path / "ae"
    code = train_main([
        "--config", str(ROOT / "configs/px_space/training_config.yaml"),
        "--config", str(ROOT / "configs/lat_space/ae_config.yaml"),
        "--config", str(ROOT / "configs/px_space/data_config.yaml"),
        f"dataset.store={tiny_store}", f"trainer.run_dir={ae_run}", "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=4", "ae.encoder_hidden_channels=[16,16]",
        "ae.decoder_hidden_channels=[16,16]", "ae.latent_channels=4", *COMMON])
    assert code == 0
    ae_ckpt = ae_run / "checkpoints" / "step_00000004" / "model.safetensors"
    assert ae_ckpt.is_file()
    ae_yaml = tmp_path / "ae.yaml"
    ae_yaml.write_text("ae:\n  latent_channels: 4\n  encoder_hidden_channels: [16, 16]\n"
                       "  decoder_hidden_channels: [16, 16]\n")
    lat_run = tmp_path / "latent"
    code = train_main([
        "--config", str(ROOT / "configs/lat_space/model_config.yaml"),
        "--config", str(ROOT / "configs/lat_space/training_config.yaml"),
        "--config", str(ROOT / "configs/px_space/data_config.yaml"),
        f"dataset.store={tiny_store}", f"trainer.run_dir={lat_run}", "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=4", f"model.latent.ae_checkpoint={ae_ckpt}",
        f"model.latent.ae_config_path={ae_yaml}", "model.latent.latent_channels=4",
        "model.generated_channels=4", "model.condition_channels=6", "model.unet.dim=8",
        "model.unet.dim_mults=[1,2]", "model.noise.num_timesteps=10", *COMMON])
    assert code == 0
    _, model = load_model(lat_run)
    assert isinstance(model, LatentDepthDif)
    pred = tmp_path / "pred.zarr"
    counts = predict_split(model, tiny_store, pred, limit=3, sampler="ddim",
                           sampler_overrides={"ddim_num_timesteps": 2}, progress=False)
    assert counts["written"] == 3
    g = zarr.open_group(str(pred), mode="r")
    assert g["mean"].shape[1] == 50 and np.isfinite(g["mean"][0]).any()
    r = evaluate(pred, tiny_store, tmp_path / "report", figures=False, progress=False)
    assert r["n_samples"] == 3 and r["overall"]["hidden"]["model"]["count"] > 0
