"""PNG figures of the evaluation report (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from depthdif_hpc.normalization import PLOT_MAX_C, PLOT_MIN_C  # noqa: E402

COLORS = {"model": "C3", "oi": "C4", "idw": "C0", "climatology": "C2", "surface_extended": "C1"}


def make_all(out: Path, depth_m: np.ndarray, result: dict, s: dict) -> list[Path]:
    figs = [
        rmse_per_depth(out / "rmse_per_depth.png", depth_m, result),
        scores_per_depth(out / "scores_per_depth.png", depth_m, result),
        maps(out / "maps.png", depth_m, s),
        profiles(out / "profiles.png", depth_m, s),
        section(out / "section.png", depth_m, s),
    ]
    if "rank_histogram" in result:
        figs.append(rank_histogram(out / "rank_histogram.png", result))
    return figs


def _present(r: dict, support: str, key: str = "rmse") -> list[str]:
    """Methods with at least one finite value (OI is absent when it was switched off)."""
    return [m for m in COLORS if m in r["per_depth"][support]
            and np.isfinite(np.asarray(r["per_depth"][support][m][key], dtype=float)).any()]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def rmse_per_depth(path: Path, depth_m: np.ndarray, r: dict) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    for ax, support, title in ((axes[0], "hidden", "hidden ocean pixels vs truth"),
                               (axes[1], "withheld", "withheld profiles vs observations")):
        for m in _present(r, support):
            rmse = np.asarray(r["per_depth"][support][m]["rmse"], dtype=float)
            ax.plot(rmse, depth_m, label=m, color=COLORS[m], lw=2 if m == "model" else 1.2)
        ax.set_title(f"{title} ({r.get('withheld_mode', '')})" if support == "withheld" else title)
        ax.set_xlabel("RMSE (degC)")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].set_ylim(float(np.max(depth_m)) * 1.05, 0)  # deepest at the bottom, no negative depths
    axes[0].set_ylabel("depth (m)")
    axes[0].legend()
    return _save(fig, path)


def scores_per_depth(path: Path, depth_m: np.ndarray, r: dict) -> Path:
    """CRPS (model ensemble, OI) on both supports and R^2 of every method on hidden pixels."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 5), sharey=True)
    for ax, support in zip(axes[:2], ("hidden", "withheld"), strict=True):
        for m, v in r.get("crps", {}).get(support, {}).items():
            ax.plot(np.asarray(v["per_depth"], dtype=float), depth_m, color=COLORS[m], label=m)
        ax.set_title(f"CRPS, {support}")
        ax.set_xlabel("CRPS (degC)")
        ax.grid(alpha=0.3)
        ax.legend()
    for m in _present(r, "hidden", "r2"):
        r2 = np.asarray(r["per_depth"]["hidden"][m]["r2"], dtype=float)
        axes[2].plot(r2, depth_m, color=COLORS[m], label=m, lw=2 if m == "model" else 1.2)
    axes[2].set_xlim(-1, 1)
    axes[2].set_title("R^2, hidden pixels")
    axes[2].set_xlabel("R^2")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].set_ylim(float(np.max(depth_m)) * 1.05, 0)
    axes[0].set_ylabel("depth (m)")
    return _save(fig, path)


def rank_histogram(path: Path, r: dict) -> Path:
    """Rank of the truth among the members, pooled over levels; flat when calibrated."""
    hists = r["rank_histogram"]
    fig, axes = plt.subplots(1, len(hists), figsize=(5 * len(hists), 4), squeeze=False)
    for ax, (support, h) in zip(axes[0], hists.items(), strict=True):
        counts = np.asarray(h["counts"], dtype=float)
        freq = counts / max(counts.sum(), 1)
        ax.bar(np.arange(len(counts)), freq, color="C3")
        ax.axhline(1 / len(counts), color="k", ls="--", lw=1, label="calibrated")
        ax.set_title(f"rank histogram, {support} ({int(counts.sum())} points)")
        ax.set_xlabel("rank of the truth among the members")
        ax.set_ylabel("frequency")
        ax.legend()
    return _save(fig, path)


def _levels(depth_m: np.ndarray, want=(0, 100, 500, 1000)) -> list[int]:
    return sorted({int(np.argmin(np.abs(depth_m - z))) for z in want})


