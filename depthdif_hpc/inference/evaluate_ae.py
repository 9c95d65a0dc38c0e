"""`python -m depthdif_hpc.inference.evaluate_ae --checkpoint RUN_OR_CKPT --store STORE [--split val] --report DIR`.

Scores the latent workflow's depth-band autoencoder (model.model_type=depth_band_ae,
docs/model.md#latent-workflow): every sample of a split is streamed through `make_dataloader`, its
full temperature field y is encoded and decoded, and the reconstruction is compared with y in degC
over the valid (ocean, above the sea floor) pixels: RMSE, MAE and bias per depth level and overall,
plus PSNR/SSIM as in docs/metrics.md#reconstruction-metrics and the compression ratio (50 depth
bands -> latent channels, and the spatial factor). Writes DIR/report.md (a table per depth, in
metres), DIR/metrics.json and DIR/rmse_per_depth.png.

RUN_OR_CKPT is anything `depthdif_hpc.checkpoint.loading.load_model` reads: a run folder (its
newest complete checkpoint), a checkpoint folder or an export folder. Extra `key=value`
arguments are config overrides.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from depthdif_hpc.command import command
from depthdif_hpc.data.store import StoreError, read_manifest
from depthdif_hpc.data.stream import make_dataloader
from depthdif_hpc.inference.report import (
    REPORT,
    fmt,
    open_report,
    report_levels,
    write_json,
    write_text,
)
from depthdif_hpc.kernels import no_tf32
from depthdif_hpc.metrics import DepthStats, recon_metrics
from depthdif_hpc.model.latent import AutoencoderModel
from depthdif_hpc.normalization import denormalize_temperature

if TYPE_CHECKING:
    from depthdif_hpc.config import Config

FIGURE = "rmse_per_depth.png"


class NotAnAutoencoderError(ValueError):
    """The checkpoint holds another model than the depth-band autoencoder."""


def load_trained_autoencoder(checkpoint: str | Path, *, use_ema: bool = True,
                             overrides: list[str] | None = None) -> tuple[Config, AutoencoderModel]:
    """(config, AutoencoderModel in eval mode) from a run, checkpoint or export folder."""
    from depthdif_hpc.checkpoint.loading import load_model

    cfg, model = load_model(checkpoint, use_ema=use_ema, overrides=overrides)
    if not isinstance(model, AutoencoderModel):
        hint = ""
        lat = getattr(cfg.model, "latent", None)
        if cfg.model.model_type == "latent_cond_dif" and lat is not None and lat.ae_checkpoint:
            hint = f" (its autoencoder was loaded from model.latent.ae_checkpoint={lat.ae_checkpoint})"
        raise NotAnAutoencoderError(
            f"{checkpoint} holds a {cfg.model.model_type!r} model ({type(model).__name__}), not the "
            f"depth-band autoencoder (model.model_type=depth_band_ae){hint}; evaluate diffusion "
            "models with depthdif_hpc.inference.predict + depthdif_hpc.inference.evaluate")
    return cfg, model


def compression(model: AutoencoderModel) -> dict:
    """Values per tile in and out of the latent: D x H x W -> C x H/f x W/f."""
    ae = model.autoencoder
    f = ae.spatial_downsample
    return {"in_channels": ae.in_channels, "latent_channels": ae.latent_channels,
            "spatial_downsample": f, "ratio": ae.in_channels * f * f / ae.latent_channels}


def check_store(model: AutoencoderModel, store: str | Path, split: str) -> dict:
    """The store's manifest, after checking that its split, levels and tiles fit the autoencoder."""
    man = read_manifest(store)
    if split not in man["splits"]:
        raise StoreError(f"store {store} has no split {split!r} ({sorted(man['splits'])})")
    ae = model.autoencoder
    levels = list(man.get("levels_m", []))
    if len(levels) != ae.in_channels:
        raise ValueError(f"channel mismatch: store {store} has {len(levels)} depth levels but the "
                         f"autoencoder expects ae.in_channels={ae.in_channels}")
    tile, f = int(man["tile_size"]), ae.spatial_downsample
    if tile % f:
        raise ValueError(f"store {store} has {tile} px tiles, not divisible by the autoencoder's "
                         f"spatial_downsample={f}")
    return man


