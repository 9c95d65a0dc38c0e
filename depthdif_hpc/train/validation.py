"""Validation: the stochastic loss on every rank, and a full reverse-diffusion reconstruction of
the cached first validation batch on global rank 0 with degC metrics and figures
(docs/metrics.md#full-reconstruction)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from depthdif_hpc.checkpoint.weights import load_model_weights
from depthdif_hpc.config import Config
from depthdif_hpc.data.profiles import GLORYS_DEPTHS
from depthdif_hpc.diffusion.samplers import SamplingInterrupted
from depthdif_hpc.metrics import eval_mask, per_depth_error, recon_metrics
from depthdif_hpc.model.build import build_model
from depthdif_hpc.normalization import PLOT_MAX_C, PLOT_MIN_C, denormalize_temperature
from depthdif_hpc.train.optim import LRController
from depthdif_hpc.train.steplog import StepLog
from depthdif_hpc.train.stream import DataFactory, to_device, wrap_stream

log = logging.getLogger("depthdif_hpc.train")

LOSS_CKPT_NONFINITE = 1e9  # val/loss_ckpt replaces NaN/inf by 1e9 (docs/metrics.md#validation-loss)


def slice_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """First n samples of a host batch (tensors and lists), cloned so the loader can reuse memory."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            out[k] = v[:n].clone()
        elif isinstance(v, list):
            out[k] = v[:n]
        else:
            out[k] = v
    return out