def maps(path: Path, depth_m: np.ndarray, s: dict) -> Path:
    levels = _levels(depth_m)
    fig, axes = plt.subplots(len(levels), 4, figsize=(13, 3.1 * len(levels)), squeeze=False)
    extent = [float(s["lon"][0]), float(s["lon"][-1]), float(s["lat"][-1]), float(s["lat"][0])]
    for row, k in enumerate(levels):
        truth, mean, std = s["truth"][k], s["mean"][k], np.asarray(s["std"][k], dtype=float)
        lo, hi = np.nanpercentile(truth, [2, 98]) if np.isfinite(truth).any() else (PLOT_MIN_C, PLOT_MAX_C)
        err = mean - truth
        lim = float(np.nanmax(np.abs(err))) if np.isfinite(err).any() else 1.0
        panels = ((truth, "truth", "turbo", lo, hi), (mean, "prediction", "turbo", lo, hi),
                  (err, "error", "RdBu_r", -lim, lim), (std, "ensemble std", "viridis", 0, None))
        for col, (f, name, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[row, col]
            im = ax.imshow(f, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, aspect="auto")
            ax.set_title(f"{name}, {depth_m[k]:.0f} m")
            fig.colorbar(im, ax=ax, shrink=0.8, label="degC")
            if col == 0:
                rr, cc = np.nonzero(s["cond_valid"].any(axis=0))
                lat, lon = np.asarray(s["lat"]), np.asarray(s["lon"])
                ax.scatter(lon[cc], lat[rr], s=6, c="k", marker="x", label="profiles")
    fig.suptitle(f"sample {s['i']}, date {s['date']}")
    return _save(fig, path)


def profiles(path: Path, depth_m: np.ndarray, s: dict, n: int = 4) -> Path:
    cols = np.argwhere(s["withheld"] & np.isfinite(s["obs"]).any(axis=0))
    kind = "withheld"
    if len(cols) == 0:
        cols = np.argwhere(np.isfinite(s["obs"]).any(axis=0))
        kind = "observed"
    cols = cols[:n]
    fig, axes = plt.subplots(1, max(len(cols), 1), figsize=(3.4 * max(len(cols), 1), 5), squeeze=False)
    std = np.asarray(s["std"], dtype=float)
    for ax, (r, c) in zip(axes[0], cols, strict=False):
        mu, sd = s["mean"][:, r, c], std[:, r, c]
        ax.fill_betweenx(depth_m, mu - 2 * sd, mu + 2 * sd, color="C3", alpha=0.2, label="model +-2 std")
        ax.plot(mu, depth_m, color="C3", label="model")
        ax.plot(s["truth"][:, r, c], depth_m, color="k", lw=1, label="truth")
        ax.plot(s["idw"][:, r, c], depth_m, color="C0", lw=1, ls="--", label="IDW")
        if s.get("oi") is not None:
            ax.plot(s["oi"][:, r, c], depth_m, color="C4", lw=1, ls=":", label="OI")
        ax.scatter(s["obs"][:, r, c], depth_m, s=10, color="k", marker="o", label=f"{kind} profile")
        ax.set_yscale("symlog", linthresh=10)
        ax.invert_yaxis()
        ax.set_xlabel("degC")
        ax.set_title(f"pixel ({r}, {c})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("depth (m)")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def section(path: Path, depth_m: np.ndarray, s: dict) -> Path:
    row = s["truth"].shape[1] // 2
    lon = np.asarray(s["lon"], dtype=float)
    truth, mean = s["truth"][:, row, :], s["mean"][:, row, :]
    lo, hi = (np.nanmin(truth), np.nanmax(truth)) if np.isfinite(truth).any() else (PLOT_MIN_C, PLOT_MAX_C)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    err = mean - truth
    lim = float(np.nanmax(np.abs(err))) if np.isfinite(err).any() else 1.0
    for ax, f, name, cmap, vmin, vmax in ((axes[0], truth, "truth", "turbo", lo, hi),
                                          (axes[1], mean, "prediction", "turbo", lo, hi),
                                          (axes[2], err, "error", "RdBu_r", -lim, lim)):
        im = ax.pcolormesh(lon, depth_m, f, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        ax.set_title(f"{name}, section at lat {float(s['lat'][row]):.2f}")
        ax.set_xlabel("longitude")
        fig.colorbar(im, ax=ax, label="degC")
    axes[0].set_yscale("symlog", linthresh=10)
    axes[0].invert_yaxis()
    axes[0].set_ylabel("depth (m)")
    return _save(fig, path)