def evaluate_autoencoder(checkpoint: str | Path, store: str | Path, report: str | Path, *,
                         split: str = "val", batch_size: int = 8, num_workers: int = 0,
                         limit: int | None = None, use_ema: bool = True,
                         overrides: list[str] | None = None, device: str | torch.device = "cpu",
                         figures: bool = True, progress: bool = True) -> dict:
    """Reconstruction errors of the autoencoder in `checkpoint` on `split` of `store`; writes
    report.md, metrics.json (and the figure) under `report` and returns the metrics."""
    cfg, model = load_trained_autoencoder(checkpoint, use_ema=use_ema, overrides=overrides)
    man = check_store(model, store, split)
    depth_m = np.asarray(man["levels_m"], dtype=float)
    d = len(depth_m)
    model = model.to(device).eval()
    loader = make_dataloader(cfg, split, store=store, batch_size=batch_size,
                             num_workers=num_workers, shuffle=False)
    stats = DepthStats(d)
    psnr_sum = psnr_n = ssim_sum = ssim_n = 0.0
    n_samples = 0
    t0 = time.perf_counter()
    from tqdm import tqdm

    total = len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    bar = tqdm(total=total, desc="evaluate_ae", disable=not progress, leave=False)
    # No TF32 while scoring: cuDNN allows it for fp32 convolutions by default, and its ~1e-3
    # relative error would show up in a reconstruction error of 0.0x degC.
    with torch.no_grad(), no_tf32():
        for batch in loader:
            b = batch["y"].shape[0]
            if limit is not None:
                b = min(b, limit - n_samples)
                if b <= 0:
                    break
            y = batch["y"][:b]
            valid = batch["y_valid_mask"][:b].bool()
            res = model.predict({"y": y.to(device), "y_valid_mask": valid.to(device)})
            # degC in float64: float32 carries only ~3e-5 degC of resolution through Kelvin
            pred = denormalize_temperature(res.y_hat.double().cpu()).masked_fill(~valid, float("nan"))
            truth = denormalize_temperature(y.double()).masked_fill(~valid, float("nan"))
            # (B, D, H, W) -> (D, B*H, W): DepthStats sums over the last two axes
            stats.add(pred.numpy().transpose(1, 0, 2, 3).reshape(d, -1, pred.shape[-1]),
                      truth.numpy().transpose(1, 0, 2, 3).reshape(d, -1, truth.shape[-1]),
                      valid.numpy().transpose(1, 0, 2, 3).reshape(d, -1, valid.shape[-1]))
            r = recon_metrics(pred, truth, valid)
            psnr_sum += r["recon_psnr_full_recon"] * r["recon_psnr_bands"] if r["recon_psnr_bands"] else 0.0
            psnr_n += r["recon_psnr_bands"]
            ssim_sum += r["recon_ssim_full_recon"] * r["recon_ssim_bands"]
            ssim_n += r["recon_ssim_bands"]
            n_samples += b
            bar.update(b)
    bar.close()
    if n_samples == 0:
        raise ValueError(f"split {split!r} of {store} yielded no samples")
    per = stats.per_depth()
    result = {
        "checkpoint": str(checkpoint),
        "store": str(store),
        "split": split,
        "n_samples": n_samples,
        "seconds": time.perf_counter() - t0,
        "autoencoder": {**compression(model),
                        "encoder_hidden_channels": list(cfg.ae.encoder_hidden_channels),
                        "decoder_hidden_channels": list(cfg.ae.decoder_hidden_channels),
                        "parameters": sum(p.numel() for p in model.parameters())},
        "overall": stats.overall(),
        "psnr": psnr_sum / psnr_n if psnr_n else math.nan,
        "ssim": ssim_sum / ssim_n if ssim_n else math.nan,
        "per_depth": {"depth_m": depth_m.tolist(),
                      **{k: np.asarray(v, dtype=float).tolist() for k, v in per.items()}},
    }
    result["per_depth"]["count"] = [int(c) for c in per["count"]]
    report = open_report(report)
    write_json(report / "metrics.json", result)
    fig = _figure(report / FIGURE, result) if figures else None
    write_text(report / REPORT, _markdown(result, fig))
    return result


