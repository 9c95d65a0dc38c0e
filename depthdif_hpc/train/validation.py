"""Validation: the stochastic loss on every rank, and a full reverse-diffusion reconstruction of
a fixed set of validation samples, shared out over the ranks, with degC metrics and figures on
rank 0 (docs/metrics.md#full-reconstruction)."""

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
from depthdif_hpc.normalization import GLOBAL, PLOT_MAX_C, PLOT_MIN_C, Normalizer
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


def reconstruct(model: torch.nn.Module, batch: dict[str, Any], *, ambient: bool, sampler: Any,
                log_intermediates: bool, generator: torch.Generator | None,
                should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run predict on a device batch and compute the metrics of
    docs/metrics.md#reconstruction-metrics in degC."""
    res = model.predict(batch, sampler=sampler, return_intermediates=log_intermediates, generator=generator,
                        should_stop=should_stop)
    pred_c = res.y_hat_denorm
    target_norm = batch["x"] if ambient else batch["y"]
    mask = eval_mask(batch, ambient)
    norm: Normalizer = getattr(model, "normalizer", GLOBAL)  # the one the batches were decoded with
    target_c = norm.denormalize(target_norm.float()).masked_fill(~mask, float("nan"))
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
            "mask": mask, "generated": generated, "result": res, "normalizer": norm,
            "intermediates": (chain_errors(res.x0_denoise_samples, target_c, mask, norm)
                              if log_intermediates else None)}


def chain_errors(frames: Any, target_c: torch.Tensor, mask: torch.Tensor,
                 norm: Normalizer = GLOBAL) -> dict[str, Any] | None:
    """Along the reverse chain: the first sample's band-0 x0 estimates (S, H, W; normalised) and,
    per step, the summed absolute degC error and the pixel count over the eval mask (sums, so
    that the samples of several ranks add up to the mean over all of them)."""
    if frames is None:
        return None
    frames = frames if isinstance(frames, torch.Tensor) else torch.stack(list(frames))
    # frames: (S, B, G, H, W) of x0 estimates along the reverse chain (normalised units)
    sel = mask & torch.isfinite(target_c)
    abs_sum, count = [], []
    for i in range(frames.shape[0]):
        p = norm.denormalize(frames[i].float().to(target_c.device))
        abs_sum.append(float((p[sel] - target_c[sel]).abs().sum()))
        count.append(int(sel.sum()))
    return {"frames": frames[:, 0, 0].float().cpu(), "abs_sum": np.array(abs_sum), "count": np.array(count)}


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
    norm: Normalizer = rec.get("normalizer", GLOBAL)
    x_c = norm.denormalize(batch["x"].float()).masked_fill(batch["x_valid_mask"] <= 0.5, float("nan"))
    y_c = norm.denormalize(batch["y"].float()).masked_fill(batch["y_valid_mask"] <= 0.5, float("nan")) \
        if "y" in batch else None
    panels = [("x (obs)", x_c)]
    if y_c is not None:
        panels.append(("GLORYS y", y_c))
    if "eo" in batch:
        panels.append(("eo", norm.denormalize(batch["eo"].float())))
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

    chain = rec.get("intermediates")
    if log_intermediates and chain is not None:
        frames = chain["frames"]  # (S, H, W): first sample, band 0
        s = frames.shape[0]
        idx = np.linspace(0, s - 1, min(16, s)).round().astype(int)
        fig3, axes3 = plt.subplots(4, 4, figsize=(8, 8), squeeze=False)
        for a, i in zip(axes3.flat, list(idx) + [None] * (16 - len(idx)), strict=False):
            a.set_xticks([])
            a.set_yticks([])
            if i is None:
                continue
            img = norm.denormalize(frames[i].float()[None, None])[0, 0].cpu().numpy()  # band 0
            a.imshow(img, cmap="turbo", vmin=PLOT_MIN_C, vmax=PLOT_MAX_C)
            a.set_title(f"frame {i}", fontsize=7)
        fig3.tight_layout()
        fig3.savefig(out_dir / f"step_{step:08d}_intermediates.png", dpi=70)
        figs["val/denoise_intermediates"] = fig3
        with np.errstate(invalid="ignore", divide="ignore"):
            maes = chain["abs_sum"] / np.where(chain["count"] > 0, chain["count"], np.nan)
        fig4, ax4 = plt.subplots(figsize=(4, 3))
        ax4.plot(maes)
        ax4.set_xlabel("reverse step")
        ax4.set_ylabel("MAE of x0 estimate (degC)")
        fig4.tight_layout()
        fig4.savefig(out_dir / f"step_{step:08d}_mae_vs_step.png", dpi=80)
        figs["val/mae_vs_step"] = fig4
    return figs


def validation_sampler(model: torch.nn.Module, cfg: Config) -> Any:
    """The reverse process of the in-training reconstruction (trainer.validation_sampler): DDIM with
    trainer.validation_ddim_steps steps (eta and temperature from model.sampling; a count above
    model.noise.num_timesteps is clamped to it by the sampler), or the model's own default
    (model.sampling, as predict uses). None for a model without a reverse process."""
    if cfg.trainer.validation_sampler == "model" or not hasattr(model, "make_sampler"):
        return None
    return model.make_sampler("ddim", ddim_num_timesteps=cfg.trainer.validation_ddim_steps)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _take(batch: dict[str, Any], i: int) -> dict[str, Any]:
    """Sample i of a host batch as a batch of one."""
    return {k: (v[i:i + 1] if (isinstance(v, torch.Tensor) and v.ndim > 0) or isinstance(v, list) else v)
            for k, v in batch.items()}


