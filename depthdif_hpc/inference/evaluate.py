"""`python -m depthdif_hpc.inference.evaluate --pred OUT.zarr --store STORE --report DIR`.

Scores a prediction store against the truth in the data store, next to four baselines
(docs/metrics.md#baselines): optimal interpolation of the profiles on the climatology
(depthdif_hpc/inference/oi.py), inverse-distance weighting, the per-pixel seasonal climatology of
the train split (depthdif_hpc/inference/climatology.py) and the SST anomaly carried down.
Everything is in degC, read from the store's codes and streamed sample by sample.

Supports (per depth level):
* `hidden`: ocean pixels (y valid) that the condition did not contain, scored against y;
* `withheld`: observed profile values that predict hid from the condition (random columns or
  whole floats, whichever the prediction store records), scored against the observations.
Per method and support: RMSE, MAE, bias, R^2; for the model's ensemble and OI: CRPS,
spread-skill and (ensemble members stored) rank histograms; PSNR/SSIM as in
docs/metrics.md#reconstruction-metrics. Writes DIR/report.md, DIR/metrics.json and PNG figures.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from depthdif_hpc.command import command
from depthdif_hpc.config import Config, EvaluationConfig, OIConfig, validate_config
from depthdif_hpc.data.store import META, StoreError
from depthdif_hpc.inference.baselines import idw, surface_extended
from depthdif_hpc.inference.climatology import (
    Climatology,
    ObservationReader,
    iter_split_fields,
    load_or_fit,
)
from depthdif_hpc.inference.oi import (
    OIParams,
    analyse,
    fit_hyperparameters,
    haversine_km,
    pixel_latlon,
)
from depthdif_hpc.inference.report import (
    REPORT,
    fmt,
    open_report,
    report_levels,
    write_json,
    write_text,
)
from depthdif_hpc.metrics import (
    DepthMean,
    DepthStats,
    crps_ensemble_fair,
    crps_gaussian,
    ensemble_ranks,
    recon_metrics,
    spread_skill,
    two_pixel_power,
)

METHODS = ("model", "oi", "idw", "climatology", "surface_extended")
# Area means for the block spread-skill: 8 px = 0.8 degrees, about the scale of the demo's error
# blobs; an ensemble whose members differ pixel by pixel is calibrated pointwise but 8x too narrow
# for such a mean (docs/metrics.md#spread-skill-ratio).
BLOCK_PX = 8
SUPPORTS = ("hidden", "withheld")
PROBABILISTIC = ("model", "oi")
KM_PER_DEG = 111.19


def fit_oi(store: str | Path, clim: Climatology, cfg: OIConfig) -> OIParams:
    """OI hyperparameters from up to cfg.fit_samples evenly spaced train days: each day's
    observed columns (all its patches, each global pixel once, at most cfg.fit_max_obs of them)
    as one draw of the anomaly field from the climatology."""
    reader = ObservationReader(store, "train")
    if len(reader.meta) == 0:
        raise ValueError(f"store {store} has no train samples to fit the OI hyperparameters")
    _, first_of_day = np.unique(reader.meta[:, META["day"]], return_index=True)
    n_days = len(first_of_day)
    pick = first_of_day[np.unique(np.linspace(0, n_days - 1, min(cfg.fit_samples, n_days)).round().astype(int))]
    rng = np.random.default_rng(0)

    def samples():
        for first in pick:
            idx = reader.same_day(int(first))
            cols = [reader.columns(int(i)) for i in idx]
            rows = np.concatenate([c[0] for c in cols])
            cc = np.concatenate([c[1] for c in cols])
            vals = np.concatenate([c[2] for c in cols], axis=1)
            _, first = np.unique(rows * 10_000 + cc, return_index=True)
            if first.size > cfg.fit_max_obs:
                first = np.sort(rng.choice(first, cfg.fit_max_obs, replace=False))
            if first.size:
                r, c = rows[first], cc[first]
                lat, lon = pixel_latlon(r, c, reader.res)
                yield lat, lon, vals[:, first] - clim.at(r, c, int(reader.meta[idx[0], META["date"]]))

    return fit_hyperparameters(samples(), cfg, reader.depth)


def halo_observations(reader: ObservationReader, i: int, halo_km: float,
                      withheld_of: Callable[[int], np.ndarray | None]) -> tuple[np.ndarray, ...]:
    """Columns of same-day samples outside sample i's patch and within halo_km of it (each global
    pixel once), without those withheld in their own sample's prediction."""
    r0, c0 = reader.origin(i)
    t, res = reader.tile, reader.res
    top, left = 90.0 - r0 * res, -180.0 + c0 * res
    bottom, right = top - t * res, left + t * res
    coslat = max(math.cos(math.radians(max(abs(top), abs(bottom)) + halo_km / KM_PER_DEG)), 0.05)
    seen: set[int] = set()
    out_r, out_c, out_v = [], [], []
    for j in reader.same_day(i):
        if j == i:
            continue
        rj, cj = reader.origin(int(j))
        # cheap rejection of far patches before reading their columns
        if (abs(rj - r0) - t) * res * KM_PER_DEG > halo_km or \
                (abs(cj - c0) - t) * res * KM_PER_DEG * coslat > halo_km:
            continue
        rows, cols, vals = reader.columns(int(j))
        keep = ~((rows >= r0) & (rows < r0 + t) & (cols >= c0) & (cols < c0 + t))
        wh = withheld_of(int(j))
        if wh is not None:
            keep &= ~wh[rows - rj, cols - cj]
        lat, lon = pixel_latlon(rows, cols, res)
        keep &= haversine_km(lat, lon, np.clip(lat, bottom, top), np.clip(lon, left, right)) <= halo_km
        for k in np.flatnonzero(keep):
            key = int(rows[k]) * 10_000 + int(cols[k])
            if key not in seen:
                seen.add(key)
                out_r.append(rows[k])
                out_c.append(cols[k])
                out_v.append(vals[:, k])
    if not out_r:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((reader.depth, 0))
    return np.asarray(out_r), np.asarray(out_c), np.stack(out_v, axis=1)


