"""The training loop: Accelerate (+ DeepSpeed ZeRO), EMA, validation, atomic checkpoints, resume,
preemption by signal, and failure on a non-finite loss.

Per optimizer step the loop does no device->host synchronisation: losses and other logs stay on
the device and are brought to the host together every `trainer.log_every_n_steps` steps (and
before any checkpoint, so a non-finite loss is caught before anything is saved). The only
per-step collective is a tiny all-reduce of two host flags (stop requested, data exhausted) on
a CPU (gloo) group, so that every rank stops or starts a new epoch at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from depthdif_hpc.config import Config, ConfigError, to_dict, to_yaml
from depthdif_hpc.model.depthdif import build_model
from depthdif_hpc.train import checkpoint as ckpt
from depthdif_hpc.train.distributed import format_rank_table, rank_row
from depthdif_hpc.train.ema import ShardedEMA, is_zero3_param
from depthdif_hpc.train.optim import LRController, build_optimizer
from depthdif_hpc.train.setup import make_accelerator
from depthdif_hpc.train.stream import (
    DataFactory,
    default_data_factory,
    sample_ids,
    to_device,
    wrap_stream,
)
from depthdif_hpc.train.validation import LOSS_CKPT_NONFINITE, figures, reconstruct, slice_batch
from depthdif_hpc.train.weights import load_model_weights, load_weights

log = logging.getLogger("depthdif_hpc.train")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, please requeue


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, ids_by_rank: dict[int, list], value: float) -> None:
        self.step, self.ids_by_rank, self.value = step, ids_by_rank, value
        super().__init__(f"non-finite training loss ({value}) at optimizer step {step}; sample ids of "
                         f"that step's batches by rank: {ids_by_rank}. Nothing was saved after the "
                         "last complete checkpoint.")


@dataclass
class _Pending:
    """One optimizer step's logs, still on the device."""

    step: int
    loss: torch.Tensor
    extras: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    lr: float
    ids: list


