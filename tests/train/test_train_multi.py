"""Two processes under torchrun with DeepSpeed ZeRO-2 and ZeRO-3 through Accelerate (CPU, gloo,
fp32): the loss falls, the ranks agree, a signal on one rank stops both at the same step with a
checkpoint (exit 75), resume continues, and the ZeRO-3 export equals the gathered parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from common import args, steps, torchrun
from memdata import MemoryStream
from safetensors.torch import load_file

from depthdif_hpc.checkpoint.export import export
from depthdif_hpc.config import load_config
from depthdif_hpc.model.build import build_model

pytestmark = pytest.mark.slow


def _facts(out: Path) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]


def _eval_loss(train_args: list[str], weights: dict[str, torch.Tensor] | None) -> float:
    """Mean objective over the training samples with fixed noise, for initial or given weights."""
    files = [a for i, a in enumerate(train_args) if i and train_args[i - 1] == "--config"]
    overrides = [a for a in train_args if "=" in a and not a.startswith("trainer.run_dir")]
    cfg = load_config(*files, overrides=overrides)
    torch.manual_seed(cfg.training.seed)  # the trainer builds its initial model the same way
    model = build_model(cfg)
    if weights is not None:
        model.load_state_dict(weights)
    stream = MemoryStream(24, 4, 0, 1, seed=cfg.training.seed)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        batches = list(stream)
        losses = [model.loss(b, generator=g)[0] for _ in range(4) for b in batches]
    return float(torch.stack(losses).mean())


def test_zero2_two_processes(tmp_path):
    run = tmp_path / "z2"
    a = args(run, "trainer.distributed=deepspeed", "trainer.deepspeed_config=configs/deepspeed/zero2.json",
             "trainer.max_steps=10", "trainer.val_every_n_steps=10", "trainer.full_reconstruction=true",
             "trainer.checkpoint_every_n_steps=5", "training.lr=3e-3")
    torchrun(tmp_path / "z2.json", a)
    f0, f1 = _facts(tmp_path / "z2.json")
    assert f0["exit_code"] == f1["exit_code"] == 0
    assert f0["param_sum"] == f1["param_sum"] and f0["param_abs"] == f1["param_abs"]  # ranks agree
    assert [r["step"] for r in steps(run)] == list(range(1, 11))
    assert (run / "val" / "step_00000010_recon.png").is_file()  # rank-0 reconstruction ran
    final = run / "checkpoints" / "step_00000010"
    assert (final / "deepspeed").is_dir() and (final / "rank_00001.pt").is_file()
    w = export(final, tmp_path / "export")["model"]
    weights = load_file(str(w))
    gathered = torch.load(f"{tmp_path / 'z2.json'}.params.pt")
    assert all(torch.equal(weights[k], gathered[k]) for k in gathered)
    before, after = _eval_loss(a, None), _eval_loss(a, weights)
    assert after < 0.98 * before, (before, after)  # deterministic (fp32 CPU, fixed seeds)


def test_zero3_signal_resume_and_export(tmp_path):
    run = tmp_path / "z3"
    a = args(run, "trainer.distributed=deepspeed", "trainer.deepspeed_config=configs/deepspeed/zero3.json",
             "trainer.zero_stage=3", "trainer.max_steps=10", "trainer.checkpoint_every_n_steps=1000",
             "training.lr=3e-3")
    # SIGUSR1 reaches rank 0 only, after step 4: both ranks stop at the same boundary, exit 75.
    torchrun(tmp_path / "first.json", a, "--stop-at", "4")
    f0, f1 = _facts(tmp_path / "first.json")
    assert f0["exit_code"] == f1["exit_code"] == 75
    ck = run / "checkpoints" / "step_00000004"
    assert (ck / "MANIFEST.json").is_file()
    assert {p.name for p in ck.glob("ema_rank_*.safetensors")} == {"ema_rank_00000.safetensors",
                                                                    "ema_rank_00001.safetensors"}
    torchrun(tmp_path / "second.json", a)
    f0, f1 = _facts(tmp_path / "second.json")
    assert f0["exit_code"] == f1["exit_code"] == 0
    assert f0["param_sum"] == f1["param_sum"] and f0["param_abs"] == f1["param_abs"]
    assert [r["step"] for r in steps(run)] == list(range(1, 11))  # no step twice, none missing
    written = export(run, tmp_path / "export")  # the run folder: its newest checkpoint (step 10)
    weights, ema = load_file(str(written["model"])), load_file(str(written["ema"]))
    gathered = torch.load(f"{tmp_path / 'second.json'}.params.pt")
    gathered_ema = torch.load(f"{tmp_path / 'second.json'}.ema.pt")
    assert weights.keys() == gathered.keys() == ema.keys()
    for k in gathered:
        assert torch.equal(weights[k], gathered[k]), k
        assert torch.equal(ema[k], gathered_ema[k].float()), k
    before, after = _eval_loss(a, None), _eval_loss(a, weights)
    assert after < 0.98 * before, (before, after)  # deterministic (fp32 CPU, fixed seeds)


def test_a_hung_rank_fails_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 freezes after step 3: rank 0 must give up after trainer.collective_timeout_s (not
    hold the allocation for hours), and the launcher then ends the whole job."""
    import time

    run = tmp_path / "hang"
    a = args(run, "trainer.max_steps=50", "trainer.collective_timeout_s=15")
    t0 = time.monotonic()
    # after step 3: both ranks have passed the step-2 log flush (a collective) by then
    proc = torchrun(tmp_path / "hang.json", a, "--hang-at", "3", timeout=200, check=False)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert took < 150, took  # 15 s timeout + start-up + torchrun's 30 s shutdown grace
    assert not (run / "checkpoints" / "step_00000050").exists()
    assert [r["step"] for r in steps(run)][:2] == [1, 2]  # it trained, then a peer hung
