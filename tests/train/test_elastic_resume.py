"""Resume at another world size (docs/cluster.md, "What happens when"): the product data stream
continues the interrupted epoch with the samples no saved rank consumed, dealt over the new
ranks. The sample audit (logs/samples_rank_*.jsonl) proves every sample of that epoch is trained
on exactly once across the two runs: 2 -> 1 and 1 -> 2 ranks under DDP on CPU (gloo), and
2 -> 1 under DeepSpeed ZeRO-2 through DeepSpeed's universal checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import HERE, ROOT, args, steps, torchrun
from test_train_multi import _facts

from depthdif_hpc.checkpoint.weights import checkpoint_weights
from depthdif_hpc.data.store import StoreError, read_manifest
from depthdif_hpc.data.stream import ShardStream, StreamLoader
from depthdif_hpc.train.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """28 training samples (7 days x 4 tiles) in shards of 3: no world size here divides a shard."""
    from depthdif_hpc.data.synthetic import build_tiny_store

    return build_tiny_store(tmp_path_factory.mktemp("elastic"), tile_size=32, start="2017-12-25",
                            end="2018-01-01", shard_samples=3)


def _loader(store: Path, rank: int, world: int, batch: int, workers: int) -> StreamLoader:
    ds = ShardStream(store, "train", rank=rank, world_size=world, batch_size=batch, batched=True,
                     shuffle=True, seed=7, shuffle_buffer=4)
    ds.set_epoch(0)
    return StreamLoader(ds, num_workers=workers)


def _take(loaders: list[StreamLoader], batches: int | None) -> tuple[list[int], list[dict]]:
    """Sample ids of the first `batches` batches (None: the rest of the epoch) of every loader,
    and each loader's position afterwards."""
    ids, states = [], []
    for ld in loaders:
        it = iter(ld)
        for i, b in enumerate(it):
            ids += b["sample_id"].tolist()
            if batches is not None and i + 1 == batches:
                break
        states.append(ld.state_dict())
        del it
    return ids, states


def test_stream_continues_an_epoch_across_layout_changes(store):
    """3 ranks x 2 workers stop after 1 batch, 2 ranks x 1 worker (batch 3) continue for 2 and
    stop, the second layout resumes once more at the same size, then 1 rank in-process finishes:
    every sample of the epoch exactly once (28 - 6 = 22 divides over 2 ranks: none left out)."""
    n = ShardStream(store, "train").n
    seen, states = _take([_loader(store, r, 3, 2, 2) for r in range(3)], 1)
    two = [_loader(store, r, 2, 3, 1) for r in range(2)]
    for ld in two:
        ld.load_layout_states(states)
    more, states2 = _take(two, 2)
    assert all("done" in s for s in states2)  # the re-dealt epoch survives a same-size resume
    again = [_loader(store, r, 2, 3, 1) for r in range(2)]
    for ld, st in zip(again, states2, strict=True):
        ld.load_state_dict(st)
    more2, states3 = _take(again, 1)
    one = _loader(store, 0, 1, 2, 0)
    one.load_layout_states(states3)
    rest, _ = _take([one], None)
    ids = seen + more + more2 + rest
    assert len(seen) == 6 and len(more) == 12 and len(more2) == 6
    assert sorted(ids) == sorted(set(ids)) and len(ids) == n, (len(ids), n)
    assert one.epoch == 1 and "done" not in one.state_dict()  # the next epoch is whole again
    with pytest.raises(StoreError, match="different epochs"):
        _loader(store, 0, 1, 2, 0).load_layout_states([states3[0], dict(states3[1], epoch=1)])


def _base(store: Path, max_steps: int, workers: int) -> list[str]:
    return [f"dataset.store={store}", f"dataloader.num_workers={workers}", f"trainer.max_steps={max_steps}",
            "trainer.val_at_epoch_end=false", "trainer.record_sample_ids=true"]