def _open_step_log(path: Path, step: int):
    """Open a one-line-per-step JSON log for appending, first dropping the lines of steps after
    `step` (the resumed checkpoint): a hard kill may have logged steps it never saved, and each
    step must appear once in the file whatever the number of requeues."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by the kill
        tmp = path.with_name(path.name + ".part")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    return open(path, "a")


class Trainer:
    def __init__(self, cfg: Config, *, data_factory: DataFactory | None = None,
                 hooks: dict[str, Callable[..., Any]] | None = None) -> None:
        self.cfg = cfg
        self.data_factory = data_factory or default_data_factory
        self.hooks = hooks or {}
        self.run_dir = Path(cfg.trainer.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self._stop_signal: int | None = None
        self._pending: list[_Pending] = []
        self.step = 0
        self.epoch = 0
        self.samples_seen = 0
        self.tb = None

    # ================================================================== setup

    def _setup(self) -> None:
        from depthdif_hpc.train.distributed import apply_threads, resolve_dist_env, resolve_threads

        cfg = self.cfg
        env = resolve_dist_env()
        omp_before = os.environ.get("OMP_NUM_THREADS")
        self.threads = resolve_threads(cfg.trainer.intra_op_threads)
        apply_threads(self.threads)
        if torch.cuda.is_available():
            # TF32 on GPUs; on CPU "high" may route fp32 through reduced-precision oneDNN paths,
            # which would break the fp32 exactness the CPU tests rely on.
            torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
        self.accelerator, self.precision, self.ds_config = make_accelerator(cfg, env.world_size)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.device = acc.device
        self.deepspeed = cfg.trainer.distributed == "deepspeed"
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0)) if self.ds_config else 0
        self._setup_logging()
        # Flags agreed on by all ranks each step travel on a CPU group: no GPU stream sync.
        self.ctrl_group = None
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            self.ctrl_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        log.info(f"intra-op threads: {self.threads.count} ({self.threads.source}; OMP_NUM_THREADS was "
                 f"{omp_before if omp_before is not None else 'unset'})")
        self._log_rank_table(env.local_rank)

        # Same initial weights on every rank (DDP broadcasts anyway; ZeRO partitions local copies).
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg)
        self.resume_from = self._find_resume()
        if self.resume_from is None and cfg.model.load_checkpoint:
            missing = load_weights(model, cfg.model.load_checkpoint)
            log.info(f"warm start: weights from {cfg.model.load_checkpoint}" +
                     (f" ({missing})" if missing else ""))
        self.raw_model = model
        optimizer = build_optimizer(model, cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.engine = self.model if self.deepspeed else None
        self.module = acc.unwrap_model(self.model)
        self.lr_ctl = LRController(cfg)
        self.named_params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.ema = None
        if cfg.trainer.ema.enabled:
            e = cfg.trainer.ema
            self.ema = ShardedEMA(self.named_params, e.decay, e.start_step, e.update_every)
        # Per-rank seeds for everything stochastic after initialisation.
        rank_seed = cfg.training.seed * 1_000_003 + self.rank
        random.seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        torch.manual_seed(rank_seed)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(rank_seed)

        self.train_stream = wrap_stream(self.data_factory(cfg, "train", self.rank, self.world))
        self.val_stream = None
        self.recon_batch: dict | None = None
        self.eval_model = None

        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        if self.is_main:
            self._write_run_files()
        self.ids_fh = None
        if cfg.trainer.record_sample_ids:
            self.ids_fh = _open_step_log(self.run_dir / "logs" / f"samples_rank_{self.rank:05d}.jsonl", self.step)
        acc.wait_for_everyone()
        if self.is_main and cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events after the resumed step that a killed run had logged.
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step or None)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs")
        self.wandb = None
        if self.is_main and cfg.logging.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                        dir=str(self.run_dir), config=to_dict(cfg), resume="allow")
            except ImportError:
                log.warning("logging.wandb is true but wandb is not installed; TensorBoard only")

    def _log_rank_table(self, local_rank: int) -> None:
        """Every rank reports rank/local rank/node/address once; rank 0 logs and saves the table."""
        row = rank_row(self.rank, self.world, local_rank, self.threads.count)
        rows = [row]
        if self.ctrl_group is not None:
            rows = [None] * self.world
            dist.all_gather_object(rows, row, group=self.ctrl_group)
        log.info(f"rank {self.rank}: local rank {local_rank}, node {row['node_rank']}, addr {row['addr']}")
        if self.is_main:
            log.info("rank table\n" + format_rank_table(rows))
            (self.run_dir / "ranks.json").write_text(json.dumps(rows, indent=1))

    def _setup_logging(self) -> None:
        logdir = self.run_dir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        log.setLevel(logging.INFO)
        log.propagate = False
        for h in list(log.handlers):
            log.removeHandler(h)
        fmt = logging.Formatter(f"%(asctime)s [rank {self.rank}] %(levelname)s %(message)s")
        fh = logging.FileHandler(logdir / f"rank_{self.rank:05d}.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        sh.setLevel(logging.INFO if self.is_main else logging.WARNING)
        log.addHandler(sh)

    def _write_run_files(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        text = to_yaml(self.cfg)
        if not cfg_path.exists():
            tmp = cfg_path.with_suffix(".yaml.part")
            tmp.write_text(text)
            os.replace(tmp, cfg_path)
        elif cfg_path.read_text() != text:
            # A requeued run with changed settings: keep the original, record the new one.
            (self.run_dir / f"config.step_{self.step:08d}.yaml").write_text(text)
        self.steps_fh = _open_step_log(self.run_dir / "steps.jsonl", self.step)

    # ================================================================== resume

    def _find_resume(self) -> Path | None:
        mode = self.cfg.trainer.resume
        path: Path | None = None
        if self.is_main:
            ckpt.remove_stale_temporaries(self.ckpt_root)
            if mode == "auto":
                path = ckpt.latest_complete(self.ckpt_root, warn=log.warning)
            elif mode not in ("none", "", None):
                path = Path(mode)
                why = ckpt.check_complete(path)
                if why is not None:
                    raise ConfigError(f"trainer.resume = {mode!r}: cannot use this checkpoint: {why}")
            elif ckpt.list_checkpoints(self.ckpt_root):
                log.warning(f"trainer.resume=none but {self.ckpt_root} holds checkpoints: starting "
                            "from step 0 and overwriting them as the run goes")
        obj = [str(path) if path else None]
        if self.world > 1:
            dist.broadcast_object_list(obj, src=0, group=self.ctrl_group)
        return Path(obj[0]) if obj[0] else None

    def _load_checkpoint(self, path: Path) -> None:
        man = ckpt.read_manifest(path)
        mine = {"world_size": self.world, "distributed": self.cfg.trainer.distributed,
                "zero_stage": self.zero_stage}
        for key, value in mine.items():
            if man.get(key) != value:
                raise ConfigError(
                    f"checkpoint {path} was written with {key} = {man.get(key)}, this run has {key} = "
                    f"{value}: resuming would not continue exactly (data positions and RNG are per rank). "
                    "Start a new run_dir with model.load_checkpoint=<that checkpoint> to warm start instead.")
        state = json.loads((path / "trainer_state.json").read_text())
        if self.deepspeed:
            load_path, _ = self.engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                                       load_lr_scheduler_states=False, load_module_strict=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {path}/deepspeed")
        else:
            from safetensors.torch import load_file

            load_model_weights(self.module, load_file(str(path / "model.safetensors")), str(path))
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu",
                                                      weights_only=False))
        if self.ema is not None:
            from safetensors.torch import load_file

            f = path / (f"ema_rank_{self.rank:05d}.safetensors" if self.ema.sharded else "ema.safetensors")
            if f.exists():
                self.ema.load_local_state(load_file(str(f)))
            else:
                log.warning(f"{path} has no EMA state ({f.name}); EMA restarts from the current weights")
                self.ema.update(0)
        rank_state = torch.load(path / f"rank_{self.rank:05d}.pt", map_location="cpu", weights_only=False)
        random.setstate(rank_state["python_rng"])
        np.random.set_state(rank_state["numpy_rng"])
        torch.set_rng_state(rank_state["torch_rng"])
        if torch.cuda.is_available() and rank_state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(rank_state["cuda_rng"], self.device)
        self.gen.set_state(rank_state["loss_generator"].to(self.gen.get_state().device))
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state.get("samples_seen", 0))
        self.lr_ctl.load_state_dict(state["lr_controller"])
        self.train_stream.set_epoch(self.epoch)
        self.train_stream.load_state_dict(rank_state["data"])
        log.info(f"resumed from {path}: step {self.step}, epoch {self.epoch}")

    # ================================================================== checkpoint

    def save_checkpoint(self, data_states: dict) -> Path:
        """Collective. `data_states` is this rank's stream position for the saved step."""
        self._flush_logs()  # raises on a non-finite loss before anything is written
        acc = self.accelerator
        tmp = ckpt.tmp_dir_for(self.ckpt_root, self.step)
        final = self.ckpt_root / ckpt.step_dir_name(self.step)
        if self.is_main:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        from safetensors.torch import save_file

        if self.deepspeed:
            self.engine.save_checkpoint(str(tmp), tag="deepspeed", client_state={}, save_latest=False)
        elif self.is_main:
            sd = {k: v.detach().float().cpu().contiguous() for k, v in self.module.state_dict().items()}
            save_file(sd, str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        if self.ema is not None and (self.ema.sharded or self.is_main):
            name = f"ema_rank_{self.rank:05d}.safetensors" if self.ema.sharded else "ema.safetensors"
            save_file(self.ema.local_state(), str(tmp / name), metadata=self.ema.shard_metadata())
        rank_state = {
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if torch.cuda.is_available() else None,
            "loss_generator": self.gen.get_state(),
            "data": data_states,
            "rank": self.rank,
        }
        torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        if self.is_main:
            state = {"step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen,
                     "lr_controller": self.lr_ctl.state_dict(), "world_size": self.world,
                     "config": to_dict(self.cfg)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        acc.wait_for_everyone()
        if self.is_main:
            meta = {"step": self.step, "epoch": self.epoch, "world_size": self.world,
                    "distributed": self.cfg.trainer.distributed, "zero_stage": self.zero_stage,
                    "ema": self.ema is not None, "ema_sharded": bool(self.ema and self.ema.sharded)}
            ckpt.write_manifest_and_publish(tmp, final, meta)
            for d in ckpt.prune(self.ckpt_root, self.cfg.trainer.keep_last_checkpoints):
                log.info(f"removed old checkpoint {d}")
            log.info(f"checkpoint {final}")
        acc.wait_for_everyone()
        self._last_ckpt_step = self.step
        return final

    # ================================================================== full weights

    @torch.no_grad()
    def full_state_dict(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """Full fp32 weights on every rank (collective under ZeRO-3)."""
        if use_ema and self.ema is not None:
            return {k: v.float() for k, v in self.ema.full_state_dict().items()}
        params = [p for _, p in self.named_params]
        if any(is_zero3_param(p) for p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {n: p.detach().float().clone() for n, p in self.named_params}
        return {n: p.detach().float().clone() for n, p in self.named_params}

    def _eval_replica(self, use_ema: bool) -> torch.nn.Module:
        """An unsharded, unwrapped fp32 copy for validation (no collectives inside forward)."""
        sd = self.full_state_dict(use_ema)
        if self.eval_model is None:
            self.eval_model = build_model(self.cfg).to(self.device).eval()
            self.eval_model.requires_grad_(False)
        load_model_weights(self.eval_model, sd, "the training replica")
        return self.eval_model

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ================================================================== validation

    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        acc = self.accelerator
        use_ema = self.ema is not None and cfg.trainer.ema.evaluate_with_ema
        model = self._eval_replica(use_ema)
        if self.val_stream is None:
            self.val_stream = wrap_stream(self.data_factory(cfg, "val", self.rank, self.world))
        self.val_stream.set_epoch(0)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(cfg.training.seed * 7919 + self.rank)  # same draws at every validation
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        with torch.no_grad():
            for i, batch in enumerate(self.val_stream):
                if i >= cfg.trainer.limit_val_batches:
                    break
                if i == 0 and self.recon_batch is None and self.is_main:
                    n = cfg.training.validation_sampling.max_full_reconstruction_samples
                    self.recon_batch = slice_batch(batch, n)
                dev = to_device(batch, self.device)
                with self._autocast():
                    loss, _ = model.loss(dev, generator=gen)
                total += loss.float()
                count += 1
        if self.world > 1:
            both = torch.stack([total, count])
            dist.all_reduce(both)
            total, count = both[0], both[1]
        val_loss = float(total / count.clamp_min(1)) if float(count) > 0 else float("nan")
        metrics = {"val/loss": val_loss,
                   "val/loss_ckpt": val_loss if np.isfinite(val_loss) else LOSS_CKPT_NONFINITE,
                   "val/batches": float(count)}
        if cfg.trainer.full_reconstruction and self.is_main and self.recon_batch is not None:
            vs = cfg.training.validation_sampling
            ambient = cfg.model.ambient_occlusion.enabled
            rgen = torch.Generator(device=self.device)
            rgen.manual_seed(cfg.training.seed + 17)
            dev = to_device(self.recon_batch, self.device)
            t0 = time.perf_counter()
            try:
                with self._autocast():
                    rec = reconstruct(model, dev, ambient=ambient, sampler=vs.sampler,
                                      log_intermediates=vs.log_intermediates, generator=rgen)
                for k, v in rec["metrics"].items():
                    metrics[f"val/{k}"] = v
                for k, v in enumerate(rec["profile"]["mae"]):
                    metrics[f"val_absolute_band_error/recon_l1_generated_deg_band_{k}"] = float(v)
                for k, v in enumerate(rec["profile"]["rmse"]):
                    metrics[f"val_band_rmse/recon_rmse_generated_deg_band_{k}"] = float(v)
                figs = figures({k: v for k, v in dev.items()}, rec, self.run_dir / "val", self.step,
                               ambient=ambient, log_intermediates=vs.log_intermediates)
                if self.tb is not None:
                    for tag, fig in figs.items():
                        self.tb.add_figure(tag, fig, self.step)
                import matplotlib.pyplot as plt

                for fig in figs.values():
                    plt.close(fig)
            except Exception as exc:  # SPEC 8.1: a failed reconstruction logs placeholders
                log.exception(f"full reconstruction failed at step {self.step}: {exc}")
                for k in ("recon_mse_full_recon", "recon_psnr_full_recon", "recon_ssim_full_recon"):
                    metrics[f"val/{k}"] = 0.0
            metrics["val/recon_seconds"] = time.perf_counter() - t0
        acc.wait_for_everyone()
        # The plateau monitor must be the same on every rank (reconstruction metrics exist on
        # rank 0 only): rank 0's value is broadcast.
        monitor = cfg.scheduler.reduce_on_plateau.monitor
        value = torch.tensor([metrics.get(monitor, metrics["val/loss_ckpt"])], dtype=torch.float64)
        if self.world > 1:
            dist.broadcast(value, src=0, group=self.ctrl_group)
        reduced = self.lr_ctl.plateau_step(float(value))
        if reduced:
            log.info(f"ReduceLROnPlateau: lr now {self.lr_ctl.plateau_lr:g}")
        if self.is_main:
            self._log_scalars(metrics, self.step)
            log.info("validation step %d: %s", self.step,
                     ", ".join(f"{k}={v:.5g}" for k, v in metrics.items() if not k.startswith(("val_absolute", "val_band"))))
        return metrics

    # ================================================================== logging

    def _log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def _flush_logs(self) -> None:
        """Bring the pending per-step logs to the host (one sync), check them, write them."""
        pending, self._pending = self._pending, []
        if not pending and self.world == 1:
            return
        keys = sorted(pending[0].extras) if pending else []
        n = len(pending)
        if n:
            local = torch.stack([p.loss.float() for p in pending])
            rows = [local] + [torch.stack([p.extras[k].float() for p in pending]) for k in keys]
            packed = torch.stack(rows)  # (1 + len(keys), n)
        else:
            packed = torch.zeros((1, 0), device=self.device)
        reduced = packed.clone()
        # Every rank reaches this point after the same steps, so the shapes agree.
        if self.world > 1:
            dist.all_reduce(reduced)
            reduced /= self.world
        norms = [p.grad_norm for p in pending if p.grad_norm is not None]
        norm_host = torch.stack(norms).float().cpu().tolist() if norms else []
        host_local = packed[0].cpu().tolist()
        host_red = reduced.cpu().tolist()
        bad_local = next((i for i, v in enumerate(host_local) if not np.isfinite(v)), n)
        first_bad = bad_local
        if self.world > 1:
            t = torch.tensor([bad_local], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.ctrl_group)
            first_bad = int(t)
        if first_bad < n:
            step = pending[first_bad].step
            mine = pending[first_bad].ids if bad_local == first_bad else []
            gathered: list = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(gathered, (self.rank, mine, host_local[first_bad]), group=self.ctrl_group)
            else:
                gathered = [(0, mine, host_local[first_bad])]
            ids = {r: i for r, i, v in gathered if not np.isfinite(v)}
            value = next(v for _, _, v in gathered if not np.isfinite(v))
            raise NonFiniteLossError(step, ids, value)
        if self.ids_fh is not None and n:
            self.ids_fh.write("".join(json.dumps({"step": p.step, "ids": p.ids}) + "\n" for p in pending))
            self.ids_fh.flush()
        if not self.is_main or not n:
            return
        now = time.perf_counter()
        span = now - self._window_t0
        steps_in_window = max(1, self.step - self._window_step0)
        perf = {
            "perf/step_time_s": span / steps_in_window,
            "perf/samples_per_s": self._window_samples / span if span > 0 else float("nan"),
            "perf/data_wait_s_per_step": self._window_wait / steps_in_window,
            "perf/data_wait_fraction": self._window_wait / span if span > 0 else float("nan"),
            "perf/peak_mem_gib": _peak_mem_gib(self.device),
        }
        self._window_t0, self._window_step0 = now, self.step
        self._window_samples, self._window_wait = 0, 0.0
        for i, p in enumerate(pending):
            rec: dict[str, Any] = {"step": p.step, "loss": host_red[0][i], "lr": p.lr, "epoch": self.epoch}
            for j, k in enumerate(keys):
                rec[k] = host_red[j + 1][i]
            if i < len(norm_host):
                rec["grad_norm"] = norm_host[i]
            if i == n - 1:
                rec.update({k.split("/")[1]: v for k, v in perf.items()})
            self.steps_fh.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                self.tb.add_scalar("train/loss", rec["loss"], p.step)
                self.tb.add_scalar("train/lr", p.lr, p.step)
                for k in keys:
                    self.tb.add_scalar(f"train/{k}", rec[k], p.step)
                if "grad_norm" in rec:
                    self.tb.add_scalar("train/grad_norm", rec["grad_norm"], p.step)
        self.steps_fh.flush()
        self._log_scalars(perf, pending[-1].step)
        if self.wandb is not None:
            self.wandb.log({"train/loss": host_red[0][-1]}, step=pending[-1].step)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{host_red[0][-1]:.4g}", sps=f"{perf['perf/samples_per_s']:.1f}")

    # ================================================================== loop

    def _reset_window(self) -> None:
        """Throughput windows exclude validation and checkpoint time."""
        self._window_t0, self._window_step0 = time.perf_counter(), self.step
        self._window_samples, self._window_wait = 0, 0.0

    def _agree(self, stop: bool, exhausted: bool) -> tuple[bool, bool]:
        if self.world == 1:
            return stop, exhausted
        t = torch.tensor([int(stop), int(exhausted)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl_group)
        return bool(t[0]), bool(t[1])

    def _fetch(self, it) -> tuple[list[dict], bool]:
        batches = []
        t0 = time.perf_counter()
        for _ in range(self.cfg.trainer.gradient_accumulation_steps):
            try:
                batches.append(next(it))
            except StopIteration:
                self._window_wait += time.perf_counter() - t0
                return batches, True
        self._window_wait += time.perf_counter() - t0
        return batches, False

    def _train_step(self, batches: list[dict]) -> None:
        acc = self.accelerator
        lr = self.lr_ctl.apply(self.optimizer, self.step)
        losses, extras_acc = [], {}
        ids: list = []
        # Accelerate's accumulate() counts micro-batches: restart the count for each optimizer
        # step so the last micro-batch of the step is the one that synchronises gradients.
        acc.step = 0
        grad_norm = None
        for mb in batches:
            ids.extend(sample_ids(mb))
            dev = to_device(mb, self.device)
            with acc.accumulate(self.model):
                with self._autocast() if self.deepspeed else nullcontext():
                    loss, logs = self.model(dev, generator=self.gen)
                acc.backward(loss)
                if acc.sync_gradients and not self.deepspeed:
                    if self.cfg.trainer.gradient_clip_val > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.gradient_clip_val)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            for k, v in logs.items():
                if k != "loss":
                    extras_acc.setdefault(k, []).append(v.detach())
        self.step += 1
        n = sum(int(b["x"].shape[0]) for b in batches)
        self.samples_seen += n * self.world
        self._window_samples += n * self.world
        if self.ema is not None:
            self.ema.update(self.step)
        self._pending.append(_Pending(
            self.step, torch.stack(losses).float().mean(),
            {k: torch.stack(v).float().mean() for k, v in extras_acc.items()},
            grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else None, lr, ids))

    def _install_signals(self) -> dict:
        def handler(signum, frame):  # noqa: ARG001 - signal API
            self._stop_signal = signum

        old = {}
        for s in (signal.SIGUSR1, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, handler)
            except ValueError:
                pass  # not the main thread (e.g. some notebook runners): no signal handling
        return old

    def fit(self) -> int:
        """Train to trainer.max_steps (0) or until a stop signal (75, after a checkpoint)."""
        # Handlers first: a preemption signal during the (slow) start-up is kept, not fatal, and
        # honoured at the first step boundary.
        old_handlers = self._install_signals()
        self.pbar = None
        try:
            self._setup()
            cfg = self.cfg
            if self.is_main and cfg.trainer.progress_bar and sys.stderr.isatty():
                from tqdm import tqdm

                self.pbar = tqdm(total=cfg.trainer.max_steps, initial=self.step, desc="train",
                                 dynamic_ncols=True)
            self._reset_window()
            self._last_ckpt_step = self.step if self.resume_from is not None else -1
            return self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self.pbar is not None:
                self.pbar.close()
            if getattr(self, "ids_fh", None):
                self.ids_fh.close()
            if getattr(self, "is_main", False):  # _setup may have failed before it was known
                if getattr(self, "steps_fh", None):
                    self.steps_fh.close()
                if self.tb is not None:
                    self.tb.close()

    def _loop(self) -> int:
        cfg = self.cfg
        tr = cfg.trainer
        if self.resume_from is None:
            self.train_stream.set_epoch(self.epoch)
        it = iter(self.train_stream)
        self._steps_in_epoch, self._empty_epochs = 0, 0
        while self.step < tr.max_steps:
            before = self.train_stream.state_dict()
            batches, exhausted = self._fetch(it)
            stop, exhausted = self._agree(self._stop_signal is not None, exhausted)
            if stop:
                log.warning(f"stop requested (signal {self._stop_signal}) at step {self.step}: "
                            "checkpointing and exiting with code 75")
                if self._last_ckpt_step != self.step:
                    # The batches just fetched were not trained on: save the position before them.
                    self.save_checkpoint(before)
                else:
                    self._flush_logs()
                return EXIT_PREEMPTED
            if exhausted:
                self._empty_epochs = 0 if self._steps_in_epoch else self._empty_epochs + 1
                if self._empty_epochs >= 2:  # 1 is legal: resumed exactly at an epoch's end
                    raise RuntimeError(f"the training stream yielded too few batches for one optimizer "
                                       f"step ({tr.gradient_accumulation_steps} micro-batches) in epoch "
                                       f"{self.epoch}, on at least one rank")
                self._flush_logs()
                if tr.val_at_epoch_end:
                    self.validate()
                    self._reset_window()
                self.epoch += 1
                if self.epoch >= tr.max_epochs:
                    log.info(f"reached trainer.max_epochs = {tr.max_epochs}")
                    break
                self.train_stream.set_epoch(self.epoch)
                it = iter(self.train_stream)
                self._steps_in_epoch = 0
                continue
            self._train_step(batches)
            self._steps_in_epoch += 1
            if self.pbar is not None:
                self.pbar.update(1)
            if "after_step" in self.hooks:
                self.hooks["after_step"](self)
            if self.step % tr.log_every_n_steps == 0:
                self._flush_logs()
            if self.step % tr.val_every_n_steps == 0:
                self._flush_logs()
                self.validate()
                self._reset_window()
            if self.step % tr.checkpoint_every_n_steps == 0 and self.step < tr.max_steps:
                self.save_checkpoint(self.train_stream.state_dict())
                self._reset_window()
        if self._last_ckpt_step != self.step:
            self.save_checkpoint(self.train_stream.state_dict())
        else:
            self._flush_logs()
        log.info(f"finished at step {self.step} (epoch {self.epoch})")
        return EXIT_OK


def _peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
