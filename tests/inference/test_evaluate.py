import json
import math

import matplotlib.image as mpimg
import numpy as np
import scoringrules as sr
import torch
import zarr

from depthdif_hpc.config import EvaluationConfig
from depthdif_hpc.data.stream import ShardStream
from depthdif_hpc.inference.climatology import ObservationReader
from depthdif_hpc.inference.evaluate import (
    evaluate,
    halo_observations,
    summary_lines,
    withheld_lookup,
)
from depthdif_hpc.inference.predict import predict_split
from depthdif_hpc.metrics import DepthStats
from depthdif_hpc.normalization import denormalize_temperature


def test_depth_stats_by_hand():
    st = DepthStats(2)
    pred = np.array([[[1.0, 2.0]], [[0.0, np.nan]]])
    truth = np.array([[[0.0, 0.0]], [[3.0, 1.0]]])
    mask = np.ones_like(pred, dtype=bool)
    st.add(pred, truth, mask)
    pd = st.per_depth()
    assert pd["count"].tolist() == [2, 1]
    assert pd["rmse"][0] == math.sqrt((1 + 4) / 2) and pd["mae"][0] == 1.5 and pd["bias"][0] == 1.5
    assert pd["rmse"][1] == 3.0 and pd["bias"][1] == -3.0
    o = st.overall()
    assert o["count"] == 3 and math.isclose(o["rmse"], math.sqrt((1 + 4 + 9) / 3))


