"""Two-node SLURM on this machine (`local_cluster.sh up --nodes 2`: one slurmd per namespace host):
`sbatch -N 2 slurm/train_ambient.sh`, `python -m depthdif_hpc.launch.submit --nodes 2`, and a preemption
that must reach both nodes. One trainer process per node, CPU, gloo across the veth addresses.

Each two-node run is checked against a one-node run of the same global batch (two processes on
node1): same steps, same samples, bit-identical weights."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from launch_helpers import (
    STOP_RE,
    assert_same_weights,
    final_weights,
    job_env,
    job_id,
    job_log,
    rank_log,
    run,
    sacct_records,
    sbatch,
    steps_logged,
    stop_and_resume_steps,
    submit,
    submitit_log,
    tiny_overrides,
    wait_job,
    wait_steps,
)

from depthdif_hpc.data.synthetic import build_tiny_store

pytestmark = pytest.mark.slow

STEPS = 24
EVERY = 8  # periodic checkpoints at 8, 16, 24
EXTRA = ["trainer.record_sample_ids=true", f"trainer.checkpoint_every_n_steps={EVERY}"]


def _env(cluster_env: dict, procs_per_node: int) -> dict:
    return job_env(cluster_env, DDHPC_DEVICE="cpu", DDHPC_PROCS_PER_NODE=str(procs_per_node),
                   DDHPC_RESIGNAL_S="3")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_tiny_store(tmp_path_factory.mktemp("ocean"), tile_size=32)


def _sbatch_run(cluster_env: dict, store: Path, cwd: Path, nodes: int, procs: int) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    run_dir = cwd / "run"
    env = _env(cluster_env, procs)
    job = sbatch(env, cwd, "train_ambient.sh", [f"--nodes={nodes}"], tiny_overrides(store, run_dir, STEPS, *EXTRA))
    wait_job(env, job, 300, f"({nodes}-node run)")
    return {"job": job, "cwd": cwd, "run_dir": run_dir, "env": env,
            "log": job_log(cwd, "depthdif-ambient", job)}


@pytest.fixture(scope="module")
def two_node_run(two_node_slurm, store, tmp_path_factory) -> dict:
    return _sbatch_run(two_node_slurm, store, tmp_path_factory.mktemp("two_nodes"), nodes=2, procs=1)


@pytest.fixture(scope="module")
def one_node_run(two_node_slurm, store, tmp_path_factory) -> dict:
    return _sbatch_run(two_node_slurm, store, tmp_path_factory.mktemp("one_node"), nodes=1, procs=2)


def _ranks(run_dir: Path) -> list[tuple]:
    rows = sorted(json.loads((run_dir / "ranks.json").read_text()), key=lambda r: r["rank"])
    return [(r["rank"], r["local_rank"], r["node_rank"], r["host"], r["addr"]) for r in rows]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(run_dir: Path) -> list[dict]:
    return _jsonl(run_dir / "steps.jsonl")


def _samples(run_dir: Path, rank: int) -> list[dict]:
    return _jsonl(run_dir / "logs" / f"samples_rank_{rank:05d}.jsonl")


def _check_one_run_folder(run_dir: Path, ranks: int, saves: list[int]) -> None:
    """One folder for the job: one config, one step log, one log and sample audit per rank, one
    checkpoint per save holding every rank's state."""
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))  # each step once
    assert (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("config.step_*.yaml"))
    # every layout compared here runs under the same, explicit thread count (TINY)
    assert {r["threads"] for r in json.loads((run_dir / "ranks.json").read_text())} == {1}
    names = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert names == sorted([f"rank_{r:05d}.log" for r in range(ranks)]
                           + [f"samples_rank_{r:05d}.jsonl" for r in range(ranks)]), names
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step_{s:08d}" for s in saves], ckpts  # no temporaries, no duplicates
    for s in saves:
        ck = run_dir / "checkpoints" / f"step_{s:08d}"
        assert (ck / "MANIFEST.json").is_file()
        assert sorted(p.name for p in ck.glob("rank_*.pt")) == [f"rank_{r:05d}.pt" for r in range(ranks)]


def _check_disjoint_samples(run_dir: Path, ranks: int) -> list[list]:
    """Every step, the ranks train on different samples; every epoch covers the training set
    once. Returns the ids of each step, per rank."""
    epoch_of = {r["step"]: r["epoch"] for r in _steps(run_dir)}
    per_rank = [_samples(run_dir, r) for r in range(ranks)]
    for recs in per_rank:
        assert [x["step"] for x in recs] == list(range(1, STEPS + 1))
    by_epoch: dict[int, list] = defaultdict(list)
    for step in range(1, STEPS + 1):
        ids = [per_rank[r][step - 1]["ids"] for r in range(ranks)]
        assert all(ids), f"step {step}: a rank saw no samples"
        flat = [i for part in ids for i in part]
        assert len(flat) == len(set(flat)), f"step {step}: ranks share samples {ids}"
        by_epoch[epoch_of[step]].extend(flat)
    complete = [e for e in sorted(by_epoch) if e + 1 in by_epoch]  # the last may be partial
    assert len(complete) >= 2, by_epoch
    sets = [set(by_epoch[e]) for e in complete]
    for e in complete:
        assert len(by_epoch[e]) == len(set(by_epoch[e])), f"epoch {e} repeats a sample"
    assert all(s == sets[0] for s in sets), "epochs cover different sample sets"
    return [[per_rank[r][s]["ids"] for r in range(ranks)] for s in range(STEPS)]


