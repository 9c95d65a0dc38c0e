"""`python -m depthdif_hpc.inference.evaluate --pred OUT.zarr --store STORE --report DIR`.

Scores a prediction store against the truth in the data store, next to three baselines
(depthdif_hpc/inference/baselines.py): inverse-distance weighting of the observed profiles,
the training-set climatology per depth and day of year, and the surface field carried down by
the mean profile. Everything is in degC and streamed sample by sample.

Supports (per depth level):
* `hidden`: ocean pixels (y_valid) that the condition did not contain, scored against y;
* `withheld`: observed profile values that predict hid from the condition (--withhold-fraction),
  scored against the observations themselves;
Also: PSNR/SSIM as in docs/metrics.md#reconstruction-metrics (depthdif_hpc.metrics) and the ensemble
spread-skill ratio. Writes DIR/report.md, DIR/metrics.json and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader
from tqdm import tqdm

from depthdif_hpc.data.stream import ShardStream
from depthdif_hpc.inference.baselines import Climatology, idw, surface_extended
from depthdif_hpc.inference.report import fmt, json_default, report_levels
from depthdif_hpc.metrics import DepthStats, recon_metrics
from depthdif_hpc.normalization import denormalize_temperature

METHODS = ("model", "idw", "climatology", "surface_extended")
SUPPORTS = ("hidden", "withheld")


def fit_climatology(store: str | Path, window_days: int = 15, batch_size: int = 8) -> Climatology:
    """Climatology from the train split, streamed (per-sample sums only)."""
    stream = ShardStream(store, "train", shuffle=False, even_ranks=False)
    sums, counts, dates = [], [], []
    for b in DataLoader(stream, batch_size=batch_size):
        v = b["y_valid_mask"].double()
        t = denormalize_temperature(b["y"].double())
        sums.append((t * v).sum(dim=(2, 3)))
        counts.append(v.sum(dim=(2, 3)))
        dates.append(b["date"])
    if not sums:
        raise ValueError(f"store {store} has no train samples to fit the climatology")
    return Climatology.from_sums(torch.cat(sums), torch.cat(counts), torch.cat(dates), window_days)


def evaluate(pred_path: str | Path, store: str | Path, report: str | Path, *,
             idw_power: float = 2.0, figures: bool = True, progress: bool = True) -> dict:
    pred = zarr.open_group(str(pred_path), mode="r")
    split = pred.attrs.get("split", "val")
    done = pred["done"][:].astype(bool)
    if not done.any():
        raise ValueError(f"{pred_path} holds no finished sample (run predict first)")
    depth_m = np.asarray(pred["depth"][:], dtype=float)
    d = len(depth_m)
    clim = fit_climatology(store)
    mean_profile = clim.mean_profile()
    stats = {(m, s): DepthStats(d) for m in METHODS for s in SUPPORTS}
    spread_sq = np.zeros(d)
    spread_n = np.zeros(d)
    psnr_sum, psnr_n, ssim_sum, ssim_n = {}, {}, {}, {}
    ensemble = int(pred.attrs.get("ensemble", 1))
    stream = ShardStream(store, split, shuffle=False, even_ranks=False)
    offset = stream.id_offset
    keep_for_figures = None
    bar = tqdm(total=int(done.sum()), desc="evaluate", disable=not progress, leave=False)
    for b in DataLoader(stream, batch_size=1):
        i = int(b["sample_id"][0]) - offset
        if i >= len(done) or not done[i]:
            continue
        bar.update(1)
        truth = denormalize_temperature(b["y"][0].double()).numpy()
        y_valid = b["y_valid_mask"][0].numpy()
        truth = np.where(y_valid, truth, np.nan)
        x_valid = b["x_valid_mask"][0].numpy()
        obs = np.where(x_valid, denormalize_temperature(b["x"][0].double()).numpy(), np.nan)
        withheld = pred["withheld"][i].astype(bool)
        cond_valid = x_valid & ~withheld[None]
        mean = pred["mean"][i].astype(np.float64)
        # baselines see exactly what the model saw
        xc = torch.from_numpy(np.nan_to_num(obs) * cond_valid)[None]
        fields = {
            "model": mean,
            "idw": idw(xc, torch.from_numpy(cond_valid)[None], idw_power)[0].numpy(),
            "climatology": clim.predict(b["date"], (1, d, *truth.shape[1:]))[0].double().numpy(),
            "surface_extended": surface_extended(
                denormalize_temperature(b["eo"].double()), mean_profile.double())[0].numpy(),
        }
        hidden = y_valid & ~cond_valid
        w_mask = x_valid & withheld[None]
        for m, f in fields.items():
            f = np.where(y_valid, f, np.nan)
            stats[(m, "hidden")].add(f, truth, hidden)
            stats[(m, "withheld")].add(f, obs, w_mask)
            r = recon_metrics(torch.from_numpy(f)[None], torch.from_numpy(truth)[None],
                              torch.from_numpy(y_valid)[None])
            if r["recon_psnr_bands"]:
                psnr_sum[m] = psnr_sum.get(m, 0.0) + r["recon_psnr_full_recon"] * r["recon_psnr_bands"]
                psnr_n[m] = psnr_n.get(m, 0.0) + r["recon_psnr_bands"]
            if r["recon_ssim_bands"]:
                ssim_sum[m] = ssim_sum.get(m, 0.0) + r["recon_ssim_full_recon"] * r["recon_ssim_bands"]
                ssim_n[m] = ssim_n.get(m, 0.0) + r["recon_ssim_bands"]
        if ensemble > 1:
            std = pred["std"][i].astype(np.float64)
            sel = hidden & np.isfinite(std)
            spread_sq += np.where(sel, std**2, 0).sum(axis=(1, 2))
            spread_n += sel.sum(axis=(1, 2))
        if keep_for_figures is None:
            keep_for_figures = dict(i=i, truth=truth, mean=mean, std=pred["std"][i], obs=obs,
                                    withheld=withheld, cond_valid=cond_valid, idw=fields["idw"],
                                    lat=pred["lat"][i], lon=pred["lon"][i], date=int(b["date"][0]))
    bar.close()
    result = _summarise(stats, depth_m, spread_sq, spread_n, ensemble, psnr_sum, psnr_n, ssim_sum, ssim_n)
    result["n_samples"] = int(done.sum())
    result["split"] = split
    report = Path(report)
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(json.dumps(result, indent=1, default=json_default))
    figs = []
    if figures and keep_for_figures is not None:
        from depthdif_hpc.inference import report_figures as rf

        figs = rf.make_all(report, depth_m, result, keep_for_figures)
    (report / "report.md").write_text(_markdown(result, depth_m, figs, pred_path, store))
    return result


def _summarise(stats, depth_m, spread_sq, spread_n, ensemble, psnr_sum, psnr_n, ssim_sum, ssim_n) -> dict:
    out: dict = {"depth_m": depth_m.tolist(), "overall": {}, "per_depth": {}}
    for (m, s), st in stats.items():
        out["overall"].setdefault(s, {})[m] = st.overall()
        out["per_depth"].setdefault(s, {})[m] = {k: v.tolist() for k, v in st.per_depth().items()}
    out["psnr"] = {m: psnr_sum[m] / psnr_n[m] for m in psnr_sum}
    out["ssim"] = {m: (ssim_sum[m] / ssim_n[m]) if m in ssim_sum else 0.0 for m in METHODS}
    if ensemble > 1:
        # spread-skill: RMS ensemble spread over RMSE of the ensemble mean, with the finite-
        # ensemble factor sqrt((K + 1) / K); about 1 for a well-calibrated ensemble.
        h = stats[("model", "hidden")]
        with np.errstate(invalid="ignore", divide="ignore"):
            spread = np.sqrt(spread_sq / np.where(spread_n > 0, spread_n, np.nan))
            rmse = np.sqrt(h.s2 / np.where(h.n > 0, h.n, np.nan))
            factor = math.sqrt((ensemble + 1) / ensemble)
            out["spread_skill_per_depth"] = (factor * spread / rmse).tolist()
            tot = factor * math.sqrt(spread_sq.sum() / max(spread_n.sum(), 1)) / max(
                h.overall()["rmse"], 1e-12)
        out["spread_skill"] = float(tot)
    # the headline: at how many depths the model beats each baseline on hidden pixels
    model_rmse = np.asarray(out["per_depth"]["hidden"]["model"]["rmse"], dtype=float)
    out["model_better_than"] = {}
    for m in METHODS[1:]:
        base = np.asarray(out["per_depth"]["hidden"][m]["rmse"], dtype=float)
        ok = np.isfinite(model_rmse) & np.isfinite(base)
        out["model_better_than"][m] = {"depths": int((model_rmse[ok] < base[ok]).sum()),
                                       "of": int(ok.sum())}
    return out


def _markdown(r: dict, depth_m: np.ndarray, figs: list[Path], pred_path, store) -> str:
    lines = [f"# DepthDif evaluation ({r['split']} split, {r['n_samples']} samples)", "",
             f"Predictions: `{pred_path}`  ", f"Truth and observations: `{store}`", ""]
    for s, title in (("hidden", "Ocean pixels not in the condition, against GLORYS-like truth (degC)"),
                     ("withheld", "Withheld profiles, against the observations (degC)")):
        lines += [f"## {title}", "", "| method | RMSE | MAE | bias | points |", "|---|---:|---:|---:|---:|"]
        for m in METHODS:
            o = r["overall"][s][m]
            lines.append(f"| {m} | {fmt(o['rmse'])} | {fmt(o['mae'])} | {fmt(o['bias'])} | {o['count']} |")
        lines.append("")
    lines += ["## RMSE per depth on hidden pixels (degC)", "",
              "| depth (m) | " + " | ".join(METHODS) + " |", "|---:|" + "---:|" * len(METHODS)]
    for k in report_levels(depth_m):
        row = [fmt(r["per_depth"]["hidden"][m]["rmse"][k]) for m in METHODS]
        lines.append(f"| {depth_m[k]:.1f} | " + " | ".join(row) + " |")
    lines += ["", "Model RMSE below the baseline's at: " + ", ".join(
        f"{m} {v['depths']}/{v['of']} depths" for m, v in r["model_better_than"].items()), ""]
    lines += ["## Image metrics (docs/metrics.md#reconstruction-metrics)", "", "| method | PSNR (dB) | SSIM |", "|---|---:|---:|"]
    for m in METHODS:
        lines.append(f"| {m} | {fmt(r['psnr'].get(m, math.nan))} | {fmt(r['ssim'].get(m, 0.0))} |")
    if "spread_skill" in r:
        lines += ["", f"Ensemble spread-skill ratio (hidden pixels): {fmt(r['spread_skill'])}"]
    if figs:
        lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.inference.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, help="prediction store written by depthdif_hpc.inference.predict")
    ap.add_argument("--store", required=True, help="the data store the predictions were made from")
    ap.add_argument("--report", required=True, help="output folder for report.md, metrics.json, PNGs")
    ap.add_argument("--idw-power", type=float, default=2.0)
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    r = evaluate(args.pred, args.store, args.report, idw_power=args.idw_power, figures=not args.no_figures)
    o = r["overall"]["hidden"]
    print("hidden-pixel RMSE (degC): " + ", ".join(f"{m} {fmt(o[m]['rmse'])}" for m in METHODS))
    print(f"report: {Path(args.report) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
