"""Data: NetCDF source readers, the synthetic ocean, the store builder and the training stream.

Entry points (docs/data_store.md):
* `python -m depthdif_hpc.data.synthetic --out DIR` - GLORYS/OSTIA/EN4-like NetCDF files;
* `python -m depthdif_hpc.data.build --glorys G --ostia O --en4 E --out STORE` - the store;
* `make_dataloader(cfg, split, rank, world_size)` - the resumable training stream;
* `depthdif_hpc.data.synthetic.build_tiny_store(out_dir, tile_size=32)` - a small store for
  tests and demos.
"""

from depthdif_hpc.data.stream import ShardStream, StreamLoader, make_dataloader

__all__ = ["ShardStream", "StreamLoader", "make_dataloader"]
