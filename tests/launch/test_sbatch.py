"""slurm/train_ambient.sh on a real local SLURM: 2 CPU processes under torchrun, checkpoint on
the time-limit signal and self-requeue, SIGTERM preemption by `scontrol requeue`, refusals."""

from __future__ import annotations

import pytest
from launch_helpers import (
    MAX_STEPS,
    ROOT,
    assert_same_weights,
    final_weights,
    finish_after_requeue,
    job_log,
    open_ended_config,
    rank_log,
    run,
    sacct_records,
    sbatch,
    steps_logged,
    stop_and_resume_steps,
    tiny_overrides,
    wait_job,
    wait_steps,
)

pytestmark = pytest.mark.slow


def test_sbatch_two_ranks_complete(reference_run):
    r = reference_run
    recs = sacct_records(r["env"], r["job"])
    assert [x["state"] for x in recs] == ["COMPLETED"], (recs, r["log"])
    assert "training finished (exit 0)" in r["log"]
    run_dir = r["run_dir"]
    assert steps_logged(run_dir) == list(range(1, MAX_STEPS + 1))
    ck = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert (ck / "MANIFEST.json").is_file() and (ck / "model.safetensors").is_file()
    # Both ranks trained to the end and saved their state.
    assert {p.name for p in ck.glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    for rank in (0, 1):
        assert f"[rank {rank}] INFO finished at step {MAX_STEPS}" in rank_log(run_dir, rank)
    # Per-node and per-rank launcher logs exist.
    logs = r["cwd"] / "logs" / f"depthdif-ambient-{r['job']}" / "attempt-0"
    assert (logs / "node-0.out").is_file()
    assert len(list(logs.glob("node-0/*/attempt_0/[01]/stderr.log"))) == 2


def _interrupted_run(reference_run, tiny_store, tmp_path, interrupt, wait_restart_s=240):
    env = reference_run["env"]
    run_dir = tmp_path / "run"
    job = sbatch(env, tmp_path, "train_ambient.sh", [], tiny_overrides(tiny_store, run_dir, MAX_STEPS))
    seen = wait_steps(run_dir, 3, 180, env, job)
    assert seen < MAX_STEPS, "the run finished before it could be interrupted"
    interrupt(env, job)
    wait_job(env, job, wait_restart_s, "(interrupted run)")
    log = job_log(tmp_path, "depthdif-ambient", job)
    return job, run_dir, log


def _check_resumed_exactly(reference_run, env, job, run_dir, log):
    recs = sacct_records(env, job)
    states = [x["state"] for x in recs]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (states, log)
    assert "attempt 1" in log, log
    stops, resumes = stop_and_resume_steps(run_dir)
    assert len(stops) == 1 and 0 < stops[0] < MAX_STEPS, (stops, log)
    assert resumes == stops, (stops, resumes)  # resumed from exactly the step it saved
    # Every step once, none missing, and the same weights as the uninterrupted run.
    assert steps_logged(run_dir) == list(range(1, MAX_STEPS + 1))
    assert_same_weights(final_weights(run_dir), final_weights(reference_run["run_dir"]))


def _signal_batch(env, job):
    """The time-limit warning (--signal=B:USR1@180), delivered by hand."""
    out = run(["scancel", "--signal=USR1", "--batch", job], env=env)
    assert out.returncode == 0, out.stderr


def test_sbatch_checkpoint_signal_requeues_and_resumes(reference_run, tiny_store, tmp_path):
    """The time-limit warning: checkpoint, self-requeue, exact resume."""
    job, run_dir, log = _interrupted_run(reference_run, tiny_store, tmp_path, _signal_batch)
    print(log)
    assert "checkpoint signal received" in log and f"requeueing job {job}" in log, log
    assert '"signal":10' in log  # the trainer's stopped.json, quoted by the script
    _check_resumed_exactly(reference_run, reference_run["env"], job, run_dir, log)
    assert not (run_dir / "stopped.json").exists()  # the resumed attempt cleared it


def test_sbatch_failed_checkpoint_of_a_stop_is_not_requeued(reference_run, tiny_store, tmp_path):
    """A crash while checkpointing the stop (on a cluster: a full disk, a quota, an OOM; here a
    file standing where the save's temporary folder goes) ends the job FAILED: a requeue would
    only repeat the lost work, up to DDHPC_MAX_REQUEUES times."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in range(1, MAX_STEPS + 1):
        (ckpts / f".tmp-step_{step:08d}").write_text("in the way")
    job, run_dir, log = _interrupted_run(reference_run, tiny_store, tmp_path, _signal_batch)
    print(log)
    assert "checkpoint signal received" in log, log
    assert "not requeueing" in log and f"requeueing job {job}" not in log, log
    states = [x["state"] for x in sacct_records(reference_run["env"], job)]
    assert states == ["FAILED"], (states, log)
    assert not (run_dir / "stopped.json").exists()
    assert "NotADirectoryError" in rank_log(run_dir, 0) + log + "".join(
        p.read_text() for p in (tmp_path / "logs").rglob("*.log"))


def test_sbatch_scontrol_requeue_preemption(reference_run, tiny_store, tmp_path):
    """Preemption from outside: SLURM sends SIGTERM, the trainer checkpoints, SLURM requeues."""

    def requeue(env, job):
        out = run(["scontrol", "requeue", job], env=env)
        assert out.returncode == 0, out.stderr

    job, run_dir, log = _interrupted_run(reference_run, tiny_store, tmp_path, requeue)
    print(log)
    assert "DUE TO JOB REQUEUE" in log, log
    _check_resumed_exactly(reference_run, reference_run["env"], job, run_dir, log)


def test_sbatch_time_limit_requeues(reference_run, tiny_store, tmp_path):
    """A 1-minute limit with the warning 25 s before it (--signal=B:USR1@25 on the command line
    overrides the header's @180): SLURM's own signal stops the run mid-way, the script requeues it,
    the next allocation resumes and finishes."""
    env = reference_run["env"]
    run_dir = tmp_path / "run"
    cfg = open_ended_config(tmp_path)
    args = [a for a in tiny_overrides(tiny_store, run_dir) if not a.startswith("trainer.max_steps=")]
    job = sbatch(env, tmp_path, "train_ambient.sh", ["--time=1", "--signal=B:USR1@25"],
                 ["--config", str(cfg), *args])
    final = finish_after_requeue(env, job, run_dir, cfg)
    wait_job(env, job, 240, "(time limit)")
    log = job_log(tmp_path, "depthdif-ambient", job)
    print(log)
    assert "checkpoint signal received" in log and f"requeueing job {job}" in log, log
    assert "TIME LIMIT" not in log, log  # stopped by the warning, not killed at the limit
    states = [x["state"] for x in sacct_records(env, job)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (states, log)
    stops, resumes = stop_and_resume_steps(run_dir)
    assert len(stops) == 1 and resumes == stops and final == stops[0] + 10, (stops, resumes, final)
    assert steps_logged(run_dir) == list(range(1, final + 1))


@pytest.mark.parametrize("opts, message", [
    (["--gpus-per-node=0", "--partition=no_such_partition"], "invalid partition"),
    (["--gpus-per-node=0", "--nodes=64"], "more processors requested than permitted"),
    (["--gpus-per-node=4"], "invalid generic resource"),
], ids=["bad-partition", "too-many-nodes", "no-gpus-here"])
def test_sbatch_refuses_impossible_requests(slurm_env, tmp_path, opts, message):
    cmd = ["sbatch", "--parsable", *opts, str(ROOT / "slurm" / "train_ambient.sh"), "trainer.max_steps=1"]
    out = run(cmd, env=slurm_env, cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    assert message in out.stderr.lower(), out.stderr
    assert not list(tmp_path.glob("*.out"))  # nothing ran
