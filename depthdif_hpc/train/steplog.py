"""The step-log book: per-step training logs kept on the device, brought to the host together (one
sync every `trainer.log_every_n_steps` steps and before every checkpoint), checked for a
non-finite loss, then written to steps.jsonl, the per-rank sample audit, TensorBoard, wandb and
the progress bar, with throughput over the window since the last flush.

The files are trimmed on resume to the resumed step, so each step appears once in them however
often a run was killed and requeued.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from depthdif_hpc.config import Config, to_dict

log = logging.getLogger("depthdif_hpc.train")

STEP_LOG = "steps.jsonl"


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, ids_by_rank: dict[int, list], value: float) -> None:
        self.step, self.ids_by_rank, self.value = step, ids_by_rank, value
        super().__init__(f"non-finite training loss ({value}) at optimizer step {step}; sample ids of "
                         f"that step's batches by rank: {ids_by_rank}. Nothing was saved after the "
                         "last complete checkpoint.")


@dataclass
class StepRecord:
    """One optimizer step's logs, still on the device."""

    step: int
    loss: torch.Tensor
    extras: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    lr: float
    ids: list


def open_step_log(path: Path, step: int) -> TextIO:
    """Open a one-line-per-step JSON log for appending, first dropping the lines of steps after
    `step` (the resumed checkpoint): a hard kill may have logged steps it never saved."""
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


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StepLog:
    """Collective `flush`: every rank calls it after the same steps."""

    def __init__(self, cfg: Config, run_dir: Path, *, rank: int, world: int, device: torch.device,
                 ctrl_group: Any, step: int, flops_per_sample: int = 0,
                 peak_flops: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world, self.device, self.ctrl_group = rank, world, device, ctrl_group
        self.is_main = rank == 0
        self.pending: list[StepRecord] = []
        # Training FLOPs of one sample at the configured tile (depthdif_hpc.model.flops), the
        # device's dense peak, and the batch area they were counted for (checked at first record).
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.flops_area: int | None = cfg.dataset.grid.tile_size ** 2
        self._files = ExitStack()
        self.steps_fh: TextIO | None = None
        self.ids_fh: TextIO | None = None
        self.tb: Any = None
        self.wandb: Any = None
        self.pbar: Any = None
        # Seconds, monotonic; the window's wall time and its data wait are read from it alone
        # (tests drive it by hand).
        self.clock = clock
        self.window_t0 = clock()
        self.window_step0 = step
        self.window_samples = 0
        self.window_wait = 0.0
        if cfg.trainer.record_sample_ids:
            self.ids_fh = self._files.enter_context(
                open_step_log(run_dir / "logs" / f"samples_rank_{rank:05d}.jsonl", step))
        if not self.is_main:
            return
        self.steps_fh = self._files.enter_context(open_step_log(run_dir / STEP_LOG, step))
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events after the resumed step that a killed run had logged.
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)
                self._files.callback(self.tb.close)
            except ImportError:
                log.warning("tensorboard is not installed: no TensorBoard logs")
        if cfg.logging.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                        dir=str(run_dir), config=to_dict(cfg), resume="allow")
            except ImportError:
                log.warning("logging.wandb is true but wandb is not installed; TensorBoard only")
        if cfg.trainer.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.pbar = tqdm(total=cfg.trainer.max_steps, initial=step, desc="train", dynamic_ncols=True)
            self._files.callback(self.pbar.close)

    def close(self) -> None:
        self._files.close()

    # ------------------------------------------------------------------ the window

    def reset_window(self, step: int) -> None:
        """Throughput windows exclude validation and checkpoint time."""
        self.window_t0, self.window_step0 = self.clock(), step
        self.window_samples, self.window_wait = 0, 0.0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """The block's time counts as waiting for data in the current window.

        On a GPU the host blocks here while the device may still run queued work, so the
        fraction is what the host lost to the loader, the number that says whether more loader
        workers would speed the step up.
        """
        t0 = self.clock()
        try:
            yield
        finally:
            self.window_wait += self.clock() - t0

    def record(self, rec: StepRecord, samples: int, area: int) -> None:
        """One optimizer step; `samples` across all ranks, `area` = H * W of its batches."""
        if self.flops_area is not None and area != self.flops_area:
            # Every counted product is linear in the pixel count (convolutions and the linear
            # attention alike), so the count scales with the area; only the tiny MLP does not.
            log.info(f"batches of {area} pixels, FLOPs counted for {self.flops_area}: count scaled")
            self.flops_per_sample = self.flops_per_sample * area // self.flops_area
        self.flops_area = None
        self.pending.append(rec)
        self.window_samples += samples
        if self.pbar is not None:
            self.pbar.update(1)

    # ------------------------------------------------------------------ writing

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def figures(self, figs: dict[str, Any], step: int) -> None:
        if self.tb is not None:
            for tag, fig in figs.items():
                self.tb.add_figure(tag, fig, step)

    def flush(self, step: int, epoch: int) -> None:
        """Bring the pending logs to the host (one sync), check them, write them."""
        pending, self.pending = self.pending, []
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
        self._check_finite(pending, host_local)
        if self.ids_fh is not None and n:
            self.ids_fh.write("".join(json.dumps({"step": p.step, "ids": p.ids}) + "\n" for p in pending))
            self.ids_fh.flush()
        if not self.is_main or not n:
            return
        assert self.steps_fh is not None
        span = self.clock() - self.window_t0
        steps_in_window = max(1, step - self.window_step0)
        perf = {
            "perf/step_time_s": span / steps_in_window,
            "perf/samples_per_s": self.window_samples / span if span > 0 else float("nan"),
            "perf/data_wait_s_per_step": self.window_wait / steps_in_window,
            "perf/data_wait_fraction": self.window_wait / span if span > 0 else float("nan"),
            "perf/peak_mem_gib": peak_mem_gib(self.device),
        }
        if self.peak_flops and span > 0:
            per_device = self.window_samples / span / self.world
            perf["perf/mfu"] = per_device * self.flops_per_sample / self.peak_flops
        self.reset_window(step)
        for i, p in enumerate(pending):
            rec: dict[str, Any] = {"step": p.step, "loss": host_red[0][i], "lr": p.lr, "epoch": epoch}
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
        self.scalars(perf, pending[-1].step)
        if self.wandb is not None:
            self.wandb.log({"train/loss": host_red[0][-1]}, step=pending[-1].step)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{host_red[0][-1]:.4g}", sps=f"{perf['perf/samples_per_s']:.1f}")

    def _check_finite(self, pending: list[StepRecord], host_local: list[float]) -> None:
        """Raise on the first step whose loss is non-finite on any rank, naming its samples."""
        n = len(pending)
        bad_local = next((i for i, v in enumerate(host_local) if not np.isfinite(v)), n)
        first_bad = bad_local
        if self.world > 1:
            t = torch.tensor([bad_local], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.ctrl_group)
            first_bad = int(t)
        if first_bad >= n:
            return
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
