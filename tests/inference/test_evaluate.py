import json
import math

import matplotlib.image as mpimg
import numpy as np
import torch
import zarr

from depthdif_hpc.data.stream import ShardStream
from depthdif_hpc.inference.evaluate import evaluate
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
    predict_split(tiny_model, tiny_store, pred, ensemble=2, withhold_fraction=0.5, limit=4, progress=False)
    report = tmp_path / "report"
    r = evaluate(pred, tiny_store, report, progress=False)
    assert r["n_samples"] == 4
    # recompute the model's hidden-pixel RMSE and the withheld RMSE directly
    g = zarr.open_group(str(pred), mode="r")
    s = ShardStream(tiny_store, "val", shuffle=False, even_ranks=False)
    se = n = sw = nw = 0.0
    for item in s:
        i = int(item["sample_id"]) - s.id_offset
        if i >= 4:
            continue
        truth = denormalize_temperature(item["y"].double()).numpy()
        yv, xv = item["y_valid_mask"].numpy(), item["x_valid_mask"].numpy()
        wh = g["withheld"][i].astype(bool)
        hidden = yv & ~(xv & ~wh[None])
        m = g["mean"][i]
        se += ((m - truth)[hidden] ** 2).sum()
        n += hidden.sum()
        obs = denormalize_temperature(item["x"].double()).numpy()
        sel = xv & wh[None]
        sw += ((m - obs)[sel] ** 2).sum()
        nw += sel.sum()
    assert nw > 0
    assert math.isclose(r["overall"]["hidden"]["model"]["rmse"], math.sqrt(se / n), rel_tol=1e-5)
    assert math.isclose(r["overall"]["withheld"]["model"]["rmse"], math.sqrt(sw / nw), rel_tol=1e-5)
    assert r["overall"]["hidden"]["model"]["count"] == n
    assert 0 < r["spread_skill"] < math.inf
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["overall"]["hidden"]["idw"]["count"] > 0
    md = (report / "report.md").read_text()
    for name in ("rmse_per_depth.png", "maps.png", "profiles.png", "section.png"):
        img = mpimg.imread(report / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and float(np.std(img)) > 0.01, name
        assert name in md
    assert "| climatology |" in md
    assert torch.isfinite(torch.tensor(r["psnr"]["model"]))