def test_sbatch_two_nodes_matches_one_node(two_node_run, one_node_run):
    r = two_node_run
    recs = sacct_records(r["env"], r["job"])
    assert [x["state"] for x in recs] == ["COMPLETED"], (recs, r["log"])
    assert "2 node(s) [node[1-2]]" in r["log"] and "training finished (exit 0)" in r["log"], r["log"]
    run_dir = r["run_dir"]
    # Rendezvous crossed the namespace boundary: each rank on its own host and address.
    two = _ranks(run_dir)
    subnet = r["env"]["DDHPC_NETNS_SUBNET"]
    assert two == [(0, 0, 0, "node1", f"{subnet}.1"), (1, 0, 1, "node2", f"{subnet}.2")], two
    table = rank_log(run_dir, 0)
    assert "rank table" in table and "node1" in table and "node2" in table
    _check_one_run_folder(run_dir, 2, [8, 16, 24])
    ids_two = _check_disjoint_samples(run_dir, 2)
    # One launcher log per node, one log per rank under its node.
    logs = r["cwd"] / "logs" / f"depthdif-ambient-{r['job']}" / "attempt-0"
    assert sorted(p.name for p in logs.glob("node-*.out")) == ["node-0.out", "node-1.out"]
    for node in (0, 1):
        assert len(list(logs.glob(f"node-{node}/*/attempt_0/0/stderr.log"))) == 1
    # Nothing else was written into the submit directory (no stray per-node run folders).
    assert sorted(p.name for p in r["cwd"].iterdir()) == sorted(
        ["run", "logs", f"depthdif-ambient-{r['job']}.out"])

    # The same global batch on one node (two processes on node1): same samples, same weights.
    one = one_node_run
    assert [x["state"] for x in sacct_records(one["env"], one["job"])] == ["COMPLETED"], one["log"]
    assert _ranks(one["run_dir"]) == [(0, 0, 0, "node1", f"{subnet}.1"), (1, 1, 0, "node1", f"{subnet}.1")]
    assert _check_disjoint_samples(one["run_dir"], 2) == ids_two
    assert [s["loss"] for s in _steps(one["run_dir"])] == [s["loss"] for s in _steps(run_dir)]
    assert_same_weights(final_weights(run_dir, STEPS), final_weights(one["run_dir"], STEPS))


def test_sbatch_two_nodes_two_processes_each(two_node_slurm, store, tmp_path):
    """Two trainer processes per node (four ranks): local ranks repeat across nodes while global
    ranks do not, the place where LOCAL_RANK-for-RANK bugs show. Same training as four processes
    on one node."""
    two = _sbatch_run(two_node_slurm, store, tmp_path / "2x2", nodes=2, procs=2)
    one = _sbatch_run(two_node_slurm, store, tmp_path / "1x4", nodes=1, procs=4)
    subnet = two["env"]["DDHPC_NETNS_SUBNET"]
    for r in (two, one):
        assert [x["state"] for x in sacct_records(r["env"], r["job"])] == ["COMPLETED"], r["log"]
    assert _ranks(two["run_dir"]) == [(0, 0, 0, "node1", f"{subnet}.1"), (1, 1, 0, "node1", f"{subnet}.1"),
                                      (2, 0, 1, "node2", f"{subnet}.2"), (3, 1, 1, "node2", f"{subnet}.2")]
    assert [(x[0], x[1], x[2]) for x in _ranks(one["run_dir"])] == [(i, i, 0) for i in range(4)]
    _check_one_run_folder(two["run_dir"], 4, [8, 16, 24])
    assert _check_disjoint_samples(two["run_dir"], 4) == _check_disjoint_samples(one["run_dir"], 4)
    assert_same_weights(final_weights(two["run_dir"], STEPS), final_weights(one["run_dir"], STEPS))


