"""The step-log book on its own: the non-finite check, steps.jsonl lines and the MFU figure."""

from __future__ import annotations

import json

import pytest
import torch
from common import args

from depthdif_hpc.config import load_config
from depthdif_hpc.train.steplog import NonFiniteLossError, StepLog, StepRecord


def _cfg(tmp_path):
    files = [a for i, a in enumerate(args(tmp_path)) if i and args(tmp_path)[i - 1] == "--config"]
    return load_config(*files, overrides=["logging.tensorboard=false", "trainer.progress_bar=false",
                                          "dataset.grid.tile_size=16", "dataset.grid.patch_stride=16"])


def _rec(step: int, loss: float) -> StepRecord:
    return StepRecord(step, torch.tensor(loss), {"mse": torch.tensor(2 * loss)}, None, 1e-3, [step])


def test_lines_and_mfu(tmp_path):
    log = StepLog(_cfg(tmp_path), tmp_path, rank=0, world=1, device=torch.device("cpu"),
                  ctrl_group=None, step=0, flops_per_sample=10**9, peak_flops=1e12)
    try:
        for s in (1, 2, 3):
            log.record(_rec(s, 0.5 * s), samples=4, area=16 * 16)
        log.flush(3, epoch=0)
    finally:
        log.close()
    lines = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert [r["loss"] for r in lines] == [0.5, 1.0, 1.5] and lines[1]["mse"] == 2.0
    last = lines[-1]
    # 12 samples of 1 GFLOP each over the window, against a 1 TFLOP/s peak
    assert last["mfu"] == pytest.approx(last["samples_per_s"] * 1e9 / 1e12)


def test_area_other_than_the_counted_tile_scales_the_count(tmp_path):
    log = StepLog(_cfg(tmp_path), tmp_path, rank=0, world=1, device=torch.device("cpu"),
                  ctrl_group=None, step=0, flops_per_sample=4 * 10**9, peak_flops=1e12)
    log.record(_rec(1, 1.0), samples=2, area=8 * 8)  # a quarter of 16 x 16
    log.close()
    assert log.flops_per_sample == 10**9


def test_non_finite_loss_names_step_and_samples(tmp_path):
    log = StepLog(_cfg(tmp_path), tmp_path, rank=0, world=1, device=torch.device("cpu"),
                  ctrl_group=None, step=0)
    log.record(_rec(1, 1.0), samples=2, area=256)
    log.record(_rec(2, float("nan")), samples=2, area=256)
    with pytest.raises(NonFiniteLossError, match="optimizer step 2") as err:
        log.flush(2, epoch=0)
    log.close()
    assert err.value.ids_by_rank == {0: [2]}
    assert not (tmp_path / "steps.jsonl").read_text()  # nothing of the bad window is written
