"""torchrun across two namespace hosts, no SLURM: tells a distributed-training problem apart
from a SLURM one. The two-node run must match a single-node run of the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthdif_hpc.data.synthetic import build_tiny_store

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
STEPS = 6


def _train_args(store: Path, run_dir: Path) -> list[str]:
    cfg = ROOT / "configs" / "px_space"
    return [
        "-m", "depthdif_hpc.train",
        "--config", str(cfg / "model_config_ambient.yaml"), "--config", str(cfg / "training_config.yaml"),
        "--config", str(cfg / "data_config.yaml"),
        f"dataset.store={store}", f"trainer.run_dir={run_dir}", f"trainer.max_steps={STEPS}",
        "model.unet.dim=8", "model.unet.dim_mults=[1,2]", "model.kernels=eager",
        "model.noise.num_timesteps=20", "model.sampling.sampler=ddim",
        "model.sampling.ddim_num_timesteps=2", "trainer.limit_val_batches=1",
        "trainer.val_every_n_steps=1000", f"trainer.checkpoint_every_n_steps={STEPS}",
        "dataloader.batch_size=2", "dataloader.val_batch_size=2", "dataloader.num_workers=0",
        "dataloader.pin_memory=false", "trainer.ema.enabled=false", "scheduler.warmup.steps=2",
        # Both layouts sum in the same order only with the same thread count: by default one
        # process per host would get every CPU and two processes on one host half each.
        "trainer.intra_op_threads=1",
    ]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors"))


def _check_run(run_dir: Path) -> None:
    steps = [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # every step once, written once per job
    assert (run_dir / "config.yaml").is_file()
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["rank_00000.log", "rank_00001.log"], logs
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")] == [
        f"step_{STEPS:08d}"]
    assert [r["threads"] for r in json.loads((run_dir / "ranks.json").read_text())] == [1, 1]


@pytest.mark.slow
def test_torchrun_across_two_hosts_matches_single_host(two_hosts, tmp_path):
    store = build_tiny_store(tmp_path / "ocean", tile_size=32)
    port = 29000 + (abs(hash(str(tmp_path))) % 2000)
    multi = tmp_path / "two_hosts"
    procs = []
    for node in (1, 2):
        cmd = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node - 1),
               "--master_addr", two_hosts.addr(1), "--master_port", str(port),
               *_train_args(store, multi)]
        procs.append(two_hosts.popen(node, cmd, cwd=str(ROOT), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    _check_run(multi)
    # the rendezvous really crossed hosts: the rank table shows each rank on its own node/address
    ranks = {r["rank"]: r for r in json.loads((multi / "ranks.json").read_text())}
    assert [(ranks[i]["node_rank"], ranks[i]["local_rank"], ranks[i]["addr"]) for i in (0, 1)] == [
        (0, 0, two_hosts.addr(1)), (1, 0, two_hosts.addr(2))]
    assert "rank table" in (multi / "logs" / "rank_00000.log").read_text()

    single = tmp_path / "one_host"
    r = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port + 1),
                        *_train_args(store, single)], cwd=str(ROOT), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _check_run(single)
    a, b = _final_weights(multi), _final_weights(single)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
