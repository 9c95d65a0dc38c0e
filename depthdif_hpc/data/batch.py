"""The batch contract: the keys, shapes and dtypes of every batch the data stream hands out.

`FIELDS` declares each key once, with symbolic dims: B (samples in the batch), D (depth
levels, 50 in a store), H and W (the tile). A single sample of the per-sample stream has the
same keys without the leading B. `Batch` is the same contract as a `TypedDict` for type
checkers, and `check_batch` checks a batch against `FIELDS` at run time.

Temperatures are z-scores (`depthdif_hpc.normalization`) and exactly 0 where invalid.
"""

# No `from __future__ import annotations`: Python 3.11's TypedDict reads NotRequired only from
# evaluated annotations (with strings `coords` would count as required).
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

import torch

Dim = str | int


@dataclass(frozen=True)
class Field:
    """One key of a batch: its dims (symbols or fixed sizes, B first), dtype and meaning."""

    name: str
    dims: tuple[Dim, ...]
    dtype: torch.dtype
    doc: str
    optional: bool = False

    def sample_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape of one sample (dims after B), the symbols looked up in `sizes`."""
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.dims[1:])


FIELDS: tuple[Field, ...] = (
    Field("eo", ("B", 1, "H", "W"), torch.float32, "satellite SST (OSTIA), 0 where invalid"),
    Field("x", ("B", "D", "H", "W"), torch.float32,
          "sparse in-situ profiles (EN4) on the depth levels, 0 where not observed"),
    Field("y", ("B", "D", "H", "W"), torch.float32, "target temperature (GLORYS), 0 where invalid"),
    Field("x_valid_mask", ("B", "D", "H", "W"), torch.bool, "x observed"),
    Field("y_valid_mask", ("B", "D", "H", "W"), torch.bool, "y valid (ocean above the sea floor)"),
    Field("land_mask", ("B", 1, "H", "W"), torch.float32,
          "1 = ocean, 0 = land (the first level of y_valid_mask)"),
    Field("date", ("B",), torch.int64, "YYYYMMDD (Feb 29 -> Feb 28)"),
    Field("sample_id", ("B",), torch.int64, "unique across splits (train first, then val)"),
    Field("coords", ("B", 2), torch.float32, "patch centre [lat, lon] in degrees", optional=True),
)


class Batch(TypedDict):
    """`FIELDS` for type checkers (a test keeps the two in step)."""

    eo: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    x_valid_mask: torch.Tensor
    y_valid_mask: torch.Tensor
    land_mask: torch.Tensor
    date: torch.Tensor
    sample_id: torch.Tensor
    coords: NotRequired[torch.Tensor]


def _fmt(dims: tuple[Any, ...]) -> str:
    return "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"


def check_batch(batch: Mapping[str, Any], where: str,
                sizes: Mapping[str, int] | None = None) -> None:
    """Raise ValueError naming every key of `batch` that breaks the contract.

    Checks: no required key missing, no unknown key, each value a tensor of the declared dtype
    and shape. Each symbol takes the size given in `sizes`, else the size most keys agree on,
    so the message blames the odd key out rather than whichever key came first. `where`
    (the producer, e.g. "val loader") starts the message.
    """
    fields = {f.name: f for f in FIELDS}
    problems = [f"missing key {k!r}" for k, f in fields.items()
                if not f.optional and k not in batch]
    problems += [f"unknown key {k!r} (the contract has {sorted(fields)})"
                 for k in batch if k not in fields]
    tensors = {k: v for k, v in batch.items()
               if k in fields and isinstance(v, torch.Tensor)}
    problems += [f"{k!r} is a {type(v).__name__}, expected a torch.Tensor"
                 for k, v in batch.items() if k in fields and k not in tensors]
    seen: dict[str, Counter[int]] = {}
    for k, v in tensors.items():
        if v.ndim == len(fields[k].dims):
            for d, n in zip(fields[k].dims, v.shape, strict=True):
                if isinstance(d, str):
                    seen.setdefault(d, Counter())[n] += 1
    bound = {d: c.most_common(1)[0][0] for d, c in seen.items()}
    bound.update(sizes or {})
    for k, v in tensors.items():
        f = fields[k]
        want = tuple(d if isinstance(d, int) else bound.get(d, d) for d in f.dims)
        if tuple(v.shape) != want:
            problems.append(f"{k!r} has shape {_fmt(tuple(v.shape))}, expected {_fmt(f.dims)} "
                            f"= {_fmt(want)}")
        if v.dtype != f.dtype:
            problems.append(f"{k!r} has dtype {v.dtype}, expected {f.dtype}")
    if problems:
        raise ValueError(f"batch from {where} breaks the batch contract: " + "; ".join(problems))