def test_submit_two_nodes(two_node_slurm, two_node_run, store, tmp_path):
    env = _env(two_node_slurm, 1)
    run_dir = tmp_path / "run"
    out = submit(env, tmp_path, "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "2",
                 "--time", "10", "--wait", *tiny_overrides(store, run_dir, STEPS, *EXTRA))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    job = job_id(out)
    for rank in (0, 1):
        assert f"'rank': {rank}, 'exit_code': 0, 'step': {STEPS}" in out.stdout, out.stdout
    log = submitit_log(tmp_path, job)
    assert "hostname=node1" in log and "node=0(2)" in log, log[-3000:]
    assert "hostname=node2" in submitit_log(tmp_path, job, rank=1)
    subnet = env["DDHPC_NETNS_SUBNET"]
    assert _ranks(run_dir) == [(0, 0, 0, "node1", f"{subnet}.1"), (1, 0, 1, "node2", f"{subnet}.2")]
    _check_one_run_folder(run_dir, 2, [8, 16, 24])
    ids = _check_disjoint_samples(run_dir, 2)
    # The submitit launch trains exactly what the sbatch launch trained.
    assert ids == _check_disjoint_samples(two_node_run["run_dir"], 2)
    assert_same_weights(final_weights(run_dir, STEPS), final_weights(two_node_run["run_dir"], STEPS))


def _start_sbatch(env: dict, cwd: Path, run_dir: Path, store: Path) -> str:
    return sbatch(env, cwd, "train_ambient.sh", ["--nodes=2"], tiny_overrides(store, run_dir, STEPS, *EXTRA))


def _start_submit(env: dict, cwd: Path, run_dir: Path, store: Path) -> str:
    out = submit(env, cwd, "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "2", "--time", "10",
                 *tiny_overrides(store, run_dir, STEPS, *EXTRA))
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    return job_id(out)


# How each entry point is told to stop: SLURM's warning before the time limit goes to the batch
# script for sbatch (--signal=B:USR1) and to every task for submitit (USR2).
ENTRY_POINTS = {
    "sbatch": (_start_sbatch, ["scancel", "--signal=USR1", "--batch"]),
    "submit": (_start_submit, ["scancel", "--signal=USR2"]),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_two_node_preemption_checkpoints_once_and_resumes(entry, two_node_slurm, two_node_run, store, tmp_path):
    """The checkpoint signal must reach the trainers on both nodes: one checkpoint, a requeue, and
    a resume on two nodes with no step repeated or skipped."""
    start, signal_cmd = ENTRY_POINTS[entry]
    env = _env(two_node_slurm, 1)
    run_dir = tmp_path / "run"
    job = start(env, tmp_path, run_dir, store)
    seen = wait_steps(run_dir, 3, 180, env, job)
    assert seen < STEPS, "the run finished before it could be interrupted"
    sig = run([*signal_cmd, job], env=env)
    assert sig.returncode == 0, sig.stderr
    wait_job(env, job, 300, f"(two-node preemption, {entry})")
    if entry == "sbatch":
        log = job_log(tmp_path, "depthdif-ambient", job)
        assert "checkpoint signal received" in log and f"requeueing job {job}" in log, log
        assert "attempt 1: 2 node(s) [node[1-2]]" in log, log
        attempt1 = tmp_path / "logs" / f"depthdif-ambient-{job}" / "attempt-1"
        assert sorted(p.name for p in attempt1.glob("node-*.out")) == ["node-0.out", "node-1.out"]
    else:
        log = submitit_log(tmp_path, job)
        assert f"Requeued job {job}" in log and "attempt 1 rank 0/2" in log, log[-4000:]
        assert "attempt 1 rank 1/2" in submitit_log(tmp_path, job, rank=1)
    print(log[-6000:])
    states = [x["state"] for x in sacct_records(env, job)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", (states, log[-4000:])

    # Both nodes' trainers got the signal and stopped at the same step; one checkpoint was saved
    # for it and both resumed from it.
    stops, resumes = stop_and_resume_steps(run_dir)
    assert len(stops) == 1 and 0 < stops[0] < STEPS and resumes == stops, (stops, resumes)
    stop = stops[0]
    rank1 = rank_log(run_dir, 1)
    assert re.search(STOP_RE.format(step=stop), rank1), rank1
    # The signal reached a trainer itself, not only through the agreement (which of the two
    # is a race: the one whose signal lands after the other's vote logs "another rank").
    own = rf"stop requested \(signal \d+\) at step {stop}:"
    assert re.search(own, rank_log(run_dir, 0)) or re.search(own, rank1), (rank_log(run_dir, 0), rank1)
    if entry == "submit":  # and node2's task got it too
        assert "caught SIGUSR2" in submitit_log(tmp_path, job, rank=1)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stop:08d}'}: step {stop}" in rank1, rank1
    saves = rank_log(run_dir, 0).count(f"INFO checkpoint {run_dir / 'checkpoints' / f'step_{stop:08d}'}\n")
    assert saves == 1, rank_log(run_dir, 0)
    assert _ranks(run_dir)[1][3] == "node2"  # the resumed attempt ran on two nodes again

    # No step repeated or skipped, the same samples and weights as the uninterrupted run.
    assert steps_logged(run_dir) == list(range(1, STEPS + 1))
    assert _check_disjoint_samples(run_dir, 2) == _check_disjoint_samples(two_node_run["run_dir"], 2)
    assert_same_weights(final_weights(run_dir, STEPS), final_weights(two_node_run["run_dir"], STEPS))
