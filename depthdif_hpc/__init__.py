"""DepthDif as an HPC training package: eager reference model, Triton kernels, trainer, data.

`Config`, `ConfigError`, `load_config`, `DepthDif` and `build_model` are loaded on first use, so
that `import depthdif_hpc.kernels` or `depthdif_hpc.model.unet` needs torch and triton only (a GPU
machine without the training stack, running kernel tests and benchmarks from a plain checkout).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from depthdif_hpc.config import Config, ConfigError, load_config
    from depthdif_hpc.model.build import build_model
    from depthdif_hpc.model.depthdif import DepthDif

_LAZY = {
    "Config": "depthdif_hpc.config",
    "ConfigError": "depthdif_hpc.config",
    "load_config": "depthdif_hpc.config",
    "DepthDif": "depthdif_hpc.model.depthdif",
    "build_model": "depthdif_hpc.model.build",
}

__all__ = ["Config", "ConfigError", "DepthDif", "build_model", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Finds `depthdif_hpc.kernels` in the top-level kernels/ folder of a source checkout.

    An install maps that folder into the package (pyproject's package-dir); a plain checkout on
    PYTHONPATH has no such mapping, so this finder supplies it. It answers for that one name only
    and only for the checkout this package was imported from.
    """

    def __init__(self, kernels_dir: Path) -> None:
        self.kernels_dir = kernels_dir

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != f"{__name__}.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.kernels_dir / "__init__.py",
            submodule_search_locations=[str(self.kernels_dir)],
        )


def _map_checkout_kernels() -> None:
    package_dir = Path(__file__).resolve().parent
    kernels_dir = package_dir.parent / "kernels"
    # A wheel has the kernels inside the package: nothing to map.
    if (package_dir / "kernels").is_dir() or not (kernels_dir / "__init__.py").is_file():
        return
    # First in line, so that an editable install of another checkout cannot answer instead.
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_CheckoutKernelsFinder"]
    sys.meta_path.insert(0, _CheckoutKernelsFinder(kernels_dir))


_map_checkout_kernels()
