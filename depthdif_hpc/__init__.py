"""DepthDif as an HPC training package."""
