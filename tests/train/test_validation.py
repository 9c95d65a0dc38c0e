"""Validation's reconstruction: shared out over the ranks with the same result as on one rank,
DDIM by default (the model's own sampler untouched), abandoned on a stop request; validation
runs every val_every_n_steps, not at epoch ends."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from common import args, steps, torchrun
from memdata import factory
from validation_worker import validate

from depthdif_hpc.diffusion.samplers import DDIMSampler, DDPMSampler
from depthdif_hpc.model.build import build_model
from depthdif_hpc.train.cli import main
from depthdif_hpc.train.validation import validation_sampler
from tests.helpers import tiny_config

RECON = ["trainer.full_reconstruction=true", "trainer.full_reconstruction_samples=3",
         "dataloader.val_batch_size=3", "trainer.log_intermediates=true", "trainer.validation_ddim_steps=5"]


def _recon_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "recon" in k and k != "val/recon_seconds"}


@pytest.mark.slow
def test_reconstruction_shared_over_two_ranks_equals_one_rank(tmp_path):
    one, _, log = validate(tmp_path / "one", args(tmp_path, *RECON))
    assert one is not None and log.scalar_calls == [one]
    assert one["val/recon_steps"] == 5  # DDIM, validation_ddim_steps
    out = tmp_path / "two" / "metrics.json"
    out.parent.mkdir()
    torchrun(out, args(tmp_path, *RECON), worker="validation_worker.py", timeout=300)
    two = json.loads(out.read_text())
    # samples 0 and 2 on rank 0, sample 1 on rank 1: the same numbers as one rank doing all three
    assert _recon_metrics(two["metrics"]) == _recon_metrics(one)
    assert len(_recon_metrics(one)) > 100  # MSE, PSNR, SSIM and the per-band errors all compared
    assert "val/mae_vs_step" in two["figures"] and (tmp_path / "two" / "val" / "step_00000001_mae_vs_step.png").is_file()


def test_reconstruction_is_ddim_by_default_and_predict_keeps_the_model_sampler():
    cfg = tiny_config()  # model.noise.num_timesteps = 20
    assert cfg.trainer.validation_sampler == "ddim" and cfg.model.sampling.sampler == "ddpm"
    model = build_model(cfg)
    s = validation_sampler(model, cfg)
    assert isinstance(s, DDIMSampler) and s.num_steps == 20  # default 50 steps, clamped to T = 20
    short = tiny_config(overrides=["trainer.validation_ddim_steps=4"])
    assert validation_sampler(model, short).num_steps == 4
    assert type(model.make_sampler()) is DDPMSampler  # predict / evaluate default unchanged
    assert validation_sampler(model, tiny_config(overrides=["trainer.validation_sampler=model"])) is None


def test_stop_during_the_reconstruction_abandons_validation(tmp_path):
    calls = itertools.count()
    # the loss loop asks once (limit_val_batches 1), then the reverse chain before each step
    metrics, v, log = validate(tmp_path, args(tmp_path, *RECON), stop_requested=lambda: next(calls) >= 3)
    assert metrics is None and log.scalar_calls == [] and v.lr_ctl.best is None
    assert next(calls) == 4  # 1 check in the loss loop + 3 in the chain: it stopped, did not run 5 steps


def test_validation_runs_every_n_steps_not_at_epoch_end(tmp_path):
    # 8 training samples at batch 2: 4 steps per epoch; 10 steps cross two epoch ends
    run = tmp_path / "run"
    assert main(args(run, "trainer.max_steps=10", "trainer.val_every_n_steps=5"),
                data_factory=factory(n_train=8)) == 0
    text = (run / "logs" / "rank_00000.log").read_text()
    assert [int(s) for s in re.findall(r"validation step (\d+):", text)] == [5, 10]
    assert [r["step"] for r in steps(run)] == list(range(1, 11))
    assert "epoch 2" in text  # the run did cross epoch ends