def withheld_mode(attrs: dict) -> str:
    """How predict chose the withheld observations: its recorded mode ("columns" or "floats"),
    "none" when nothing was withheld."""
    if float(attrs.get("withhold_fraction", 0) or 0) <= 0:
        return "none"
    return str(attrs.get("withhold_mode", "columns"))


def withheld_lookup(pred: zarr.Group, done: np.ndarray, store: str | Path, split: str,
                    meta: np.ndarray) -> Callable[[int], np.ndarray | None]:
    """j -> the (H, W) withheld mask of sample j: the prediction store's for finished samples;
    for others, whole-float holdout recomputes it from the withheld float ids (the same floats in
    every sample), random columns cannot be known (None)."""
    floats = withheld_mode(dict(pred.attrs)) == "floats"
    if floats:
        from depthdif_hpc.data.store import read_manifest
        from depthdif_hpc.inference.predict import float_columns

        man = read_manifest(store)
        chosen = np.isin(np.asarray(man["platforms"]), list(pred.attrs.get("withheld_platforms", [])))
        grp = zarr.open_group(str(store), mode="r")[split]
        tile = int(man["tile_size"])

    def lookup(j: int) -> np.ndarray | None:
        if j < len(done) and done[j]:
            return pred["withheld"][j].astype(bool)
        if floats:
            n = int(meta[j, META["n_obs_pixels"]])
            return np.asarray(float_columns(grp["obs"][j, :n, :2], grp["obs_platform"][j, :n], chosen,
                                            tile, tile), bool)
        return None

    return lookup


