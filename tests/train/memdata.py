"""Test-only stand-in for the data stream (never the product path): an in-memory, sharded,
seeded stream with the same position API as depthdif_hpc.data's stream."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import random_batch  # noqa: E402


class MemoryStream:
    def __init__(self, n: int, batch_size: int, rank: int, world: int, *, size: int = 16,
                 seed: int = 0, nan_sample: int | None = None) -> None:
        self.samples = []
        for i in range(n):
            b = random_batch(b=1, h=size, w=size, seed=seed * 10_000 + i, obs_frac=0.1)
            b["sample_id"] = torch.tensor([i])
            if i == nan_sample:
                b["y"][:] = float("nan")
                b["x"][:] = float("nan")
            self.samples.append(b)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.epoch, self.pos = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + 1000 * self.epoch)
        perm = torch.randperm(len(self.samples), generator=g).tolist()
        per_rank = len(perm) // self.world
        return perm[self.rank::self.world][:per_rank]

    def __iter__(self):
        order = self._order()
        nb = len(order) // self.batch_size
        while self.pos < nb:
            idx = order[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
            self.pos += 1
            yield {k: torch.cat([self.samples[i][k] for i in idx]) for k in self.samples[0]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def factory(n_train: int = 24, n_val: int = 6, size: int = 16, nan_sample: int | None = None):
    def make(cfg, split, rank, world):
        if split == "train":
            return MemoryStream(n_train, cfg.dataloader.batch_size, rank, world, size=size,
                                seed=cfg.training.seed, nan_sample=nan_sample)
        return MemoryStream(n_val, cfg.dataloader.val_batch_size, rank, world, size=size, seed=999)
    return make
