"""A real single-node SLURM for the launcher tests, brought up by slurm/local_cluster.sh (which
installs Debian's slurm-wlm, munge, MariaDB and slurmdbd when missing) and taken down at the end of
the session even when tests fail. A cluster that was already up is used and left running."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch_helpers import CLUSTER, SLURM_CONF, run  # noqa: E402


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for SLURM clients (SLURM_CONF) with the local cluster up."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM needs root (munged, slurmctld, slurmd, MariaDB run as system users)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it (not Debian-like)")
    env = dict(os.environ, SLURM_CONF=str(SLURM_CONF))
    was_up = False
    if shutil.which("scontrol"):
        status = run(["bash", str(CLUSTER), "status"], env=env)
        was_up = ("slurmctld" in status.stdout and "DEAD" not in status.stdout
                  and run(["scontrol", "ping"], env=env).returncode == 0)
    if not was_up:
        up = run(["bash", str(CLUSTER), "up"], env=env, timeout=600)
        if up.returncode != 0:
            run(["bash", str(CLUSTER), "down"], env=env, timeout=300)
            pytest.fail(f"slurm/local_cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    try:
        yield env
    finally:
        if not was_up:
            down = run(["bash", str(CLUSTER), "down"], env=env, timeout=300)
            print(down.stdout, down.stderr, file=sys.stderr)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    from depthdif_hpc.data.synthetic import build_tiny_store

    return build_tiny_store(tmp_path_factory.mktemp("store"), tile_size=32)




@pytest.fixture(scope="session")
def reference_run(slurm_env, tiny_store, tmp_path_factory):
    """The uninterrupted run: sbatch slurm/train_ambient.sh, 2 CPU processes, MAX_STEPS steps."""
    from launch_helpers import MAX_STEPS, cpu_job_env, job_log, sbatch, tiny_overrides, wait_job

    cwd = tmp_path_factory.mktemp("reference")
    run_dir = cwd / "run"
    env = cpu_job_env(slurm_env)
    job = sbatch(env, cwd, "train_ambient.sh", [], tiny_overrides(tiny_store, run_dir, MAX_STEPS))
    wait_job(env, job, 240, "(reference run)")
    return {"job": job, "cwd": cwd, "run_dir": run_dir, "env": env,
            "log": job_log(cwd, "depthdif-ambient", job)}
