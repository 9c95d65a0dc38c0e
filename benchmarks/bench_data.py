"""Decode-and-collate throughput of the training store, per CPU core, from page cache.

    python benchmarks/bench_data.py [--store STORE] [--batch 8] [--seconds 10]

Without --store it builds the tiny synthetic store (128 x 128 x 50) in a temp folder. One
process, one thread (torch, Blosc, zarr's thread pool): the last line is samples per CPU second
of this process (per core); wall-clock samples/s is printed too. A first pass
warms the page cache; the timed passes read, decode, densify x and collate with torch's default
collate. Also reports the store size against the same samples as float32. Last line:
`samples/s: N`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="store to read (default: build the tiny synthetic one)")
    p.add_argument("--split", default=None, help="split (default: the larger one)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numcodecs
    import torch
    import zarr
    from torch.utils.data import default_collate

    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})

    from depthdif_hpc.data.store import read_manifest
    from depthdif_hpc.data.stream import ShardStream

    tmp = None
    store = Path(a.store) if a.store else None
    if store is None:
        from depthdif_hpc.data.synthetic import build_tiny_store

        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        store = build_tiny_store(tmp.name, tile_size=128, end="2018-01-08", shard_samples=16)
        print(f"built tiny store in {time.perf_counter() - t0:.1f} s: {store}")
    man = read_manifest(store)
    split = a.split or max(man["splits"], key=lambda s: man["splits"][s]["n_samples"])
    ds = ShardStream(store, split, shuffle=True, shuffle_buffer=16, batch_size=a.batch)
    n = man["splits"][split]["n_samples"]
    t = man["tile_size"]
    f32 = 4 * t * t
    # float32 tensors of the batch contract: y, x, eo, x/y masks (50 levels), 1-d mask, land.
    dense_all = n * f32 * (50 + 50 + 1 + 50 + 50 + 1 + 1)
    dense_data = n * (f32 * (50 + 50 + 1) + t * t * (50 + 50 + 1 + 1))  # masks as bool
    stored = sum(_dir_bytes(store / s) for s in man["splits"] if (store / s).exists())
    stored_split = _dir_bytes(store / split)
    total_n = sum(v["n_samples"] for v in man["splits"].values())
    print(f"store {store}: {total_n} samples, {stored / 1e6:.1f} MB on disk")
    print(f"size vs float32 (y, x, eo and all masks as float32): {stored / (dense_all * total_n / n):.3f}")
    print(f"size vs float32 y/x/eo + bool masks: {stored / (dense_data * total_n / n):.3f}")

    def one_pass() -> tuple[int, int]:
        got, nbytes, batch = 0, 0, []
        for item in ds:
            batch.append(item)
            if len(batch) == a.batch:
                out = default_collate(batch)
                nbytes += sum(v.numel() * v.element_size() for v in out.values())
                got += len(batch)
                batch = []
        if batch:
            out = default_collate(batch)
            got += len(batch)
        return got, nbytes

    one_pass()  # page cache and allocator warm-up
    samples = 0
    out_bytes = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    epoch = 1
    while time.perf_counter() - t0 < a.seconds:
        ds.set_epoch(epoch)
        got, nb = one_pass()
        samples += got
        out_bytes += nb
        epoch += 1
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    read_mb = stored_split * (samples / n) / 1e6
    print(f"{samples} samples in {dt:.2f} s wall, {cpu:.2f} s CPU (one thread): "
          f"{out_bytes / cpu / 1e6:.0f} MB/s of batch tensors, {read_mb / cpu:.0f} MB/s read from "
          "the store, per CPU second")
    print(f"wall-clock samples/s: {samples / dt:.1f} (lower when other processes share the core)")
    # Per core = per CPU second of this process: on a shared machine wall time also counts the
    # time the core spent on other processes.
    rate = samples / cpu
    print(f"samples/s: {rate:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return rate


if __name__ == "__main__":
    main(sys.argv[1:])
