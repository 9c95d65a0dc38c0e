"""Raw stored samples (uint16 codes, obs rows, meta) -> the tensors of the batch contract.

Every temperature is `a * code + b` (`Quantizer.norm_affine`, float32 throughout) where
code != 0, else 0; the masks are `code != 0`. Under per-level normalisation `a` and `b` are one
pair per level (`Quantizer.norm_affine_levels`; eo takes level 0's). `Decoder.decode_batch` writes whole batches
straight into preallocated tensors (what the training loader uses), `Decoder.decode` one
sample (the per-sample stream); both go through `_decode_into`, so they are the same values
bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch

from ..normalization import GLOBAL, Normalizer
from .batch import FIELDS, Batch
from .store import META, N_LEVELS, meta_coords, quantizer_from

Where = Literal["plain", "shared", "pinned"]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]
Raw = tuple[np.ndarray, np.ndarray, np.ndarray]  # (fields, obs, meta) of one sample
# The per-pixel keys `_decode_into` writes (the rest come from meta), as numpy dtypes.
_PIXEL = {f.name: torch.empty(0, dtype=f.dtype).numpy().dtype for f in FIELDS if "H" in f.dims}
_SPARSE = ("x", "x_valid_mask")  # zero but at the observed pixels: zeroed, then scattered into


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype, where: Where = "plain") -> torch.Tensor:
    """An uninitialised tensor: "plain", "shared" (shared memory, as torch's default collate
    makes in a worker, so sending it to another process copies nothing) or "pinned"."""
    if where == "shared":
        elem = torch.empty(0, dtype=dtype)
        storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
        return elem.new(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=where == "pinned")


def scatter_obs(obs: np.ndarray, n_obs: int, a: Any, b: Any,
                x: np.ndarray, x_valid: np.ndarray) -> None:
    """Write the first `n_obs` obs rows ([row, col, D codes]) into zeroed (D, H, W) x, x_valid.

    Touches only the observed pixels: a full pass over x costs more than the few columns.
    """
    if not n_obs:
        return
    o = obs[:n_obs]
    r, c, codes = o[:, 0].astype(np.intp), o[:, 1].astype(np.intp), o[:, 2:]
    ok = codes != 0
    x_valid[:, r, c] = ok.T
    x[:, r, c] = ((codes * a + b) * ok).T


def _decode_dense(codes: np.ndarray, a: Any, b: Any, out: np.ndarray,
                  valid: np.ndarray) -> None:
    """codes -> out = (a * code + b) * valid and valid = code != 0, one in-place pass each
    (uint16 -> float32 inside the multiply: no temporary at full size)."""
    np.not_equal(codes, 0, out=valid)
    np.multiply(codes, a, out=out)
    np.add(out, b, out=out)
    np.multiply(out, valid, out=out)


def _decode_into(raw: Raw, a: Any, b: Any, row: dict[str, np.ndarray],
                 eo_valid: np.ndarray) -> None:
    """One sample into its row of the batch arrays (x, x_valid_mask already zero).
    `a`, `b`: float32 scalars, or (D,) per level (eo then uses level 0).
    `eo_valid` is scratch: eo has no mask of its own in the batch."""
    fields, obs, meta = raw
    if np.ndim(a):
        a_eo, b_eo, a_y, b_y = a[0], b[0], a[:, None, None], b[:, None, None]
    else:
        a_eo, b_eo, a_y, b_y = a, b, a, b
    _decode_dense(fields[0:1], a_eo, b_eo, row["eo"], eo_valid)
    _decode_dense(fields[1:], a_y, b_y, row["y"], row["y_valid_mask"])
    np.copyto(row["land_mask"], row["y_valid_mask"][0:1])
    scatter_obs(obs, int(meta[META["n_obs_pixels"]]), a, b, row["x"], row["x_valid_mask"])


@dataclass(frozen=True)
class Decoder:
    """Decodes one split's raw samples (tile x tile, N_LEVELS levels) with the store's codes."""

    a: Any  # np.float32, or (N_LEVELS,) float32 under per-level normalisation
    b: Any
    tile: int
    return_coords: bool = True

    @classmethod
    def from_manifest(cls, man: dict[str, Any], return_coords: bool = True,
                      normalizer: Normalizer = GLOBAL) -> Decoder:
        return cls.from_quantizer(quantizer_from(man), int(man["tile_size"]), return_coords, normalizer)

    @classmethod
    def from_quantizer(cls, q: Any, tile: int, return_coords: bool = True,
                       normalizer: Normalizer = GLOBAL) -> Decoder:
        """The decoder of samples quantised by `q` (the store's, or the builder's for gridded
        source files), normalised as `normalizer` says."""
        if normalizer.kind == "global":
            a, b = q.norm_affine()  # scalars: the reference path, bit for bit
        else:
            if normalizer.levels != N_LEVELS:
                raise ValueError(f"per-level normalisation has {normalizer.levels} levels, the "
                                 f"store {N_LEVELS}")
            a, b = q.norm_affine_levels(normalizer)
        return cls(a, b, tile, return_coords)

    def batch_specs(self) -> Specs:
        """Per-sample shape and dtype of every key of a batch (coords only with return_coords)."""
        sizes = {"D": N_LEVELS, "H": self.tile, "W": self.tile}
        return {f.name: (f.sample_shape(sizes), f.dtype) for f in FIELDS
                if not f.optional or self.return_coords}

    def decode_batch(self, sample_ids: list[int], raws: list[Raw], where: Where = "plain",
                     out: dict[str, torch.Tensor] | None = None) -> Batch:
        """Raw samples -> one batch, written into new tensors allocated `where` or into the
        first len(raws) rows of `out`.

        Each sample is decoded straight into its row: nothing per sample is allocated at full
        size and nothing is stacked.
        """
        bsz = len(raws)
        if out is None:
            out = {k: new_tensor((bsz, *shape), dt, where)
                   for k, (shape, dt) in self.batch_specs().items()}
        else:
            out = {k: v[:bsz] for k, v in out.items()}
        for k in _SPARSE:
            out[k].zero_()  # once for the whole batch
        arrays = {k: v.numpy() for k, v in out.items()}
        eo_valid = np.empty((1, self.tile, self.tile), bool)
        for j, raw in enumerate(raws):
            _decode_into(raw, self.a, self.b, {k: arrays[k][j] for k in _PIXEL}, eo_valid)
        meta = np.stack([raw[2] for raw in raws])
        arrays["date"][:] = meta[:, META["date"]]
        arrays["sample_id"][:] = sample_ids
        if self.return_coords:
            arrays["coords"][:] = meta_coords(meta)
        return cast(Batch, out)

    def decode(self, sample_id: int, fields: np.ndarray, obs: np.ndarray,
               meta: np.ndarray) -> Batch:
        """Raw sample -> its tensors (the keys of a batch without B), for the per-sample stream.

        Not a batch of one from decode_batch: that is slower here (a torch allocation per key,
        x zeroed by a write instead of calloc's zero pages).
        """
        specs = self.batch_specs()
        row = {k: (np.zeros if k in _SPARSE else np.empty)(specs[k][0], dt)
               for k, dt in _PIXEL.items()}
        _decode_into((fields, obs, meta), self.a, self.b, row,
                     np.empty((1, self.tile, self.tile), bool))
        item = {k: torch.from_numpy(v) for k, v in row.items()}
        item["date"] = torch.tensor(int(meta[META["date"]]), dtype=torch.int64)
        item["sample_id"] = torch.tensor(sample_id, dtype=torch.int64)
        if self.return_coords:
            item["coords"] = torch.from_numpy(meta_coords(meta[None])[0].copy())
        return cast(Batch, item)
