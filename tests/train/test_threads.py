"""The trainer's intra-op thread count: one rule under every launcher, applied and logged by the
trainer itself (`trainer.intra_op_threads`), whatever OMP_NUM_THREADS the launcher left behind."""

from __future__ import annotations

import json
import os

import pytest
import torch
from common import args
from memdata import factory

from depthdif_hpc.launch_env import resolve_threads
from depthdif_hpc.train.cli import main


@pytest.mark.parametrize("env, cpus, want", [
    ({}, 8, 8),                                                   # one process: every CPU
    ({"LOCAL_WORLD_SIZE": "2"}, 8, 4),                            # shared among the node's processes
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),                            # never below one
    ({"LOCAL_WORLD_SIZE": "2", "SLURM_CPUS_ON_NODE": "4"}, 64, 2),  # the allocation caps the mask
    ({"SLURM_CPUS_ON_NODE": "16(x2)"}, 64, 16),                   # SLURM's repeat notation
])
def test_default_is_node_cpus_over_local_processes(env, cpus, want):
    assert resolve_threads(None, env, cpus=cpus).count == want


def test_launcher_omp_setting_is_not_consulted():
    # torchrun exports OMP_NUM_THREADS=1 only with several processes per node: honouring it would
    # make one process per node run with a different count than two per node.
    one_per_node = resolve_threads(None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"}, cpus=4)
    unset = resolve_threads(None, {"LOCAL_WORLD_SIZE": "1"}, cpus=4)
    assert one_per_node.count == unset.count == 4


def test_explicit_setting_wins():
    t = resolve_threads(3, {"LOCAL_WORLD_SIZE": "8", "OMP_NUM_THREADS": "1"}, cpus=2)
    assert (t.count, t.source) == (3, "trainer.intra_op_threads")


@pytest.mark.parametrize("setting", [1, 2])
def test_trainer_applies_and_logs_the_count(tmp_path, monkeypatch, setting):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # a launcher's leftover: must not win
    run = tmp_path / "run"
    assert main(args(run, "trainer.max_steps=1", f"trainer.intra_op_threads={setting}"),
                data_factory=factory()) == 0
    assert torch.get_num_threads() == setting
    assert os.environ["OMP_NUM_THREADS"] == str(setting)  # what loader workers and children see
    assert [r["threads"] for r in json.loads((run / "ranks.json").read_text())] == [setting]
    text = (run / "logs" / "rank_00000.log").read_text()
    assert f"intra-op threads: {setting} (trainer.intra_op_threads; OMP_NUM_THREADS was 7)" in text


def test_trainer_default_ignores_the_launcher_value(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    overrides = [a for a in args(tmp_path / "run", "trainer.max_steps=1")
                 if not a.startswith("trainer.intra_op_threads")]
    assert main(overrides, data_factory=factory()) == 0
    assert torch.get_num_threads() == resolve_threads(None).count
