"""`make demo`: the whole job end to end on the embedded synthetic ocean, on a CPU.

1. generate GLORYS-, OSTIA- and EN4-format NetCDF files of a synthetic North Atlantic box;
2. build the sharded Zarr store from them (3 x 3 tiles of 64 px, 2017 for training, 2018 for
   validation);
3. train a small standard-preset model with the real trainer for a few minutes;
4. predict the validation split with DDIM (an ensemble, 30% of the profiles withheld);
5. evaluate against OI, IDW, the per-pixel climatology and the SST anomaly carried down
   (RMSE, CRPS, spread-skill, R^2, rank histograms) and write the report;
6. reconstruct the whole demo box on one validation date from the source files (tiled and
   blended, depthdif_hpc.inference.reconstruct) and add its map beside GLORYS to the report.

Each stage reports its progress; a rerun reuses what is already complete (sources, store,
checkpoint, predictions). Everything goes under --out (default demo_out/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from depthdif_hpc.config import Config, config_dir, load_config
from depthdif_hpc.inference.report import REPORT, write_text

CONFIGS = config_dir() / "px_space"
TILE = 64
# The demo's ensemble settings (docs/model.md#ensemble-spread, 8 validation samples x 8 members):
# without the skip spread-skill 0.04 on hidden pixels; with it 0.60 (uniform DDIM-20) and 0.83
# (quadratic), CRPS -27 %, the ensemble mean's RMSE within +-2 %.
X0_SKIP = "gaussian"
DDIM_DISCRETIZATION = "quadratic"


def _stage(n: int, text: str) -> float:
    print(f"\n[{n}/6] {text}", flush=True)
    return time.time()


def _done(t0: float, text: str = "") -> None:
    print(f"      done in {time.time() - t0:.0f}s {text}", flush=True)


def demo_region(tile: int = TILE, res: float = 0.1) -> tuple[float, float, float, float]:
    """An open-ocean box holding 3 x 3 tiles at 50% overlap."""
    from depthdif_hpc.data.synthetic import _TINY_ANCHOR

    lon0, lat1 = _TINY_ANCHOR
    span = 2 * tile * res
    return (lon0 - 0.2, lon0 + span + 0.2, lat1 - span - 0.2, lat1 + 0.2)


def train_overrides(store: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        f"dataset.store={store}", f"trainer.run_dir={run_dir}", f"trainer.max_steps={steps}",
        "model.unet.dim=24", "model.unet.dim_mults=[1,2,4]", "model.kernels=eager",
        "model.post_process.gaussian_blur.enabled=false",
        "training.lr=2e-3", "scheduler.warmup.steps=50", "scheduler.reduce_on_plateau.enabled=false",
        "trainer.ema.decay=0.98", "trainer.val_every_n_steps=100000",
        f"trainer.checkpoint_every_n_steps={max(steps // 4, 1)}", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=25", "dataloader.batch_size=8", "dataloader.val_batch_size=4",
        "dataloader.num_workers=1", "dataloader.pin_memory=false",
        "model.sampling.sampler=ddim", "model.sampling.ddim_num_timesteps=10",
        "trainer.full_reconstruction_samples=2",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--steps", type=int, default=600, help="training steps")
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--ensemble", type=int, default=4)
    ap.add_argument("--ocean", choices=("v2", "simple"), default="v2",
                    help="synthetic ocean (docs/synthetic.md); a new one needs a fresh --out")
    ap.add_argument("--normalization", choices=("global", "per_level"), default="per_level",
                    help="temperature z-score the model trains with (dataset.normalization; "
                         "per_level: 2-4x lower deep error, docs/data_store.md)")
    ap.add_argument("--x0-skip", choices=("gaussian", "gaussian_spectral", "none"), default=X0_SKIP,
                    help="model.x0_skip: the Gaussian skip that makes the ensemble spread "
                         "(docs/model.md#gaussian-x0-skip)")
    ap.add_argument("--ddim-discretization", choices=("quadratic", "uniform"), default=DDIM_DISCRETIZATION,
                    help="DDIM steps dense near t = 0 (quadratic) keep the spread of deep levels "
                         "(docs/model.md#ensemble-spread)")
    ap.add_argument("--upsample", choices=("transposed", "nearest_conv"), default="transposed",
                    help="model.unet.upsample: the decoder's x2 upsampling (docs/model.md#checkerboard)")
    ap.add_argument("--withhold", choices=("floats", "columns"), default="floats",
                    help="what predict hides from the condition for scoring: 30%% of the floats "
                         "(every profile of each) or 30%% of each sample's columns")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    start = time.time()

    from depthdif_hpc.data.build import build_store
    from depthdif_hpc.data.synthetic import generate

    t0 = _stage(1, "synthetic ocean: GLORYS/OSTIA/EN4-format NetCDF files")
    marker = out / "sources" / "COMPLETE"
    if marker.is_file():
        src = json.loads(marker.read_text())
        if src.pop("mode", "simple") != args.ocean:
            print(f"{out} holds sources of another synthetic ocean than --ocean {args.ocean}; "
                  "use a fresh --out")
            return 2
        _done(t0, "(reused)")
    else:
        src = generate(out / "sources", demo_region(), "2017-11-20", "2018-01-08", seed=0,
                       glorys_every=2, floats_per_100sqdeg=8.0 * (128 / TILE) ** 2, progress=True,
                       mode=args.ocean)
        marker.write_text(json.dumps({**src, "mode": args.ocean}))
        _done(t0, f"-> {out / 'sources'}")

    t0 = _stage(2, "build the sharded Zarr store")
    store = out / "store.zarr"
    cfg = load_config(CONFIGS / "data_config.yaml", overrides=[
        f"dataset.grid.tile_size={TILE}", f"dataset.grid.patch_stride={TILE // 2}", "split.val_year=2018",
        "dataset.layout.shard_samples=16"])
    build_store(cfg, src["glorys"], src["ostia"], src["en4"], store, workers=2, progress=True)
    man = json.loads((store / "manifest.json").read_text())
    _done(t0, f"-> {store}: " + ", ".join(f"{k} {v['n_samples']}" for k, v in man["splits"].items())
          + " samples")

    t0 = _stage(3, f"train a small standard-preset model ({args.steps} steps, CPU)")
    from depthdif_hpc.train.cli import main as train_main

    run_dir = out / "run"
    code = train_main([
        "--config", str(CONFIGS / "model_config.yaml"), "--config", str(CONFIGS / "training_config.yaml"),
        "--config", str(CONFIGS / "data_config.yaml"), *train_overrides(store, run_dir, args.steps),
        f"dataset.normalization={args.normalization}", f"model.x0_skip={args.x0_skip}",
        f"model.unet.upsample={args.upsample}"])
    if code != 0:
        print(f"training failed with exit code {code}; see {run_dir / 'logs'}")
        return code
    _done(t0, f"-> {run_dir}")

    t0 = _stage(4, f"predict the validation split (DDIM {args.ddim_steps} {args.ddim_discretization} steps, "
                   f"ensemble of {args.ensemble})")
    from depthdif_hpc.checkpoint.loading import load_model
    from depthdif_hpc.inference.predict import predict_split

    model_cfg, model = load_model(run_dir)
    sampler_overrides = {"ddim_num_timesteps": args.ddim_steps, "ddim_discretization": args.ddim_discretization}
    pred = out / "predictions.zarr"
    counts = predict_split(model, store, pred, split="val", batch_size=8, ensemble=args.ensemble,
                           sampler="ddim", sampler_overrides=sampler_overrides,
                           withhold_fraction=0.3, withhold=args.withhold, seed=0, keep_members=True)
    _done(t0, f"-> {pred} ({counts['written']} new, {counts['skipped']} reused)")

    t0 = _stage(5, "evaluate against OI, IDW, climatology and surface-extended baselines")
    from depthdif_hpc.inference.evaluate import evaluate, summary_lines

    report = out / "report"
    r = evaluate(pred, store, report)
    _done(t0)
    print("\n".join("      " + line for line in summary_lines(r)))

    recon = reconstruct_box(model, model_cfg, store, src, out, report, args.ensemble, sampler_overrides)
    print(f"\nreport: {report / REPORT}   (total {time.time() - start:.0f}s)")
    print(f"reconstruction: {recon}")
    return 0


def reconstruct_box(model: torch.nn.Module, cfg: Config, store: Path, src: dict, out: Path,
                    report: Path, ensemble: int, sampler_overrides: dict) -> Path:
    """Stage 6: the demo box on the first validation date, from the source files."""
    import zarr

    from depthdif_hpc.data.store import META
    from depthdif_hpc.inference.reconstruct import reconstruct

    ymd = str(int(zarr.open_group(str(store), mode="r")["val/meta"][0, META["date"]]))
    date = f"{ymd[:4]}-{ymd[4:6]}-{ymd[6:]}"
    t0 = _stage(6, f"reconstruct the demo box on {date} from the source files (tiles of {TILE} px)")
    path = out / f"reconstruction_{ymd}.nc"
    fig = report / "reconstruction.png"
    if path.is_file():
        _done(t0, "(reused)")
    else:
        lon0, lon1, lat0, lat1 = demo_region()
        rep = reconstruct(model, cfg, date=date, out=path, ostia=src["ostia"], en4=src["en4"],
                          glorys=src["glorys"], region=(lon0 + 0.2, lon1 - 0.2, lat0 + 0.2, lat1 - 0.2),
                          tile=TILE, ensemble=ensemble, sampler="ddim",
                          sampler_overrides=sampler_overrides, figure=fig)
        _done(t0, f"-> {path} ({rep['tiles_per_s']:.2f} tiles/s)")
    import netCDF4

    with netCDF4.Dataset(path) as ds:
        rmse, tiles = float(ds.rmse_vs_reference_c), int(ds.tiles_total)
    print(f"      RMSE against GLORYS over the box: {rmse:.3f} degC")
    md = report / REPORT
    text = md.read_text()
    if "## Reconstruction of the demo box" not in text:
        # Rewritten whole, not appended: a kill mid-append would leave a cut section that a rerun
        # takes for done.
        write_text(md, text + f"\n## Reconstruction of the demo box on {date}\n\n"
                   f"`{path.name}`: {tiles} tiles of {TILE} px blended, ensemble of {ensemble}; "
                   f"RMSE against GLORYS {rmse:.3f} degC. Top: the ensemble mean at four depths; "
                   "middle: GLORYS; bottom: the ensemble spread and a section.\n\n"
                   "![reconstruction](reconstruction.png)\n")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
