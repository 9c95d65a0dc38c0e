"""ZeRO 1/2/3 under bf16 (DeepSpeed on CPU, one rank): the checkpoint exports, warm-starts and loads
for inference, with the fp32 master weights (the bf16 working copy is their rounding)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from common import args  # noqa: E402
from memdata import factory  # noqa: E402

from depthdif_hpc.checkpoint.export import export  # noqa: E402
from depthdif_hpc.checkpoint.loading import load_model  # noqa: E402
from depthdif_hpc.train.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "train" / "worker.py"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_zero_checkpoint_exports_warm_starts_and_loads(tmp_path, stage):
    run = tmp_path / "run"
    ds = ["trainer.distributed=deepspeed", f"trainer.deepspeed_config=configs/deepspeed/zero{stage}.json",
          f"trainer.zero_stage={stage}", "trainer.precision=bf16", "trainer.max_steps=2"]
    # Its own process: DeepSpeed keeps process-group state in module globals between engines.
    facts = tmp_path / "facts.json"
    r = subprocess.run([sys.executable, str(WORKER), str(facts), "--", *args(run, *ds)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    working = torch.load(f"{facts}.params.pt")  # full_state_dict at the last step (working copy)
    exported = load_file(str(export(run, tmp_path / "export")["model"]))
    assert exported.keys() == working.keys()
    for k, w in exported.items():
        assert w.dtype == torch.float32
        # the working weights the step used are the master's bf16 rounding
        assert torch.equal(w.bfloat16().float(), working[k].bfloat16().float()), k
    _, model = load_model(run, use_ema=False, overrides=["model.kernels=eager"])
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k].float(), exported[k]) for k in exported)
    warm = tmp_path / "warm"
    assert main(args(warm, "trainer.max_steps=1", f"model.load_checkpoint={run}"), data_factory=factory()) == 0
