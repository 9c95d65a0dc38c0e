"""A process whose loader still has persistent workers at exit must exit: the workers ignore
SIGTERM (they leave the stop signals to the trainer), which is how the interpreter's exit stops
daemonic children, so the stream stops them itself first."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    from depthdif_hpc.data.stream import ShardStream, StreamLoader
    ds = ShardStream(sys.argv[1], "train", batch_size=2, batched=True)
    ds.set_epoch(0)
    loader = StreamLoader(ds, num_workers=1, persistent_workers=True)
    next(iter(loader))  # the workers stay up: the loader is alive until the interpreter exits
    print("batch", flush=True)
""")


def test_exit_with_live_persistent_workers(tiny_store):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_store)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "batch" in proc.stdout, proc.stderr[-2000:]
