"""Command line and function entry point shared by every launcher."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from depthdif_hpc.config import ConfigError, load_config

if TYPE_CHECKING:
    from depthdif_hpc.train.stream import DataFactory
    from depthdif_hpc.train.trainer import Trainer


# The exit codes say more than depthdif_hpc.command's one code for bad input (EXIT_* in trainer.py),
# so this command reports in its format but not through it.
PROG = "python -m depthdif_hpc.train"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Train DepthDif (Accelerate; DDP or DeepSpeed ZeRO). Later --config files and "
                    "key=value overrides win. Exit 0 done, 75 preempted (checkpoint written), "
                    "2 bad config, 3 non-finite loss, 1 other failure.")
    ap.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, *, data_factory: DataFactory | None = None,
         hooks: dict[str, Callable[[Trainer], Any]] | None = None) -> int:
    """Train with these arguments; returns the exit code (submitit calls this directly)."""
    from depthdif_hpc.train.state import CheckpointSpaceError
    from depthdif_hpc.train.steplog import NonFiniteLossError
    from depthdif_hpc.train.trainer import (
        EXIT_CONFIG,
        EXIT_FAILURE,
        EXIT_NONFINITE,
        StopSignals,
        Trainer,
    )

    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    agreed_exit = False
    try:
        cfg = load_config(*args.config, overrides=args.overrides)
        # Handlers first: a preemption signal during the (slow) start-up is kept, not fatal.
        with StopSignals() as stop:
            trainer = Trainer(cfg, stop=stop, data_factory=data_factory, hooks=hooks)
            try:
                code = trainer.fit()
                agreed_exit = True
            finally:
                trainer.close()
    except ConfigError as exc:
        print(f"{PROG}: error: configuration refused: {exc}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    except NonFiniteLossError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    except CheckpointSpaceError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_FAILURE
    finally:
        _shutdown(synchronise=agreed_exit)
    return code


def _shutdown(*, synchronise: bool) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            # A rank that tears gloo down while a peer still works on the group can abort that
            # peer ("terminate called without an active exception": 2 of 5 two-rank runs in a
            # test harness before a barrier went in). Only when fit returned on every rank:
            # after an exception a peer may never arrive, and the collective timeout would
            # then hold the allocation.
            if synchronise:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    try:
        from accelerate.state import AcceleratorState, PartialState

        # Lets a second in-process run (tests, notebooks) build a fresh Accelerator.
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    except Exception:  # noqa: BLE001
        pass
