"""Shared arguments for the trainer tests: a tiny model on 16x16 patches, T=20."""

from __future__ import annotations

import json
from pathlib import Path

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