def test_evaluate_end_to_end(tiny_store, tiny_model, tmp_path):
    pred = tmp_path / "pred.zarr"
    predict_split(tiny_model, tiny_store, pred, ensemble=3, keep_members=True, withhold_fraction=0.5, limit=4,
                  progress=False)
    report = tmp_path / "report"
    r = evaluate(pred, tiny_store, report, progress=False)
    assert r["n_samples"] == 4
    # recompute the model's hidden-pixel RMSE and the withheld RMSE directly
    g = zarr.open_group(str(pred), mode="r")
    s = ShardStream(tiny_store, "val", shuffle=False, even_ranks=False)
    se = n = sw = nw = 0.0
    crps_sum = crps_n = 0.0
    nyq_total = np.zeros(2)
    var_sum = 0.0
    block = np.zeros(3)
    for item in s:
        i = int(item["sample_id"]) - s.id_offset
        if i >= 4:
            continue
        truth = denormalize_temperature(item["y"].double()).numpy()
        yv, xv = item["y_valid_mask"].numpy(), item["x_valid_mask"].numpy()
        wh = g["withheld"][i].astype(bool)
        hidden = yv & ~(xv & ~wh[None])
        m = g["mean"][i]
        err = np.where(yv, m - truth, 0.0)
        err = err[:, : err.shape[1] // 2 * 2, : err.shape[2] // 2 * 2]
        err = err - err.mean(axis=(1, 2), keepdims=True)
        hh, ww = err.shape[1] // 2, err.shape[2] // 2
        # the 2-pixel patterns: rows alternating, columns alternating (and both), their power
        p = np.abs(np.fft.fft2(err)) ** 2
        nyq_total += [p[:, hh, :].sum() + p[:, :, ww].sum() - p[:, hh, ww].sum(), p.sum()]
        se += ((m - truth)[hidden] ** 2).sum()
        var_sum += (g["std"][i].astype(np.float64) ** 2)[hidden].sum()
        n += hidden.sum()
        mem = g["members"][i]  # (M, D, H, W)
        for lvl in range(truth.shape[0]):
            for r0 in range(0, truth.shape[1] - 7, 8):
                for c0 in range(0, truth.shape[2] - 7, 8):
                    if yv[lvl, r0:r0 + 8, c0:c0 + 8].all():
                        bm = mem[:, lvl, r0:r0 + 8, c0:c0 + 8].astype(np.float64).mean(axis=(1, 2))
                        bt = truth[lvl, r0:r0 + 8, c0:c0 + 8].mean()
                        block += [(bm.mean() - bt) ** 2, bm.var(ddof=1), 1]
        crps_sum += sr.crps_ensemble(truth[hidden], np.moveaxis(mem, 0, -1)[hidden], estimator="fair",
                                     backend="numpy").sum()
        crps_n += hidden.sum()
        obs = denormalize_temperature(item["x"].double()).numpy()
        sel = xv & wh[None]
        sw += ((m - obs)[sel] ** 2).sum()
        nw += sel.sum()
    assert nw > 0
    assert math.isclose(r["overall"]["hidden"]["model"]["rmse"], math.sqrt(se / n), rel_tol=1e-5)
    assert math.isclose(r["overall"]["withheld"]["model"]["rmse"], math.sqrt(sw / nw), rel_tol=1e-5)
    assert r["overall"]["hidden"]["model"]["count"] == n
    assert math.isclose(r["crps"]["hidden"]["model"]["overall"], crps_sum / crps_n, rel_tol=1e-5)
    assert 0 < r["spread_skill"]["hidden"]["model"]["overall"] < math.inf
    assert 0 < r["spread_skill"]["hidden"]["oi"]["overall"] < math.inf
    assert r["withheld_mode"] == "columns"
    b = r["block_spread_skill"]
    assert b["blocks"] == block[2] > 0
    assert math.isclose(b["overall"], math.sqrt(4 / 3) * math.sqrt(block[1] / block[0]), rel_tol=1e-5)
    inf = r["rmse_infinite_ensemble"]["hidden"]["overall"]
    assert math.isclose(inf, math.sqrt(se / n - var_sum / n / 3), rel_tol=1e-5) and inf < math.sqrt(se / n)
    assert math.isclose(r["checkerboard"]["model_error"]["overall"], nyq_total[0] / nyq_total[1], rel_tol=1e-6)
    assert 0 < r["checkerboard"]["truth"]["overall"] < 1
    # OI scores every point the model scores, and its CRPS is a Gaussian's
    assert r["overall"]["hidden"]["oi"]["count"] == n and r["crps"]["withheld"]["oi"]["overall"] > 0
    hist = r["rank_histogram"]["hidden"]["counts"]
    assert len(hist) == 4 and sum(hist) == n
    assert len(r["oi"]["length_km"]) == 50 and r["oi"]["fit_samples"] > 0
    assert r["climatology"]["own_fit_fraction"] == 1.0  # val tiles sit where the train tiles are

    def no_nan(name):
        raise ValueError(f"metrics.json holds {name}")

    saved = json.loads((report / "metrics.json").read_text(), parse_constant=no_nan)
    assert saved["overall"]["hidden"]["idw"]["count"] > 0
    md = (report / "report.md").read_text()
    for name in ("rmse_per_depth.png", "scores_per_depth.png", "rank_histogram.png", "maps.png", "profiles.png",
                 "section.png"):
        img = mpimg.imread(report / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and float(np.std(img)) > 0.01, name
        assert name in md
    assert "| climatology |" in md and "| oi |" in md and "## CRPS per depth" in md and "## Checkerboard" in md
    text = "\n".join(summary_lines(r))
    assert "model, K -> inf" in text and "block means" in text and "block means" in md and "infinitely many members" in md
    assert "withheld (columns)" in text and f"{r['overall']['hidden']['oi']['rmse']:.3f}" in text
    assert torch.isfinite(torch.tensor(r["psnr"]["model"]))


def test_halo_takes_neighbours_outside_the_patch_once_and_skips_their_withheld(tiny_store):
    reader = ObservationReader(tiny_store, "val")
    i = 0
    r0, c0 = reader.origin(i)
    t = reader.tile
    neighbours = [int(j) for j in reader.same_day(i) if j != i]
    assert neighbours, "the tiny store has four overlapping tiles per day"
    outside = set()
    for j in neighbours:
        rows, cols, _ = reader.columns(j)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if not (r0 <= r < r0 + t and c0 <= c < c0 + t):
                outside.add((r, c))
    assert outside
    rows, cols, vals = halo_observations(reader, i, 5000.0, lambda j: None)
    got = list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert len(got) == len(set(got)) and set(got) == outside  # each global pixel once
    assert vals.shape == (50, len(got)) and np.isfinite(vals).any(axis=0).all()
    assert len(halo_observations(reader, i, 0.0, lambda j: None)[0]) == 0
    # a column withheld in the predictions of every sample that holds it is not used
    target = sorted(outside)[0]
    masks = {}
    for j in neighbours:
        rj, cj = reader.origin(j)
        jr, jc, _ = reader.columns(j)
        m = np.zeros((t, t), bool)
        for r, c in zip(jr.tolist(), jc.tolist(), strict=True):
            if (r, c) == target:
                m[r - rj, c - cj] = True
        masks[j] = m
    rows2, cols2, _ = halo_observations(reader, i, 5000.0, masks.get)
    got2 = set(zip(rows2.tolist(), cols2.tolist(), strict=True))
    assert got2 == outside - {target}


def test_whole_float_holdout_is_scored_and_known_for_unpredicted_neighbours(tiny_store, tiny_model, tmp_path):
    pred = tmp_path / "pred_floats.zarr"
    predict_split(tiny_model, tiny_store, pred, withhold="floats", withhold_fraction=0.5, limit=4,
                  progress=False)
    g = zarr.open_group(str(pred), mode="r")
    reader = ObservationReader(tiny_store, "val")
    # pretend only the first two samples were predicted: the masks of the other two (used by the
    # OI halo) are recomputed from the withheld float ids and equal what predict withheld
    done = np.array([True, True, False, False])
    lookup = withheld_lookup(g, done, tiny_store, "val", reader.meta)
    for j in (2, 3):
        np.testing.assert_array_equal(lookup(j), g["withheld"][j].astype(bool))
    assert lookup(7) is not None  # beyond the predictions: still known in floats mode
    cfg = EvaluationConfig()
    cfg.oi.fit_samples, cfg.oi.length_grid_km, cfg.oi.noise_ratio_grid = 4, [100.0], [0.1]  # cheap fit
    r = evaluate(pred, tiny_store, tmp_path / "rep", cfg=cfg, figures=False, progress=False)
    assert r["withheld_mode"] == "floats"
    nw = 0
    for i in range(4):
        rows, cols, vals = reader.columns(i)
        r0, c0 = reader.origin(i)
        wh = g["withheld"][i].astype(bool)[rows - r0, cols - c0]
        nw += int(np.isfinite(vals[:, wh]).sum())
    assert nw > 0 and r["overall"]["withheld"]["model"]["count"] == nw
    assert r["overall"]["withheld"]["oi"]["count"] == nw
