"""Target for the DeepSpeed EMA test (one or more processes): the real entry point with the test
data stream; after every step rank 0 saves the full fp32 master (DeepSpeed's own
safe_get_full_fp32_param) and the working weights, for the test to average by hand; every rank
checks that its EMA piece survives a round trip through the full tensors.

usage: [torchrun ...] tests/train/ema_worker.py OUT_PREFIX -- <train args>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memdata import factory  # noqa: E402

from depthdif_hpc.train.cli import main  # noqa: E402


def run() -> int:
    argv = sys.argv[1:]
    out, train_args = Path(argv[0]), argv[argv.index("--") + 1:]
    masters: list[dict[str, torch.Tensor]] = []
    working: list[dict[str, torch.Tensor]] = []

    def after_step(tr) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        # collectives: every rank takes part
        masters.append({n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in tr.named_params})
        working.append(tr.full_state_dict(use_ema=False))
        ema = tr.ema.full_state_dict()
        # each rank's piece back from the full tensors (a resume at another world size does this)
        before = [t.clone() for t in tr.ema.shadow]
        for t in tr.ema.shadow:
            t.zero_()
        tr.ema.load_full_state(ema)
        if not all(torch.equal(a, b) for a, b in zip(before, tr.ema.shadow, strict=True)):
            raise AssertionError(f"rank {tr.rank}: load_full_state(full_state_dict()) changed the EMA")
        if tr.rank == 0 and tr.step == tr.cfg.trainer.max_steps:
            torch.save({"master": masters, "working": working, "ema": ema}, f"{out}.pt")

    return main(train_args, data_factory=factory(), hooks={"after_step": after_step})


if __name__ == "__main__":
    sys.exit(run())
