"""Data: NetCDF source readers, the synthetic ocean, the store builder and the training stream."""

from depthdif_hpc.data.stream import ShardStream, make_dataloader

__all__ = ["ShardStream", "make_dataloader"]
