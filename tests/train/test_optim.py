"""The learning-rate controller: linear warm-up, reduce-on-plateau (and its saved state), cosine."""

import pytest

from depthdif_hpc.train.optim import LRController
from tests.helpers import tiny_config


def test_warmup_plateau_and_cosine():
    cfg = tiny_config(overrides=["training.lr=1e-3", "scheduler.warmup.steps=4", "scheduler.warmup.start_ratio=0.2",
                                 "scheduler.reduce_on_plateau.patience=1", "scheduler.reduce_on_plateau.factor=0.5"])
    lr = LRController(cfg)
    assert [round(lr.lr_at(s), 8) for s in range(5)] == [0.0004, 0.0006, 0.0008, 0.001, 0.001]
    assert not lr.plateau_step(1.0) and not lr.plateau_step(1.0)
    assert lr.plateau_step(1.0) and lr.lr_at(10) == 5e-4  # 2 bad epochs > patience 1
    state = lr.state_dict()
    lr2 = LRController(cfg)
    lr2.load_state_dict(state)
    assert lr2.lr_at(10) == 5e-4
    cos = LRController(tiny_config(overrides=["training.lr=1e-3", "scheduler.warmup.steps=0",
                                              "scheduler.reduce_on_plateau.enabled=false",
                                              "scheduler.cosine.enabled=true", "trainer.max_steps=10"]))
    assert cos.lr_at(0) == pytest.approx(1e-3) and cos.lr_at(5) == pytest.approx(5e-4) and cos.lr_at(10) == pytest.approx(0)
