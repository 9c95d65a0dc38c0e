"""Tiled reconstruction (inference/reconstruct.py, inference/tiling.py): seams, periodicity,
reproducibility, resume, the CF file, and the inputs gridded like the store's.

Most tests use a coarse 1 degree grid, few depth levels, tiles of 16 px and a stand-in model
that returns its input (the SST of the tile at every level) plus an error that grows towards
the tile edges and, on request, noise from the tile's generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from depthdif_hpc.config import load_config
from depthdif_hpc.data.grid import Tile
from depthdif_hpc.diffusion import rng
from depthdif_hpc.inference import reconstruct as rc
from depthdif_hpc.inference import tiling
from depthdif_hpc.normalization import denormalize_temperature, normalize_temperature

DEPTHS = 3
SIZE, STRIDE = 16, 12
DATE = "2018-01-03"


def smooth(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """A smooth ocean, periodic in longitude."""
    return 15 + 8 * np.cos(np.radians(lat)) * np.sin(np.radians(2 * lon)) + 3 * np.cos(np.radians(lon))


class AnalyticInputs:
    """Tile inputs from an analytic SST (land where `land(lat, lon)`), depth-independent."""

    validity = "analytic"

    def __init__(self, field=smooth, land=None, fail_after: int | None = None):
        self.field, self.land, self.fail_after, self.calls = field, land, fail_after, 0

    def __call__(self, t: Tile) -> rc.TileInput | None:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        lat, lon = np.meshgrid(t.pixel_lats(), t.pixel_lons(), indexing="ij")
        sst = self.field(lat, lon).astype(np.float32)
        ocean = np.ones_like(sst, bool) if self.land is None else ~self.land(lat, lon)
        if not ocean.any():
            return None
        valid = torch.from_numpy(np.repeat(ocean[None], DEPTHS, 0))
        eo = normalize_temperature(torch.from_numpy(sst))[None] * torch.from_numpy(ocean)[None]
        z = torch.zeros(DEPTHS, t.size, t.size)
        batch = {"eo": eo, "x": z, "y": z.clone(), "x_valid_mask": torch.zeros_like(valid),
                 "y_valid_mask": valid, "land_mask": valid[0:1].float(),
                 "date": torch.tensor(20180103), "sample_id": torch.tensor(0),
                 "coords": torch.tensor(t.centre(), dtype=torch.float32)}
        truth = np.where(ocean, sst, np.nan)[None].repeat(DEPTHS, 0)
        return rc.TileInput({k: v.unsqueeze(0) for k, v in batch.items()}, truth, np.zeros(0, np.int64))


class EchoModel:
    """Returns the tile's SST at every level, plus `edge` * (distance from the tile centre)^2
    (models are worst at tile edges) and `noise` from the generator."""

    def __init__(self, edge: float = 0.5, noise: float = 0.0):
        self.edge, self.noise = edge, noise

    def make_sampler(self, name=None, **kw):
        return SimpleNamespace(name="echo", num_steps=1)

    def predict(self, batch, *, sampler=None, generator=None, **kw):
        self.kw = kw
        eo = denormalize_temperature(batch["eo"])
        b, _, h, w = eo.shape
        r = (torch.arange(h) - (h - 1) / 2) / (h / 2)
        dist2 = (r[:, None] ** 2 + r[None, :] ** 2) / 2
        out = eo.expand(b, DEPTHS, h, w) + self.edge * dist2
        if self.noise:
            out = out + self.noise * rng.randn(out.shape, generator)
        out = out.masked_fill(~batch["y_valid_mask"], float("nan"))
        return SimpleNamespace(y_hat_denorm=out)


@pytest.fixture(scope="module")
def coarse_cfg():
    return load_config(overrides=["dataset.grid.resolution_deg=1.0", f"dataset.grid.tile_size={SIZE}",
                                  f"dataset.grid.patch_stride={SIZE // 2}"])


def run(cfg, out: Path, *, region=(0.0, 40.0, -10.0, 20.0), model=None, inputs=None, **kw):
    return rc.reconstruct(model or EchoModel(), cfg, date=DATE, out=out, ostia=[], en4=[],
                          region=region, stride=STRIDE, inputs=inputs or AnalyticInputs(),
                          progress=False, **kw)


def read(path: Path, name: str = "thetao_mean") -> np.ndarray:
    import xarray as xr

    with xr.open_dataset(path) as ds:
        return ds[name].isel(time=0).values


def jumps(residual: np.ndarray, starts: list[int], ncols: int, periodic: bool = False):
    """Max |first difference along longitude| across tile edges and inside tiles."""
    if periodic:
        residual = np.concatenate([residual, residual[..., :1]], axis=-1)
    d = np.abs(np.diff(residual, axis=-1))
    # d[..., c] is the step from column c to c + 1: across an edge when c + 1 starts or ends a tile.
    edges = {(c - 1) % ncols for s in starts for c in (s, s + SIZE)} & set(range(d.shape[-1]))
    inner = sorted(set(range(d.shape[-1])) - edges)
    return np.nanmax(d[..., sorted(edges)]), np.nanmax(d[..., inner])


def test_blend_has_no_seams_where_a_flat_average_has(coarse_cfg, tmp_path, monkeypatch):
    dom = tiling.region_domain((0.0, 40.0, -10.0, 20.0), 1.0, SIZE)
    starts = sorted({p.c for p in tiling.plan_tiles(dom, SIZE, STRIDE)})
    run(coarse_cfg, tmp_path / "hann.nc")
    lat, lon = np.meshgrid(dom.lats()[::-1], dom.lons(), indexing="ij")
    res = read(tmp_path / "hann.nc") - smooth(lat, lon)
    edge, inner = jumps(res, starts, dom.ncols)
    assert np.isfinite(res).all()
    assert edge <= inner * 1.05, (edge, inner)
    # The same check fails for a flat average of the tiles (so it can fail).
    monkeypatch.setattr(tiling, "window_2d", lambda n: np.ones((n, n)))
    run(coarse_cfg, tmp_path / "flat.nc")
    edge_f, inner_f = jumps(read(tmp_path / "flat.nc") - smooth(lat, lon), starts, dom.ncols)
    assert edge_f > 1.5 * inner_f, (edge_f, inner_f)


def test_region_across_the_dateline_equals_the_shifted_field(coarse_cfg, tmp_path):
    shifted = lambda lat, lon: smooth(lat, lon + 180.0)  # noqa: E731
    across = run(coarse_cfg, tmp_path / "across.nc", region=(160.0, -150.0, -10.0, 20.0))
    centred = run(coarse_cfg, tmp_path / "centred.nc", region=(-20.0, 30.0, -10.0, 20.0),
                  inputs=AnalyticInputs(shifted))
    assert across["domain"] == centred["domain"]
    a, b = read(tmp_path / "across.nc"), read(tmp_path / "centred.nc")
    np.testing.assert_allclose(a, b, atol=1e-4)
    import xarray as xr

    with xr.open_dataset(tmp_path / "across.nc") as ds:
        lon = ds["lon"].values
    assert lon[0] == pytest.approx(160.5) and lon[-1] == pytest.approx(209.5)  # continuous past 180


def test_global_run_is_seamless_across_180(coarse_cfg, tmp_path):
    land = lambda lat, lon: np.abs(lat) > 50  # noqa: E731
    # 2 degree pixels: 7 x 15 tiles around the globe.
    cfg = load_config(overrides=["dataset.grid.resolution_deg=2.0", f"dataset.grid.tile_size={SIZE}",
                                 f"dataset.grid.patch_stride={SIZE // 2}"])
    rep = run(cfg, tmp_path / "globe.nc", region=None, inputs=AnalyticInputs(land=land))
    dom = tiling.global_domain(2.0)
    assert rep["empty"] > 0  # the polar rows of tiles hold no ocean and are skipped
    mean = read(tmp_path / "globe.nc")
    lat, lon = np.meshgrid(dom.lats()[::-1], dom.lons(), indexing="ij")
    res = mean - smooth(lat, lon)
    ocean = np.abs(lat[:, 0]) < 50
    assert np.isnan(mean[:, ~ocean]).all() and np.isfinite(mean[:, ocean]).all()
    starts = sorted({p.c for p in tiling.plan_tiles(dom, SIZE, STRIDE)})
    edge, inner = jumps(res[:, ocean], [s % dom.ncols for s in starts], dom.ncols, periodic=True)
    assert edge <= inner * 1.05, (edge, inner)
    wrap = np.abs(res[:, ocean, 0] - res[:, ocean, -1]).max()  # the step across 180 E
    assert wrap <= inner * 1.05


def test_ensemble_is_reproducible_and_has_spread(coarse_cfg, tmp_path):
    kw = dict(model=EchoModel(noise=0.3), ensemble=3, keep_members=True)
    run(coarse_cfg, tmp_path / "a.nc", **kw)
    run(coarse_cfg, tmp_path / "b.nc", **kw)
    for name in ("thetao_mean", "thetao_std", "thetao_member"):
        np.testing.assert_array_equal(read(tmp_path / "a.nc", name), read(tmp_path / "b.nc", name))
    std = read(tmp_path / "a.nc", "thetao_std")
    assert 0.1 < np.nanmean(std) < 0.5
    run(coarse_cfg, tmp_path / "c.nc", seed=1, **kw)
    assert not np.array_equal(read(tmp_path / "a.nc"), read(tmp_path / "c.nc"))


@pytest.mark.parametrize("ambient,sampler", [(False, "ddpm"), (True, "ddim")], ids=["standard", "ambient"])
def test_member_k_does_not_depend_on_the_ensemble_size(ambient, sampler):
    """Each member draws from its own (tile, member) seed: members 0 and 1 of a 3-member run are
    those of a 2-member run, with the real model (ambient: its inference-time further drop too).
    A rerun with the same K is bit-identical (test_ensemble_is_reproducible_and_has_spread)."""
    from depthdif_hpc import build_model
    from tests.helpers import random_batch, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(ambient=ambient, overrides=[
        f"model.sampling.sampler={sampler}", "model.sampling.ddim_num_timesteps=3"])).eval()
    batch = random_batch(b=1, obs_frac=0.3)
    tile = Tile(0, 120, 340, 16, 0.1)
    two = rc.EnsembleRunner(model, ensemble=2)(tile, batch)
    three = rc.EnsembleRunner(model, ensemble=3)(tile, batch)
    # Equal up to rounding: the convolutions of a batch of 3 sum in another order than of 2.
    np.testing.assert_allclose(three[:2], two, rtol=0, atol=1e-4)
    apart = np.nanmax(np.abs(three[2] - three[1]))
    assert apart > 1e-2, apart  # the members differ by far more than the tolerance
    other = rc.EnsembleRunner(model, ensemble=2)(Tile(0, 120, 341, 16, 0.1), batch)
    assert np.nanmax(np.abs(other - two)) > 1e-2  # another tile, other draws


def test_resume_after_a_kill_equals_an_uninterrupted_run(coarse_cfg, tmp_path):
    kw = dict(model=EchoModel(noise=0.3), ensemble=2)
    full = run(coarse_cfg, tmp_path / "full.nc", **kw)
    out = tmp_path / "killed.nc"
    with pytest.raises(KeyboardInterrupt):
        run(coarse_cfg, out, inputs=AnalyticInputs(fail_after=3), **kw)
    assert not out.exists() and not Path(str(out) + ".part").exists()
    tiles = sorted((tmp_path / "killed.nc.work" / "tiles").glob("tile_*.npz"))
    assert len(tiles) == 3
    again = run(coarse_cfg, out, **kw)
    assert again["skipped"] == 3 and again["computed"] == full["computed"] - 3
    for name in ("thetao_mean", "thetao_std"):
        np.testing.assert_array_equal(read(out, name), read(tmp_path / "full.nc", name))
    assert not (tmp_path / "killed.nc.work").exists()  # removed once the file is complete


def test_ranks_take_disjoint_tiles(coarse_cfg, tmp_path):
    out = tmp_path / "two.nc"
    one = run(coarse_cfg, out, rank=1, world_size=2, keep_work=True)
    assert not out.exists()  # rank 1 computes its tiles only
    zero = run(coarse_cfg, out, rank=0, world_size=2, keep_work=True)
    assert one["computed"] + zero["computed"] == one["tiles"] and one["computed"] > 0
    run(coarse_cfg, tmp_path / "single.nc")
    np.testing.assert_array_equal(read(out), read(tmp_path / "single.nc"))


def test_a_crash_while_writing_leaves_no_file(coarse_cfg, tmp_path, monkeypatch):
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk full")
        return tiling.blend_rows(*a, **k)

    monkeypatch.setattr(rc, "blend_rows", failing)
    out = tmp_path / "x.nc"
    with pytest.raises(OSError):
        run(coarse_cfg, out, band_rows=8)
    assert not out.exists() and not list(tmp_path.glob("x.nc.part*"))
    monkeypatch.undo()
    run(coarse_cfg, out)  # the tiles were kept: this only blends
    assert out.is_file()


def test_the_file_is_cf(coarse_cfg, tmp_path):
    import cf_xarray  # noqa: F401
    import xarray as xr

    land = lambda lat, lon: (lon > 30) & (lat > 5)  # noqa: E731
    run(coarse_cfg, tmp_path / "cf.nc", inputs=AnalyticInputs(land=land), ensemble=2,
        model=EchoModel(noise=0.1), figure=tmp_path / "cf.png")
    with xr.open_dataset(tmp_path / "cf.nc") as ds:
        axes = ds.cf.axes
        assert {k: v[0] for k, v in axes.items()} == {"X": "lon", "Y": "lat", "Z": "depth", "T": "time"}
        assert ds.cf["latitude"].attrs["units"] == "degrees_north"
        assert ds.cf["longitude"].attrs["units"] == "degrees_east"
        assert ds["depth"].attrs["positive"] == "down" and ds["depth"].attrs["units"] == "m"
        assert np.all(np.diff(ds["lat"].values) > 0)
        assert ds["time"].values[0] == np.datetime64("2018-01-03")
        assert set(ds.cf[["sea_water_potential_temperature"]].data_vars) == {"thetao_mean",
                                                                              "thetao_reference"}
        mean = ds["thetao_mean"]
        assert mean.encoding["_FillValue"] == pytest.approx(1e20)
        assert mean.attrs["units"] == "degC" and "long_name" in ds["thetao_std"].attrs
        lat2, lon2 = np.meshgrid(ds["lat"].values, ds["lon"].values, indexing="ij")
        assert np.isnan(mean.values[0, :, land(lat2, lon2)]).all()
        assert np.isfinite(mean.values[0, :, ~land(lat2, lon2)]).all()
        assert ds.attrs["Conventions"].startswith("CF-")
    assert (tmp_path / "cf.png").stat().st_size > 10_000


def test_window_and_plan():
    w = tiling.window_1d(128)
    assert w.min() > 0 and w.max() <= 1 and np.allclose(w, w[::-1])
    assert np.all(np.diff(w[:64]) > 0)  # rises to the centre
    dom = tiling.Domain(0, 0, 40, 40, 1.0)
    plan = tiling.plan_tiles(dom, SIZE, STRIDE)
    assert sorted({p.r for p in plan}) == [0, 12, 24]


def test_inputs_are_the_stores_samples(tiny_store, tiny_model, tmp_path):
    """SourceInputs grids a tile exactly as the store builder did (one code path), and the
    command runs end to end on the synthetic source files with a real (tiny) model."""
    import zarr

    from depthdif_hpc.data.store import META, read_manifest
    from depthdif_hpc.data.stream import ShardStream

    src = tiny_store.parent / "sources"
    man = read_manifest(tiny_store)
    cfg = load_config(overrides=["dataset.grid.tile_size=32", "dataset.grid.patch_stride=16"])
    meta = zarr.open_group(str(tiny_store), mode="r")["val/meta"][:]
    item = next(iter(ShardStream(tiny_store, "val", shuffle=False, return_coords=True)))
    row = meta[0]
    inputs = rc.SourceInputs(cfg, int(row[META["day"]]), str(src / "ostia/*.nc"), str(src / "en4/*.nc"),
                             glorys=str(src / "glorys/*.nc"))
    t = Tile(0, int(row[META["row0"]]), int(row[META["col0"]]), int(man["tile_size"]), 0.1)
    got = inputs(t)
    for k in ("eo", "x", "x_valid_mask", "y_valid_mask", "land_mask", "coords", "date"):
        assert torch.equal(got.batch[k][0], item[k]), k
    assert not got.batch["y"].any()  # the model never sees GLORYS
    np.testing.assert_allclose(got.truth, np.where(item["y_valid_mask"].numpy(),
                                                   denormalize_temperature(item["y"]).numpy(), np.nan),
                               atol=2e-3)
    # A per_level model gets its inputs normalised per level, as its training stream gave them.
    from depthdif_hpc.data.store import resolve_normalizer

    per_level = resolve_normalizer(load_config(overrides=[f"dataset.store={tiny_store}",
                                                          "dataset.normalization=per_level"]))
    item_pl = next(iter(ShardStream(tiny_store, "val", shuffle=False, return_coords=True,
                                    normalizer=per_level)))
    got_pl = rc.SourceInputs(cfg, int(row[META["day"]]), str(src / "ostia/*.nc"), str(src / "en4/*.nc"),
                             glorys=str(src / "glorys/*.nc"), normalizer=per_level)(t)
    for k in ("eo", "x"):
        assert torch.equal(got_pl.batch[k][0], item_pl[k]), k
    assert not torch.equal(got_pl.batch["x"][0], got.batch["x"][0])  # not the global z-score
    # Validity without GLORYS: from --mask files (the static land/floor of the same ocean), else
    # OSTIA's land at every depth (with a warning).
    day = int(row[META["day"]])
    masked = rc.SourceInputs(cfg, day, str(src / "ostia/*.nc"), str(src / "en4/*.nc"),
                             mask=str(src / "glorys/*.nc"))(t)
    assert masked.truth is None and torch.equal(masked.batch["y_valid_mask"][0], item["y_valid_mask"])
    with pytest.warns(UserWarning, match="OSTIA"):
        bare = rc.SourceInputs(cfg, day, str(src / "ostia/*.nc"), str(src / "en4/*.nc"))
    surface = (item["eo"] != 0)[0]
    assert torch.equal(bare(t).batch["y_valid_mask"][0], surface.expand_as(item["y_valid_mask"]))
    # End to end: 1 x 2 tiles of 32 px over the synthetic box, the real model, 2 members.
    ymd = str(row[META["date"]])
    out = tmp_path / "recon.nc"
    rep = rc.reconstruct(tiny_model, cfg, date=f"{ymd[:4]}-{ymd[4:6]}-{ymd[6:]}", out=out,
                         ostia=str(src / "ostia/*.nc"), en4=str(src / "en4/*.nc"),
                         glorys=str(src / "glorys/*.nc"), region=(-32.8, -28.0, 48.4, 51.6),
                         tile=32, stride=16, ensemble=2, progress=False)
    assert rep["tiles"] == 2 and rep["computed"] == 2
    assert rep["scores"]["count"][0] > 0
    import xarray as xr

    with xr.open_dataset(out) as ds:
        assert ds["thetao_mean"].shape == (1, 50, 32, 48)
        assert ds.sizes["profile"] > 0
        assert np.isfinite(ds["thetao_reference"].values).any()


def test_precision_reaches_the_model_and_the_file(coarse_cfg, tmp_path):
    """--precision bf16 goes to DepthDif.predict, the file records it, and a resumed run with
    another precision is refused (its tiles would mix the two)."""
    import xarray as xr

    model = EchoModel()
    out = tmp_path / "bf16.nc"
    run(coarse_cfg, out, model=model, precision="bf16", keep_work=True)
    assert model.kw["precision"] == "bf16"
    with xr.open_dataset(out) as ds:
        assert ds.attrs["precision"] == "bf16"
    out.unlink()  # the work folder stays: a resume of the same plan
    with pytest.raises(ValueError, match="differs in precision"):
        run(coarse_cfg, out, model=model, precision="fp32")
    # A plan written before the precision was recorded was sampled in fp32: bf16 is refused.
    plan = tmp_path / "bf16.nc.work" / rc.PLAN_FILE
    plan.write_text(json.dumps({k: v for k, v in json.loads(plan.read_text()).items()
                                if k != "precision"}))
    with pytest.raises(ValueError, match="differs in precision"):
        run(coarse_cfg, out, model=model, precision="bf16")
