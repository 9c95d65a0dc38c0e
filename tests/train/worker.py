"""torchrun target for the multi-process tests: the real entry point with the test data stream.

usage: torchrun --nproc_per_node 2 tests/train/worker.py OUT_JSON [--stop-at N] [--hang-at N]
       [--product-data] [--facts-at N] -- <train args>
Writes per-rank facts (final parameter digest, exit code) to OUT_JSON.rank<R>; rank 0 also saves
the gathered full parameters (and EMA) next to it. --product-data: the real data stream
(dataset.store=...) instead of the in-memory test stream.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memdata import factory  # noqa: E402

from depthdif_hpc.train.cli import main  # noqa: E402


def run() -> int:
    argv = sys.argv[1:]
    sep = argv.index("--")
    opts, train_args = argv[:sep], argv[sep + 1:]
    out = Path(opts[0])
    stop_at = int(opts[opts.index("--stop-at") + 1]) if "--stop-at" in opts else None
    # --hang-at N: rank 1 freezes (SIGSTOP) after step N, as a rank stuck in a driver call would.
    hang_at = int(opts[opts.index("--hang-at") + 1]) if "--hang-at" in opts else None
    # --facts-at N: the parameters and EMA of step N instead of the last step's.
    facts_at = int(opts[opts.index("--facts-at") + 1]) if "--facts-at" in opts else None
    facts: dict = {}

    def after_step(tr) -> None:
        if hang_at is not None and tr.step == hang_at and tr.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        if stop_at is not None and tr.step == stop_at and tr.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # like SLURM's --signal: one rank gets it first
        if tr.step == (facts_at or tr.cfg.trainer.max_steps) or (stop_at is not None and tr.step == stop_at):
            sd = tr.full_state_dict(use_ema=False)
            facts["param_sum"] = float(sum(v.double().sum() for v in sd.values()))
            facts["param_abs"] = float(sum(v.double().abs().sum() for v in sd.values()))
            facts["step"] = tr.step
            if tr.rank == 0:
                torch.save(sd, str(out) + ".params.pt")
                if tr.ema is not None:
                    torch.save(tr.ema.full_state_dict(), str(out) + ".ema.pt")
            elif tr.ema is not None:
                tr.ema.full_state_dict()  # collective under ZeRO-3

    data = None if "--product-data" in opts else factory()
    code = main(train_args, data_factory=data, hooks={"after_step": after_step})
    facts["exit_code"] = code
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_text(json.dumps(facts))
    return 0 if code in (0, 75) else code


if __name__ == "__main__":
    sys.exit(run())