def _figure(path: Path, r: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = r["per_depth"]
    z = np.asarray(p["depth_m"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 5))
    ax.plot(p["rmse"], z, marker=".", label="RMSE")
    ax.plot(p["mae"], z, marker=".", label="MAE")
    ax.plot(p["bias"], z, ls="--", lw=1, label="bias")
    ax.axvline(0.0, color="0.6", lw=0.5)
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("reconstruction error (degC), valid pixels")
    ax.set_ylabel("depth (m)")
    c = r["autoencoder"]
    ax.set_title(f"autoencoder {c['in_channels']} -> {c['latent_channels']} ch (x{c['ratio']:.2f}), "
                 f"{r['split']}: RMSE {r['overall']['rmse']:.3f}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _markdown(r: dict, fig: Path | None) -> str:
    c, o, p = r["autoencoder"], r["overall"], r["per_depth"]
    f = c["spatial_downsample"]
    lines = [
        f"# Depth-band autoencoder reconstruction ({r['split']} split, {r['n_samples']} samples)", "",
        f"Checkpoint: `{r['checkpoint']}`  ", f"Store: `{r['store']}`", "",
        f"Compression: {c['in_channels']} depth bands x H x W -> {c['latent_channels']} latent channels"
        f" x H/{f} x W/{f} = **{c['ratio']:.2f}x** fewer values "
        f"(encoder {c['encoder_hidden_channels']}, decoder {c['decoder_hidden_channels']}, "
        f"{c['parameters']:,} parameters)", "",
        "## Overall (degC, all valid pixels and depths)", "",
        "| RMSE | MAE | bias | PSNR (dB) | SSIM | points |", "|---:|---:|---:|---:|---:|---:|",
        f"| {fmt(o['rmse'])} | {fmt(o['mae'])} | {fmt(o['bias'])} | {fmt(r['psnr'])} | "
        f"{fmt(r['ssim'])} | {o['count']} |", "",
        "## Selected depths (degC)", "", "| depth (m) | RMSE | MAE | bias |", "|---:|---:|---:|---:|",
    ]
    z = np.asarray(p["depth_m"], dtype=float)
    for k in report_levels(z):
        lines.append(f"| {z[k]:.1f} | {fmt(p['rmse'][k])} | {fmt(p['mae'][k])} | {fmt(p['bias'][k])} |")
    lines += ["", "## Every depth level (degC; bias = reconstruction - truth)", "",
              "| level | depth (m) | RMSE | MAE | bias | points |", "|---:|---:|---:|---:|---:|---:|"]
    for k in range(len(z)):
        lines.append(f"| {k} | {z[k]:.1f} | {fmt(p['rmse'][k])} | {fmt(p['mae'][k])} | "
                     f"{fmt(p['bias'][k])} | {p['count'][k]} |")
    if fig is not None:
        lines += ["", f"![RMSE per depth]({fig.name})"]
    return "\n".join(lines) + "\n"


@command(StoreError)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.inference.evaluate_ae", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="run folder, checkpoint folder or export folder of a depth_band_ae run")
    ap.add_argument("--store", required=True, help="data store built by depthdif_hpc.data.build")
    ap.add_argument("--split", default="val")
    ap.add_argument("--report", required=True, help="output folder for report.md, metrics.json, PNG")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0, help="data-loader workers")
    ap.add_argument("--limit", type=int, help="only the first N samples of the split")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA exists")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    r = evaluate_autoencoder(args.checkpoint, args.store, args.report, split=args.split,
                             batch_size=args.batch_size, num_workers=args.workers,
                             limit=args.limit, use_ema=not args.no_ema,
                             overrides=list(args.overrides), device=args.device,
                             figures=not args.no_figures, progress=sys.stderr.isatty())
    o, c = r["overall"], r["autoencoder"]
    print(f"{r['split']}: {r['n_samples']} samples, {o['count']} valid points; compression "
          f"{c['in_channels']} -> {c['latent_channels']} ch x {c['spatial_downsample']}^2 = {c['ratio']:.2f}x")
    print(f"overall RMSE {fmt(o['rmse'])} degC, MAE {fmt(o['mae'])}, bias {fmt(o['bias'])}")
    z = np.asarray(r["per_depth"]["depth_m"])
    print("RMSE per depth (degC): " + ", ".join(
        f"{z[k]:.0f} m {fmt(r['per_depth']['rmse'][k])}" for k in report_levels(z)))
    print(f"report: {Path(args.report) / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
