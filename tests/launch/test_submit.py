"""`python -m depthdif_hpc.launch.submit` (submitit) on a real local SLURM and with --local: 2 CPU
tasks, submitit's preemption hook -> trainer checkpoint -> requeue -> resume, the time limit,
job-array sweeps, refusals."""

from __future__ import annotations

import re

import pytest
from launch_helpers import (
    MAX_STEPS,
    assert_same_weights,
    cpu_job_env,
    final_weights,
    finish_after_requeue,
    job_id,
    open_ended_config,
    run,
    sacct_records,
    steps_logged,
    stop_and_resume_steps,
    submit,
    submitit_log,
    tiny_overrides,
    wait_job,
    wait_steps,
)

pytestmark = pytest.mark.slow


def test_submit_slurm_two_tasks(reference_run, tiny_store, tmp_path):
    env = cpu_job_env(reference_run["env"])
    run_dir = tmp_path / "run"
    out = submit(env, tmp_path, "--tasks-per-node", "2", "--time", "10", "--wait",
                 *tiny_overrides(tiny_store, run_dir))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    job = job_id(out)
    assert f"job {job} finished" in out.stdout
    assert "'rank': 0, 'exit_code': 0" in out.stdout and "'rank': 1, 'exit_code': 0" in out.stdout
    wait_job(env, job, 60, "(results written, allocation ending)")
    assert [x["state"] for x in sacct_records(env, job)] == ["COMPLETED"]
    assert steps_logged(run_dir) == list(range(1, MAX_STEPS + 1))
    ck = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert {p.name for p in ck.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    # Per-task logs, and the same model as the torchrun launch of the sbatch script.
    assert (tmp_path / "submitit" / job / f"{job}_1_log.err").is_file()
    assert_same_weights(final_weights(run_dir), final_weights(reference_run["run_dir"]))


def test_submit_local_two_tasks(tiny_store, tmp_path):
    import os

    env = dict(os.environ)
    run_dir = tmp_path / "run"
    out = submit(env, tmp_path, "--local", "--tasks-per-node", "2", "--wait",
                 *tiny_overrides(tiny_store, run_dir, 6))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    assert "local executor" in out.stdout
    assert "'rank': 0, 'exit_code': 0, 'step': 6" in out.stdout
    assert "'rank': 1, 'exit_code': 0, 'step': 6" in out.stdout
    assert steps_logged(run_dir) == list(range(1, 7))


def test_submit_preemption_hook_requeues_and_resumes(reference_run, tiny_store, tmp_path):
    """SIGUSR2 (what SLURM sends before the limit or on preemption) to every task: submitit's hook
    stops the trainer at a step boundary with a checkpoint, requeues, and the job resumes."""
    env = cpu_job_env(reference_run["env"])
    run_dir = tmp_path / "run"
    out = submit(env, tmp_path, "--tasks-per-node", "2", "--time", "10",
                 *tiny_overrides(tiny_store, run_dir))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    job = job_id(out)
    seen = wait_steps(run_dir, 3, 180, env, job)
    assert seen < MAX_STEPS
    sig = run(["scancel", "--signal=USR2", job], env=env)
    assert sig.returncode == 0, sig.stderr
    wait_job(env, job, 240, "(submitit preemption)")
    log = submitit_log(tmp_path, job)
    print(log[-6000:])
    states = [x["state"] for x in sacct_records(env, job)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (states, log[-4000:])
    assert f"Requeued job {job}" in log and "attempt 1 rank 0/2" in log
    stops, resumes = stop_and_resume_steps(run_dir)
    assert len(stops) == 1 and 0 < stops[0] < MAX_STEPS and resumes == stops, (stops, resumes)
    assert steps_logged(run_dir) == list(range(1, MAX_STEPS + 1))
    assert_same_weights(final_weights(run_dir), final_weights(reference_run["run_dir"]))


def test_submit_time_limit_requeues(reference_run, tiny_store, tmp_path):
    """A 1-minute limit with the signal 25 s before it: SLURM's own warning reaches submitit's
    hook mid-run, the trainer checkpoints, submitit requeues, the next allocation finishes."""
    env = cpu_job_env(reference_run["env"])
    run_dir = tmp_path / "run"
    cfg = open_ended_config(tmp_path)
    args = [a for a in tiny_overrides(tiny_store, run_dir) if not a.startswith("trainer.max_steps=")]
    out = submit(env, tmp_path, "--tasks-per-node", "2", "--time", "1", "--signal-delay", "25",
                 "--config", str(cfg), *args)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    job = job_id(out)
    final = finish_after_requeue(env, job, run_dir, cfg)
    wait_job(env, job, 240, "(time limit)")
    log = submitit_log(tmp_path, job)
    assert "this job is timed-out" in log and f"Requeued job {job}" in log, log[-4000:]
    states = [x["state"] for x in sacct_records(env, job)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (states, log[-4000:])
    stops, resumes = stop_and_resume_steps(run_dir)
    assert len(stops) == 1 and resumes == stops and final == stops[0] + 10, (stops, resumes, final)
    assert steps_logged(run_dir) == list(range(1, final + 1))


def test_submit_array_sweep(reference_run, tiny_store, tmp_path):
    env = cpu_job_env(reference_run["env"])
    overrides = [o for o in tiny_overrides(tiny_store, tmp_path / "unused", 4) if not o.startswith("trainer.run_dir")]
    out = submit(env, tmp_path, "--tasks-per-node", "1", "--time", "10", "--wait",
                 "--array", "trainer.max_steps=3,5", *overrides)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    jobs = re.findall(r"^job (\S+)$", out.stdout, re.M)
    assert len(jobs) == 2 and all("_" in j for j in jobs), out.stdout  # one array, two tasks
    assert len({j.split("_")[0] for j in jobs}) == 1
    for j, n in zip(jobs, (3, 5), strict=True):
        assert steps_logged(tmp_path / "runs" / f"depthdif-ambient-{j}") == list(range(1, n + 1))


def test_submit_refuses_bad_partition_and_resources(slurm_env, tiny_store, tmp_path):
    out = submit(slurm_env, tmp_path, "--tasks-per-node", "2", "--partition", "no_such_partition",
                 "trainer.max_steps=1")
    assert out.returncode == 2
    assert "invalid partition" in out.stderr.lower(), out.stderr
    out = submit(slurm_env, tmp_path, "--tasks-per-node", "64", "trainer.max_steps=1")
    assert out.returncode == 2
    assert "more processors requested than permitted" in out.stderr.lower(), out.stderr
