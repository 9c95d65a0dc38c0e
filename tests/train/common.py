"""Shared arguments for the trainer tests: a tiny model on 16x16 patches, T=20."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

BASE = ["--config", "configs/px_space/model_config.yaml", "--config", "configs/px_space/training_config.yaml"]
AMBIENT = ["--config", "configs/px_space/model_config_ambient.yaml", "--config",
           "configs/px_space/training_config.yaml"]
TINY = [
    "model.unet.dim=8", "model.unet.dim_mults=[1,2]", "model.kernels=eager",
    "model.noise.num_timesteps=20", "training.lr=1e-3",
    "dataloader.batch_size=2", "dataloader.val_batch_size=2",
    "scheduler.warmup.steps=2", "trainer.log_every_n_steps=2",
    "trainer.val_every_n_steps=1000", "trainer.checkpoint_every_n_steps=1000",
    "trainer.full_reconstruction=false", "trainer.limit_val_batches=1",
    "trainer.ema.enabled=true", "trainer.ema.decay=0.8", "trainer.ema.start_step=1",
    "trainer.ema.update_every=1", "trainer.ema.warmup=false", "trainer.progress_bar=false",
    # In-process runs are compared with torchrun runs bit for bit: one thread everywhere.
    "trainer.intra_op_threads=1",
]


def args(run_dir: Path, *extra: str, ambient: bool = False) -> list[str]:
    return [*(AMBIENT if ambient else BASE), *TINY, f"trainer.run_dir={run_dir}", *extra]


def steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "steps.jsonl").read_text().splitlines()]


def torchrun(out: Path, train_args: list[str], *opts: str, worker: str = "worker.py", timeout: int = 240,
             check: bool = True) -> subprocess.CompletedProcess:
    """Two local ranks of `tests/train/<worker>` under torchrun: `worker OUT OPTS -- TRAIN_ARGS`."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    with socket.socket() as sock:  # torchrun's static rendezvous cannot take port 0
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(HERE / worker), str(out), *opts, "--", *train_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
