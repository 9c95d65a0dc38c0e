"""The learning-rate controller: linear warm-up, reduce-on-plateau in optimizer steps (and its
saved state), cosine; the old per-validation plateau keys still load, converted to steps."""

import re
import warnings

import pytest

from depthdif_hpc.config import config_from_dict, load_config, to_dict
from depthdif_hpc.train.optim import LRController
from tests.helpers import tiny_config


def test_warmup_and_cosine():
    cfg = tiny_config(overrides=["training.lr=1e-3", "scheduler.warmup.steps=4", "scheduler.warmup.start_ratio=0.2"])
    lr = LRController(cfg)
    assert [round(lr.lr_at(s), 8) for s in range(5)] == [0.0004, 0.0006, 0.0008, 0.001, 0.001]
    cos = LRController(tiny_config(overrides=["training.lr=1e-3", "scheduler.warmup.steps=0",
                                              "scheduler.reduce_on_plateau.enabled=false",
                                              "scheduler.cosine.enabled=true", "trainer.max_steps=10"]))
    assert cos.lr_at(0) == pytest.approx(1e-3) and cos.lr_at(5) == pytest.approx(5e-4) and cos.lr_at(10) == pytest.approx(0)


def _plateau(*extra: str) -> LRController:
    return LRController(tiny_config(overrides=[
        "training.lr=1e-3", "scheduler.warmup.steps=0", "scheduler.reduce_on_plateau.enabled=true",
        "scheduler.reduce_on_plateau.patience_steps=100", "scheduler.reduce_on_plateau.factor=0.5", *extra]))


def test_plateau_patience_counts_steps_not_validations():
    # every 10 steps: no drop until more than 100 steps have passed since the best value
    dense = _plateau()
    assert not any(dense.plateau_step(1.0, s) for s in range(10, 111, 10))  # 100 steps since step 10
    assert dense.plateau_step(1.0, 120) and dense.lr_at(121) == 5e-4
    # every 60 steps: the same 100 steps, reached after 2 validations, not 100/10
    sparse = _plateau()
    assert not sparse.plateau_step(1.0, 60) and not sparse.plateau_step(1.0, 120)
    assert sparse.plateau_step(1.0, 180) and sparse.lr_at(181) == 5e-4
    # an improvement restarts the count; the count restarts after a drop
    assert not sparse.plateau_step(0.5, 240) and not sparse.plateau_step(0.5, 340)
    assert sparse.plateau_step(0.5, 341) and sparse.plateau_lr == 2.5e-4
    assert not sparse.plateau_step(0.5, 441)


def test_plateau_cooldown_in_steps_and_saved_state():
    lr = _plateau("scheduler.reduce_on_plateau.cooldown_steps=50")
    lr.plateau_step(1.0, 0)
    assert lr.plateau_step(1.0, 101)  # drop, then no bad steps counted up to step 151
    assert not lr.plateau_step(1.0, 150) and not lr.plateau_step(1.0, 250)
    copy = _plateau("scheduler.reduce_on_plateau.cooldown_steps=50")
    copy.load_state_dict(lr.state_dict())
    assert copy.plateau_step(1.0, 251) and lr.plateau_step(1.0, 251) and copy.plateau_lr == lr.plateau_lr == 2.5e-4
    # a state saved before the step count (num_bad, cooldown_left) counts from the next validation
    old = _plateau()
    old.load_state_dict({"plateau_lr": 5e-4, "best": 1.0, "num_bad": 3, "cooldown_left": 0})
    assert not old.plateau_step(1.0, 1000) and old.plateau_step(1.0, 1101) and old.plateau_lr == 2.5e-4


def test_per_validation_plateau_keys_load_as_steps(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("trainer:\n  val_every_n_steps: 300\nscheduler:\n  reduce_on_plateau:\n    patience: 4\n"
                   "    cooldown: 2\n")
    cfg, said = _warned(lambda: load_config(old))
    assert re.search(r"patience = 4 counted validations.*patience_steps.*4 x trainer.val_every_n_steps "
                     r"300 = 1200", said)
    assert cfg.scheduler.reduce_on_plateau.patience_steps == 1200
    assert cfg.scheduler.reduce_on_plateau.cooldown_steps == 600
    cfg, said = _warned(lambda: load_config(overrides=["scheduler.reduce_on_plateau.patience=3"]))
    assert "patience = 3 counted validations" in said
    assert cfg.scheduler.reduce_on_plateau.patience_steps == 3 * cfg.trainer.val_every_n_steps
    cfg, said = _warned(lambda: load_config(old, overrides=["scheduler.reduce_on_plateau.patience_steps=7"]))
    assert "patience ignored" in said and cfg.scheduler.reduce_on_plateau.patience_steps == 7  # new key wins
    # a checkpoint's saved config from before the change loads the same way
    saved = to_dict(load_config())
    plateau = saved["scheduler"]["reduce_on_plateau"]
    del plateau["patience_steps"], plateau["cooldown_steps"]
    plateau["patience"], plateau["cooldown"] = 2, 0
    cfg, said = _warned(lambda: config_from_dict(saved))
    assert "saved config: scheduler.reduce_on_plateau.patience = 2" in said
    assert cfg.scheduler.reduce_on_plateau.patience_steps == 2 * cfg.trainer.val_every_n_steps


def _warned(load):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load()
    return cfg, "\n".join(str(w.message) for w in caught)
