"""Wheels for the lent GPU machine: what the trainer needs beyond the machine's own image.

    python benchmarks/wheelhouse.py [--out .wheelhouse]      (`make wheelhouse` runs this)

The GPU machine (Python 3.12, x86-64, torch, triton, accelerate, xarray, scipy, ... but no
omegaconf, zarr, numcodecs, deepspeed, submitit, netCDF4) has no network. This builds, on a
machine that has one, the wheels that close the gap, so that `benchmarks/gpu_run.sh` can install
them offline in seconds (`pip install --no-index --no-deps --target DIR .wheelhouse/*.whl`).

What is carried is computed, not listed: the project's runtime requirements (pyproject.toml,
with the `synthetic` extra the trainer stage's store builder needs) and, recursively, theirs, as installed in the environment running this script (the venv that
`make install` built and the test suite passed in), minus what the GPU image already has
(`GPU_IMAGE`). Each is fetched at the version installed here: a cp312 manylinux x86-64 wheel
when the registry has one, else the sdist built here into a pure-Python wheel (deepspeed with
DS_BUILD_OPS=0: its CUDA ops compile just in time where they are used). Then every wheel is
checked: installable on CPython 3.12 manylinux x86-64, one version per package, and every
Requires-Dist met by another wheel here or by the image. Re-running only fetches what changed
and removes wheels that are no longer wanted.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYTHON = (3, 12)
PYTHON_TEXT = f"{PYTHON[0]}.{PYTHON[1]}"
# manylinux levels the GPU machine's glibc accepts (pip matches each level exactly).
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]

# Packages in the lent GPU image (its package list, read on such a machine), PEP 503 names.
GPU_IMAGE = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split())

# Carried although the image has them: the image's version is not known and a carried wheel
# needs a recent one (pydantic-core requires typing-extensions >= 4.16).
ALSO_CARRY = frozenset({"typing-extensions"})


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: Version
    tags: frozenset[Tag]

    @classmethod
    def of(cls, path: Path) -> Wheel:
        name, version, _, tags = parse_wheel_filename(path.name)
        return cls(path, canonicalize_name(name), version, frozenset(tags))

    def requires(self) -> list[str]:
        """Requires-Dist lines of the wheel's METADATA."""
        with zipfile.ZipFile(self.path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = email.parser.Parser().parsestr(z.read(meta).decode())
        return msg.get_all("Requires-Dist") or []


def target_environment() -> dict[str, str]:
    """PEP 508 marker values of the GPU machine's interpreter (not of the one running this)."""
    env = default_environment()
    env.update(python_version=PYTHON_TEXT, python_full_version=f"{PYTHON_TEXT}.3",
               implementation_name="cpython", platform_python_implementation="CPython",
               sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
               os_name="posix")
    return env


def target_tags() -> set[Tag]:
    return set(cpython_tags(PYTHON, platforms=PLATFORMS)) | set(compatible_tags(PYTHON, platforms=PLATFORMS))


def applies(req: Requirement, env: dict[str, str]) -> bool:
    """A requirement of a plain install (no extras) on the target interpreter."""
    return req.marker is None or req.marker.evaluate({**env, "extra": ""})


# Extras of the project the GPU run uses: the trainer stage builds a synthetic store.
EXTRAS = ("synthetic",)


def project_requirements(pyproject: Path = ROOT / "pyproject.toml",
                         extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """The project's runtime requirements and those of `extras` (pyproject.toml)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    lines = [*project["dependencies"], *(r for e in extras for r in optional.get(e, []))]
    return [Requirement(r) for r in lines]


def closure(roots: list[Requirement], *, image: frozenset[str] = GPU_IMAGE,
            also: frozenset[str] = ALSO_CARRY, dist=metadata.distribution) -> dict[str, str]:
    """{canonical name: installed version} of everything to carry: the roots and their
    requirements, recursively, minus what the image has (except `also`), read from the
    installed distributions (`dist(name)` -> importlib.metadata.Distribution)."""
    env = target_environment()
    todo = [r for r in roots if applies(r, env)]
    out: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in out or (name in image and name not in also):
            continue
        try:
            d = dist(req.name)
        except metadata.PackageNotFoundError as exc:
            raise SystemExit(f"wheelhouse: {req.name} is required but not installed here; "
                             "run `make install` first") from exc
        if req.specifier and not req.specifier.contains(d.version, prereleases=True):
            raise SystemExit(f"wheelhouse: installed {req.name} {d.version} does not meet {req}")
        out[name] = d.version
        todo += [r for r in map(Requirement, d.requires or []) if applies(r, env)]
    return out


def check(wheels: list[Wheel], *, image: frozenset[str] = GPU_IMAGE) -> list[str]:
    """Problems with a wheel set: duplicates, tags the GPU machine's Python cannot install, and
    Requires-Dist not met by the set itself or by the image. Empty when the set is usable."""
    problems: list[str] = []
    by_name: dict[str, Wheel] = {}
    for w in wheels:
        if w.name in by_name:
            problems.append(f"two versions of {w.name}: {by_name[w.name].path.name}, {w.path.name}")
        by_name[w.name] = w
    tags = target_tags()
    env = target_environment()
    for w in wheels:
        if not w.tags & tags:
            problems.append(f"{w.path.name} cannot be installed on CPython {PYTHON[0]}.{PYTHON[1]} "
                            "manylinux x86-64")
        for line in w.requires():
            req = Requirement(line)
            if not applies(req, env):
                continue
            name = canonicalize_name(req.name)
            have = by_name.get(name)
            if have is not None:
                if req.specifier and not req.specifier.contains(have.version, prereleases=True):
                    problems.append(f"{w.name} needs {req}, the wheelhouse has {have.version}")
            elif name not in image:
                problems.append(f"{w.name} needs {req}: neither in the wheelhouse nor in the GPU image")
    return problems


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env=env)


def fetch(name: str, version: str, out: Path) -> Path:
    """The wheel of name==version for the GPU machine, into `out`: a binary from the registry,
    else the sdist built here (pure-Python results only)."""
    spec = f"{name}=={version}"
    with tempfile.TemporaryDirectory() as tmp:
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        r = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_TEXT,
                 "--implementation", "cp", *plat, "-d", tmp, spec)
        if r.returncode != 0:
            # No wheel for the target: build the sdist here. --no-build-isolation builds against
            # this venv (deepspeed records the torch it was built with, 0.0 in an isolated build);
            # DS_BUILD_OPS=0 keeps deepspeed's CUDA ops out of the wheel (JIT-built where used).
            env = {**os.environ, "DS_BUILD_OPS": "0"}
            r = _pip("wheel", "--no-deps", "--no-build-isolation", f"--no-binary={name}", "-w", tmp,
                     spec, env=env)
            if r.returncode != 0:
                raise SystemExit(f"wheelhouse: cannot get {spec}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        got = [Wheel.of(p) for p in Path(tmp).glob("*.whl")]
        mine = [w for w in got if w.name == canonicalize_name(name)]
        if len(mine) != 1:
            raise SystemExit(f"wheelhouse: expected one wheel of {spec}, got {[p.path.name for p in got]}")
        dest = out / mine[0].path.name
        shutil.move(str(mine[0].path), dest)
        return dest


def build(out: Path, wanted: dict[str, str]) -> list[Wheel]:
    out.mkdir(parents=True, exist_ok=True)
    have = {}
    for p in out.glob("*.whl"):
        w = Wheel.of(p)
        if wanted.get(w.name) is not None and w.version == Version(wanted[w.name]) and w.name not in have:
            have[w.name] = w
        else:  # another version, or no longer wanted: one version of each, nothing stale
            p.unlink()
            print(f"  removed {p.name}")
    for name, version in sorted(wanted.items()):
        if name not in have:
            have[name] = Wheel.of(fetch(name, version, out))
            print(f"  fetched {have[name].path.name}")
    (out / "requirements.txt").write_text(
        "".join(f"{n}=={wanted[n]}\n" for n in sorted(wanted)))
    return sorted(have.values(), key=lambda w: w.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".wheelhouse")
    a = ap.parse_args(argv)
    wanted = closure(project_requirements())
    print(f"wheelhouse: {len(wanted)} packages for CPython {PYTHON[0]}.{PYTHON[1]} x86-64 -> {a.out}")
    wheels = build(a.out, wanted)
    problems = check(wheels)
    total = 0
    for w in wheels:
        size = w.path.stat().st_size
        total += size
        print(f"  {size / 2**20:7.2f} MiB  {w.path.name}")
    print(f"  {total / 2**20:7.2f} MiB  total, {len(wheels)} wheels")
    for p in problems:
        print(f"wheelhouse: PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
