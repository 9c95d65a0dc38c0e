"""DepthDif as an HPC training package: eager reference model, Triton kernels, trainer, data."""

from depthdif_hpc.config import Config, ConfigError, load_config
from depthdif_hpc.model.depthdif import DepthDif, build_model

__all__ = ["Config", "ConfigError", "DepthDif", "build_model", "load_config"]
