"""The on-disk checkpoint format: file names, atomic publication, completeness, discovery, pruning.

This module is the only place that knows the names below; everything else asks it.

Layout of `<run_dir>/checkpoints/step_XXXXXXXX/`:
  trainer_state.json      step, epoch, LR controller, world size, mode (global rank 0)
  model.safetensors       full fp32 weights          (ddp; deepspeed: inside deepspeed/)
  optimizer.pt            optimizer state            (ddp, global rank 0)
  ema.safetensors         full EMA                   (replicated parameters, rank 0)
  ema_rank_RRRRR.safetensors   EMA partitions        (ZeRO-3, every rank)
  deepspeed/              engine.save_checkpoint(tag="deepspeed") (model + ZeRO optimizer shards)
  rank_RRRRR.pt           RNG states, data-stream position, loss generator (every rank)
  MANIFEST.json           written last: every file with its size

All ranks write into `.tmp-step_XXXXXXXX`; after a barrier global rank 0 lists the files into
MANIFEST.json, fsyncs, and renames the folder. A crash at any point leaves either a `.tmp-*`
folder (ignored, later removed) or a complete checkpoint. A folder whose files do not match its
manifest (truncated, deleted) is skipped by `latest_complete` with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("depthdif_hpc.checkpoint")

CHECKPOINTS = "checkpoints"  # <run_dir>/checkpoints/step_XXXXXXXX
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
MODEL = "model.safetensors"  # also the export folder's weights
EMA = "ema.safetensors"  # also the export folder's EMA weights
OPTIMIZER = "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"  # engine.save_checkpoint(tag=...): the subfolder DeepSpeed writes
CONFIG = "config.yaml"  # export folders carry the run's config beside the weights
EMA_SHARDS = "ema_rank_*.safetensors"
# <run_dir>/stopped.json: written after the checkpoint of a stop on a signal, removed when a run
# starts. A launcher requeues only when it finds it: any other way out (a crash in the final
# save, a full disk, a non-finite loss) ends the job instead of repeating the lost work.
STOPPED = "stopped.json"
_NAME = re.compile(r"^step_(\d{8,})$")


def ema_shard_name(rank: int) -> str:
    return f"ema_rank_{rank:05d}.safetensors"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def fsync_files(paths: list[Path]) -> None:
    """Flush files this process wrote to stable storage."""
    for f in paths:
        _fsync_path(f)


def write_manifest_and_publish(tmp: Path, final: Path, meta: dict) -> Path:
    """Global rank 0, after every rank wrote into `tmp`: manifest last, then atomic rename."""
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            _fsync_path(f)
            files[str(f.relative_to(tmp))] = f.stat().st_size
    manifest = {"format": 1, "written_at": time.time(), **meta, "files": files}
    part = tmp / (MANIFEST + ".part")
    with open(part, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, tmp / MANIFEST)
    _fsync_path(tmp)
    if final.exists():
        # Same step saved again (e.g. a signal right after a periodic save): keep the new one.
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    return final


def check_complete(ckpt: Path) -> str | None:
    """None when `ckpt` matches its manifest, else the reason it cannot be used."""
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        return "no MANIFEST.json (interrupted while writing)"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable MANIFEST.json ({exc})"
    for rel, size in manifest.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            return f"file {rel} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"file {rel} has {actual} bytes, manifest says {size} (truncated?)"
    if not manifest.get("files"):
        return "manifest lists no files"
    return None


def read_manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / MANIFEST).read_text())


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_complete(root: Path, warn: Callable[[str], object] = log.warning) -> Path | None:
    """Newest checkpoint that passes `check_complete`; broken newer ones are reported."""
    for step, d in reversed(list_checkpoints(root)):
        why = check_complete(d)
        if why is None:
            return d
        warn(f"ignoring checkpoint {d} (step {step}): {why}; trying an older one")
    return None


def mark_stopped(run_dir: Path, info: dict) -> Path:
    """Record (atomically) that the run checkpointed and stopped on a signal."""
    path = Path(run_dir) / STOPPED
    part = path.with_name(STOPPED + ".part")
    with open(part, "w") as fh:
        json.dump(info, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    _fsync_path(path.parent)
    return path


def clear_stopped(run_dir: Path) -> None:
    (Path(run_dir) / STOPPED).unlink(missing_ok=True)


def is_checkpoint(path: Path) -> bool:
    """A (possibly broken) checkpoint folder, as opposed to a run or export folder."""
    return (Path(path) / MANIFEST).is_file()


def resolve(path: str | Path) -> Path:
    """A checkpoint folder as it is; a run folder -> its newest complete checkpoint.

    Anything else (an export folder, a file) is returned unchanged for the caller to interpret.
    """
    p = Path(path)
    if (p / CHECKPOINTS).is_dir() and not is_checkpoint(p):
        newest = latest_complete(p / CHECKPOINTS)
        if newest is None:
            raise FileNotFoundError(f"{p / CHECKPOINTS} holds no complete checkpoint")
        return newest
    return p


def _best_of(complete: list[tuple[int, Path]]) -> Path | None:
    best: tuple[float, int, Path] | None = None
    for step, d in complete:
        value = read_manifest(d).get("val_loss")
        if isinstance(value, int | float) and math.isfinite(value):
            if best is None or (value, -step) <= (best[0], -best[1]):
                best = (float(value), step, d)
    return best[2] if best else None


def best_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the lowest `val_loss` in its manifest (None: none has one).

    The trainer records the checkpoint-selection loss of the latest validation (EMA weights when
    evaluated with EMA) in each manifest; ties go to the newer checkpoint.
    """
    return _best_of([(s, d) for s, d in list_checkpoints(root) if check_complete(d) is None])


def prune(root: Path, keep: int, keep_best: bool = True) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and, with `keep_best`, the best one.

    Step folders that fail their manifest check are deleted too once a newer complete checkpoint
    exists (they can never be resumed from); the newest ones are left for inspection.
    """
    steps = list_checkpoints(root)
    complete = [(s, d) for s, d in steps if check_complete(d) is None]  # each folder checked once
    spare = {d for _, d in complete[-keep:]} if keep > 0 else set()
    best = _best_of(complete) if keep_best else None
    if best is not None:
        spare.add(best)
    whole = {d for _, d in complete}
    newest_complete = complete[-1][0] if complete else None
    removed = []
    for s, d in steps:
        if (d in whole and d not in spare) or \
                (d not in whole and newest_complete is not None and s < newest_complete):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def remove_stale_temporaries(root: Path) -> None:
    if root.is_dir():
        for d in root.glob(".tmp-step_*"):
            log.warning(f"removing interrupted checkpoint write {d}")
            shutil.rmtree(d, ignore_errors=True)
