"""Decode-and-collate throughput of the training store, per CPU core, from page cache.

    python benchmarks/bench_data.py [--store STORE] [--batch 8] [--seconds 10] [--repeat 3]
                                    [--path loader|per-sample] [--workers 0]

Without --store it builds the tiny synthetic store (128 x 128 x 50) in a temp folder.

`--path loader` (default) times what the trainer iterates: `make_dataloader(cfg, split, ...)`,
a StreamLoader over the batched ShardStream (whole batches decoded straight into the batch
tensors, DataLoader(batch_size=None)). `--path per-sample` times the per-sample stream with
torch's default collate (what `DataLoader(ShardStream(...), batch_size=N)` in evaluate/predict
does, and what the trainer used before the batched path), for comparison on the same machine.

One process, one thread (torch, Blosc, zarr's thread pool); with `--workers N` the loader keeps
N persistent DataLoader workers (one thread each) and their CPU time (from /proc) is added, so
the per-core rate then includes handing batches over in shared memory. Rate = samples per CPU
second of this process and its workers: on a shared machine wall time also counts the time
the core spent on other processes, so wall-clock samples/s is printed too. A first pass warms the page
cache; each of `--repeat` windows then runs whole epochs for `--seconds`. Also reports the store
size against the same samples as float32. Last line: `samples/s: N` (median of the windows).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process (all threads) and of the processes `pids` (loader workers)."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="store to read (default: build the tiny synthetic one)")
    p.add_argument("--split", default=None, help="split (default: the larger one)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="length of one timed window")
    p.add_argument("--repeat", type=int, default=1, help="timed windows (the median is reported)")
    p.add_argument("--path", choices=("loader", "per-sample"), default="loader")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (loader path)")
    a = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numcodecs
    import torch
    import zarr
    from torch.utils.data import default_collate

    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})

    from depthdif_hpc.config import load_config
    from depthdif_hpc.data.batch import FIELDS
    from depthdif_hpc.data.store import N_LEVELS, read_manifest
    from depthdif_hpc.data.stream import ShardStream, StreamLoader, make_dataloader

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
    n = man["splits"][split]["n_samples"]
    t = man["tile_size"]
    # The per-pixel tensors of the batch contract (eo, x, y, their masks, land_mask) per sample.
    pixel = [(math.prod(f.sample_shape({"D": N_LEVELS, "H": t, "W": t})), f.dtype.itemsize)
             for f in FIELDS if "H" in f.dims]
    dense_all = n * sum(4 * numel for numel, _ in pixel)  # all as float32
    dense_data = n * sum(numel * size for numel, size in pixel)  # masks as bool
    stored = sum(_dir_bytes(store / s) for s in man["splits"] if (store / s).exists())
    stored_split = _dir_bytes(store / split)
    total_n = sum(v["n_samples"] for v in man["splits"].values())
    print(f"store {store}: {total_n} samples, {stored / 1e6:.1f} MB on disk")
    print(f"size vs float32 (eo, x, y and all masks as float32): {stored / (dense_all * total_n / n):.3f}")
    print(f"size vs float32 eo/x/y + bool masks: {stored / (dense_data * total_n / n):.3f}")

    if a.path == "loader":
        cfg = load_config(overrides=["dataloader.shuffle_buffer=16", "dataloader.pin_memory=false",
                                     "dataloader.persistent_workers=true"])
        # The trainer's own loader; iterating it runs one epoch and advances to the next.
        source = make_dataloader(cfg, split, store=store, batch_size=a.batch,
                                 num_workers=a.workers, shuffle=True)
        if a.workers and not source.loader.persistent_workers:  # (val split): keep them
            source = StreamLoader(source.dataset, num_workers=a.workers, persistent_workers=True,
                                  prefetch_factor=cfg.dataloader.prefetch_factor)

        def one_pass() -> tuple[int, int]:
            got, nbytes = 0, 0
            for out in source:
                nbytes += sum(v.numel() * v.element_size() for v in out.values())
                got += len(out["sample_id"])
            return got, nbytes
    else:
        if a.workers:
            p.error("--workers applies to --path loader")
        ds = ShardStream(store, split, shuffle=True, shuffle_buffer=16, batch_size=a.batch)

        def one_pass() -> tuple[int, int]:
            got, nbytes, batch = 0, 0, []
            for item in ds:  # advances ds to the next epoch at its end
                batch.append(item)
                if len(batch) == a.batch:
                    out = default_collate(batch)
                    nbytes += sum(v.numel() * v.element_size() for v in out.values())
                    got += len(batch)
                    batch = []
            if batch:
                out = default_collate(batch)
                nbytes += sum(v.numel() * v.element_size() for v in out.values())
                got += len(batch)
            return got, nbytes

    print(f"path {a.path}, batch {a.batch}, workers {a.workers}, split {split} ({n} samples), "
          f"torch threads {torch.get_num_threads()}")
    one_pass()  # page cache and allocator warm-up (and worker start-up)
    pids = ([w.pid for w in source.loader._iterator._workers]  # persistent workers
            if a.path == "loader" and a.workers else [])
    rates = []
    for r in range(a.repeat):
        samples = out_bytes = 0
        c0 = _cpu_seconds(pids)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            got, nb = one_pass()
            samples += got
            out_bytes += nb
        dt = time.perf_counter() - t0
        cpu = _cpu_seconds(pids) - c0
        read_mb = stored_split * (samples / n) / 1e6
        rates.append(samples / cpu)
        print(f"[{r + 1}/{a.repeat}] {samples} samples in {dt:.2f} s wall, {cpu:.2f} s CPU: "
              f"{out_bytes / cpu / 1e6:.0f} MB/s of batch tensors, {read_mb / cpu:.0f} MB/s read "
              f"from the store, per CPU second; wall-clock {samples / dt:.1f} samples/s, per CPU "
              f"second {samples / cpu:.1f} samples/s")
    # Per core = per CPU second: wall time on a shared machine also counts other processes.
    rate = statistics.median(rates)
    if a.repeat > 1:
        print(f"per CPU second over {a.repeat} windows: min {min(rates):.1f}, "
              f"median {rate:.1f}, max {max(rates):.1f}")
    print(f"samples/s: {rate:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return rate


if __name__ == "__main__":
    main(sys.argv[1:])
