"""The trainer's speed options (docs/cluster.md, "Speed options") on CPU: each one leaves the
numbers of the default step (fp32 tolerance) and is really in effect.

torch.compile runs with backend aot_eager here: it traces the same graph (custom kernel ops kept
whole, autograd through AOTAutograd) but generates no code. Inductor's C++ code generation took
171 s for this tiny U-Net on the 2-core test machine (forward + backward), too long for every
option; tests/kernels/test_inductor.py compiles one U-Net with inductor around the kernels, and
the GPU benchmark command measures the inductor step (docs/gpu_run.md).
"""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pytest
import torch
from common import args, steps, torchrun
from memdata import factory
from safetensors.torch import load_file

from depthdif_hpc.config import ConfigError, load_config
from depthdif_hpc.model.unet import UNet
from depthdif_hpc.train.cli import main
from depthdif_hpc.train.optim import build_optimizer
from depthdif_hpc.train.setup import apply_speed_options

OPTIONS = ["trainer.compile=true", "trainer.compile_backend=aot_eager", "trainer.channels_last=true",
           "trainer.fused_adamw=true", "trainer.activation_checkpointing=all",
           "trainer.cudnn_benchmark=true"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the trainer tests run (trainer.intra_op_threads=1): on a shared
    2-core machine two threads per process made this tiny U-Net's step up to 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(tmp_path, *extra: str):
    a = args(tmp_path, *extra)
    files = [x for i, x in enumerate(a) if i and a[i - 1] == "--config"]
    return load_config(*files, overrides=[x for x in a if "=" in x])


def _unet() -> UNet:
    torch.manual_seed(0)
    # FiLM (coord embedding), a first block without LN and a mid level: every block kind.
    return UNet(8, 3, (1, 2), channels=6, coord_emb_dim=4)


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 6, 16, 16, generator=g), torch.randint(0, 20, (2,), generator=g),
            torch.randn(2, 4, generator=g))