def _epoch_ids(run: Path, epoch: int) -> list[int]:
    """Sample ids trained on in `epoch`, over every rank's audit (steps.jsonl gives the epochs)."""
    of_step = {r["step"]: r["epoch"] for r in steps(run)}
    ids = []
    for f in sorted((run / "logs").glob("samples_rank_*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if of_step[rec["step"]] == epoch:
                ids += rec["ids"]
    return ids


def _check(run: Path, store: Path, max_steps: int, old: int, new: int) -> None:
    assert [r["step"] for r in steps(run)] == list(range(1, max_steps + 1))  # the counter continues
    n = read_manifest(store)["splits"]["train"]["n_samples"]
    ids = _epoch_ids(run, 0)
    assert len(ids) == n and len(set(ids)) == n, sorted(ids)
    assert _epoch_ids(run, 1)  # and the next epoch started
    log = (run / "logs" / "rank_00000.log").read_text()
    assert f"written by {old} ranks) on {new} ranks" in log and "global batch is now" in log


@pytest.mark.slow
def test_two_ranks_to_one(tmp_path, store):
    """2 ranks (7 steps per epoch of 28) stop after step 3; 1 rank continues with the 16 samples
    left (8 steps), then starts epoch 1."""
    run = tmp_path / "run"
    torchrun(tmp_path / "a.json", args(run, *_base(store, 12, 1)), "--stop-at", "3", "--product-data")
    assert [f["exit_code"] for f in _facts(tmp_path / "a.json")] == [75, 75]
    assert main(args(run, *_base(store, 12, 0))) == 0
    _check(run, store, 12, 2, 1)
    assert [r["epoch"] for r in steps(run)] == [0] * 11 + [1]


@pytest.mark.slow
def test_one_rank_to_two(tmp_path, store):
    """1 rank (14 steps per epoch) stops after step 3; 2 ranks continue with the 22 samples left
    (11 each: 6 steps, the last with one sample per rank), then start epoch 1."""
    run = tmp_path / "run"

    def stop_at_3(tr) -> None:
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert main(args(run, *_base(store, 10, 0)), hooks={"after_step": stop_at_3}) == 75
    torchrun(tmp_path / "b.json", args(run, *_base(store, 10, 1)), "--product-data")
    assert [f["exit_code"] for f in _facts(tmp_path / "b.json")] == [0, 0]
    _check(run, store, 10, 1, 2)
    assert [r["epoch"] for r in steps(run)] == [0] * 9 + [1]


@pytest.mark.slow
def test_zero2_two_ranks_to_one(tmp_path, store):
    """DeepSpeed ZeRO-2: the 2-rank checkpoint is converted to DeepSpeed's universal format
    (a temporary sibling folder, removed after the load) and resumed by 1 process."""
    run = tmp_path / "run"
    ds = ["trainer.distributed=deepspeed", "trainer.deepspeed_config=configs/deepspeed/zero2.json",
          "trainer.zero_stage=2"]
    torchrun(tmp_path / "a.json", args(run, *_base(store, 12, 0), *ds), "--stop-at", "3", "--product-data")
    assert [f["exit_code"] for f in _facts(tmp_path / "a.json")] == [75, 75]
    # Its own process: DeepSpeed keeps process-group state in module globals between engines.
    proc = subprocess.run([sys.executable, str(HERE / "worker.py"), str(tmp_path / "b.json"), "--product-data", "--facts-at", "4", "--",
                           *args(run, *_base(store, 12, 0), *ds)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check(run, store, 12, 2, 1)
    log = (run / "logs" / "rank_00000.log").read_text()
    assert "converting its ZeRO-2 state to a universal checkpoint" in log and "EMA restarts" not in log
    assert not list((run / "checkpoints").glob(".universal-*"))
    # The EMA came along, re-cut to one rank's fragments: step 4 averages into the saved one
    # (decay 0.8), not into the weights it would restart from.
    saved = checkpoint_weights(run / "checkpoints" / "step_00000003", ema=True)
    w4, ema4 = torch.load(f"{tmp_path / 'b.json'}.params.pt"), torch.load(f"{tmp_path / 'b.json'}.ema.pt")
    for k, e in saved.items():
        torch.testing.assert_close(ema4[k].float(), e + 0.2 * (w4[k] - e), rtol=0, atol=1e-6)
    # The Adam state came along: one partition now, and its step count continues (3 + 9).
    final = torch.load(run / "checkpoints" / "step_00000012" / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    assert final["partition_count"] == [1]
    assert all(int(st["step"]) == 12 for st in final["base_optimizer_state"]["state"].values())