class _Scores:
    """Every streamed sum of one evaluation."""

    def __init__(self, depth: int, members: int) -> None:
        self.depth, self.members = depth, members
        self.stats = {(m, s): DepthStats(depth) for m in METHODS for s in SUPPORTS}
        self.crps = {(m, s): DepthMean(depth) for m in PROBABILISTIC for s in SUPPORTS}
        self.var = {(m, s): DepthMean(depth) for m in PROBABILISTIC for s in SUPPORTS}
        self.ranks = {s: np.zeros((depth, members + 1), np.int64) for s in SUPPORTS} if members > 1 else {}
        self.psnr: dict[str, list[float]] = {m: [0.0, 0.0] for m in METHODS}
        self.ssim: dict[str, list[float]] = {m: [0.0, 0.0] for m in METHODS}
        self.rng = np.random.default_rng(0)
        # (squared error of the mean, members' variance, count) of BLOCK_PX block means per level
        self.block = np.zeros((3, depth))
        # (power on the 2-pixel period, total power) per level: the model's error, the truth
        self.checker = {k: np.zeros((2, depth)) for k in ("model_error", "truth")}

    def add_blocks(self, members: np.ndarray, truth: np.ndarray) -> None:
        """members (M, D, H, W), truth (D, H, W) NaN off Y: blocks wholly in Y at a level count."""
        k = BLOCK_PX
        d, h, w = truth.shape
        if h < k or w < k:
            return
        h, w = h // k * k, w // k * k

        def blocks(a: np.ndarray) -> np.ndarray:
            return a[..., :h, :w].reshape(*a.shape[:-2], h // k, k, w // k, k).mean(axis=(-3, -1))

        t, mem = blocks(truth), blocks(members)
        ok = np.isfinite(t) & np.isfinite(mem).all(axis=0)
        err = np.where(ok, mem.mean(axis=0) - t, 0.0)
        var = np.where(ok, mem.var(axis=0, ddof=1), 0.0)
        self.block += np.stack([(err ** 2).sum(axis=(1, 2)), var.sum(axis=(1, 2)), ok.sum(axis=(1, 2))])

    def add_checkerboard(self, model: np.ndarray, truth: np.ndarray) -> None:
        for k, f in (("model_error", model - truth), ("truth", truth)):
            nyq, total = two_pixel_power(f)
            self.checker[k] += np.stack([nyq, total])

    def add_probabilistic(self, s: str, target: np.ndarray, mask: np.ndarray, model_mean: np.ndarray,
                          model_var: np.ndarray | None, members: np.ndarray | None,
                          oi_mean: np.ndarray | None, oi_var: np.ndarray | None) -> None:
        sel = mask & np.isfinite(target) & np.isfinite(model_mean)
        if members is not None:
            sel &= np.isfinite(members).all(axis=0)
        lvl, yy, xx = np.nonzero(sel)
        if lvl.size == 0:
            return
        tgt = target[lvl, yy, xx]
        if model_var is not None:
            self.var[("model", s)].add(model_var[lvl, yy, xx], lvl)
        if members is not None:
            mem = members[:, lvl, yy, xx].T
            self.crps[("model", s)].add(crps_ensemble_fair(tgt, mem), lvl)
            np.add.at(self.ranks[s], (lvl, ensemble_ranks(tgt, mem, self.rng)), 1)
        if oi_mean is not None:
            sel_o = np.isfinite(oi_mean[lvl, yy, xx])
            lo, mu, v = lvl[sel_o], oi_mean[lvl, yy, xx][sel_o], oi_var[lvl, yy, xx][sel_o]
            self.crps[("oi", s)].add(crps_gaussian(tgt[sel_o], mu, np.sqrt(v)), lo)
            self.var[("oi", s)].add(v, lo)

    def add_image(self, m: str, f: np.ndarray, truth: np.ndarray, y_valid: np.ndarray) -> None:
        r = recon_metrics(torch.from_numpy(f)[None], torch.from_numpy(truth)[None],
                          torch.from_numpy(y_valid)[None])
        if r["recon_psnr_bands"]:
            self.psnr[m][0] += r["recon_psnr_full_recon"] * r["recon_psnr_bands"]
            self.psnr[m][1] += r["recon_psnr_bands"]
        if r["recon_ssim_bands"]:
            self.ssim[m][0] += r["recon_ssim_full_recon"] * r["recon_ssim_bands"]
            self.ssim[m][1] += r["recon_ssim_bands"]


def evaluate(pred_path: str | Path, store: str | Path, report: str | Path, *,
             cfg: EvaluationConfig | None = None, climatology_path: str | Path | None = None,
             figures: bool = True, progress: bool = True) -> dict:
    cfg = cfg or EvaluationConfig()
    validate_config(Config(evaluation=cfg), {})  # names the offending evaluation.* key
    pred = zarr.open_group(str(pred_path), mode="r")
    split = pred.attrs.get("split", "val")
    done = pred["done"][:].astype(bool)
    if not done.any():
        raise ValueError(f"{pred_path} holds no finished sample (run predict first)")
    depth_m = np.asarray(pred["depth"][:], dtype=float)
    d = len(depth_m)
    ensemble = int(pred.attrs.get("ensemble", 1))
    has_members = "members" in pred and ensemble > 1
    clim, clim_file = load_or_fit(store, cfg.climatology, climatology_path, progress=progress)
    if clim.depth != d:
        raise ValueError(f"climatology has {clim.depth} levels, the predictions {d}")
    oi_params = fit_oi(store, clim, cfg.oi) if cfg.oi.enabled else None
    reader = ObservationReader(store, split)

    withheld_of = withheld_lookup(pred, done, store, split, reader.meta)
    sc = _Scores(d, ensemble if has_members else 0)
    own_fraction = []
    keep_for_figures = None
    bar = tqdm(total=int(done.sum()), desc="evaluate", disable=not progress, leave=False)
    for i, fields_c, meta_row in iter_split_fields(store, split):
        if i >= len(done):
            break
        if not done[i]:
            continue
        bar.update(1)
        eo, truth = fields_c[0].astype(np.float64), fields_c[1:].astype(np.float64)
        y_valid = np.isfinite(truth)
        _, h, w = truth.shape
        r0, c0, date = int(meta_row[META["row0"]]), int(meta_row[META["col0"]]), int(meta_row[META["date"]])
        rows, cols, vals = reader.columns(i)
        obs = np.full((d, h, w), np.nan)
        obs[:, rows - r0, cols - c0] = vals
        x_valid = np.isfinite(obs)
        withheld = pred["withheld"][i].astype(bool)
        cond_valid = x_valid & ~withheld[None]
        bg = clim.patch(r0, c0, h, w, date)
        own_fraction.append(clim.own_fraction(r0, c0, h, w, y_valid))
        xc = torch.from_numpy(np.where(cond_valid, obs, 0.0))[None]
        fields = {
            "model": pred["mean"][i].astype(np.float64),
            "idw": idw(xc, torch.from_numpy(cond_valid)[None], cfg.idw_power)[0].numpy(),
            "climatology": bg,
            "surface_extended": surface_extended(torch.from_numpy(eo)[None, None],
                                                 torch.from_numpy(bg)[None])[0].numpy(),
        }
        oi_var = None
        if oi_params is not None:
            keep = ~withheld[rows - r0, cols - c0]
            hr, hc, hv = halo_observations(reader, i, cfg.oi.halo_km, withheld_of)
            o_rows, o_cols = np.concatenate([rows[keep], hr]), np.concatenate([cols[keep], hc])
            o_vals = np.concatenate([vals[:, keep], hv], axis=1)
            anom = o_vals - clim.at(o_rows, o_cols, date)
            rr, cc = np.meshgrid(np.arange(r0, r0 + h), np.arange(c0, c0 + w), indexing="ij")
            t_lat, t_lon = pixel_latlon(rr.ravel(), cc.ravel(), reader.res)
            o_lat, o_lon = pixel_latlon(o_rows, o_cols, reader.res)
            mu, var = analyse(oi_params, bg.reshape(d, -1), t_lat, t_lon, o_lat, o_lon, anom)
            fields["oi"], oi_var = mu.reshape(d, h, w), var.reshape(d, h, w)
        fields = {m: np.where(y_valid, f, np.nan) for m, f in fields.items()}
        hidden = y_valid & ~cond_valid
        w_mask = x_valid & withheld[None]
        targets = {"hidden": (truth, hidden), "withheld": (obs, w_mask)}
        for m, f in fields.items():
            for s, (tgt, mask) in targets.items():
                sc.stats[(m, s)].add(f, tgt, mask)
            sc.add_image(m, f, truth, y_valid)
        sc.add_checkerboard(fields["model"], truth)  # NaN off Y already: y_valid is its finiteness
        std = pred["std"][i].astype(np.float64) if ensemble > 1 else None
        members = pred["members"][i].astype(np.float64) if has_members else None
        if members is not None:
            sc.add_blocks(members, truth)
        for s, (tgt, mask) in targets.items():
            sc.add_probabilistic(s, tgt, mask, fields["model"], None if std is None else std**2, members,
                                 fields.get("oi"), oi_var)
        if keep_for_figures is None:
            lat, lon = pixel_latlon(np.arange(r0, r0 + h), np.arange(c0, c0 + w), reader.res)
            keep_for_figures = dict(i=i, truth=truth, mean=fields["model"], std=pred["std"][i], obs=obs,
                                    withheld=withheld, cond_valid=cond_valid, idw=fields["idw"],
                                    oi=fields.get("oi"), lat=lat, lon=lon, date=date)
    bar.close()
    result = _summarise(sc, depth_m, ensemble, has_members)
    result["n_samples"] = int(done.sum())
    result["split"] = split
    result["withheld_mode"] = withheld_mode(dict(pred.attrs))
    result["climatology"] = {**clim.attrs, "file": str(clim_file) if clim_file else None,
                             "own_fit_fraction": float(np.nanmean(own_fraction))}
    if oi_params is not None:
        result["oi"] = {**oi_params.to_dict(), "halo_km": cfg.oi.halo_km}
    report = open_report(report)
    write_json(report / "metrics.json", result)
    figs = []
    if figures and keep_for_figures is not None:
        from depthdif_hpc.inference import report_figures as rf

        figs = rf.make_all(report, depth_m, result, keep_for_figures)
    write_text(report / REPORT, _markdown(result, depth_m, figs, pred_path, store))
    return result


def _summarise(sc: _Scores, depth_m: np.ndarray, ensemble: int, has_members: bool) -> dict:
    out: dict = {"depth_m": depth_m.tolist(), "ensemble": ensemble, "members_stored": has_members,
                 "overall": {}, "per_depth": {}, "crps": {}, "spread_skill": {}}
    for (m, s), st in sc.stats.items():
        out["overall"].setdefault(s, {})[m] = st.overall()
        out["per_depth"].setdefault(s, {})[m] = {k: v.tolist() for k, v in st.per_depth().items()}
    for s in SUPPORTS:
        for m in PROBABILISTIC:
            crps = sc.crps[(m, s)]
            if crps.n.sum():
                out["crps"].setdefault(s, {})[m] = {"overall": crps.overall(),
                                                    "per_depth": crps.per_depth().tolist()}
            v, st = sc.var[(m, s)], sc.stats[(m, s)]
            if v.n.sum() and st.n.sum():
                k = ensemble if m == "model" else None
                with np.errstate(invalid="ignore", divide="ignore"):
                    per = spread_skill(v.per_depth(), st.s2 / np.where(st.n > 0, st.n, np.nan), k)
                out["spread_skill"].setdefault(s, {})[m] = {
                    "overall": float(spread_skill(v.overall(), st.s2.sum() / st.n.sum(), k)),
                    "per_depth": per.tolist()}
    if ensemble > 1:
        # E(mean of K - truth)^2 = (mean of infinitely many - truth)^2 + variance / K, and the
        # members' unbiased variance estimates it: a calibrated ensemble of 4 has an ensemble-mean
        # RMSE sqrt(1.25) = 1.12 times that of its infinite mean, so runs with different K (and
        # ensembles of different spread) compare only after this correction.
        out["rmse_infinite_ensemble"] = {}
        for s in SUPPORTS:
            v, st = sc.var[("model", s)], sc.stats[("model", s)]
            if v.n.sum() and st.n.sum():
                with np.errstate(invalid="ignore", divide="ignore"):
                    per = st.s2 / np.where(st.n > 0, st.n, np.nan) - v.per_depth() / ensemble
                    total = st.s2.sum() / st.n.sum() - v.overall() / ensemble
                out["rmse_infinite_ensemble"][s] = {"overall": float(np.sqrt(max(total, 0.0))),
                                                    "per_depth": np.sqrt(np.maximum(per, 0.0)).tolist()}
    se, var, n = sc.block
    if n.sum():
        with np.errstate(invalid="ignore", divide="ignore"):
            per = spread_skill(var / np.where(n > 0, n, np.nan), se / np.where(n > 0, n, np.nan), ensemble)
        out["block_spread_skill"] = {"block_px": BLOCK_PX, "blocks": int(n.sum()),
                                     "overall": float(spread_skill(var.sum() / n.sum(), se.sum() / n.sum(), ensemble)),
                                     "per_depth": per.tolist()}
    if sc.ranks:
        out["rank_histogram"] = {s: {"counts": r.sum(axis=0).tolist(), "per_depth": r.tolist()}
                                 for s, r in sc.ranks.items()}
    out["checkerboard"] = {}
    for k, (nyq, total) in sc.checker.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            out["checkerboard"][k] = {"overall": float(nyq.sum() / total.sum()) if total.sum() else math.nan,
                                      "per_depth": (nyq / np.where(total > 0, total, np.nan)).tolist()}
    out["psnr"] = {m: v[0] / v[1] for m, v in sc.psnr.items() if v[1]}
    out["ssim"] = {m: v[0] / v[1] if v[1] else 0.0 for m, v in sc.ssim.items()}
    # at how many depths the model's hidden-pixel RMSE is below each baseline's
    model_rmse = np.asarray(out["per_depth"]["hidden"]["model"]["rmse"], dtype=float)
    out["model_better_than"] = {}
    for m in METHODS[1:]:
        base = np.asarray(out["per_depth"]["hidden"][m]["rmse"], dtype=float)
        ok = np.isfinite(model_rmse) & np.isfinite(base)
        out["model_better_than"][m] = {"depths": int((model_rmse[ok] < base[ok]).sum()), "of": int(ok.sum())}
    return out


def _markdown(r: dict, depth_m: np.ndarray, figs: list[Path], pred_path, store) -> str:
    lines = [f"# DepthDif evaluation ({r['split']} split, {r['n_samples']} samples)", "",
             f"Predictions: `{pred_path}`  ", f"Truth and observations: `{store}`  ",
             f"Withheld observations: {r['withheld_mode']}; ensemble of {r['ensemble']}"
             + ("" if r["members_stored"] else " (members not stored: no ensemble CRPS or rank histogram)"), ""]
    titles = {"hidden": "Ocean pixels not in the condition, against the GLORYS-like truth (degC)",
              "withheld": f"Withheld observations ({r['withheld_mode']}), against the observations (degC)"}
    methods = [m for m in METHODS if m in r["overall"]["hidden"]
               and (m != "oi" or "oi" in r)]
    for s in SUPPORTS:
        lines += [f"## {titles[s]}", "", "| method | RMSE | MAE | bias | R^2 (within levels) | CRPS | spread-skill | points |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in methods:
            o = r["overall"][s][m]
            crps = r["crps"].get(s, {}).get(m, {}).get("overall")
            ss = r["spread_skill"].get(s, {}).get(m, {}).get("overall")
            lines.append(f"| {m} | {fmt(o['rmse'])} | {fmt(o['mae'])} | {fmt(o['bias'])} | {fmt(o['r2'])} | "
                         f"{fmt(crps)} | {fmt(ss)} | {o['count']} |")
        inf = r.get("rmse_infinite_ensemble", {}).get(s)
        if inf is not None:
            lines += ["", f"The model's ensemble-mean RMSE corrected to infinitely many members (MSE − mean "
                          f"member variance / {r['ensemble']}): {fmt(inf['overall'])}."]
        lines.append("")
    for s in SUPPORTS:
        lines += [f"## RMSE per depth, {s} (degC)", "",
                  "| depth (m) | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
        for k in report_levels(depth_m):
            row = [fmt(r["per_depth"][s][m]["rmse"][k]) for m in methods]
            lines.append(f"| {depth_m[k]:.1f} | " + " | ".join(row) + " |")
        lines.append("")
    prob = [(s, m) for s in SUPPORTS for m in PROBABILISTIC if m in r["crps"].get(s, {})]
    if prob:
        lines += ["## CRPS per depth (degC; ensemble: fair estimator, OI: Gaussian)", "",
                  "| depth (m) | " + " | ".join(f"{m} {s}" for s, m in prob) + " |", "|---:|" + "---:|" * len(prob)]
        for k in report_levels(depth_m):
            lines.append(f"| {depth_m[k]:.1f} | "
                         + " | ".join(fmt(r["crps"][s][m]["per_depth"][k]) for s, m in prob) + " |")
        lines.append("")
    lines += ["## R^2 per depth, hidden", "", "| depth (m) | " + " | ".join(methods) + " |",
              "|---:|" + "---:|" * len(methods)]
    for k in report_levels(depth_m):
        lines.append(f"| {depth_m[k]:.1f} | "
                     + " | ".join(fmt(r["per_depth"]["hidden"][m]["r2"][k]) for m in methods) + " |")
    lines += ["", "Model RMSE below the baseline's at: " + ", ".join(
        f"{m} {v['depths']}/{v['of']} depths" for m, v in r["model_better_than"].items()), ""]
    if "block_spread_skill" in r:
        b = r["block_spread_skill"]
        lines += [f"Spread-skill of {b['block_px']} x {b['block_px']} px block means (every ocean pixel, "
                  f"{b['blocks']} blocks x levels): {fmt(b['overall'])}; per depth: " + ", ".join(
                      f"{depth_m[k]:.0f} m {fmt(b['per_depth'][k])}" for k in report_levels(depth_m)), ""]
    if "rank_histogram" in r:
        lines += ["## Rank histogram of the truth among the members (pooled over levels)", ""]
        for s, h in r["rank_histogram"].items():
            lines.append(f"* {s}: " + " ".join(str(c) for c in h["counts"]))
        lines.append("")
    cb = r["checkerboard"]
    lines += ["## Checkerboard (docs/metrics.md#checkerboard)", "",
              "Share of the power on the 2-pixel period (the spectrum's Nyquist row and column), in %: "
              f"the model's error {fmt(100 * cb['model_error']['overall'])}, the truth {fmt(100 * cb['truth']['overall'])} "
              "over all levels.", "", "| depth (m) | model error | truth |", "|---:|---:|---:|"]
    for k in report_levels(depth_m):
        lines.append(f"| {depth_m[k]:.1f} | {fmt(100 * cb['model_error']['per_depth'][k])} | "
                     f"{fmt(100 * cb['truth']['per_depth'][k])} |")
    lines.append("")
    lines += ["## Image metrics (docs/metrics.md#reconstruction-metrics)", "", "| method | PSNR (dB) | SSIM |",
              "|---|---:|---:|"]
    for m in methods:
        lines.append(f"| {m} | {fmt(r['psnr'].get(m, math.nan))} | {fmt(r['ssim'].get(m, 0.0))} |")
    c = r["climatology"]
    lines += ["", "## Baseline settings", "",
              f"* climatology: mean + {c['harmonics']} annual harmonics per pixel and level, ridge {c['ridge']}, "
              f"{c['n_samples']} train samples; {fmt(100 * c['own_fit_fraction'])} % of the scored (pixel, level) "
              f"pairs have their own fit (the rest: the domain-wide fit); file `{c['file']}`"]
    if "oi" in r:
        o = r["oi"]
        lines.append(f"* OI: {o['covariance']} correlation, halo {o['halo_km']:g} km, fitted on "
                     f"{o['fit_samples']} train days ({o['method']}; "
                     f"{'one length and noise ratio for all levels' if o['shared_across_levels'] else 'per level'})")
        lines += ["", "| depth (m) | length (km) | noise/signal | signal std (degC) | train obs |",
                  "|---:|---:|---:|---:|---:|"]
        for k in report_levels(depth_m):
            lines.append(f"| {depth_m[k]:.1f} | {o['length_km'][k]:g} | {o['noise_ratio'][k]:g} | "
                         f"{fmt(math.sqrt(o['signal_var'][k]))} | {int(o['fit_observations_per_level'][k])} |")
    if figs:
        lines += ["", "## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figs]
    return "\n".join(lines) + "\n"


def summary_lines(r: dict) -> list[str]:
    """A plain-text digest of a result for terminals (the demo and the CLI print it)."""
    methods = [m for m in METHODS if m != "oi" or "oi" in r]
    lines = []
    for s in SUPPORTS:
        label = f"{s} ({r['withheld_mode']})" if s == "withheld" else s
        lines.append(f"{label}: {'method':>16} {'RMSE':>7} {'CRPS':>7} {'spr/skl':>7} {'R^2':>7} {'points':>9}")
        for m in methods:
            o = r["overall"][s][m]
            crps = r["crps"].get(s, {}).get(m, {}).get("overall")
            ss = r["spread_skill"].get(s, {}).get(m, {}).get("overall")
            lines.append(f"{'':{len(label) + 1}} {m:>16} {fmt(o['rmse']):>7} {fmt(crps):>7} {fmt(ss):>7} "
                         f"{fmt(o['r2']):>7} {o['count']:>9}")
        inf = r.get("rmse_infinite_ensemble", {}).get(s)
        if inf is not None:
            lines.append(f"{'':{len(label) + 1}} {'model, K -> inf':>16} {fmt(inf['overall']):>7}")
    depth_m = np.asarray(r["depth_m"], dtype=float)
    for s in SUPPORTS:
        lines.append(f"RMSE per depth, {s} (degC): depth (m) | " + " | ".join(methods))
        for k in report_levels(depth_m):
            lines.append(f"  {depth_m[k]:8.1f} | " + " | ".join(fmt(r["per_depth"][s][m]["rmse"][k]) for m in methods))
    if "block_spread_skill" in r:
        b = r["block_spread_skill"]
        lines.append(f"spread-skill of {b['block_px']} x {b['block_px']} px block means: {fmt(b['overall'])}")
    for s, h in r.get("rank_histogram", {}).items():
        lines.append(f"rank histogram, {s}: " + " ".join(str(c) for c in h["counts"]))
    cb = r["checkerboard"]
    lines.append(f"checkerboard: {fmt(100 * cb['model_error']['overall'])} % of the model's error power on the "
                 f"2-pixel period (truth: {fmt(100 * cb['truth']['overall'])} %)")
    lines.append("model RMSE below baseline at: " + ", ".join(
        f"{m} {v['depths']}/{v['of']} depths" for m, v in r["model_better_than"].items() if v["of"]))
    return lines


@command(StoreError)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.inference.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pred", required=True, help="prediction store written by depthdif_hpc.inference.predict")
    ap.add_argument("--store", required=True, help="the data store the predictions were made from")
    ap.add_argument("--report", required=True, help="output folder for report.md, metrics.json, PNGs")
    ap.add_argument("--idw-power", type=float, default=2.0)
    ap.add_argument("--climatology", help="climatology cache file (default: STORE/derived/climatology_*.npz)")
    ap.add_argument("--harmonics", type=int, default=2, help="annual harmonics of the climatology")
    ap.add_argument("--oi-covariance", choices=("gaussian", "roemmich_gilson"), default="gaussian")
    ap.add_argument("--oi-halo-km", type=float, default=300.0)
    ap.add_argument("--no-oi", action="store_true", help="skip the OI baseline")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    cfg = EvaluationConfig(idw_power=args.idw_power)
    cfg.climatology.harmonics = args.harmonics
    cfg.oi.covariance = args.oi_covariance
    cfg.oi.halo_km = args.oi_halo_km
    cfg.oi.enabled = not args.no_oi
    r = evaluate(args.pred, args.store, args.report, cfg=cfg, climatology_path=args.climatology,
                 figures=not args.no_figures)
    print("\n".join(summary_lines(r)))
    print(f"report: {Path(args.report) / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
