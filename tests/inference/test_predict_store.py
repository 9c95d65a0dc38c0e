from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from depthdif_hpc.data.grid import Tile
from depthdif_hpc.data.store import META, read_manifest
from depthdif_hpc.data.stream import ShardStream
from depthdif_hpc.inference.predict import (
    predict_split,
    to_netcdf,
    withheld_platforms,
    withhold_columns,
)


def _truth_valid(store, split="val"):
    s = ShardStream(store, split, shuffle=False, even_ranks=False)
    return {int(item["sample_id"]) - s.id_offset: item for item in s}


def test_layout_and_nan_masking(tiny_store, tiny_model, tmp_path):
    out = tmp_path / "pred.zarr"
    counts = predict_split(tiny_model, tiny_store, out, ensemble=2, keep_members=True, progress=False)
    assert counts == {"written": 12, "skipped": 0, "n": 12}
    g = zarr.open_group(str(out), mode="r")
    assert g["mean"].shape == (12, 50, 32, 32) and g["members"].shape == (12, 2, 50, 32, 32)
    assert g["done"][:].all()
    assert g["mean"].attrs["units"] == "degC"
    truth = _truth_valid(tiny_store)
    for i, item in truth.items():
        valid = item["y_valid_mask"].numpy()
        mean = g["mean"][i]
        assert np.isnan(mean[~valid]).all() and np.isfinite(mean[valid]).all()
        assert g["sample_id"][i] == int(item["sample_id"]) and g["date"][i] == int(item["date"])
        lat, lon = g["lat"][i], g["lon"][i]
        # pixel centres step 0.1 degree and surround the stored patch centre
        assert np.allclose(np.diff(lat), -0.1, atol=1e-4) and np.allclose(np.diff(lon), 0.1, atol=1e-4)
        c = item["coords"].numpy()
        assert abs(lat.mean() - c[0]) < 0.06 and abs(lon.mean() - c[1]) < 0.06
    # the ensemble spread is the std of the members
    np.testing.assert_allclose(g["std"][3], np.std(g["members"][3], axis=0, ddof=1), rtol=1e-5, atol=1e-6)
    nc = to_netcdf(out, tmp_path / "pred.nc")
    import xarray as xr

    ds = xr.open_dataset(nc)
    assert ds["mean"].dims == ("sample", "depth", "y", "x") and float(ds["depth"][0]) == pytest.approx(0.494)


def test_two_ranks_split_without_gap_or_overlap(tiny_store, tiny_model, tmp_path):
    out = tmp_path / "pred.zarr"
    c0 = predict_split(tiny_model, tiny_store, out, rank=0, world_size=2, progress=False)
    g = zarr.open_group(str(out), mode="r")
    first = g["done"][:].astype(bool)
    c1 = predict_split(tiny_model, tiny_store, out, rank=1, world_size=2, progress=False)
    both = g["done"][:].astype(bool)
    assert c0["written"] + c1["written"] == 12 and c0["written"] > 0 and c1["written"] > 0
    assert c0["skipped"] == c1["skipped"] == 0  # rank 1 never saw a sample rank 0 wrote
    assert first.sum() == c0["written"] and both.all()


def test_resume_skips_done_samples(tiny_store, tiny_model, tmp_path):
    out = tmp_path / "pred.zarr"
    predict_split(tiny_model, tiny_store, out, limit=5, progress=False)
    g = zarr.open_group(str(out), mode="r+")
    before = g["mean"][2].copy()
    g["done"][1] = 0  # as if the run had died while writing sample 1
    g["mean"][1] = np.nan
    counts = predict_split(tiny_model, tiny_store, out, limit=5, progress=False)
    assert counts["written"] == 1 and counts["skipped"] == 4
    assert g["done"][:].all() and np.isfinite(g["mean"][1]).any()
    np.testing.assert_array_equal(g["mean"][2], before)  # done samples untouched


def test_existing_store_with_other_shape_is_refused(tiny_store, tiny_model, tmp_path):
    out = tmp_path / "pred.zarr"
    predict_split(tiny_model, tiny_store, out, limit=2, progress=False)
    with pytest.raises(ValueError, match="exists with shape"):
        predict_split(tiny_model, tiny_store, out, limit=3, progress=False)


def test_withhold_columns_deterministic():
    x_valid = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    x_valid[:, :, [0, 1, 2, 3], [0, 1, 2, 3]] = True
    batch = {"x": torch.ones(2, 3, 4, 4) * x_valid, "x_valid_mask": x_valid.clone(),
             "sample_id": torch.tensor([5, 9])}
    hidden = withhold_columns(batch, 0.5, seed=1)
    assert hidden.sum(dim=(1, 2)).tolist() == [2, 2]
    assert not (batch["x_valid_mask"] & hidden[:, None]).any()
    assert (batch["x"][hidden[:, None].expand_as(batch["x"])] == 0).all()
    again = withhold_columns({"x": torch.ones(2, 3, 4, 4) * x_valid, "x_valid_mask": x_valid.clone(),
                              "sample_id": torch.tensor([5, 9])}, 0.5, seed=1)
    assert torch.equal(hidden, again)


