"""The callable that `python -m depthdif_hpc.launch.submit` hands to submitit: one per task (= rank).

Lives in an importable module (not `__main__`) because submitit pickles it by reference.

Preemption and time limits: submitit asks SLURM for SIGUSR2 `signal_delay_s` before the limit
(`--signal=USR2@...`, sent to every task) and installs a handler that calls `checkpoint()` on
rank 0 and then runs `scontrol requeue`. Calling that handler straight away would requeue before
the trainer has saved anything, so `TrainJob` puts its own handler in front:

    SIGUSR2 -> trainer's stop flag (its SIGUSR1 handler) -> every rank checkpoints at the next step
    boundary and `main()` returns 75 -> rank 0 runs submitit's handler -> `checkpoint()` returns the
    same callable -> `scontrol requeue` -> the next attempt resumes (trainer.resume=auto).

A requeue or preemption from outside (`scontrol requeue`, the scheduler) sends SIGTERM instead:
the trainer checkpoints on that too and SLURM requeues the job by itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import submitit

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.launch.trainer_args import trainer_argv
from depthdif_hpc.launch_env import job_port

EXIT_OK = 0
EXIT_PREEMPTED = 75


def _say(msg: str) -> None:
    print(f"[{time.strftime('%Y-%m-%dT%H:%M:%S')}] depthdif_hpc.launch.submit: {msg}", flush=True)


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint of a run folder (None: none yet)."""
    newest = layout.latest_complete(Path(run_dir) / layout.CHECKPOINTS, warn=lambda _msg: None)
    return int(layout.read_manifest(newest)["step"]) if newest is not None else None


class _StopForwarder:
    """Turns submitit's preemption signal into the trainer's stop request, whenever it comes.

    If the signal lands before the trainer has installed its SIGUSR1 handler (start-up), a small
    thread waits for that handler and then sends SIGUSR1 to this process.
    """

    def __init__(self) -> None:
        self.requested = False
        self.finished = threading.Event()

    @staticmethod
    def _placeholder(signum, frame) -> None:  # noqa: ARG004 - signal API
        pass  # SIGUSR1 before the trainer starts: nothing to stop yet (the forwarder retries)

    @classmethod
    def _trainer_handler(cls) -> Callable[[int, FrameType | None], Any] | None:
        h = signal.getsignal(signal.SIGUSR1)
        if callable(h) and h is not cls._placeholder:
            return h
        return None

    def on_preempt(self, signum: int, frame: FrameType | None) -> None:
        first = not self.requested
        self.requested = True
        if first:
            _say(f"caught {signal.Signals(signum).name}: asking the trainer to checkpoint and stop")
        h = self._trainer_handler()
        if h is not None:
            h(signal.SIGUSR1, frame)
            return
        if first:
            threading.Thread(target=self._deliver_later, daemon=True).start()

    def _deliver_later(self) -> None:
        while not self.finished.wait(0.2):
            if self._trainer_handler() is not None:
                os.kill(os.getpid(), signal.SIGUSR1)
                return


class TrainJob(submitit.helpers.Checkpointable):
    """Runs `depthdif_hpc.train.main` in one task with torch.distributed set up from SLURM."""

    def __init__(self, preset: str, configs: list[str], overrides: list[str], *, run_root: str,
                 name: str, device: str = "gpu", run_dir: str | None = None) -> None:
        self.preset = preset
        self.configs = list(configs)
        self.overrides = list(overrides)
        self.run_root = run_root
        self.name = name
        self.device = device
        self.run_dir = run_dir

    def resolved_run_dir(self, job_id: str) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        return Path(self.run_root) / f"{self.name}-{job_id}"

    def __call__(self) -> dict[str, Any]:
        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        # Always the job's own port: a MASTER_PORT inherited from the submitting shell (or left
        # there by an earlier in-process run) may be long gone or taken by now.
        os.environ["MASTER_PORT"] = str(job_port(env.job_id, restart))
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                      overwrite=True)
        if self.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        run_dir = self.resolved_run_dir(env.job_id)
        argv = trainer_argv(self.preset, self.configs, self.overrides, run_dir=run_dir, restart=restart)
        _say(f"job {env.job_id} attempt {restart} rank {dist.rank}/{dist.world_size} "
             f"(local {dist.local_rank}) rendezvous {dist.master_addr}:{dist.master_port}")
        _say(f"run dir {run_dir}; trainer args: {' '.join(argv)}")

        usr = env._usr_sig()  # SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise
        submitit_handler = signal.getsignal(usr)
        fwd = _StopForwarder()
        signal.signal(usr, fwd.on_preempt)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, fwd._placeholder)  # default action would kill us
        from depthdif_hpc.train import main as train_main

        try:
            code = train_main(argv)
        finally:
            fwd.finished.set()
            signal.signal(usr, submitit_handler)
        step = newest_checkpoint_step(run_dir)
        if code == EXIT_OK:
            _say(f"rank {dist.rank}: training finished at step {step}")
            return {"rank": dist.rank, "world_size": dist.world_size, "exit_code": code,
                    "run_dir": str(run_dir), "step": step, "attempt": restart}
        if code == EXIT_PREEMPTED:
            _say(f"rank {dist.rank}: trainer checkpointed at step {step} and stopped")
            if fwd.requested and dist.rank == 0 and callable(submitit_handler):
                # submitit's own hook: checkpoint() -> dump -> scontrol requeue -> exit.
                submitit_handler(usr, None)
            # Other ranks, or a SIGTERM from SLURM (it requeues or cancels the job itself): leave
            # without a result file, so the job is not reported finished.
            sys.exit(EXIT_PREEMPTED)
        raise RuntimeError(f"the trainer exited with code {code} on rank {dist.rank} "
                           f"(2 bad config, 3 non-finite loss, 1 other failure); run dir {run_dir}")

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer has written its checkpoint already; the same job resumes from it
        # (trainer.resume=auto, same run dir since the job id does not change on requeue).
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