def reconstruct(model: torch.nn.Module, batch: dict[str, Any], *, ambient: bool, sampler: str | None,
                log_intermediates: bool, generator: torch.Generator | None,
                should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run predict on a device batch and compute the metrics of
    docs/metrics.md#reconstruction-metrics in degC."""
    res = model.predict(batch, sampler=sampler, return_intermediates=log_intermediates, generator=generator,
                        should_stop=should_stop)
    pred_c = res.y_hat_denorm
    target_norm = batch["x"] if ambient else batch["y"]
    mask = eval_mask(batch, ambient)
    target_c = denormalize_temperature(target_norm.float()).masked_fill(~mask, float("nan"))
    metrics = recon_metrics(pred_c, target_c, mask)
    # "Generated" pixels: not given to the model. Standard: Y and not A; ambient: A and Y and not A~;
    # a model without a condition (the autoencoder) says itself which pixels it produced.
    x_valid = batch["x_valid_mask"] > 0.5
    if res.generated_mask is not None:
        generated = mask & res.generated_mask
    elif ambient and res.further_valid_mask is not None:
        generated = mask & ~(res.further_valid_mask > 0.5)
    else:
        generated = mask & ~x_valid
    profile = per_depth_error(pred_c, target_c, generated)
    return {"metrics": metrics, "profile": profile, "pred_c": pred_c, "target_c": target_c,
            "result": res}


def figures(batch: dict[str, Any], rec: dict[str, Any], out_dir: Path, step: int, *,
            ambient: bool, log_intermediates: bool) -> dict[str, Any]:
    """Reconstruction grid, per-depth error profile (and intermediates) as PNGs; returns figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Any] = {}
    n = min(5, batch["x"].shape[0])
    band = 0
    x_c = denormalize_temperature(batch["x"].float()).masked_fill(batch["x_valid_mask"] <= 0.5, float("nan"))
    y_c = denormalize_temperature(batch["y"].float()).masked_fill(batch["y_valid_mask"] <= 0.5, float("nan")) \
        if "y" in batch else None
    panels = [("x (obs)", x_c)]
    if y_c is not None:
        panels.append(("GLORYS y", y_c))
    if "eo" in batch:
        panels.append(("eo", denormalize_temperature(batch["eo"].float())))
    panels.append(("y_hat", rec["pred_c"]))
    if ambient:
        panels.append(("target", rec["target_c"]))
    if "land_mask" in batch:
        panels.append(("ocean mask", batch["land_mask"].float()))
    fig, axes = plt.subplots(n, len(panels), figsize=(2.2 * len(panels), 2.2 * n), squeeze=False)
    for i in range(n):
        for j, (title, t) in enumerate(panels):
            img = t[i, min(band, t.shape[1] - 1)].detach().float().cpu().numpy()
            is_mask = title == "ocean mask"
            axes[i, j].imshow(img, cmap="gray" if is_mask else "turbo",
                              vmin=0 if is_mask else PLOT_MIN_C, vmax=1 if is_mask else PLOT_MAX_C)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
    fig.suptitle(f"step {step}, depth band {band} (degC)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"step_{step:08d}_recon.png", dpi=80)
    figs["val/recon_grid"] = fig

    prof = rec["profile"]
    fig2, ax = plt.subplots(figsize=(4, 3.5))
    k = np.arange(len(prof["mae"]))
    ylabel = "depth index"
    if len(k) == len(GLORYS_DEPTHS):  # the 50 GLORYS levels: plot against depth in metres
        k, ylabel = GLORYS_DEPTHS, "depth (m)"
        ax.set_yscale("log")
    ax.plot(prof["mae"], k, marker=".", label="MAE")
    ax.plot(prof["rmse"], k, marker=".", label="RMSE")
    ax.invert_yaxis()
    ax.set_xlabel("error (degC), generated pixels")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(f"per-depth error, step {step}", fontsize=9)
    fig2.tight_layout()
    fig2.savefig(out_dir / f"step_{step:08d}_depth_error.png", dpi=80)
    figs["val/depth_error_profile"] = fig2

    res = rec["result"]
    if log_intermediates and res.x0_denoise_samples is not None:
        frames = res.x0_denoise_samples
        frames = frames if isinstance(frames, torch.Tensor) else torch.stack(list(frames))
        # frames: (S, B, G, H, W) of x0 estimates along the reverse chain (normalised units)
        s = frames.shape[0]
        idx = np.linspace(0, s - 1, min(16, s)).round().astype(int)
        fig3, axes3 = plt.subplots(4, 4, figsize=(8, 8), squeeze=False)
        for a, i in zip(axes3.flat, list(idx) + [None] * (16 - len(idx)), strict=False):
            a.set_xticks([])
            a.set_yticks([])
            if i is None:
                continue
            img = denormalize_temperature(frames[i, 0, 0].float()).cpu().numpy()
            a.imshow(img, cmap="turbo", vmin=PLOT_MIN_C, vmax=PLOT_MAX_C)
            a.set_title(f"frame {i}", fontsize=7)
        fig3.tight_layout()
        fig3.savefig(out_dir / f"step_{step:08d}_intermediates.png", dpi=70)
        figs["val/denoise_intermediates"] = fig3
        mask = eval_mask(batch, ambient)
        tgt = rec["target_c"]
        maes = []
        for i in range(s):
            p = denormalize_temperature(frames[i].float().to(tgt.device))
            sel = mask & torch.isfinite(tgt)
            maes.append(float((p[sel] - tgt[sel]).abs().mean()) if sel.any() else float("nan"))
        fig4, ax4 = plt.subplots(figsize=(4, 3))
        ax4.plot(maes)
        ax4.set_xlabel("reverse step")
        ax4.set_ylabel("MAE of x0 estimate (degC)")
        fig4.tight_layout()
        fig4.savefig(out_dir / f"step_{step:08d}_mae_vs_step.png", dpi=80)
        figs["val/mae_vs_step"] = fig4
    return figs


class Validator:
    """Runs validation for the trainer (collective: every rank calls `run` at the same step).

    Validation uses an unsharded, unwrapped fp32 replica of the model (or of its EMA), so no
    collective runs inside its forward and rank 0 alone can run the reverse diffusion.
    """

    def __init__(self, cfg: Config, *, rank: int, world: int, device: torch.device, ctrl_group: Any,
                 data_factory: DataFactory, full_weights: Callable[[bool], dict[str, torch.Tensor]],
                 autocast: Callable[[], AbstractContextManager], lr_ctl: LRController, steplog: StepLog,
                 barrier: Callable[[], None], out_dir: Path, use_ema: bool,
                 stop_requested: Callable[[], bool] = lambda: False) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.is_main = rank == 0
        self.ctrl_group, self.data_factory = ctrl_group, data_factory
        self.full_weights, self.autocast, self.barrier = full_weights, autocast, barrier
        self.lr_ctl, self.steplog, self.out_dir, self.use_ema = lr_ctl, steplog, out_dir, use_ema
        # A preemption during validation abandons it (checked between batches and reverse steps):
        # the launcher's grace period is for the checkpoint, not for a 1000-step reconstruction.
        self.stop_requested = stop_requested
        self.stream: Any = None  # built at the first validation: runs that never validate skip it
        self.recon_batch: dict | None = None  # rank 0: the first validation batch, cached
        self.replica: torch.nn.Module | None = None

    def _replica(self) -> torch.nn.Module:
        sd = self.full_weights(self.use_ema)
        if self.replica is None:
            self.replica = build_model(self.cfg).to(self.device).eval()
            self.replica.requires_grad_(False)
        load_model_weights(self.replica, sd, "the training replica")
        return self.replica

    def run(self, step: int) -> dict[str, float] | None:
        """Validation metrics, or None when a stop request abandoned it (on every rank alike)."""
        cfg = self.cfg
        model = self._replica()
        if self.stream is None:
            self.stream = wrap_stream(self.data_factory(cfg, "val", self.rank, self.world))
        self.stream.set_epoch(0)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(cfg.training.seed * 7919 + self.rank)  # same draws at every validation
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        stopped = torch.zeros((), device=self.device)
        with torch.no_grad():
            for i, batch in enumerate(self.stream):
                if i >= cfg.trainer.limit_val_batches:
                    break
                if self.stop_requested():
                    stopped.fill_(1)
                    break
                if i == 0 and self.recon_batch is None and self.is_main:
                    n = cfg.trainer.full_reconstruction_samples
                    self.recon_batch = slice_batch(batch, n)
                dev = to_device(batch, self.device)
                with self.autocast():
                    loss, _ = model.loss(dev, generator=gen)
                total += loss.float()
                count += 1
        if self.world > 1:
            # The stop flag travels with the sums, so every rank abandons together.
            packed = torch.stack([total, count, stopped])
            dist.all_reduce(packed)
            total, count, stopped = packed[0], packed[1], packed[2]
        if float(stopped) > 0:
            log.warning(f"validation at step {step} abandoned: stop requested")
            return None
        val_loss = float(total / count.clamp_min(1)) if float(count) > 0 else float("nan")
        metrics = {"val/loss": val_loss,
                   "val/loss_ckpt": val_loss if np.isfinite(val_loss) else LOSS_CKPT_NONFINITE,
                   "val/batches": float(count)}
        abandoned = False
        if cfg.trainer.full_reconstruction and self.is_main and self.recon_batch is not None:
            recon = self._reconstruct(model, step)
            abandoned = recon is None
            metrics.update(recon or {})
        self.barrier()
        # The plateau monitor must be the same on every rank (reconstruction metrics exist on
        # rank 0 only): rank 0's value is broadcast, with whether it abandoned the reconstruction.
        monitor = cfg.scheduler.reduce_on_plateau.monitor
        value = torch.tensor([metrics.get(monitor, metrics["val/loss_ckpt"]), float(abandoned)],
                             dtype=torch.float64)
        if self.world > 1:
            dist.broadcast(value, src=0, group=self.ctrl_group)
        if value[1] > 0:
            log.warning(f"validation at step {step} abandoned during the reconstruction: stop requested")
            return None
        if self.lr_ctl.plateau_step(float(value[0]), step):
            log.info(f"ReduceLROnPlateau: lr now {self.lr_ctl.plateau_lr:g}")
        if self.is_main:
            self.steplog.scalars(metrics, step)
            log.info("validation step %d: %s", step,
                     ", ".join(f"{k}={v:.5g}" for k, v in metrics.items()
                               if not k.startswith(("val_absolute", "val_band"))))
        return metrics

    def _reconstruct(self, model: torch.nn.Module, step: int) -> dict[str, float] | None:
        """Rank 0: reverse diffusion of the cached batch, degC metrics, figures (None: stopped)."""
        cfg = self.cfg
        ambient = cfg.model.ambient_occlusion.enabled
        rgen = torch.Generator(device=self.device)
        rgen.manual_seed(cfg.training.seed + 17)
        assert self.recon_batch is not None
        dev = to_device(self.recon_batch, self.device)
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            with self.autocast():
                rec = reconstruct(model, dev, ambient=ambient, sampler=None,
                                  log_intermediates=cfg.trainer.log_intermediates, generator=rgen,
                                  should_stop=self.stop_requested)
            for k, v in rec["metrics"].items():
                metrics[f"val/{k}"] = v
            for k, v in enumerate(rec["profile"]["mae"]):
                metrics[f"val_absolute_band_error/recon_l1_generated_deg_band_{k}"] = float(v)
            for k, v in enumerate(rec["profile"]["rmse"]):
                metrics[f"val_band_rmse/recon_rmse_generated_deg_band_{k}"] = float(v)
            figs = figures(dict(dev), rec, self.out_dir, step, ambient=ambient,
                           log_intermediates=cfg.trainer.log_intermediates)
            self.steplog.figures(figs, step)
            import matplotlib.pyplot as plt

            for fig in figs.values():
                plt.close(fig)
        except SamplingInterrupted:
            return None
        except Exception as exc:  # logs placeholders (docs/metrics.md#full-reconstruction)
            log.exception(f"full reconstruction failed at step {step}: {exc}")
            for k in ("recon_mse_full_recon", "recon_psnr_full_recon", "recon_ssim_full_recon"):
                metrics[f"val/{k}"] = 0.0
        metrics["val/recon_seconds"] = time.perf_counter() - t0
        return metrics