def test_tile_pixel_axes_at_the_grid_corner():
    t = Tile(0, 0, 0, 3, 0.1)
    lat, lon = t.pixel_lats()[:2], t.pixel_lons()
    np.testing.assert_allclose(lat, [89.95, 89.85], atol=1e-5)
    np.testing.assert_allclose(lon, [-179.95, -179.85, -179.75], atol=1e-5)


class _ConditionRecorder(torch.nn.Module):
    """Stands in for the model: records which columns each sample's condition still holds."""

    def __init__(self):
        super().__init__()
        self.seen: dict[int, torch.Tensor] = {}

    def make_sampler(self, name=None, **overrides):
        return SimpleNamespace(name="recorder")

    def predict(self, batch, **kw):
        for sid, xv in zip(batch["sample_id"].tolist(), batch["x_valid_mask"], strict=True):
            self.seen[sid] = xv.any(dim=0).clone()
        y = torch.zeros_like(batch["y"]).masked_fill(~batch["y_valid_mask"], float("nan"))
        return SimpleNamespace(y_hat_denorm=y)


def test_withhold_floats_hides_whole_floats(tiny_store, tmp_path):
    out = tmp_path / "pred.zarr"
    model = _ConditionRecorder()
    predict_split(model, tiny_store, out, withhold="floats", withhold_fraction=0.4, seed=3,
                  progress=False)
    g = zarr.open_group(str(out), mode="r")
    names = read_manifest(tiny_store)["platforms"]
    chosen = set(g.attrs["withheld_platforms"])
    assert g.attrs["withhold_mode"] == "floats"
    assert len(chosen) == round(0.4 * len(names)) and 0 < len(chosen) < len(names)
    src = zarr.open_group(str(tiny_store), mode="r")["val"]
    meta = src["meta"][:]
    offset = read_manifest(tiny_store)["sample_id_offset"]["val"]
    hidden_pixels = visible_pixels = 0
    for i in range(meta.shape[0]):
        n = meta[i, META["n_obs_pixels"]]
        rows_cols, plat = src["obs"][i, :n, :2], src["obs_platform"][i, :n]
        withheld = g["withheld"][i].astype(bool)
        seen = model.seen[i + offset].numpy()
        for (r, c), ids in zip(rows_cols, plat, strict=True):
            floats = {names[k] for k in ids if k >= 0}
            # Every pixel of a withheld float is hidden from the model and recorded; every
            # other observed pixel stays in the condition.
            assert withheld[r, c] == bool(floats & chosen) == (not seen[r, c]), (i, r, c, floats)
            hidden_pixels += int(withheld[r, c])
            visible_pixels += int(not withheld[r, c])
        observed = np.zeros_like(withheld)
        observed[rows_cols[:, 0], rows_cols[:, 1]] = True
        assert not (withheld & ~observed).any()  # only observed pixels are marked withheld
    assert hidden_pixels > 0 and visible_pixels > 0
    # The same floats for the same seed, other floats for another seed.
    again = withheld_platforms(names, 0.4, 3)
    assert {names[k] for k in np.flatnonzero(again)} == chosen
    assert not np.array_equal(withheld_platforms(names, 0.4, 4), again)


def test_withhold_floats_refuses_a_store_without_platform_ids(tiny_store, tmp_path):
    import json
    import shutil

    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    man = json.loads((old / "manifest.json").read_text())
    man.pop("platforms")
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="no platform ids"):
        predict_split(_ConditionRecorder(), old, tmp_path / "p.zarr", withhold="floats",
                      withhold_fraction=0.3, progress=False)


class _Echo(_ConditionRecorder):
    """Predicts its input y, denormalised with its own normaliser."""

    def __init__(self, normalizer):
        super().__init__()
        self.normalizer = normalizer

    def predict(self, batch, **kw):
        y = self.normalizer.denormalize(batch["y"].double()).float()
        return SimpleNamespace(y_hat_denorm=y.masked_fill(~batch["y_valid_mask"], float("nan")))


