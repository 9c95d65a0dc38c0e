"""Single-process trainer tests (CPU, fp32, in-process through the real entry point)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from common import args, steps
from memdata import factory
from safetensors.torch import load_file, save_file

from depthdif_hpc.checkpoint import layout as ckpt
from depthdif_hpc.checkpoint.export import export
from depthdif_hpc.checkpoint.weights import load_weights
from depthdif_hpc.train.cli import main


def _run(run_dir, *extra, hooks=None, ambient=False, data=None) -> int:
    return main(args(run_dir, *extra, ambient=ambient), data_factory=data or factory(), hooks=hooks)


@pytest.mark.parametrize("ambient", [False, True], ids=["standard", "ambient"])
def test_steps_of_each_objective(tmp_path, ambient):
    """A few optimizer steps with validation and the full reconstruction; layout of run_dir."""
    run = tmp_path / "run"
    code = _run(run, "trainer.max_steps=4", "trainer.val_every_n_steps=4", "trainer.full_reconstruction=true",
                "trainer.gradient_accumulation_steps=2", ambient=ambient)
    assert code == 0
    recs = steps(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert "samples_per_s" in recs[-1] and "data_wait_s_per_step" in recs[-1] and "peak_mem_gib" in recs[-1]
    assert (run / "config.yaml").is_file() and list((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "val").iterdir()) == ["step_00000004_depth_error.png",
                                                               "step_00000004_recon.png"]
    final = run / "checkpoints" / "step_00000004"
    assert ckpt.check_complete(final) is None
    assert {"model.safetensors", "optimizer.pt", "ema.safetensors", "rank_00000.pt", "trainer_state.json",
            "MANIFEST.json"} <= {p.name for p in final.iterdir()}
    tb_text = b"".join(p.read_bytes() for p in (run / "tb").iterdir())
    for tag in (b"val/recon_mse_full_recon", b"val/recon_psnr_full_recon", b"val/recon_ssim_full_recon",
                b"val/loss_ckpt", b"train/loss", b"perf/samples_per_s"):
        assert tag in tb_text


def test_bf16_mixed_precision_path(tmp_path):
    """trainer.precision=bf16 (GPU's default) exercised on CPU autocast: training, validation and
    the full reconstruction run without falling back to placeholders, weights stay fp32."""
    import re

    run = tmp_path / "run"
    assert _run(run, "trainer.precision=bf16", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
                "trainer.full_reconstruction=true") == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps(run))
    text = (run / "logs" / "rank_00000.log").read_text()
    assert "full reconstruction failed" not in text, text
    m = re.search(r"validation step 3: .*val/recon_psnr_full_recon=([-\d.e+]+)", text)
    assert m and 0 < float(m.group(1)) < 100, text
    weights = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}


def test_resume_exact_and_ema_by_hand(tmp_path):
    """2N steps straight == N steps, SIGUSR1 (exit 75, checkpoint), resume, N steps: identical
    weights, optimizer state and EMA; steps.jsonl holds every step once. The straight run's EMA
    equals an average computed by hand from the weights recorded after every step."""
    n = 3
    seen: list[dict[str, torch.Tensor]] = []

    def record(tr):
        seen.append({k: v.detach().clone() for k, v in tr.module.state_dict().items()})

    straight = tmp_path / "straight"
    assert _run(straight, f"trainer.max_steps={2 * n}", hooks={"after_step": record}) == 0

    def stop_at_n(tr):
        if tr.step == n:
            os.kill(os.getpid(), signal.SIGUSR1)

    split = tmp_path / "split"
    assert _run(split, f"trainer.max_steps={2 * n}", hooks={"after_step": stop_at_n}) == 75
    assert [p.name for _, p in ckpt.list_checkpoints(split / "checkpoints")] == [f"step_{n:08d}"]
    assert _run(split, f"trainer.max_steps={2 * n}") == 0

    a = straight / "checkpoints" / f"step_{2 * n:08d}"
    b = split / "checkpoints" / f"step_{2 * n:08d}"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = torch.load(a / "optimizer.pt", weights_only=False)
    ob = torch.load(b / "optimizer.pt", weights_only=False)
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for key, val in st.items():
            assert torch.equal(val, ob["state"][i][key]), (i, key)
    ea, eb = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    for k in ea:
        assert torch.equal(ea[k], eb[k]), k
    assert [r["step"] for r in steps(split)] == list(range(1, 2 * n + 1))
    assert [r["loss"] for r in steps(split)] == [r["loss"] for r in steps(straight)]

    # EMA by hand: start_step=1, decay 0.8, every step.
    decay = 0.8
    ema = {k: v.clone() for k, v in seen[0].items()}
    for w in seen[1:]:
        ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
    for k in ema:
        torch.testing.assert_close(ea[k], ema[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(ea[k], wa[k])


def test_truncated_checkpoint_is_ignored(tmp_path):
    run = tmp_path / "run"
    assert _run(run, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2") == 0
    newest = run / "checkpoints" / "step_00000004"
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    warnings: list[str] = []
    assert ckpt.latest_complete(run / "checkpoints", warn=warnings.append) == run / "checkpoints" / "step_00000002"
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "truncated" in warnings[0]
    # An interrupted write (no manifest) is never picked up either.
    (run / "checkpoints" / "step_00000006").mkdir()
    (run / "checkpoints" / "step_00000006" / "model.safetensors").write_bytes(b"x")
    assert ckpt.latest_complete(run / "checkpoints") == run / "checkpoints" / "step_00000002"
    # resume: auto continues from step 2; steps 3 and 4 are logged again only once.
    assert _run(run, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2") == 0
    log_text = (run / "logs" / "rank_00000.log").read_text()
    assert "ignoring checkpoint" in log_text and "truncated" in log_text
    assert "resumed from" in log_text and "step_00000002: step 2" in log_text
    assert [r["step"] for r in steps(run)] == [1, 2, 3, 4]


def test_new_run_in_a_used_run_folder_is_refused(tmp_path, capsys):
    """trainer.resume=none among an old run's checkpoints: refused, and nothing is touched."""
    run = tmp_path / "run"
    assert _run(run, "trainer.max_steps=2") == 0
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    log_before = (run / "steps.jsonl").read_text()
    assert _run(run, "trainer.max_steps=4", "trainer.resume=none", "training.lr=5e-4") == 2
    err = capsys.readouterr().err
    assert "trainer.resume = 'none'" in err and "already holds checkpoints (steps 2..2)" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert (run / "steps.jsonl").read_text() == log_before
    # auto continues the old run
    assert _run(run, "trainer.max_steps=4") == 0
    assert [r["step"] for r in steps(run)] == [1, 2, 3, 4]


def test_nonfinite_loss_stops_with_step_and_sample_ids(tmp_path, capsys):
    run = tmp_path / "run"
    from memdata import MemoryStream

    # Poison the first sample of step 3 (batch 2, epoch 0 order of the seeded stream).
    victim = MemoryStream(24, 2, 0, 1, seed=0)._order()[4]
    code = _run(run, "trainer.max_steps=12", "trainer.checkpoint_every_n_steps=1",
                "trainer.log_every_n_steps=4", data=factory(nan_sample=victim))
    assert code == 3
    err = capsys.readouterr().err
    assert "non-finite training loss" in err
    assert f"{{0: [{victim}, " in err.split("sample ids")[1]
    bad_step = int(err.split("optimizer step ")[1].split(";")[0])
    assert bad_step == 3
    saved = [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")]
    assert saved and max(saved) == bad_step - 1  # nothing written at or after the bad step
    for _, d in ckpt.list_checkpoints(run / "checkpoints"):
        w = load_file(str(d / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in w.values())


def test_config_disagreements_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(run, "trainer.global_batch_size=64") == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m depthdif_hpc.train: error: configuration refused: ")
    assert "trainer.global_batch_size = 64" in err
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}')
    assert _run(run, "trainer.distributed=deepspeed", f"trainer.deepspeed_config={ds}") == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu = 8" in err and "dataloader.batch_size = 2" in err
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    assert _run(run, "trainer.distributed=deepspeed", f"trainer.deepspeed_config={ds}",
                "trainer.zero_stage=3") == 2
    assert "stage = 2 disagrees with trainer.zero_stage = 3" in capsys.readouterr().err
    # bf16 needs the engine's own autocast (DeepSpeed switches off one entered outside it)
    ds.write_text('{"torch_autocast": {"enabled": false}}')
    assert _run(run, "trainer.distributed=deepspeed", f"trainer.deepspeed_config={ds}",
                "trainer.precision=bf16") == 2
    assert "torch_autocast.enabled = False with bf16" in capsys.readouterr().err
    ds.write_text('{"torch_autocast": {"enabled": true}}')
    assert _run(run, "trainer.distributed=deepspeed", f"trainer.deepspeed_config={ds}") == 2
    assert "torch_autocast.enabled is true but trainer.precision resolved to fp32" in capsys.readouterr().err


def test_warm_start_and_export(tmp_path):
    run = tmp_path / "run"
    assert _run(run, "trainer.max_steps=2") == 0
    out = tmp_path / "export"
    written = export(run, out)
    assert set(written) == {"model", "ema"}
    w = load_file(str(written["model"]))
    ref = load_file(str(run / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    # Warm start from the export and from the checkpoint folder: weights only, fresh run at step 0.
    from helpers import tiny_config

    from depthdif_hpc.model.build import build_model

    for src in (written["model"], run / "checkpoints" / "step_00000002", out):
        m = build_model(tiny_config())
        load_weights(m, src)
        assert all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)
    run2 = tmp_path / "warm"
    assert _run(run2, "trainer.max_steps=1", f"model.load_checkpoint={written['model']}") == 0
    assert [r["step"] for r in steps(run2)] == [1]
    # Weights trained without the x0 skip warm-start a model with it: the skip starts at its
    # initial variance, every other tensor comes from the file; nothing else may be missing.
    skip = build_model(tiny_config(overrides=["model.x0_skip=gaussian"]))
    init = skip.state_dict()["x0_skip.log_var_scaled"].clone()
    note = load_weights(skip, written["model"])
    assert "x0_skip.log_var_scaled" in note and "initial values" in note
    assert torch.equal(skip.state_dict()["x0_skip.log_var_scaled"], init)
    assert all(torch.equal(skip.state_dict()[k], ref[k]) for k in ref)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in ref.items() if k != next(iter(ref))}, str(partial))
    with pytest.raises(ValueError, match="missing from the file"):
        load_weights(build_model(tiny_config()), partial)
    bad = tmp_path / "bad.safetensors"
    wrong = {k: v.clone() for k, v in ref.items()}
    first = next(iter(wrong))
    wrong[first] = torch.zeros(3)
    save_file(wrong, str(bad))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_weights(build_model(tiny_config()), bad)


def test_product_data_stream_resume(tmp_path):
    """The real path: depthdif_hpc.data's sharded store and stream (tiny synthetic store), with
    a stop signal mid-epoch and a resume that continues at the saved stream position."""
    from depthdif_hpc.data.synthetic import build_tiny_store

    store = build_tiny_store(tmp_path / "store", tile_size=32)
    run = tmp_path / "run"
    base = [f"dataset.store={store}", "dataloader.num_workers=0", "trainer.max_steps=5",
            "trainer.val_at_epoch_end=false", "trainer.ema.enabled=false", "trainer.record_sample_ids=true"]

    def stop_at_1(tr):
        if tr.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    assert main(args(run, *base), hooks={"after_step": stop_at_1}) == 75
    assert main(args(run, *base)) == 0
    recs = steps(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in recs] == [0, 0, 0, 0, 1]  # 8 train samples / batch 2 = 4 steps
    straight = tmp_path / "straight"
    assert main(args(straight, *base)) == 0
    assert [r["loss"] for r in steps(straight)] == [r["loss"] for r in recs]
    # The sample audit: each step once across the resume, the same samples as the straight run,
    # and the first epoch (steps 1-4) sees each of the 8 training samples exactly once.
    ids = [json.loads(line) for line in (run / "logs" / "samples_rank_00000.jsonl").read_text().splitlines()]
    ids_straight = (straight / "logs" / "samples_rank_00000.jsonl").read_text().splitlines()
    assert [r["step"] for r in ids] == [1, 2, 3, 4, 5]
    assert ids == [json.loads(line) for line in ids_straight]
    epoch0 = [i for r in ids[:4] for i in r["ids"]]
    assert len(epoch0) == 8 and len(set(epoch0)) == 8, epoch0


def test_signal_during_startup_is_honoured_at_the_first_step(tmp_path):
    """A preemption signal that arrives while the trainer is still setting up is not fatal: the
    first step boundary (before step 1) checkpoints and exits 75; a rerun resumes from there."""
    import os
    import signal

    base = factory()

    def signalling_factory(cfg, split, rank, world):
        if split == "train":
            os.kill(os.getpid(), signal.SIGUSR1)  # lands in the middle of _setup
        return base(cfg, split, rank, world)

    assert _run(tmp_path, "trainer.max_steps=4", data=signalling_factory) == 75
    assert (tmp_path / "checkpoints" / "step_00000000" / "MANIFEST.json").is_file()
    assert _run(tmp_path, "trainer.max_steps=4") == 0
    assert [s["step"] for s in steps(tmp_path)] == [1, 2, 3, 4]

