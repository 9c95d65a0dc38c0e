"""depthdif_hpc.inference.evaluate_ae: the autoencoder's reconstruction error per depth, on the tiny store."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from depthdif_hpc import build_model
from depthdif_hpc.config import load_config, to_yaml
from depthdif_hpc.data.store import StoreError, read_manifest
from depthdif_hpc.inference.evaluate_ae import (
    FIGURE,
    NotAnAutoencoderError,
    evaluate_autoencoder,
    main,
)
from depthdif_hpc.normalization import normalize_temperature
from depthdif_hpc.train.cli import main as train_main
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
AE_CONFIG = ROOT / "configs/lat_space/ae_config.yaml"
SMALL_AE = ["ae.encoder_hidden_channels=[8,8]", "ae.decoder_hidden_channels=[8,8]", "ae.latent_channels=4"]


def _export(folder: Path, cfg, model: torch.nn.Module) -> Path:
    """An export folder (model.safetensors + config.yaml), as depthdif_hpc.checkpoint.export writes."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder


def _constant_ae(folder: Path, out_c: np.ndarray, overrides: list[str] | None = None) -> Path:
    """An autoencoder whose output is out_c[k] degC at every pixel of band k (zero last conv)."""
    cfg = load_config(AE_CONFIG, overrides=[*SMALL_AE, *(overrides or [])])
    model = build_model(cfg)
    last = model.autoencoder.decoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(normalize_temperature(torch.from_numpy(out_c)).float())
    return _export(folder, cfg, model)


def _hand_errors(store: Path, split: str, out_c: np.ndarray) -> dict[str, np.ndarray]:
    """Per-depth errors of the constant prediction, straight from the stored uint16 codes."""
    man = read_manifest(store)
    step, tmin = float(man["quantization"]["step_c"]), float(man["quantization"]["min_c"])
    codes = zarr.open_group(str(store), mode="r")[f"{split}/fields"][:][:, 1:]  # (N, 50, H, W); 0 = eo
    rmse, mae, bias, count = [], [], [], []
    for k in range(codes.shape[1]):
        c = codes[:, k][codes[:, k] != 0].astype(np.float64)
        truth = tmin + (c - 1) * step
        e = out_c[k] - truth
        rmse.append(math.sqrt(float(np.mean(e**2))) if e.size else math.nan)
        mae.append(float(np.mean(np.abs(e))) if e.size else math.nan)
        bias.append(float(np.mean(e)) if e.size else math.nan)
        count.append(e.size)
    return {"rmse": np.array(rmse), "mae": np.array(mae), "bias": np.array(bias), "count": np.array(count)}