def _fwd_bwd(model: UNet) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(*_inputs())
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("weights", [True, False], ids=["weights_too", "activations_only"])
def test_channels_last_matches_contiguous_and_stays_channels_last(weights):
    """weights=False is the DeepSpeed layout (its flat byte views need NCHW parameters)."""
    ref = _unet()
    cl = copy.deepcopy(ref)
    cl.set_channels_last(True, weights=weights)
    four_d = [m.weight for m in cl.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    # The 3x3/4x4 convolutions over several channels: where the two formats differ in memory.
    differs = [p for p in four_d if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    assert len(differs) >= 10
    if weights:
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
        assert not any(p.is_contiguous() for p in differs)
    else:
        assert all(p.is_contiguous() for p in four_d)
    formats: list[tuple[str, bool]] = []
    for name, m in cl.named_modules():
        # Without NHWC weights the attention's output projection reads the attention's NCHW
        # reshape and writes NCHW; the stage re-asserts the format after it (one copy).
        in_attention = type(m).__name__ == "Residual" or ".fn." in name
        if (isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) or type(m).__name__ in (
                "ConvNextBlock", "Residual")) and (weights or not in_attention):
            m.register_forward_hook(lambda m, i, o, name=name: formats.append(
                (name, o.is_contiguous(memory_format=torch.channels_last))))
    out = _fwd_bwd(cl)
    assert formats and all(ok for _, ok in formats), [n for n, ok in formats if not ok]
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    _assert_same(out, _fwd_bwd(ref))


@pytest.mark.parametrize("levels", ["all", [0], [1]])
def test_activation_checkpointing_same_gradients_and_recomputes(levels):
    ref, ck = _unet(), _unet()
    ck.set_activation_checkpointing(levels)
    calls = {"level0": 0, "level1": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    ck.downs[0][0].register_forward_hook(count("level0"))  # first block, level 0
    ck.mid_block1.register_forward_hook(count("level1"))  # bottleneck, level 1
    _assert_same(_fwd_bwd(ck), _fwd_bwd(ref))
    chosen = {0, 1} if levels == "all" else set(levels)
    # A checkpointed block runs again during the backward pass.
    assert calls == {f"level{i}": 2 if i in chosen else 1 for i in (0, 1)}


def test_bad_checkpointing_levels_refused(tmp_path):
    with pytest.raises(ValueError, match=r"levels \[2\].*0\.\.1"):
        _unet().set_activation_checkpointing([2])
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing.*2 levels"):
        _cfg(tmp_path, "trainer.activation_checkpointing=[0,2]")
    with pytest.raises(ConfigError, match="trainer.activation_checkpointing.*'none', 'all'"):
        _cfg(tmp_path, "trainer.activation_checkpointing=some")
    with pytest.raises(ConfigError, match="trainer.compile_mode.*inductor"):
        _cfg(tmp_path, "trainer.compile_backend=aot_eager", "trainer.compile_mode=max-autotune")


def test_fused_adamw_matches_foreach(tmp_path):
    results = []
    for fused in (False, True):
        cfg = _cfg(tmp_path, f"trainer.fused_adamw={str(fused).lower()}")
        model = _unet()
        opt = build_optimizer(model, cfg)
        assert bool(opt.defaults["fused"]) is fused and bool(opt.defaults["foreach"]) is not fused
        for _ in range(3):
            _fwd_bwd(model)
            opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(results[1][k], _unet().state_dict()[k]) for k in results[1])


def test_compiled_runs_keep_inductors_cache_in_the_run_directory(tmp_path, monkeypatch):
    """A requeued job (other nodes, an empty /tmp) must find the compiled U-Net where the run
    lives; a cache the user names wins; aot_eager generates nothing to cache."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "x")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    model = torch.nn.Module()
    model.model = _unet()
    cfg = _cfg(tmp_path, "trainer.compile=true", "trainer.compile_backend=aot_eager")
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    assert "cache" not in apply_speed_options(model, cfg, 0)
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir())
    cfg = _cfg(tmp_path, "trainer.compile=true", "trainer.compile_backend=inductor")
    said = apply_speed_options(model, cfg, 0)  # compiles lazily: nothing is built here
    want = str((Path(cfg.trainer.run_dir) / "compile_cache").resolve())
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == want and f"(cache {want})" in said
    assert cache_dir() == want  # what inductor itself will use
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert f"(cache {tmp_path / 'mine'})" in apply_speed_options(model, cfg, 0)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_refusals(tmp_path):
    cfg = _cfg(tmp_path, "trainer.compile=true")
    model = torch.nn.Module()
    model.model = _unet()
    with pytest.raises(ConfigError, match="trainer.compile.*ZeRO stage 3"):
        apply_speed_options(model, cfg, zero_stage=3)
    with pytest.raises(ConfigError, match="trainer.channels_last applies to the diffusion U-Net"):
        apply_speed_options(torch.nn.Linear(2, 2), _cfg(tmp_path, "trainer.channels_last=true"), 0)
    with pytest.raises(ConfigError, match="trainer.channels_last.*true, false or 'auto'"):
        _cfg(tmp_path, "trainer.channels_last=nhwc")


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_channels_last_auto_is_on_with_cuda_only(tmp_path, monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = _cfg(tmp_path)
    assert cfg.trainer.channels_last == "auto"  # the default, not set by the test's presets
    model = torch.nn.Module()
    model.model = _unet()
    said = apply_speed_options(model, cfg, 0)
    assert said.startswith(f"channels_last {'on' if cuda else 'off'} (auto), compile off"), said
    # a weight whose two formats differ in memory (not a depthwise or 1x1 one)
    conv = next(m for m in model.model.modules() if isinstance(m, torch.nn.Conv2d)
                and m.groups == 1 and m.in_channels > 1 and m.kernel_size != (1, 1))
    assert model.model.memory_format == (torch.channels_last if cuda else torch.contiguous_format)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == cuda
    # "auto" is no request: a model without a U-Net (the autoencoder) is left alone
    apply_speed_options(torch.nn.Linear(2, 2), cfg, 0)


def _run(run_dir: Path, *extra: str, hooks=None) -> int:
    return main(args(run_dir, "trainer.max_steps=4", *extra), data_factory=factory(), hooks=hooks)


def test_training_with_every_option_matches_eager(tmp_path):
    """compile + channels_last + fused AdamW + checkpointing + cudnn.benchmark through the real
    entry point: losses of every step equal the default run's within fp32 tolerance."""
    seen: dict[str, object] = {}

    def record_input(module, inputs) -> None:
        seen.setdefault("input_requires_grad", inputs[0].requires_grad)

    def eager_hook(tr):
        if tr.step == 1:  # the next step's U-Net input
            tr.module.model.register_forward_pre_hook(record_input)

    def options_hook(tr):
        unet = tr.module.model
        seen["wrapper"] = type(tr.model).__name__
        seen["compiled"] = unet._compiled_call_impl is not None
        seen["channels_last"] = unet.downs[0][0].ds_conv.weight.is_contiguous(memory_format=torch.channels_last)
        seen["checkpointed"] = sorted(unet.checkpoint_levels)
        seen["benchmark"] = torch.backends.cudnn.benchmark

    before = torch.backends.cudnn.benchmark
    try:
        assert _run(tmp_path / "eager", hooks={"after_step": eager_hook}) == 0
        assert _run(tmp_path / "fast", *OPTIONS, hooks={"after_step": options_hook}) == 0
    finally:
        torch.backends.cudnn.benchmark = before
        torch._dynamo.reset()
    # The network input (noisy target + condition) carries no gradient: nobody uses one.
    assert seen.pop("input_requires_grad") is False
    # Accelerate wraps even one process in DDP here: the compiled U-Net runs inside DDP.
    assert seen == {"compiled": True, "channels_last": True, "checkpointed": [0, 1], "benchmark": True,
                    "wrapper": "DistributedDataParallel"}
    eager, fast = steps(tmp_path / "eager"), steps(tmp_path / "fast")
    assert [r["step"] for r in fast] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in fast]),
                               torch.tensor([r["loss"] for r in eager]), rtol=1e-4, atol=1e-6)


