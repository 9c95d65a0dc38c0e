"""A preemption during validation: validation is abandoned, the step is checkpointed at once,
and the resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import os
import signal

import torch
from common import args, steps
from memdata import factory
from safetensors.torch import load_file

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.train.cli import main


class _Signalling:
    """A validation stream that sends `signum` to this process when its `at`-th pass starts, as
    SLURM's SIGTERM lands while the ranks validate."""

    def __init__(self, stream, signum: int, at: int, passes: list) -> None:
        self.stream, self.signum, self.at, self.passes = stream, signum, at, passes

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self):
        self.passes.append(1)
        if len(self.passes) == self.at:
            os.kill(os.getpid(), self.signum)
        return iter(self.stream)


def _factory(signum: int, at: int):
    base, passes = factory(), []

    def make(cfg, split, rank, world):
        stream = base(cfg, split, rank, world)
        return _Signalling(stream, signum, at, passes) if split == "val" else stream
    return make


def test_sigterm_during_validation_checkpoints_and_resumes_exactly(tmp_path):
    extra = ["trainer.max_steps=6", "trainer.val_every_n_steps=2", "trainer.val_at_epoch_end=false",
             "trainer.full_reconstruction=true"]
    straight = tmp_path / "straight"
    assert main(args(straight, *extra), data_factory=factory()) == 0

    split = tmp_path / "split"
    assert main(args(split, *extra), data_factory=_factory(signal.SIGTERM, at=2)) == 75  # step 4
    assert [s for s, _ in layout.list_checkpoints(split / "checkpoints")] == [4]
    text = (split / "logs" / "rank_00000.log").read_text()
    assert "validation at step 4 abandoned" in text and "stop requested (signal 15) at step 4" in text
    assert "validation step 4:" not in text  # nothing of the half-run validation was logged
    assert (split / "stopped.json").is_file()

    assert main(args(split, *extra), data_factory=factory()) == 0
    assert [r["step"] for r in steps(split)] == list(range(1, 7))
    a = load_file(str(straight / "checkpoints" / "step_00000006" / "model.safetensors"))
    b = load_file(str(split / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