def test_per_level_normalization_is_recorded_and_used_by_predict(tiny_store, tmp_path):
    from depthdif_hpc import build_model
    from depthdif_hpc.config import config_from_dict, to_dict
    from depthdif_hpc.data.store import level_stats, quantizer_from
    from tests.helpers import random_batch, tiny_config

    cfg = tiny_config(overrides=["dataset.normalization=per_level", f"dataset.store={tiny_store}",
                                 "model.sampling.sampler=ddim", "model.sampling.ddim_num_timesteps=2",
                                 "model.post_process.gaussian_blur.enabled=false"])
    model = build_model(cfg)
    mean, std = level_stats(read_manifest(tiny_store))
    assert model.normalizer.kind == "per_level"
    assert cfg.dataset.normalization_mean_c == mean and cfg.dataset.normalization_std_c == std
    # The config a checkpoint saves carries the statistics: rebuilt from it with the store gone,
    # the model has the same normaliser.
    saved = to_dict(cfg)
    saved["dataset"]["store"] = str(tmp_path / "gone.zarr")
    again = build_model(config_from_dict(saved))
    np.testing.assert_array_equal(again.normalizer.mean_k, model.normalizer.mean_k)
    np.testing.assert_array_equal(again.normalizer.std_k, model.normalizer.std_k)
    # DepthDif denormalises its samples with it.
    batch = random_batch(b=1, h=16, w=16)
    res = model.eval().predict(batch, generator=torch.Generator().manual_seed(0))
    valid = batch["y_valid_mask"].bool()
    torch.testing.assert_close(res.y_hat_denorm[valid], model.normalizer.denormalize(res.y_hat)[valid])
    # predict decodes the store with the model's normaliser: echoing y gives back the stored
    # temperatures (decoded with the global z-score they would be off by degrees).
    out = tmp_path / "pred.zarr"
    predict_split(_Echo(again.normalizer), tiny_store, out, limit=3, progress=False)
    g = zarr.open_group(str(out), mode="r")
    src = zarr.open_group(str(tiny_store), mode="r")["val"]
    q = quantizer_from(read_manifest(tiny_store))
    for i in range(3):
        want = q.decode_c(src["fields"][i][1:])
        np.testing.assert_allclose(g["mean"][i], want, atol=1e-4)


def test_bf16_precision_is_recorded_and_close_to_fp32(tiny_store, tiny_model, tmp_path):
    """--precision bf16: the denoiser under autocast, the rest fp32; the store says which."""
    fp32 = predict_split(tiny_model, tiny_store, tmp_path / "fp32.zarr", limit=2, progress=False)
    bf16 = predict_split(tiny_model, tiny_store, tmp_path / "bf16.zarr", limit=2, progress=False,
                         precision="bf16")
    assert fp32 == bf16 == {"written": 2, "skipped": 0, "n": 2}
    a = zarr.open_group(str(tmp_path / "fp32.zarr"), mode="r")
    b = zarr.open_group(str(tmp_path / "bf16.zarr"), mode="r")
    assert a.attrs["precision"] == "fp32" and b.attrs["precision"] == "bf16"
    ma, mb = a["mean"][:], b["mean"][:]
    assert b["mean"].dtype == np.float32
    assert np.array_equal(np.isnan(ma), np.isnan(mb))
    diff = np.nanmax(np.abs(ma - mb))
    assert 0 < diff < 0.05 * np.nanmax(np.abs(ma)), diff  # bf16 arithmetic, not another method
    with pytest.raises(ValueError, match="precision"):
        tiny_model.predict({}, precision="fp16")


def test_resume_with_other_settings_is_refused(tiny_store, tiny_model, tmp_path):
    out = tmp_path / "pred.zarr"
    predict_split(tiny_model, tiny_store, out, limit=2, progress=False)
    for kw, key in (({"precision": "bf16"}, "precision"), ({"seed": 3}, "seed"),
                    ({"ensemble": 2}, "ensemble")):
        with pytest.raises(ValueError, match=f"written with {key} = "):
            predict_split(tiny_model, tiny_store, out, limit=2, progress=False, **kw)
    # Every rank checks, before the barrier the others would otherwise wait at (rank 1 of 2
    # here, with no barrier: it raises by itself).
    with pytest.raises(ValueError, match="written with precision = "):
        predict_split(tiny_model, tiny_store, out, limit=2, progress=False, precision="bf16",
                      rank=1, world_size=2)
    # the same settings resume (nothing left to do)
    assert predict_split(tiny_model, tiny_store, out, limit=2, progress=False)["skipped"] == 2
    # A store written before the precision was recorded was sampled in fp32: bf16 is refused.
    g = zarr.open_group(str(out), mode="r+")
    del g.attrs["precision"]
    with pytest.raises(ValueError, match="written with precision = 'fp32', this run has 'bf16'"):
        predict_split(tiny_model, tiny_store, out, limit=2, progress=False, precision="bf16")
    assert predict_split(tiny_model, tiny_store, out, limit=2, progress=False)["skipped"] == 2
