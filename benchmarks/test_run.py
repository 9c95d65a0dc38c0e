"""benchmarks/run.py, the timing driver, end to end on tiny shapes (CPU or GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


def test_run_driver_smoke(tmp_path: Path):
    """benchmarks/run.py --smoke: every op's timing cases (imported from bench_<op>.py) and the
    U-Net train step, written as one CSV and one Markdown table."""
    env = dict(os.environ)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    run = Path(__file__).with_name("run.py")
    res = subprocess.run([sys.executable, str(run), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    csv = list(tmp_path.glob("*.csv"))
    md = list(tmp_path.glob("*.md"))
    assert len(csv) == 1 and len(md) == 1
    lines = csv[0].read_text().splitlines()
    header = lines[0].split(",")
    assert {"op", "shape", "impl", "fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_mem_mb"} <= set(header)
    impls = {line.split(",")[header.index("impl")] for line in lines[1:]}
    assert {"eager", "triton"} <= impls
    ops = {line.split(",")[0] for line in lines[1:]}
    assert ops == {"convnext_front", "convnext_epilogue", "layer_norm", "linear_attention",
                   "unet_train_step"}
