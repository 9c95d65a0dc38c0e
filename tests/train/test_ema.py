"""The EMA by hand through the real trainer: the decay warm-up, and under DeepSpeed bf16 the
average of the fp32 master weights."""

from __future__ import annotations

import pytest
import torch
from common import args, torchrun
from memdata import factory
from safetensors.torch import load_file

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.checkpoint.weights import checkpoint_weights
from depthdif_hpc.train.cli import main
from depthdif_hpc.train.ema import ShardedEMA


def test_warmup_decay_follows_the_rule():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ShardedEMA([("w", p)], decay=0.9999, start_step=2, warmup=True)
    assert [round(ema.decay_at(s), 6) for s in (3, 4, 12)] == [round(2 / 11, 6), round(3 / 12, 6),
                                                               round(11 / 20, 6)]
    assert ema.decay_at(10**6) == 0.9999  # the ramp ends at the configured decay
    assert ShardedEMA([("w", p)], decay=0.9, warmup=False).decay_at(3) == 0.9


def test_trainer_ema_with_warmup_matches_the_hand_average(tmp_path):
    seen: list[dict[str, torch.Tensor]] = []

    def record(tr):
        seen.append({k: v.detach().clone() for k, v in tr.module.state_dict().items()})

    run = tmp_path / "run"
    code = main(args(run, "trainer.max_steps=5", "trainer.ema.warmup=true", "trainer.ema.decay=0.9999",
                     "trainer.ema.start_step=1"), data_factory=factory(), hooks={"after_step": record})
    assert code == 0
    ema = {k: v.clone() for k, v in seen[0].items()}  # step 1 <= start_step: a copy
    for step, w in enumerate(seen[1:], start=2):
        n = step - 1
        d = min(0.9999, (1 + n) / (10 + n))
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in ema}
    saved = load_file(str(run / "checkpoints" / "step_00000005" / "ema.safetensors"))
    for k in ema:
        torch.testing.assert_close(saved[k], ema[k], rtol=1e-6, atol=1e-7)
    # the average already follows the training (decay 0.9999 alone would still sit on step 1)
    final = seen[-1]
    to_final = sum(float((saved[k] - final[k]).abs().sum()) for k in saved)
    start_to_final = sum(float((seen[0][k] - final[k]).abs().sum()) for k in saved)
    assert to_final < 0.5 * start_to_final


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_bf16_ema_averages_the_fp32_master(tmp_path, stage):
    """Two ranks, bf16: the EMA follows the fp32 master weights (each rank holds a part of them),
    not their bf16 rounding, and the checkpoint's per-rank pieces merge into the same EMA."""
    run = tmp_path / "run"
    a = args(run, "trainer.distributed=deepspeed", f"trainer.deepspeed_config=configs/deepspeed/zero{stage}.json",
             "trainer.precision=bf16", "trainer.max_steps=4")
    out = tmp_path / "facts"
    torchrun(out, a, worker="ema_worker.py", timeout=300)
    facts = torch.load(f"{out}.pt")
    masters, working, ema = facts["master"], facts["working"], facts["ema"]

    def average(trajectory):  # decay 0.8, no warm-up, start_step 1 (tests/train/common.py)
        avg = {k: v.clone() for k, v in trajectory[0].items()}
        for w in trajectory[1:]:
            avg = {k: 0.8 * avg[k] + 0.2 * w[k] for k in avg}
        return avg

    from_master, from_working = average(masters), average(working)
    gap = max(float((from_master[k] - from_working[k]).abs().max()) for k in ema)
    assert gap > 1e-4  # bf16 rounding is visible at this lr: the test can tell the two apart
    for k in ema:
        assert ema[k].dtype == torch.float32
        torch.testing.assert_close(ema[k], from_master[k], rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in ema.values())
    final = run / "checkpoints" / "step_00000004"
    assert len(list(final.glob(layout.EMA_SHARDS))) == 2  # one piece per rank
    saved = checkpoint_weights(final, ema=True)
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
