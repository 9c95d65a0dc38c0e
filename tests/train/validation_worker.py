"""The trainer's Validator on fixed (initial) weights, outside the training loop: in-process for
one rank, or under torchrun (gloo) for several; rank 0 writes its metrics to OUT.json.

usage: torchrun --nproc_per_node 2 tests/train/validation_worker.py OUT -- <train args>
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memdata import factory  # noqa: E402

from depthdif_hpc.config import load_config  # noqa: E402
from depthdif_hpc.launch_env import apply_threads, resolve_threads  # noqa: E402
from depthdif_hpc.model.build import build_model  # noqa: E402
from depthdif_hpc.train.optim import LRController  # noqa: E402
from depthdif_hpc.train.validation import Validator  # noqa: E402


class RecordingLog:
    """What the Validator hands the step log: scalars and figures, kept for the test."""

    def __init__(self) -> None:
        self.scalar_calls: list[dict[str, float]] = []
        self.figure_names: list[str] = []

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        self.scalar_calls.append(dict(metrics))

    def figures(self, figs: dict[str, Any], step: int) -> None:
        self.figure_names.extend(figs)


def validate(out_dir: Path, train_args: list[str],
             stop_requested: Callable[[], bool] = lambda: False) -> tuple[dict | None, Validator, RecordingLog]:
    files = [a for i, a in enumerate(train_args) if i and train_args[i - 1] == "--config"]
    overrides = [a for a in train_args if "=" in a and not a.startswith("trainer.run_dir")]
    cfg = load_config(*files, overrides=overrides)
    # as the trainer does: the same summation order in every launch layout (docs/cluster.md)
    apply_threads(resolve_threads(cfg.trainer.intra_op_threads))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(cfg.training.seed)
    weights = build_model(cfg).state_dict()
    steplog = RecordingLog()
    v = Validator(cfg, rank=rank, world=world, device=torch.device("cpu"),
                  ctrl_group=dist.group.WORLD if world > 1 else None, data_factory=factory(),
                  full_weights=lambda use_ema: weights, autocast=nullcontext, lr_ctl=LRController(cfg),
                  steplog=steplog, barrier=dist.barrier if world > 1 else (lambda: None),
                  out_dir=out_dir, use_ema=False, stop_requested=stop_requested)
    return v.run(step=1), v, steplog


if __name__ == "__main__":
    argv = sys.argv[1:]
    out = Path(argv[0])
    metrics, _, log = validate(out.parent / "val", argv[argv.index("--") + 1:])
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps({"metrics": metrics, "figures": log.figure_names}))
    dist.barrier()  # both ranks leave together: a peer that closes its connections early aborts gloo
    dist.destroy_process_group()