class Validator:
    """Runs validation for the trainer (collective: every rank calls `run` at the same step).

    Validation uses an unsharded, unwrapped fp32 replica of the model (or of its EMA), so no
    collective runs inside its forward and each rank can run reverse diffusion on its own.

    The reconstruction's samples are the first trainer.full_reconstruction_samples of the first
    batch of the validation split as one rank would read it, the same at any world size. Sample i
    goes to rank i % world and runs as a batch of one with its own generator (seeded by the
    training seed and i): batch composition changes both the noise draws and the kernels'
    summation order, so this makes the metrics and figures identical at any allocation size. A
    rank runs ceil(samples / world) chains; the others wait in the gather for the slowest.
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
        self.recon_batch: dict | None = None  # the reconstruction's samples (host), cached
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
                if i == 0 and self.recon_batch is None and self.world == 1:
                    # one rank reads the split as _samples would: no second read
                    self.recon_batch = slice_batch(batch, cfg.trainer.full_reconstruction_samples)
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
        if cfg.trainer.full_reconstruction:
            recon = self._reconstruct(model, step)  # collective
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

    def _mine(self) -> list[int]:
        return list(range(self.rank, self.cfg.trainer.full_reconstruction_samples, self.world))

    def _samples(self) -> dict[str, Any]:
        """The reconstruction's samples: read once, by the ranks that reconstruct some."""
        if self.recon_batch is None:
            stream = wrap_stream(self.data_factory(self.cfg, "val", 0, 1))
            stream.set_epoch(0)
            first = next(iter(stream), None)
            if first is None:
                raise RuntimeError("the validation split yielded no batch to reconstruct")
            self.recon_batch = slice_batch(first, self.cfg.trainer.full_reconstruction_samples)
        return self.recon_batch

    def _reconstruct_mine(self, model: torch.nn.Module) -> list[dict[str, Any]] | str:
        """This rank's samples, each a host record; "stopped" when a stop request interrupted."""
        cfg = self.cfg
        mine = self._mine()
        if not mine:
            return []
        batch = self._samples()
        sampler = validation_sampler(model, cfg)
        records = []
        for i in mine:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(_seed(cfg.training.seed, 17, i))
            dev = to_device(_take(batch, i), self.device)
            try:
                with self.autocast():
                    rec = reconstruct(model, dev, ambient=cfg.model.ambient_occlusion.enabled, sampler=sampler,
                                      log_intermediates=cfg.trainer.log_intermediates,
                                      generator=gen, should_stop=self.stop_requested)
            except SamplingInterrupted:
                return "stopped"
            res = rec["result"]
            chain = rec["intermediates"]
            if chain is not None and i != 0:
                chain = {**chain, "frames": None}  # the figure shows sample 0's chain only
            records.append({"index": i, "steps": res.sampler.num_steps if res.sampler is not None else 0,
                            **{k: rec[k].cpu() for k in ("pred_c", "target_c", "mask", "generated")},
                            "intermediates": chain})
        return records

    def _reconstruct(self, model: torch.nn.Module, step: int) -> dict[str, float] | None:
        """Collective: every rank reconstructs its samples, rank 0 gathers them and computes the
        degC metrics and figures ({} on the other ranks; None on rank 0: a stop interrupted)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        try:
            mine: list[dict[str, Any]] | str = self._reconstruct_mine(model)
        except Exception as exc:  # every rank must reach the gather: report, do not raise
            log.exception(f"full reconstruction failed on rank {self.rank} at step {step}: {exc}")
            mine = f"failed on rank {self.rank}: {exc}"
        parts: list[Any] = [mine]
        if self.world > 1:
            parts = [None] * self.world if self.is_main else None
            dist.gather_object(mine, parts, dst=0, group=self.ctrl_group)
        if not self.is_main:
            return {}
        if "stopped" in parts:
            return None
        metrics: dict[str, float] = {}
        try:
            failed = [p for p in parts if isinstance(p, str)]
            if failed:
                raise RuntimeError("; ".join(failed))
            records = sorted((r for p in parts for r in p), key=lambda r: r["index"])
            rec = {k: torch.cat([r[k] for r in records]) for k in ("pred_c", "target_c", "mask", "generated")}
            chains = [r["intermediates"] for r in records if r["intermediates"] is not None]
            rec["intermediates"] = {"frames": chains[0]["frames"], "abs_sum": sum(c["abs_sum"] for c in chains),
                                    "count": sum(c["count"] for c in chains)} if chains else None
            for k, v in recon_metrics(rec["pred_c"], rec["target_c"], rec["mask"]).items():
                metrics[f"val/{k}"] = v
            profile = per_depth_error(rec["pred_c"], rec["target_c"], rec["generated"])
            rec["profile"] = profile
            for k, v in enumerate(profile["mae"]):
                metrics[f"val_absolute_band_error/recon_l1_generated_deg_band_{k}"] = float(v)
            for k, v in enumerate(profile["rmse"]):
                metrics[f"val_band_rmse/recon_rmse_generated_deg_band_{k}"] = float(v)
            metrics["val/recon_steps"] = float(records[0]["steps"])
            figs = figures(dict(self._samples()), rec, self.out_dir, step,
                           ambient=cfg.model.ambient_occlusion.enabled,
                           log_intermediates=cfg.trainer.log_intermediates)
            self.steplog.figures(figs, step)
            import matplotlib.pyplot as plt

            for fig in figs.values():
                plt.close(fig)
        except Exception as exc:  # logs placeholders (docs/metrics.md#full-reconstruction)
            log.exception(f"full reconstruction failed at step {step}: {exc}")
            for k in ("recon_mse_full_recon", "recon_psnr_full_recon", "recon_ssim_full_recon"):
                metrics[f"val/{k}"] = 0.0
        metrics["val/recon_seconds"] = time.perf_counter() - t0
        return metrics
