"""The step-log book on its own: the non-finite check, steps.jsonl lines and the MFU figure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from common import args, steps

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


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_window_throughput_and_data_wait_from_the_clock(tmp_path):
    clock = FakeClock()
    log = StepLog(_cfg(tmp_path), tmp_path, rank=0, world=1, device=torch.device("cpu"),
                  ctrl_group=None, step=0, flops_per_sample=10**9, peak_flops=1e12, clock=clock)
    try:
        for s in (1, 2):
            with log.waiting():
                clock.advance(1.5)  # the loader
            clock.advance(0.5)  # the step's compute
            log.record(_rec(s, 1.0), samples=8, area=16 * 16)
        log.flush(2, epoch=0)
        clock.advance(30.0)  # validation: outside every window
        log.reset_window(2)
        with log.waiting():
            pass
        clock.advance(2.0)
        log.record(_rec(3, 1.0), samples=8, area=16 * 16)
        log.flush(3, epoch=0)
    finally:
        log.close()
    lines = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert "samples_per_s" not in lines[0]  # once per window, on its last step
    slow, fast = lines[1], lines[2]
    assert slow["step_time_s"] == pytest.approx(2.0) and fast["step_time_s"] == pytest.approx(2.0)
    assert slow["samples_per_s"] == pytest.approx(4.0) and fast["samples_per_s"] == pytest.approx(4.0)
    assert slow["data_wait_fraction"] == pytest.approx(0.75) and fast["data_wait_fraction"] == 0.0
    assert slow["data_wait_s_per_step"] == pytest.approx(1.5)
    # 4 samples/s x 1 GFLOP against 1 TFLOP/s
    assert slow["mfu"] == pytest.approx(4e-3)


def _driven_run(run, delay: float) -> tuple[list[dict], int]:
    """The real loop on a driven clock: each batch takes `delay` s to load, each step 1 s."""
    from memdata import MemoryStream

    from depthdif_hpc.train.cli import main

    clock = FakeClock()
    seen = {}

    class SlowStream(MemoryStream):
        def __iter__(self):
            for b in super().__iter__():
                clock.advance(delay)
                yield b

    def data(cfg, split, rank, world):
        return SlowStream(24, cfg.dataloader.batch_size, rank, world, seed=cfg.training.seed)

    def after_step(tr):
        if tr.step == 1:  # from here on the window runs on the driven clock
            tr.steplog.clock = clock
            tr.steplog.reset_window(tr.step)
            seen["flops"] = tr.steplog.flops_per_sample
        else:
            clock.advance(1.0)

    assert main(args(run, "trainer.max_steps=5"), data_factory=data, hooks={"after_step": after_step}) == 0
    return [r for r in steps(run) if "samples_per_s" in r], seen["flops"]


@pytest.mark.parametrize("delay", [0.0, 3.0], ids=["instant_loader", "slow_loader"])
def test_trainer_logs_throughput_per_window(tmp_path, monkeypatch, delay):
    """Through the real loop: a loader stand-in taking 3 s per batch and steps of 1 s give a
    data-wait fraction of 3/4 in steps.jsonl and TensorBoard, samples/s of batch / 4 s and the
    MFU of the analytic count; an instant loader gives 0."""
    from depthdif_hpc.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "_peak_flops", lambda self: 1e12)
    windows, flops = _driven_run(tmp_path / "run", delay)
    assert [r["step"] for r in windows] == [2, 4, 5]
    for r in windows[:2]:  # whole windows (the last one also holds the final checkpoint)
        for k in ("step_time_s", "samples_per_s", "data_wait_fraction", "mfu"):
            assert math.isfinite(r[k]), (k, r)
        assert r["step_time_s"] == pytest.approx(1.0 + delay)
        assert r["samples_per_s"] == pytest.approx(2 / (1.0 + delay))  # batch 2, one rank
        assert r["data_wait_fraction"] == pytest.approx(delay / (1.0 + delay))
        assert r["mfu"] == pytest.approx(r["samples_per_s"] * flops / 1e12)
    tb = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tb").iterdir())
    for tag in (b"perf/samples_per_s", b"perf/data_wait_fraction", b"perf/mfu", b"perf/step_time_s"):
        assert tag in tb
