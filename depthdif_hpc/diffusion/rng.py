"""Random draws from one generator, or from one generator per batch row.

An ensemble runs its K members as one batch of K rows. With a single generator, member k's noise
is the k-th slice of one stream, so it changes with K and with the members before it; with one
generator per row (`RowGenerators`), member k draws from its own seed and is the same whether the
ensemble has 2 members or 20 (docs/reconstruct.md#ensembles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RowGenerators = torch.Generator | Sequence[torch.Generator] | None


def _per_row(draw: Callable[..., torch.Tensor], shape: Sequence[int], generator: RowGenerators,
             **kw: object) -> torch.Tensor:
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        return draw(shape, generator=generator, **kw)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} rows")
    return torch.cat([draw((1, *shape[1:]), generator=g, **kw) for g in generator])


def randn(shape: Sequence[int], generator: RowGenerators = None, *, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal draws of `shape`; row i from generator[i] when given a sequence."""
    return _per_row(torch.randn, shape, generator, device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: RowGenerators = None, *, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uniform [0, 1) draws of `shape`; row i from generator[i] when given a sequence."""
    return _per_row(torch.rand, shape, generator, device=device, dtype=dtype)
