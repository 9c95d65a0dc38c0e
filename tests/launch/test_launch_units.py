"""Launcher pieces that need no SLURM: host lists, ports, time formats, sweeps, trainer
arguments, the submitit callable and its signal forwarding."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time

import pytest

from depthdif_hpc.launch import split_args, trainer_argv
from depthdif_hpc.launch.submit import parse_sweep, parse_time_minutes
from depthdif_hpc.launch.submitit_job import TrainJob, _StopForwarder
from depthdif_hpc.launch_env import expand_hostlist, job_port


def test_expand_hostlist():
    assert expand_hostlist("gpu[003-005,007],login1") == ["gpu003", "gpu004", "gpu005", "gpu007", "login1"]
    assert expand_hostlist("localhost") == ["localhost"]
    assert expand_hostlist("r[1-2]-n[01-02]") == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
    with pytest.raises(ValueError):
        expand_hostlist("gpu[1-2")


def test_job_port_matches_the_sbatch_script():
    for job, restart in [(1, 0), (7, 3), (123456, 1), (999999, 0)]:
        bash = subprocess.run(["bash", "-c", f"echo $((20000 + ({job} * 7 + {restart}) % 30000))"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert job_port(job, restart) == int(bash)
    assert 20000 <= job_port("4242_7") < 50000
    assert job_port("4242_7") != job_port("4242_8")


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("24:00:00", 1440), ("1-12", 2160),
                                           ("2-00:30:00", 2910), ("0:30", 1)])
def test_parse_time(text, minutes):
    assert parse_time_minutes(text) == minutes


def test_parse_sweep():
    assert parse_sweep([]) == [[]]
    assert parse_sweep(["a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    assert parse_sweep(["m=[1,2],[1,2,4]"]) == [["m=[1,2]"], ["m=[1,2,4]"]]
    with pytest.raises(ValueError):
        parse_sweep(["novalues"])


def test_trainer_args(tmp_path):
    configs, overrides = split_args(["--config", "a.yaml", "x=1", "--config=b.yaml", "y.z=[1,2]"])
    assert configs == ["a.yaml", "b.yaml"] and overrides == ["x=1", "y.z=[1,2]"]
    with pytest.raises(ValueError):
        split_args(["--nodes"])
    argv = trainer_argv("ambient", configs, overrides, run_dir=tmp_path, restart=0)
    assert argv[1].endswith("configs/px_space/model_config_ambient.yaml")
    assert argv.count("--config") == 5
    assert argv[-3:] == ["trainer.resume=auto", "x=1", "y.z=[1,2]"]  # user overrides win
    again = trainer_argv("ambient", configs, ["trainer.resume=none"], run_dir=tmp_path, restart=1)
    assert again[-1] == "trainer.resume=auto"  # a requeued attempt always resumes
    with pytest.raises(ValueError):
        trainer_argv("nope", [], [], run_dir=tmp_path)


def test_train_job_pickles_by_reference(tmp_path):
    job = TrainJob("ambient", [], ["x=1"], run_root=str(tmp_path), name="n", device="cpu")
    blob = pickle.dumps(job)
    assert b"depthdif_hpc.launch.submitit_job" in blob and b"__main__" not in blob
    assert pickle.loads(blob).resolved_run_dir("12_3") == tmp_path / "n-12_3"
    assert job.checkpoint().function is job


def test_stop_forwarder_reaches_a_trainer_that_starts_later():
    old = signal.getsignal(signal.SIGUSR1)
    got = []
    fwd = _StopForwarder()
    try:
        signal.signal(signal.SIGUSR1, fwd._placeholder)
        fwd.on_preempt(signal.SIGUSR2, None)  # before the trainer has a handler: nothing yet
        time.sleep(0.3)
        assert fwd.requested and not got
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))  # the trainer starts
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [signal.SIGUSR1]
        fwd.on_preempt(signal.SIGUSR2, None)  # with a handler in place: called directly
        assert got == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        fwd.finished.set()
        signal.signal(signal.SIGUSR1, old)


def test_submit_dry_run_and_argument_errors(tmp_path):
    cmd = [sys.executable, "-m", "depthdif_hpc.launch.submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "4",
           "--array", "model.ambient_occlusion.further_drop_prob=0.1,0.25", "trainer.max_steps=5"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 job(s) on SLURM: 2 node(s) x 4 task(s), 4 GPU(s)/node" in out.stdout
    assert "further_drop_prob=0.25" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "depthdif_hpc.launch.submit", "--dry-run", "--config", "missing.yaml"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "depthdif_hpc.launch.submit", "--dry-run", "notanoverride"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "notanoverride" in bad.stderr
