"""The training loop: Accelerate (+ DeepSpeed ZeRO), EMA, validation, atomic checkpoints, resume,
preemption by signal, and failure on a non-finite loss.

The Trainer wires four components and owns only the loop: `TrainState` (what a checkpoint holds
and putting it back), `StepLog` (per-step logs, the non-finite check, steps.jsonl, TensorBoard),
`Validator` (validation loss and the reconstruction shared over the ranks) and the `StopSignals` flag.

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
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.checkpoint.weights import load_weights
from depthdif_hpc.config import Config, to_yaml
from depthdif_hpc.launch_env import (
    apply_threads,
    format_rank_table,
    rank_row,
    resolve_dist_env,
    resolve_threads,
)
from depthdif_hpc.model.build import build_model
from depthdif_hpc.model.flops import peak_flops, train_step_flops_per_sample
from depthdif_hpc.train.ema import ShardedEMA, is_zero3_param
from depthdif_hpc.train.optim import LRController, build_optimizer
from depthdif_hpc.train.setup import apply_speed_options, make_accelerator
from depthdif_hpc.train.state import Progress, TrainState, find_resume
from depthdif_hpc.train.steplog import StepLog, StepRecord
from depthdif_hpc.train.stream import (
    DataFactory,
    default_data_factory,
    sample_ids,
    to_device,
    wrap_stream,
)
from depthdif_hpc.train.validation import Validator

log = logging.getLogger("depthdif_hpc.train")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, please requeue


class StopSignals:
    """SIGUSR1 (SLURM's --signal) and SIGTERM (preemption, scancel) set `signum`; the loop
    checkpoints at the next step boundary and exits 75.

    Used as a context manager around the Trainer's construction too: a preemption during the
    (slow) start-up is kept, not fatal, and honoured at the first step boundary.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002 - signal API
        self.signum = signum

    def __enter__(self) -> StopSignals:
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:
                pass  # not the main thread (e.g. some notebook runners): no signal handling
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def _setup_logging(run_dir: Path, rank: int) -> None:
    """Rank log file for the package's loggers; rank 0 also echoes INFO to stderr."""
    logdir = run_dir / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("depthdif_hpc")
    root.setLevel(logging.INFO)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    fh = logging.FileHandler(logdir / f"rank_{rank:05d}.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(sh)


class Trainer:
    """Builds everything at construction (collective: every rank constructs its Trainer), then
    `fit()` trains to trainer.max_steps (returns 0) or until a stop signal (75, after a checkpoint)."""

    def __init__(self, cfg: Config, *, stop: StopSignals | None = None,
                 data_factory: DataFactory | None = None,
                 hooks: dict[str, Callable[[Trainer], Any]] | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or StopSignals()  # not entered: never set, the run ends at max_steps
        self.hooks = hooks or {}
        self.run_dir = Path(cfg.trainer.run_dir)
        self.ckpt_root = self.run_dir / layout.CHECKPOINTS
        self.progress = Progress()

        # ---- processes, threads, precision
        env = resolve_dist_env()
        omp_before = os.environ.get("OMP_NUM_THREADS")
        self.threads = resolve_threads(cfg.trainer.intra_op_threads)
        apply_threads(self.threads)  # before the Accelerator: it sets its own count when unset
        if torch.cuda.is_available():
            # TF32 on GPUs; on CPU "high" may route fp32 through reduced-precision oneDNN paths,
            # which would break the fp32 exactness the CPU tests rely on.
            torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
        self.accelerator, self.precision, self.ds_config = make_accelerator(cfg, env.world_size)
        acc = self.accelerator
        self.rank: int = acc.process_index
        self.world: int = acc.num_processes
        self.is_main: bool = acc.is_main_process
        self.device: torch.device = acc.device
        self.deepspeed = cfg.trainer.distributed == "deepspeed"
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0)) if self.ds_config else 0
        _setup_logging(self.run_dir, self.rank)
        # Flags agreed on by all ranks each step travel on a CPU group: no GPU stream sync.
        self.ctrl_group: Any = None
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            self.ctrl_group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
                               if dist.get_backend() != "gloo" else dist.group.WORLD)
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            layout.clear_stopped(self.run_dir)  # a marker of an earlier attempt must not requeue
        acc.wait_for_everyone()
        log.info(f"intra-op threads: {self.threads.count} ({self.threads.source}; OMP_NUM_THREADS was "
                 f"{omp_before if omp_before is not None else 'unset'})")
        self._log_rank_table(env.local_rank)

        # ---- model, optimizer, EMA (same initial weights on every rank)
        torch.manual_seed(cfg.training.seed)
        model = build_model(cfg)
        # Counted on the whole model before ZeRO partitions it; MFU logs use this one number.
        tile = cfg.dataset.grid.tile_size
        self.flops_per_sample = train_step_flops_per_sample(model, tile, tile)
        self.peak_flops = self._peak_flops()
        log.info(f"model: {self.flops_per_sample / 1e9:.2f} GFLOP per training sample at {tile}x{tile} "
                 f"(forward + backward, docs/model.md#flops); peak "
                 + (f"{self.peak_flops / 1e12:.1f} TFLOP/s per device" if self.peak_flops else
                    "unknown for this device (no MFU)"))
        self.resume_from = find_resume(cfg, self.ckpt_root, is_main=self.is_main, world=self.world,
                                       group=self.ctrl_group)
        if self.resume_from is None and cfg.model.load_checkpoint:
            note = load_weights(model, cfg.model.load_checkpoint)
            log.info(f"warm start: weights from {cfg.model.load_checkpoint}" + (f" ({note})" if note else ""))
        log.info("speed options: " + apply_speed_options(model, cfg, self.zero_stage))
        self.model, self.optimizer = acc.prepare(model, build_optimizer(model, cfg))
        self.engine = self.model if self.deepspeed else None
        self.module: torch.nn.Module = acc.unwrap_model(self.model)
        self.lr_ctl = LRController(cfg)
        self.named_params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        e = cfg.trainer.ema
        self.ema = (ShardedEMA(self.named_params, e.decay, e.start_step, e.update_every, e.warmup)
                    if e.enabled else None)

        # ---- per-rank randomness and data (seeds for everything stochastic after initialisation)
        rank_seed = cfg.training.seed * 1_000_003 + self.rank
        random.seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        torch.manual_seed(rank_seed)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(rank_seed)
        data_factory = data_factory or default_data_factory
        self.train_stream = wrap_stream(data_factory(cfg, "train", self.rank, self.world))

        # ---- components
        self.state = TrainState(cfg, self.ckpt_root, accelerator=acc, rank=self.rank, world=self.world,
                                zero_stage=self.zero_stage, module=self.module, engine=self.engine,
                                optimizer=self.optimizer, ema=self.ema, generator=self.gen, lr_ctl=self.lr_ctl,
                                group=self.ctrl_group)
        resumed = None
        if self.resume_from is not None:
            resumed = self.state.load(self.resume_from, self.progress, self.train_stream)
        else:
            self.train_stream.set_epoch(self.progress.epoch)
        if self.is_main:
            self._write_run_config()
        acc.wait_for_everyone()
        self.steplog = StepLog(cfg, self.run_dir, rank=self.rank, world=self.world, device=self.device,
                               ctrl_group=self.ctrl_group, step=self.progress.step,
                               flops_per_sample=self.flops_per_sample, peak_flops=self.peak_flops)
        self.validator = Validator(
            cfg, rank=self.rank, world=self.world, device=self.device, ctrl_group=self.ctrl_group,
            data_factory=data_factory, full_weights=self.full_state_dict, autocast=self._autocast,
            lr_ctl=self.lr_ctl, steplog=self.steplog, barrier=acc.wait_for_everyone,
            out_dir=self.run_dir / "val", use_ema=self.ema is not None and e.evaluate_with_ema,
            stop_requested=lambda: self.stop.signum is not None)

        # ---- loop bookkeeping
        self.last_ckpt_step = self.progress.step if self.resume_from is not None else -1
        # The latest validation's checkpoint-selection loss, recorded in the next manifest.
        self.last_val_loss: float | None = resumed.get("val_loss") if resumed else None
        self.steps_in_epoch = 0
        self.empty_epochs = 0

    @property
    def step(self) -> int:
        return self.progress.step

    def close(self) -> None:
        self.steplog.close()
        if hasattr(self.train_stream, "close"):
            self.train_stream.close()  # persistent loader workers stop now, not at exit

    # ================================================================== start-up records

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

    def _write_run_config(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        text = to_yaml(self.cfg)
        if not cfg_path.exists():
            tmp = cfg_path.with_suffix(".yaml.part")
            tmp.write_text(text)
            os.replace(tmp, cfg_path)
        elif cfg_path.read_text() != text:
            # A requeued run with changed settings: keep the original, record the new one.
            (self.run_dir / f"config.step_{self.step:08d}.yaml").write_text(text)

    # ================================================================== weights

    @torch.no_grad()
    def full_state_dict(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """Full fp32 weights on every rank (collective under ZeRO-3)."""
        if use_ema and self.ema is not None:
            return {k: v.float() for k, v in self.ema.full_state_dict().items()}
        params = [p for _, p in self.named_params]
        if any(is_zero3_param(p) for p in params):
            import deepspeed
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

            # Only what is partitioned now: persistent parameters (small ones ZeRO-3 keeps whole
            # between steps) would be partitioned at the exit too, and after a resume the next
            # step then fails DeepSpeed's recorded fetch order ("tracing error").
            parted = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
            with deepspeed.zero.GatheredParameters(parted, modifier_rank=None):
                return {n: p.detach().float().clone() for n, p in self.named_params}
        return {n: p.detach().float().clone() for n, p in self.named_params}

    def _peak_flops(self) -> float | None:
        """Dense peak of one device for the dtype the matmuls run in (None off known GPUs)."""
        if self.device.type != "cuda":
            return None
        if self.precision == "bf16":
            kind = "bf16"
        else:
            kind = "fp32" if self.cfg.trainer.matmul_precision == "highest" else "tf32"
        return peak_flops(torch.cuda.get_device_name(self.device), kind)

    def _autocast(self) -> AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ================================================================== steps

    def save_checkpoint(self, data_state: dict) -> Path:
        """Collective. `data_state` is this rank's stream position for the saved step."""
        self.steplog.flush(self.step, self.progress.epoch)  # raises on a non-finite loss first
        final = self.state.save(self.progress, data_state, val_loss=self.last_val_loss)
        self.last_ckpt_step = self.step
        return final

    def validate(self) -> dict[str, float] | None:
        """Validation metrics; None when a stop request abandoned it (the loop then checkpoints)."""
        metrics = self.validator.run(self.step)
        if metrics is not None:
            self.last_val_loss = metrics["val/loss_ckpt"]
        return metrics

    def _agree(self, stop: bool, exhausted: bool) -> tuple[bool, bool]:
        if self.world == 1:
            return stop, exhausted
        t = torch.tensor([int(stop), int(exhausted)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.ctrl_group)
        return bool(t[0]), bool(t[1])

    def _fetch(self, it: Iterator[dict]) -> tuple[list[dict], bool]:
        batches = []
        exhausted = False
        with self.steplog.waiting():
            for _ in range(self.cfg.trainer.gradient_accumulation_steps):
                try:
                    batches.append(next(it))
                except StopIteration:
                    exhausted = True
                    break
        return batches, exhausted

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
                # Under DeepSpeed the engine enters bf16 autocast itself (train/setup.py's
                # _torch_autocast); under DDP Accelerate wraps the forward.
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
        self.progress.step += 1
        n = sum(int(b["x"].shape[0]) for b in batches) * self.world
        area = int(batches[0]["x"].shape[-2] * batches[0]["x"].shape[-1])
        self.progress.samples_seen += n
        # DeepSpeed skips the update of a step with non-finite gradients: nothing to average in.
        applied = self.engine.was_step_applied() if self.engine is not None else True
        if self.ema is not None and applied:
            self.ema.update(self.step)
        self.steplog.record(StepRecord(
            self.step, torch.stack(losses).float().mean(),
            {k: torch.stack(v).float().mean() for k, v in extras_acc.items()},
            grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else None, lr, ids), n, area)

    # ================================================================== loop

    def fit(self) -> int:
        """Train to trainer.max_steps (0) or until a stop signal (75, after a checkpoint)."""
        tr = self.cfg.trainer
        self.steplog.reset_window(self.step)
        it = iter(self.train_stream)
        while self.step < tr.max_steps:
            before = self.train_stream.state_dict()
            batches, exhausted = self._fetch(it)
            stop, exhausted = self._agree(self.stop.signum is not None, exhausted)
            if stop:
                # Ranks agree on the stop: a rank whose own signal has not arrived yet stops too.
                why = (f"signal {self.stop.signum}" if self.stop.signum is not None
                       else "signal on another rank")
                log.warning(f"stop requested ({why}) at step {self.step}: "
                            "checkpointing and exiting with code 75")
                if self.last_ckpt_step != self.step:
                    # The batches just fetched were not trained on: save the position before them.
                    self.save_checkpoint(before)
                else:
                    self.steplog.flush(self.step, self.progress.epoch)
                if self.is_main:
                    layout.mark_stopped(self.run_dir, {
                        "step": self.step, "signal": self.stop.signum,
                        "checkpoint": layout.step_dir_name(self.step),
                        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")})
                return EXIT_PREEMPTED
            if exhausted:
                it = self._next_epoch()
                if it is None:
                    break
                continue
            self._train_step(batches)
            self.steps_in_epoch += 1
            if "after_step" in self.hooks:
                self.hooks["after_step"](self)
            if self.step % tr.log_every_n_steps == 0:
                self.steplog.flush(self.step, self.progress.epoch)
            if self.step % tr.val_every_n_steps == 0:
                self.steplog.flush(self.step, self.progress.epoch)
                self.validate()
                self.steplog.reset_window(self.step)
            if self.step % tr.checkpoint_every_n_steps == 0 and self.step < tr.max_steps:
                self.save_checkpoint(self.train_stream.state_dict())
                self.steplog.reset_window(self.step)
        if self.last_ckpt_step != self.step:
            self.save_checkpoint(self.train_stream.state_dict())
        else:
            self.steplog.flush(self.step, self.progress.epoch)
        log.info(f"finished at step {self.step} (epoch {self.progress.epoch})")
        return EXIT_OK

    def _next_epoch(self) -> Iterator[dict] | None:
        """End of the epoch's data on some rank: validate, start the next epoch (None: done)."""
        tr = self.cfg.trainer
        self.empty_epochs = 0 if self.steps_in_epoch else self.empty_epochs + 1
        if self.empty_epochs >= 2:  # 1 is legal: resumed exactly at an epoch's end
            raise RuntimeError(f"the training stream yielded too few batches for one optimizer "
                               f"step ({tr.gradient_accumulation_steps} micro-batches) in epoch "
                               f"{self.progress.epoch}, on at least one rank")
        self.steplog.flush(self.step, self.progress.epoch)
        if tr.val_at_epoch_end:
            self.validate()
            self.steplog.reset_window(self.step)
        self.progress.epoch += 1
        if self.progress.epoch >= tr.max_epochs:
            log.info(f"reached trainer.max_epochs = {tr.max_epochs}")
            return None
        self.train_stream.set_epoch(self.progress.epoch)
        self.steps_in_epoch = 0
        return iter(self.train_stream)
