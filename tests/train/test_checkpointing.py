"""What the trainer writes into a checkpoint and when it refuses to: the validation loss that
picks the best checkpoint, each writer's flush, the free-space check."""

from __future__ import annotations

from common import args
from memdata import factory

from depthdif_hpc.checkpoint import layout as ckpt
from depthdif_hpc.train.cli import main


def _run(run_dir, *extra) -> int:
    return main(args(run_dir, *extra), data_factory=factory())


def test_checkpoints_record_val_loss_and_the_best_survives(tmp_path):
    run = tmp_path / "run"
    assert _run(run, "trainer.max_steps=6", "trainer.val_every_n_steps=2",
                "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_checkpoints=1") == 0
    kept = ckpt.list_checkpoints(run / "checkpoints")
    losses = {s: ckpt.read_manifest(d)["val_loss"] for s, d in kept}
    assert all(isinstance(v, float) for v in losses.values())
    best = ckpt.best_checkpoint(run / "checkpoints")
    assert best is not None and kept[-1][0] == 6 and best in [d for _, d in kept]
    assert len(kept) <= 2


def test_every_file_of_a_checkpoint_is_flushed_by_its_writer(tmp_path, monkeypatch):
    flushed: list = []
    monkeypatch.setattr(ckpt, "fsync_files", lambda paths: flushed.extend(p.name for p in paths))
    run = tmp_path / "run"
    assert _run(run, "trainer.max_steps=2") == 0
    files = {p.name for p in (run / "checkpoints" / "step_00000002").iterdir()} - {"MANIFEST.json"}
    assert files and files == set(flushed)


def test_a_save_the_disk_cannot_hold_is_refused_by_name(tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    run = tmp_path / "run"
    assert _run(run, "trainer.max_steps=2") == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 4096, 4096))
    assert _run(run, "trainer.max_steps=4") == 1
    err = capsys.readouterr().err
    assert "not enough space for a checkpoint in" in err and str(run / "checkpoints") in err, err
    assert "bytes needed" in err and "4,096 free" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing half-written
    assert not (run / "stopped.json").exists()
