"""DeepSpeed resume against an uninterrupted run, bit for bit: 2 ranks under ZeRO-2 and ZeRO-3
(CPU, gloo, fp32, one intra-op thread), the product data stream with 2 loader workers per rank.
One run trains 6 steps straight; the other is stopped by a signal after step 3 (the trainer's
checkpoint-and-exit path), resumed, and finishes. Their final checkpoints (weights and Adam
moments in DeepSpeed's shards, the EMA, every rank's RNG and stream position), their losses and
the full weights and EMA both gather after step 5 must be identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from common import args, steps, torchrun
from safetensors.torch import load_file
from test_train_multi import _facts

pytestmark = pytest.mark.slow

STEPS, STOP = 6, 3


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """8 training samples: 2 steps per epoch at 2 ranks x batch 2, so the stop falls inside
    epoch 1 and the runs cross two more epoch boundaries (the workers restart each epoch)."""
    from depthdif_hpc.data.synthetic import build_tiny_store

    return build_tiny_store(tmp_path_factory.mktemp("dsresume"), tile_size=32)


def _same(a: Any, b: Any, where: str) -> None:
    """Equal down to the bits: tensors by dtype, shape and every element; objects by their
    attributes; the rest by ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif hasattr(a, "__dict__") and not callable(a):  # e.g. DeepSpeed's loss scaler: no __eq__
        _same(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


def _compare_checkpoints(straight: Path, resumed: Path) -> list[str]:
    names = sorted(str(p.relative_to(straight)) for p in straight.rglob("*") if p.is_file()
                   and p.name != "MANIFEST.json" and p.name != "trainer_state.json")
    assert names == sorted(str(p.relative_to(resumed)) for p in resumed.rglob("*") if p.is_file()
                           and p.name not in ("MANIFEST.json", "trainer_state.json"))
    for name in names:
        if name.endswith(".safetensors"):
            _same(load_file(str(straight / name)), load_file(str(resumed / name)), name)
        elif name.endswith(".pt"):
            _same(torch.load(straight / name, map_location="cpu", weights_only=False),
                  torch.load(resumed / name, map_location="cpu", weights_only=False), name)
    a, b = (json.loads((d / "trainer_state.json").read_text()) for d in (straight, resumed))
    for state in (a, b):
        del state["config"]["trainer"]["run_dir"]  # the one setting the two runs differ in
    _same(a, b, "trainer_state.json")
    return names


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_exact(tmp_path, store, stage):
    extra = [f"dataset.store={store}", "dataloader.num_workers=2", f"trainer.max_steps={STEPS}",
             "trainer.val_at_epoch_end=false", "trainer.record_sample_ids=true",
             "trainer.distributed=deepspeed", f"trainer.deepspeed_config=configs/deepspeed/zero{stage}.json",
             f"trainer.zero_stage={stage}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Both runs also gather the full weights after step 5, as validation does mid-run: after a
    # ZeRO-3 resume that once broke the next step (DeepSpeed's "tracing error").
    torchrun(tmp_path / "s.json", args(straight, *extra), "--product-data", "--facts-at", "5")
    torchrun(tmp_path / "r1.json", args(resumed, *extra), "--stop-at", str(STOP), "--product-data")
    assert [f["exit_code"] for f in _facts(tmp_path / "r1.json")] == [75, 75]
    assert (resumed / "checkpoints" / f"step_{STOP:08d}").is_dir()
    torchrun(tmp_path / "r2.json", args(resumed, *extra), "--product-data", "--facts-at", "5")
    assert [f["exit_code"] for f in _facts(tmp_path / "r2.json")] == [0, 0]
    for run in (straight, resumed):  # the bit-exact comparison holds under one pinned thread
        assert [r["threads"] for r in json.loads((run / "ranks.json").read_text())] == [1, 1]

    keep = ("step", "epoch", "loss", "lr")
    assert [{k: r[k] for k in keep} for r in steps(straight)] == [{k: r[k] for k in keep} for r in steps(resumed)]
    assert [r["epoch"] for r in steps(resumed)] == [0, 0, 1, 1, 2, 2]
    for r in range(2):
        audit = f"logs/samples_rank_{r:05d}.jsonl"
        assert (straight / audit).read_text() == (resumed / audit).read_text()
    names = _compare_checkpoints(straight / "checkpoints" / f"step_{STEPS:08d}",
                                 resumed / "checkpoints" / f"step_{STEPS:08d}")
    assert any("optim_states" in n for n in names) and any(n.startswith("ema") for n in names), names
    _same(torch.load(f"{tmp_path / 's.json'}.params.pt"), torch.load(f"{tmp_path / 'r2.json'}.params.pt"), "params")
    _same(torch.load(f"{tmp_path / 's.json'}.ema.pt"), torch.load(f"{tmp_path / 'r2.json'}.ema.pt"), "ema")
