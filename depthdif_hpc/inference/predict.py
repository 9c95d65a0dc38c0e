"""`python -m depthdif_hpc.inference.predict --checkpoint CKPT --store STORE --out OUT.zarr`.

Reconstructs every sample of a split: K samples per input give the ensemble mean and standard
deviation (and optionally the members), in degC with NaN outside y_valid_mask, written to a
Zarr store (layout in depthdif_hpc/inference/writer.py) and optionally NetCDF. Under torchrun
(or srun) ranks take disjoint samples; a rerun skips samples already done.

`--withhold-fraction F` hides observed profiles from the condition and records the hidden
pixels (`withheld`, with the attribute `withhold_mode`), so `evaluate` can score the
reconstruction against observations the model never saw. `--withhold columns` (default) hides
a fraction F of each sample's observed columns (deterministic per sample id); `--withhold
floats` hides every profile of a fraction F of the store's floats (deterministic per seed, the
same floats in every sample), since random columns leave a float's neighbouring profiles in
the condition.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from depthdif_hpc.command import command
from depthdif_hpc.config import SamplerName
from depthdif_hpc.data.batch import Batch
from depthdif_hpc.data.grid import Tile
from depthdif_hpc.data.profiles import PLATFORM_MORE
from depthdif_hpc.data.store import META, StoreError, read_manifest
from depthdif_hpc.data.stream import ShardStream
from depthdif_hpc.inference.writer import (
    PredictionWriter,
    check_prediction_store,
    create_prediction_store,
)
from depthdif_hpc.model.depthdif import SamplingPrecision
from depthdif_hpc.normalization import GLOBAL

Withhold = Literal["columns", "floats"]


def _hide(batch: Batch, hidden: torch.Tensor) -> torch.Tensor:
    """Remove the (B, H, W) `hidden` columns from the condition x; returns `hidden`."""
    keep = ~hidden[:, None]
    batch["x"] = batch["x"] * keep
    batch["x_valid_mask"] = batch["x_valid_mask"] & keep
    return hidden


def withheld_platforms(platforms: list[str], fraction: float, seed: int) -> np.ndarray:
    """(len(platforms),) bool: which floats a whole-float holdout hides.

    round(fraction * n) of the n named platforms (an empty id means the file had none and is
    never chosen), picked by a permutation seeded with `seed` alone, so every sample, rank and
    rerun hides the same floats.
    """
    named = np.flatnonzero(np.array([bool(p) for p in platforms], bool))
    chosen = np.zeros(len(platforms), bool)
    k = int(round(fraction * named.size))
    if k:
        chosen[np.random.default_rng(seed).permutation(named)[:k]] = True
    return chosen


def float_columns(rows_cols: np.ndarray, platform: np.ndarray, withheld: np.ndarray,
                  height: int, width: int) -> torch.Tensor:
    """(H, W) bool: the observed pixels (`rows_cols` (n, 2), `platform` (n, slots) from the
    store's obs and obs_platform rows) holding a profile of a withheld float, or more floats
    than the store could list (PLATFORM_MORE: it cannot prove they are not withheld)."""
    ids = np.asarray(platform)
    hit = (ids == PLATFORM_MORE) | ((ids >= 0) & withheld[np.maximum(ids, 0)])
    out = torch.zeros(height, width, dtype=torch.bool)
    sel = hit.any(axis=1)
    rc = torch.from_numpy(np.asarray(rows_cols, np.int64)[sel])
    out[rc[:, 0], rc[:, 1]] = True
    return out


def withhold_floats(batch: Batch, columns: torch.Tensor) -> torch.Tensor:
    """Hide the (B, H, W) `columns` (float_columns per sample) from x; returns them."""
    return _hide(batch, columns & batch["x_valid_mask"].any(dim=1))


def withhold_columns(batch: Batch, fraction: float, seed: int) -> torch.Tensor:
    """Hide `fraction` of each sample's observed columns from x; returns the (B, H, W) hidden mask.

    The choice depends only on (seed, sample_id), so it is the same on every rank and rerun.
    """
    x_valid = batch["x_valid_mask"]
    b, _, h, w = x_valid.shape
    hidden = torch.zeros(b, h, w, dtype=torch.bool)
    if fraction <= 0:
        return hidden
    cols = x_valid.any(dim=1)
    for i in range(b):
        idx = cols[i].flatten().nonzero().flatten()
        if idx.numel() < 2:  # keep at least one observation to condition on
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(batch["sample_id"][i]))
        k = min(idx.numel() - 1, max(1, round(fraction * idx.numel())))
        pick = idx[torch.randperm(idx.numel(), generator=g)[:k]]
        hidden[i].view(-1)[pick] = True
    return _hide(batch, hidden)


def predict_split(
    model: torch.nn.Module,
    store: str | Path,
    out: str | Path,
    *,
    split: str = "val",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 4,
    ensemble: int = 1,
    keep_members: bool = False,
    sampler: str | None = None,
    sampler_overrides: dict | None = None,
    clamp_known_pixels: bool | None = None,
    withhold_fraction: float = 0.0,
    withhold: Withhold = "columns",
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: SamplingPrecision = "fp32",
    limit: int | None = None,
    progress: bool = True,
    barrier: Callable[[], object] | None = None,
) -> dict[str, int]:
    """Predict one split of a store into `out`; returns counts of written and skipped samples.

    `sampler` None: the model's own default (`model.sampling` of its config). `withhold`:
    "columns" or "floats" (module docstring); the prediction store records the mode in its
    `withhold_mode` attribute and, for floats, the withheld ids in `withheld_platforms`."""
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    if withhold not in get_args(Withhold):
        raise ValueError(f"withhold {withhold!r}: expected one of {get_args(Withhold)}")
    if not 0.0 <= withhold_fraction <= 1.0:
        raise ValueError(f"withhold_fraction must be in [0, 1], got {withhold_fraction}")
    smp = model.make_sampler(sampler, **(sampler_overrides or {}))
    man = read_manifest(store)
    if split not in man["splits"]:
        raise ValueError(f"store {store} has no split {split!r} ({sorted(man['splits'])})")
    n = int(man["splits"][split]["n_samples"])
    if limit is not None:
        n = min(n, limit)
    tile = int(man["tile_size"])
    depth_m = list(man["levels_m"])
    floats = withhold == "floats" and withhold_fraction > 0
    chosen = np.zeros(0, bool)
    extra: dict = {}
    if floats:
        if "platforms" not in man:
            raise ValueError(f"store {store} has no platform ids (built before obs_platform "
                             "existed): rebuild it to withhold whole floats, or use --withhold columns")
        chosen = withheld_platforms(man["platforms"], withhold_fraction, seed)
        extra["withheld_platforms"] = [p for p, c in zip(man["platforms"], chosen, strict=True) if c]
    attrs = {"source_store": str(Path(store).resolve()), "split": split, "sampler": smp.name,
             "ensemble": ensemble, "withhold_fraction": withhold_fraction, "seed": seed,
             "withhold_mode": withhold, "precision": precision, **extra}
    shape = dict(n=n, depth_m=depth_m, height=tile, width=tile)
    if rank == 0:
        create_prediction_store(out, **shape, members=ensemble if keep_members else 0, attrs=attrs)
    else:
        check_prediction_store(out, **shape, attrs=attrs)
    if barrier is not None:
        barrier()
    writer = PredictionWriter(out)
    done = writer.done()
    # Decode with the normalisation the model was trained with (its config: build_model).
    stream = ShardStream(store, split, rank=rank, world_size=world_size, shuffle=False,
                         even_ranks=False, return_coords=True,
                         normalizer=getattr(model, "normalizer", GLOBAL))
    offset = stream.id_offset
    loader = DataLoader(stream, batch_size=batch_size, num_workers=0)
    meta = _meta_rows(store, split)
    src = _split_group(store, split) if floats else None
    model = model.to(device).eval()
    written = skipped = 0
    bar = tqdm(total=len(stream), desc=f"predict[{rank}]", disable=not progress, leave=False)
    for batch in loader:
        idx = (batch["sample_id"] - offset).tolist()
        todo = [j for j, i in enumerate(idx) if i < n and not done[i]]
        skipped += sum(1 for i in idx if i < n and done[i])
        bar.update(len(idx))
        if not todo:
            continue
        batch = {k: v[todo] for k, v in batch.items()}
        if floats:
            cols = torch.stack([_float_columns_of(src, meta, int(sid) - offset, chosen, tile)
                                for sid in batch["sample_id"]])
            hidden = withhold_floats(batch, cols)
        else:
            hidden = withhold_columns(batch, withhold_fraction, seed)
        rep = {k: v.repeat_interleave(ensemble, dim=0).to(device) for k, v in batch.items()}
        g = torch.Generator(device=device).manual_seed(seed * 7919 + int(batch["sample_id"][0]))
        res = model.predict(rep, sampler=smp, clamp_known_pixels=clamp_known_pixels, generator=g,
                            precision=precision)
        fields = res.y_hat_denorm.float().cpu()
        fields = fields.view(len(todo), ensemble, *fields.shape[1:])
        mean = fields.mean(dim=1)
        std = fields.std(dim=1, unbiased=True) if ensemble > 1 else torch.zeros_like(mean)
        std = std.masked_fill(torch.isnan(mean), float("nan"))
        for j in range(len(todo)):
            i = int(batch["sample_id"][j]) - offset
            row = meta[i]
            t = Tile(i, int(row[META["row0"]]), int(row[META["col0"]]), tile, float(man["resolution_deg"]))
            lat, lon = t.pixel_lats().astype(np.float32), t.pixel_lons().astype(np.float32)
            writer.write(i, mean=mean[j].numpy(), std=std[j].numpy(),
                         members=fields[j].numpy() if keep_members else None,
                         withheld=hidden[j].numpy(), lat=lat, lon=lon, date=int(batch["date"][j]),
                         sample_id=int(batch["sample_id"][j]))
            written += 1
    bar.close()
    return {"written": written, "skipped": skipped, "n": n}


def _meta_rows(store: str | Path, split: str) -> np.ndarray:
    return _split_group(store, split)["meta"][:]


def _split_group(store: str | Path, split: str):
    import zarr

    return zarr.open_group(str(store), mode="r")[split]


def _float_columns_of(grp, meta: np.ndarray, i: int, chosen: np.ndarray, tile: int) -> torch.Tensor:
    """float_columns of sample i of a store split group."""
    n = int(meta[i, META["n_obs_pixels"]])
    return float_columns(grp["obs"][i, :n, :2], grp["obs_platform"][i, :n], chosen, tile, tile)


def to_netcdf(pred: str | Path, path: str | Path) -> Path:
    """Copy a finished prediction store to NetCDF (xarray + netCDF4)."""
    import xarray as xr

    ds = xr.open_zarr(str(pred), consolidated=False)
    ds = ds.set_coords([c for c in ("depth", "lat", "lon", "date", "sample_id") if c in ds])
    tmp = Path(str(path) + ".part")
    ds.to_netcdf(tmp)
    os.replace(tmp, path)
    return Path(path)


def _dist() -> tuple[int, int, object]:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        from depthdif_hpc.launch_env import resolve_dist_env

        resolve_dist_env()
        if torch.cuda.is_available():
            # Bound to this rank's GPU: NCCL's barrier otherwise guesses the device (and warns).
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=local)
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


@command(StoreError)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.inference.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    ap.add_argument("--store", required=True, help="data store built by depthdif_hpc.data.build")
    ap.add_argument("--split", default="val")
    ap.add_argument("--out", required=True, help="output Zarr store (created, or resumed)")
    ap.add_argument("--netcdf", help="also write this NetCDF file once all samples are done")
    ap.add_argument("--sampler", choices=get_args(SamplerName),
                    help="default: the checkpoint's model.sampling.sampler")
    ap.add_argument("--steps", type=int, help="DDIM steps (default: config)")
    ap.add_argument("--eta", type=float, help="DDIM eta (default: config)")
    ap.add_argument("--temperature", type=float, help="DDIM initial-noise temperature")
    ap.add_argument("--ensemble", "-k", type=int, default=1, help="samples per input")
    ap.add_argument("--members", action="store_true", help="also store every ensemble member")
    ap.add_argument("--clamp-known-pixels", choices=("true", "false"), help="default: config")
    ap.add_argument("--blur", choices=("true", "false"), help="Gaussian blur; default: config")
    ap.add_argument("--withhold-fraction", type=float, default=0.0,
                    help="fraction of observed columns (or of floats) hidden from the condition")
    ap.add_argument("--withhold", choices=get_args(Withhold), default="columns",
                    help="columns: random columns per sample; floats: every profile of whole floats")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="only the first N samples of the split")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA exists")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=get_args(SamplingPrecision), default="fp32",
                    help="the denoiser's arithmetic (bf16: autocast; docs/metrics.md#evaluation-report)")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    from depthdif_hpc.checkpoint.loading import load_model

    rank, world, barrier = _dist()
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    overrides = list(args.overrides)
    if args.blur is not None:
        overrides.append(f"model.post_process.gaussian_blur.enabled={args.blur}")
    _, model = load_model(args.checkpoint, use_ema=not args.no_ema, overrides=overrides)
    smp_over = {k: v for k, v in (("ddim_num_timesteps", args.steps), ("ddim_eta", args.eta),
                                  ("ddim_temperature", args.temperature)) if v is not None}
    clamp = None if args.clamp_known_pixels is None else args.clamp_known_pixels == "true"
    counts = predict_split(
        model, args.store, args.out, split=args.split, rank=rank, world_size=world,
        batch_size=args.batch_size, ensemble=args.ensemble, keep_members=args.members,
        sampler=args.sampler, sampler_overrides=smp_over, clamp_known_pixels=clamp,
        withhold_fraction=args.withhold_fraction, withhold=args.withhold, seed=args.seed,
        device=device, precision=args.precision, limit=args.limit,
        progress=rank == 0, barrier=barrier,
    )
    print(f"rank {rank}: wrote {counts['written']}, skipped {counts['skipped']} already done "
          f"({counts['n']} in {args.split}) -> {args.out}", flush=True)
    if barrier is not None:
        barrier()
    if args.netcdf and rank == 0:
        if not PredictionWriter(args.out).done().all():
            print("not every sample is done yet: NetCDF not written", file=sys.stderr)
            return 1
        print(f"netcdf: {to_netcdf(args.out, args.netcdf)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