def test_channels_last_resume_is_bit_exact(tmp_path):
    """channels_last (the CUDA default): 4 steps straight == 2 steps, SIGUSR1, resume, 2 steps:
    the same weights bit for bit (checkpoints are written contiguous and loaded back into the
    channels_last parameters), and the same losses."""
    def stop_at_2(tr):
        if tr.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    cl = "trainer.channels_last=true"
    assert _run(tmp_path / "straight", cl) == 0
    assert _run(tmp_path / "split", cl, hooks={"after_step": stop_at_2}) == 75
    assert _run(tmp_path / "split", cl) == 0
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "step_00000004" / "model.safetensors"))
            for r in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in steps(tmp_path / "split")] == [r["loss"] for r in steps(tmp_path / "straight")]


BASE_MULTI = ["trainer.max_steps=3"]


@pytest.fixture(scope="module")
def ddp_two_ranks(tmp_path_factory) -> Path:
    """The reference: the default two-rank DDP run, no speed option."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun(out / "eager", args(out / "eager_run", *BASE_MULTI))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_compiled_step_under_zero(tmp_path, ddp_two_ranks, stage):
    """Two ranks: the compiled, channels_last, checkpointed U-Net with fused AdamW as DeepSpeed
    ZeRO-1/2's client optimizer trains to the same weights as the default two-rank DDP run.
    (DDP with every option: test_training_with_every_option_matches_eager.)"""
    # trainer.zero_stage: the run stops unless the DeepSpeed config's stage is this one.
    zero = ["trainer.distributed=deepspeed", f"trainer.deepspeed_config=configs/deepspeed/zero{stage}.json",
            f"trainer.zero_stage={stage}"]
    torchrun(tmp_path / "fast", args(tmp_path / "fast_run", *BASE_MULTI, *OPTIONS, *zero))
    ref, got = torch.load(ddp_two_ranks / "eager.params.pt"), torch.load(tmp_path / "fast.params.pt")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in steps(tmp_path / "fast_run")]),
                               torch.tensor([r["loss"] for r in steps(ddp_two_ranks / "eager_run")]),
                               rtol=1e-4, atol=1e-6)
