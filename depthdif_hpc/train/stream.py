"""The trainer's view of a data stream: iterate an epoch, save/restore the position.

The product path is `depthdif_hpc.data.make_dataloader(cfg, split, rank, world_size, ...)`: an
iterable whose dataset (or the loader itself) has `set_epoch`, `state_dict` and
`load_state_dict` (and, to resume at another world size, `load_layout_states`). `wrap_stream` adapts whatever a data factory returns and refuses a loader
without position state, since exact resume needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from depthdif_hpc.config import Config

Batch = dict[str, Any]


class DataStream(Protocol):
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def load_layout_states(self, states: list[dict]) -> None: ...


DataFactory = Callable[[Config, str, int, int], Any]


class StatefulStream:
    """A loader whose position lives on itself or on its `.dataset`."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        owner = loader if hasattr(loader, "state_dict") else loader.dataset
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.loader, getattr(self.loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
                return

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)

    def state_dict(self) -> dict:
        return self._owner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._owner.load_state_dict(state)

    def close(self) -> None:
        """Stop the loader's workers, if it has a way to."""
        if hasattr(self.loader, "close"):
            self.loader.close()

    def load_layout_states(self, states: list[dict]) -> None:
        """Continue the epoch of a run saved at another world size: `states` are its ranks'
        positions in rank order (the product stream re-deals the samples none of them took)."""
        owner = self.loader if hasattr(self.loader, "load_layout_states") else getattr(self.loader, "dataset", None)
        if not hasattr(owner, "load_layout_states"):
            raise TypeError(f"{type(self.loader).__name__} cannot continue an epoch saved at another "
                            "world size (it has no load_layout_states; depthdif_hpc.data.make_dataloader's "
                            "stream has)")
        owner.load_layout_states(states)


def wrap_stream(loader: Any) -> DataStream:
    has_state = hasattr(loader, "state_dict") or hasattr(getattr(loader, "dataset", None), "state_dict")
    if not has_state:
        raise TypeError(f"data factory returned {type(loader).__name__}, which has no state_dict "
                        "on itself or its .dataset: training cannot resume it exactly "
                        "(depthdif_hpc.data.make_dataloader returns one that has)")
    return StatefulStream(loader)


def default_data_factory(cfg: Config, split: str, rank: int, world_size: int) -> Any:
    """The product path: the sharded Zarr stream of depthdif_hpc.data."""
    try:
        from depthdif_hpc.data import make_dataloader  # type: ignore[attr-defined]
    except ImportError as exc:
        raise RuntimeError("depthdif_hpc.data.make_dataloader is not available; the training data "
                           "stream (Data issue) must be installed to train") from exc
    if not cfg.dataset.store:
        raise RuntimeError("dataset.store is not set: point it at a store built by "
                           "`python -m depthdif_hpc.data.build`")
    return make_dataloader(cfg, split, rank=rank, world_size=world_size)


def sample_ids(batch: Batch) -> list:
    """Sample ids of a (host-side) batch, for error messages; [] when the batch has none."""
    ids = batch.get("sample_id")
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    return list(ids)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}
