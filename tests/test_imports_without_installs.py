"""The kernels, the U-Net and the kernel benchmarks run from a plain checkout with torch, triton and
numpy alone: no install of this package and none of the training stack.

That is the GPU benchmark machine (no omegaconf, zarr, numcodecs, deepspeed, submitit, xarray,
netCDF4, accelerate; nothing can be installed there). Each check runs a fresh interpreter on a
copy of the checkout's source folders with `python -S` (so no .pth file, hence no editable
install of this package, is read) and a site-packages made of links to everything installed here
except those distributions, which therefore are absent exactly as on that machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("omegaconf", "zarr", "numcodecs", "deepspeed", "submitit", "xarray", "netCDF4",
          "accelerate")


def _top_name(entry: str) -> str:
    """'netCDF4-1.7.5.dist-info', 'netcdf4.libs', 'zarr' -> 'netcdf4', 'netcdf4', 'zarr'."""
    return entry.split("-")[0].split(".")[0].lower()


def _site_dirs() -> list[Path]:
    dirs = []
    for p in sys.path:
        path = Path(p).resolve() if p else None
        if (path is not None and path.name in ("site-packages", "dist-packages")
                and path.is_dir() and path not in dirs):
            dirs.append(path)
    return dirs


def _plain_machine(tmp: Path) -> tuple[Path, list[Path]]:
    """(a copy of the checkout's source folders, site dirs without the training stack)."""
    checkout = tmp / "checkout"
    for folder in ("depthdif_hpc", "kernels", "benchmarks"):
        shutil.copytree(ROOT / folder, checkout / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results"))
    absent = {name.lower() for name in ABSENT}
    sites = []
    for i, site_dir in enumerate(_site_dirs()):
        shadow = tmp / f"site{i}"
        shadow.mkdir()
        for entry in site_dir.iterdir():
            if _top_name(entry.name) in absent or entry.name.startswith("__editable__"):
                continue
            (shadow / entry.name).symlink_to(entry)
        sites.append(shadow)
    return checkout, sites


def _run(tmp: Path, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    checkout, sites = _plain_machine(tmp)
    prelude = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(checkout)!r}]
        sys.path += {[str(s) for s in sites]!r}
        CHECKOUT = {str(checkout)!r}
        ABSENT = {ABSENT!r}
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(TRITON_INTERPRET="1", PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)


def test_kernels_and_unet_import_and_run_without_the_training_stack(tmp_path: Path):
    res = _run(tmp_path, """
        import importlib.util
        from pathlib import Path

        # The training stack is really absent here.
        assert [m for m in ABSENT if importlib.util.find_spec(m) is not None] == []

        import torch

        import depthdif_hpc.kernels as K

        # The package and its kernels come from this checkout (no install maps them).
        assert Path(K.__file__).resolve() == Path(CHECKOUT, "kernels", "__init__.py").resolve()
        import depthdif_hpc

        assert Path(depthdif_hpc.__file__).resolve().parent == Path(CHECKOUT, "depthdif_hpc").resolve()

        from depthdif_hpc.kernels._testing import layer_norm_inputs
        from depthdif_hpc.model.unet import UNet

        torch.manual_seed(0)
        unet = UNet(dim=8, out_dim=3, dim_mults=(1, 2), channels=5, coord_emb_dim=4)
        out = unet(torch.randn(1, 5, 8, 8), torch.tensor([7]), torch.randn(1, 4))
        assert out.shape == (1, 3, 8, 8) and bool(torch.isfinite(out).all())

        # One Triton kernel (interpreter), directly and through the self-checking dispatcher.
        x, w, b = layer_norm_inputs(2, 6, 5, 7)
        ref = K.layer_norm_reference(x, w, b)
        assert torch.allclose(K.layer_norm(x, w, b), ref, atol=1e-5)
        assert torch.allclose(K.run_op("layer_norm", "triton", x, w, b), ref, atol=1e-5)

        # The package's lazy names resolve without omegaconf; only loading YAML needs it.
        from depthdif_hpc import Config, DepthDif, build_model  # noqa: F401
        from depthdif_hpc.model.depthdif import DepthDif as D2

        assert D2 is DepthDif
        try:
            depthdif_hpc.load_config()
        except ModuleNotFoundError as exc:
            assert exc.name == "omegaconf", exc
        else:
            raise AssertionError("load_config ran without omegaconf")
        print("plain checkout OK")
    """)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "plain checkout OK" in res.stdout


def test_benchmarks_import_and_run_without_the_training_stack(tmp_path: Path):
    res = _run(tmp_path, """
        import importlib.util
        import runpy
        from pathlib import Path

        bench = Path(CHECKOUT, "benchmarks")
        names = sorted(p.stem for p in bench.glob("bench_*.py"))
        assert {"bench_convnext_front", "bench_layer_norm", "bench_linear_attention"} <= set(names)
        for name in names:
            spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
            spec.loader.exec_module(importlib.util.module_from_spec(spec))

        out = Path("results")
        sys.argv = ["run.py", "--smoke", "--ops", "layer_norm", "--no-step", "--out", str(out)]
        try:
            runpy.run_path(str(bench / "run.py"), run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        csv = list(out.glob("*.csv"))
        assert len(csv) == 1 and "triton" in csv[0].read_text(), csv
        print("benchmarks OK", names)
    """)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "benchmarks OK" in res.stdout
