"""Helpers for the launcher tests (imported by conftest and the tests)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("DDHPC_SLURM_DIR", "/tmp/ddhpc-slurm"))
SLURM_CONF = STATE_DIR / "etc" / "slurm.conf"

# A tiny ambient model on the synthetic store: 8 training samples of 32x32, 2 per rank per step.
TINY = [
    "model.unet.dim=8", "model.unet.dim_mults=[1,2]", "model.kernels=eager",
    "model.noise.num_timesteps=20", "training.lr=1e-3",
    "dataloader.batch_size=2", "dataloader.val_batch_size=2", "dataloader.num_workers=0",
    "dataloader.persistent_workers=false", "dataloader.pin_memory=false",
    "scheduler.warmup.steps=2", "trainer.log_every_n_steps=1",
    "trainer.val_every_n_steps=100000", "trainer.checkpoint_every_n_steps=100000",
    "trainer.val_at_epoch_end=false", "trainer.full_reconstruction=false",
    "trainer.progress_bar=false", "trainer.ema.decay=0.8", "trainer.ema.start_step=1",
    "logging.tensorboard=false",
    # Runs of different layouts (1 x 2 vs 2 x 1 processes) are compared bit for bit: same threads.
    "trainer.intra_op_threads=1",
]
MAX_STEPS = 40  # the reference run and every interrupted run train to this step


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def tiny_overrides(store: Path, run_dir: Path, max_steps: int = MAX_STEPS, *extra: str) -> list[str]:
    return [*TINY, f"dataset.store={store}", f"trainer.run_dir={run_dir}", f"trainer.max_steps={max_steps}",
            *extra]


def job_env(slurm_env: dict, **extra: str) -> dict:
    env = dict(slurm_env, DDHPC_ROOT=str(ROOT),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    env.update(extra)
    return env


def squeue_state(env: dict, job: str) -> str:
    return run(["squeue", "-h", "-j", job, "-o", "%T"], env=env).stdout.strip()


def wait_job(env: dict, job: str, timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not squeue_state(env, job):
            return
        time.sleep(1)
    run(["scancel", job], env=env)
    raise AssertionError(f"job {job} {what} did not finish within {timeout:.0f} s")


def sacct_records(env: dict, job: str, settle_s: float = 30.0) -> list[dict]:
    """Every allocation record of a job, oldest first (a requeued job has several).

    Called after the job has left squeue; slurmdbd may still show the last allocation as
    RUNNING/COMPLETING for a moment, so wait (up to settle_s) until it has a final state.
    """
    deadline = time.monotonic() + settle_s
    while True:
        out = run(["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "JobID,State,ExitCode,Start,End"],
                  env=env)
        assert out.returncode == 0, f"sacct failed: {out.stderr}"
        rows = []
        for line in out.stdout.splitlines():
            f = line.split("|")
            if len(f) >= 3:
                rows.append({"id": f[0], "state": f[1], "exit": f[2], "start": f[3], "end": f[4]})
        pending = not rows or rows[-1]["state"].split()[0] in ("RUNNING", "PENDING", "COMPLETING",
                                                               "CONFIGURING", "REQUEUED")
        if not pending or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def wait_steps(run_dir: Path, n: int, timeout: float, env: dict | None = None, job: str | None = None) -> int:
    """Wait until steps.jsonl holds at least n steps; returns how many it holds."""
    path = Path(run_dir) / "steps.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            k = len(path.read_text().splitlines())
            if k >= n:
                return k
        if env is not None and job is not None and not squeue_state(env, job):
            raise AssertionError(f"job {job} ended before step {n}")
        time.sleep(0.2)
    raise AssertionError(f"{path}: fewer than {n} steps after {timeout:.0f} s")


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_dir) / "steps.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, step: int = MAX_STEPS) -> dict:
    from safetensors.torch import load_file

    ck = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    assert (ck / "MANIFEST.json").is_file(), f"no complete checkpoint {ck}"
    return {"model": load_file(str(ck / "model.safetensors")), "ema": load_file(str(ck / "ema.safetensors"))}


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        diff = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not diff, f"{part}: {len(diff)} tensors differ from the uninterrupted run, e.g. {diff[:3]}"


def rank_log(run_dir: Path, rank: int) -> str:
    return (Path(run_dir) / "logs" / f"rank_{rank:05d}.log").read_text()


# A trainer's stop line; the cause is its own signal or a peer's (the ranks agree on a stop).
STOP_RE = r"stop requested \((?:signal \d+|signal on another rank)\) at step {step}:"


def stop_and_resume_steps(run_dir: Path) -> tuple[list[int], list[int]]:
    """Steps at which rank 0 stopped on a signal (its own, or another rank's that all ranks
    agreed on), and steps it resumed from, in log order."""
    text = rank_log(run_dir, 0)
    stops = [int(m) for m in re.findall(STOP_RE.format(step=r"(\d+)"), text)]
    resumes = [int(m) for m in re.findall(r"resumed from \S+: step (\d+)", text)]
    return stops, resumes


def sbatch(env: dict, cwd: Path, script: str, sbatch_opts: list[str], train_args: list[str]) -> str:
    """Submit a slurm/ script on the local cluster (CPU, 2 processes); returns the job id."""
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
           *sbatch_opts, str(ROOT / "slurm" / script), *train_args]
    out = run(cmd, env=env, cwd=cwd)
    assert out.returncode == 0, f"sbatch failed ({out.returncode}): {out.stderr}"
    return out.stdout.strip().split(";")[0]


def cpu_job_env(slurm_env: dict) -> dict:
    return job_env(slurm_env, DDHPC_DEVICE="cpu", DDHPC_PROCS_PER_NODE="2", DDHPC_RESIGNAL_S="3")


def job_log(cwd: Path, name: str, job: str) -> str:
    p = Path(cwd) / f"{name}-{job}.out"
    return p.read_text() if p.is_file() else f"(no job log {p})"


def open_ended_config(tmp_path: Path) -> Path:
    """A config file holding trainer.max_steps, far away for now: the run lasts until a signal."""
    cfg = Path(tmp_path) / "max_steps.yaml"
    cfg.write_text("trainer:\n  max_steps: 1000000\n")
    return cfg


def finish_after_requeue(env: dict, job: str, run_dir: Path, cfg: Path, timeout: float = 180) -> int:
    """Wait for the time limit to requeue the job, then let the run end soon: the requeued attempt
    reads max_steps = (saved step + 10) from `cfg` and gets a 10-minute limit. Returns max_steps.

    Nothing here depends on how fast the machine trains: the first allocation trains until SLURM's
    warning signal, the second only 10 steps.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        show = run(["scontrol", "show", "job", job], env=env).stdout
        m = re.search(r"Restarts=(\d+)", show)
        if m and int(m.group(1)) >= 1:
            stops, _ = stop_and_resume_steps(run_dir) if (Path(run_dir) / "logs").is_dir() else ([], [])
            final = (stops[0] if stops else 0) + 10
            cfg.write_text(f"trainer:\n  max_steps: {final}\n")
            upd = run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], env=env)
            assert upd.returncode == 0, upd.stderr
            return final
        assert "JobState=COMPLETED" not in show and "JobState=FAILED" not in show \
            and "JobState=TIMEOUT" not in show, f"job {job} ended without a requeue:\n{show}"
        time.sleep(0.3)
    raise AssertionError(f"job {job} was not requeued at its time limit within {timeout:.0f} s")


def submit(env: dict, cwd: Path, *opts: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "depthdif_hpc.launch.submit", "--gpus-per-node", "0", "--log-dir",
           str(cwd / "submitit"), "--run-root", str(cwd / "runs"), *opts]
    return run(cmd, env=env, cwd=cwd, timeout=timeout)


def job_id(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"^job (\S+)$", out.stdout, re.M)
    assert m, f"no job id in the output:\n{out.stdout}\n{out.stderr}"
    return m.group(1)


def submitit_log(cwd: Path, job: str, rank: int = 0) -> str:
    paths = sorted((cwd / "submitit").glob(f"{job}*/{job}_{rank}_log.*"))
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in paths)
