"""Triton kernels (fused forward and backward) for the DepthDif U-Net."""
