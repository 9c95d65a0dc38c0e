"""The EMA's decay warm-up, by hand, through the real trainer."""

from __future__ import annotations

import torch
from common import args
from memdata import factory
from safetensors.torch import load_file

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
