"""Which checkpoints a run keeps: the newest N, the best by validation loss, nothing broken."""

from __future__ import annotations

import json
from pathlib import Path

from depthdif_hpc.checkpoint import layout


def _fake(root: Path, step: int, val_loss: float | None = None, complete: bool = True) -> Path:
    d = root / layout.step_dir_name(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * step)
    if complete:
        (d / layout.MANIFEST).write_text(json.dumps(
            {"step": step, "val_loss": val_loss, "files": {"model.safetensors": step}}))
    return d


def _steps(root: Path) -> list[int]:
    return [s for s, _ in layout.list_checkpoints(root)]


def test_keeps_newest_and_best(tmp_path):
    for step, loss in [(1, 0.9), (2, 0.3), (3, 0.5), (4, 0.6), (5, None), (6, 0.4)]:
        _fake(tmp_path, step, loss)
    assert layout.best_checkpoint(tmp_path) == tmp_path / layout.step_dir_name(2)
    removed = layout.prune(tmp_path, keep=2)
    assert _steps(tmp_path) == [2, 5, 6]
    assert sorted(p.name for p in removed) == [layout.step_dir_name(s) for s in (1, 3, 4)]


def test_without_keep_best_only_the_newest_stay(tmp_path):
    for step, loss in [(1, 0.1), (2, 0.9), (3, 0.9)]:
        _fake(tmp_path, step, loss)
    layout.prune(tmp_path, keep=1, keep_best=False)
    assert _steps(tmp_path) == [3]


def test_ties_and_non_finite_losses(tmp_path):
    _fake(tmp_path, 1, float("nan"))
    _fake(tmp_path, 2, 0.5)
    _fake(tmp_path, 3, 0.5)
    assert layout.best_checkpoint(tmp_path) == tmp_path / layout.step_dir_name(3)  # the newer tie


def test_broken_folders_go_once_a_newer_checkpoint_is_complete(tmp_path):
    _fake(tmp_path, 1, 0.5)
    _fake(tmp_path, 2, complete=False)  # no manifest: can never be resumed from
    layout.prune(tmp_path, keep=3)
    assert _steps(tmp_path) == [1, 2]  # the newest folder is broken: left for inspection
    _fake(tmp_path, 3, 0.6)
    layout.prune(tmp_path, keep=3)
    assert _steps(tmp_path) == [1, 3]


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".tmp-step_00000007").mkdir()
    (tmp_path / ".tmp-step_00000007" / "rank_00000.pt").write_bytes(b"half")
    _fake(tmp_path, 5, 0.1)
    layout.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [layout.step_dir_name(5)]