def test_per_depth_rmse_equals_hand_computation(tiny_store, tmp_path):
    out_c = 2.0 + 0.4 * np.arange(50)  # a different constant in every band
    ckpt = _constant_ae(tmp_path / "ae", out_c)
    report = tmp_path / "report"
    # batch size 5 over 12 val samples: the last batch is partial
    r = evaluate_autoencoder(ckpt, tiny_store, report, batch_size=5, progress=False)
    hand = _hand_errors(tiny_store, "val", out_c)
    p = r["per_depth"]
    assert r["n_samples"] == 12
    assert p["count"] == hand["count"].tolist() and sum(p["count"]) > 0
    for key in ("rmse", "mae", "bias"):
        np.testing.assert_allclose(p[key], hand[key], rtol=1e-6, atol=1e-5, err_msg=key)
    n = hand["count"].sum()
    overall = math.sqrt(float(np.nansum(hand["rmse"] ** 2 * hand["count"]) / n))
    assert r["overall"]["rmse"] == pytest.approx(overall, rel=1e-6)
    assert r["overall"]["count"] == n
    assert r["autoencoder"]["ratio"] == pytest.approx(50 / 4)
    assert p["depth_m"] == pytest.approx(read_manifest(tiny_store)["levels_m"])

    # report files: strict JSON, a per-depth table in metres, a real PNG
    metrics = json.loads((report / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert metrics["per_depth"]["rmse"][0] == pytest.approx(hand["rmse"][0], rel=1e-6)
    md = (report / "report.md").read_text()
    assert "| level | depth (m) | RMSE | MAE | bias | points |" in md
    assert f"| 0 | {p['depth_m'][0]:.1f} | {hand['rmse'][0]:.3f} |" in md
    assert "12.50x" in md and FIGURE in md
    png = report / FIGURE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and float(img.std()) > 0


def test_a_rerun_that_stops_halfway_leaves_no_report_md(tiny_store, tmp_path, monkeypatch):
    """report.md is the last file written: a rerun into a finished report folder that fails after
    metrics.json must not leave the old report.md beside the new metrics."""
    import depthdif_hpc.inference.evaluate_ae as ev

    ckpt = _constant_ae(tmp_path / "ae", 2.0 + 0.4 * np.arange(50))
    report = tmp_path / "report"
    evaluate_autoencoder(ckpt, tiny_store, report, progress=False)
    assert (report / "report.md").is_file()

    def broken_figure(*args, **kwargs):
        raise RuntimeError("killed while plotting")

    monkeypatch.setattr(ev, "_figure", broken_figure)
    with pytest.raises(RuntimeError, match="killed while plotting"):
        evaluate_autoencoder(ckpt, tiny_store, report, progress=False)
    assert not (report / "report.md").exists()
    assert (report / "metrics.json").is_file()  # the new metrics, whole (written atomically)
    assert not list(report.glob(".*tmp*"))


def test_cli_on_a_trained_run(tiny_store, tmp_path, capsys):
    run = tmp_path / "ae_run"
    code = train_main([
        "--config", str(AE_CONFIG), "--config", str(ROOT / "configs/px_space/data_config.yaml"),
        f"dataset.store={tiny_store}", f"trainer.run_dir={run}", "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=1000", "trainer.limit_val_batches=1",
        "trainer.full_reconstruction=false", "dataloader.batch_size=2", "dataloader.val_batch_size=4",
        "dataloader.num_workers=0", "dataloader.pin_memory=false", *SMALL_AE])
    assert code == 0
    report = tmp_path / "report"
    assert main(["--checkpoint", str(run), "--store", str(tiny_store), "--report", str(report),
                 "--limit", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "val: 3 samples" in out and "overall RMSE" in out
    r = json.loads((report / "metrics.json").read_text())
    assert r["n_samples"] == 3 and math.isfinite(r["overall"]["rmse"]) and r["overall"]["count"] > 0
    assert (report / "report.md").is_file() and (report / FIGURE).stat().st_size > 0


def test_refuses_a_diffusion_checkpoint(tiny_store, tmp_path, capsys):
    cfg = tiny_config()
    ckpt = _export(tmp_path / "dif", cfg, build_model(cfg))
    with pytest.raises(NotAnAutoencoderError, match="'cond_px_dif'.*not the depth-band autoencoder"):
        evaluate_autoencoder(ckpt, tiny_store, tmp_path / "r", progress=False)
    assert main(["--checkpoint", str(ckpt), "--store", str(tiny_store), "--report", str(tmp_path / "r")]) == 2
    assert "depth_band_ae" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_refuses_store_mismatches(tiny_store, tmp_path):
    ckpt = _constant_ae(tmp_path / "ae40", np.zeros(40), overrides=["ae.in_channels=40"])
    with pytest.raises(ValueError, match="channel mismatch: store .* 50 depth levels .*ae.in_channels=40"):
        evaluate_autoencoder(ckpt, tiny_store, tmp_path / "r", progress=False)
    ok = _constant_ae(tmp_path / "ae", np.zeros(50))
    with pytest.raises(StoreError, match="no split 'test'"):
        evaluate_autoencoder(ok, tiny_store, tmp_path / "r", split="test", progress=False)
    with pytest.raises(StoreError, match="does not exist"):
        evaluate_autoencoder(ok, tmp_path / "nowhere.zarr", tmp_path / "r", progress=False)
