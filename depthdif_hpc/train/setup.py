"""Start-up: the Accelerator (DDP or DeepSpeed ZeRO through Accelerate) and the cross-checks that
refuse a config whose batch sizes, ZeRO stage, precision or world size disagree."""

from __future__ import annotations

import copy
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from depthdif_hpc.config import Config, ConfigError
from depthdif_hpc.model.unet import UNet


def resolve_precision(cfg: Config) -> str:
    """'bf16' or 'fp32' (project decision, docs/model.md#precision: bf16 on GPUs, fp32 on CPU)."""
    p = cfg.trainer.precision
    if p == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return p


def resolve_channels_last(cfg: Config) -> bool:
    """trainer.channels_last with "auto" resolved: on CUDA only (docs/cluster.md, "Speed options")."""
    cl = cfg.trainer.channels_last
    return torch.cuda.is_available() if cl == "auto" else bool(cl)


def _load_ds_file(path: str) -> dict:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"trainer.deepspeed_config = {path!r}: file not found")
    text = f.read_text()
    try:
        if f.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            return OmegaConf.to_container(OmegaConf.create(text), resolve=True)  # type: ignore[return-value]
        return json.loads(text)
    except Exception as exc:  # json and yaml raise different types
        raise ConfigError(f"trainer.deepspeed_config = {path!r}: cannot parse: {exc}") from exc


def deepspeed_config(cfg: Config, world_size: int, precision: str) -> dict:
    """The DeepSpeed config file with the trainer's numbers filled in; disagreements refused.

    A value of "auto" (or a missing key) takes the trainer's number; an explicit value must agree.
    """
    path = cfg.trainer.deepspeed_config
    assert path is not None
    ds = copy.deepcopy(_load_ds_file(path))
    tr, dl = cfg.trainer, cfg.dataloader
    want = {
        "train_micro_batch_size_per_gpu": (dl.batch_size, "dataloader.batch_size"),
        "gradient_accumulation_steps": (tr.gradient_accumulation_steps, "trainer.gradient_accumulation_steps"),
        "train_batch_size": (dl.batch_size * tr.gradient_accumulation_steps * world_size,
                             f"dataloader.batch_size ({dl.batch_size}) x trainer.gradient_accumulation_steps "
                             f"({tr.gradient_accumulation_steps}) x world size ({world_size})"),
        "gradient_clipping": (float(tr.gradient_clip_val), "trainer.gradient_clip_val"),
    }
    for key, (value, source) in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif float(have) != float(value):
            raise ConfigError(f"{path}: {key} = {have} disagrees with {source} = {value}")
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage == "auto":
        stage = zero["stage"] = tr.zero_stage if tr.zero_stage is not None else 0
    if tr.zero_stage is not None and int(stage) != tr.zero_stage:
        raise ConfigError(f"{path}: zero_optimization.stage = {stage} disagrees with trainer.zero_stage = {tr.zero_stage}")
    if ds.get("fp16", {}).get("enabled") in (True, "true"):
        raise ConfigError(f"{path}: fp16.enabled is true; this project trains in bf16 (GPU) or fp32 (CPU)")
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") not in ("auto", precision == "bf16"):
        raise ConfigError(f"{path}: bf16.enabled = {bf16['enabled']} disagrees with trainer.precision "
                          f"(resolved to {precision})")
    bf16["enabled"] = precision == "bf16"
    ds.setdefault("fp16", {})["enabled"] = False
    if precision == "bf16":
        # Gradients are accumulated in fp32 across micro-batches: summing bf16 micro-batch
        # gradients would lose the small ones.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    _torch_autocast(ds, path, precision)
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{path}: remove the 'optimizer'/'scheduler' sections: the trainer builds AdamW "
                          "and controls the learning rate itself (docs/model.md#training)")
    # Torch AdamW with CPU offload must not be swapped for DeepSpeed's compiled CPU Adam.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _torch_autocast(ds: dict, path: str, precision: str) -> None:
    """The engine runs the model under bf16 autocast itself (DeepSpeed's `torch_autocast`).

    DeepSpeed (0.18 on) switches off, inside its engine, any CUDA autocast entered outside it, and
    its bf16 mode casts the parameters to bf16: the model's fp32 pieces (the sinusoidal time
    embedding, the fp32 first-block input, the fp32 loss) then meet bf16 weights with no autocast
    to reconcile them. On an H100 the first step failed so ("mat1 and mat2 must have the same
    dtype", docs/model.md#precision); CPU runs did not see it because the engine only looks for
    CUDA autocast. `lower_precision_safe_modules` is empty: the parameters already are the bf16
    working copy, whose gradients reduce in the engine's communication dtype; listing modules
    would only tag them with the same dtype.
    """
    ta = ds.get("torch_autocast")
    if precision != "bf16":
        if ta is not None and ta.get("enabled") in (True, "true"):
            raise ConfigError(f"{path}: torch_autocast.enabled is true but trainer.precision resolved to "
                              f"{precision}; the trainer sets torch_autocast itself for bf16")
        return
    if ta is None:
        ta = ds["torch_autocast"] = {}
    if ta.get("enabled", "auto") not in ("auto", True):
        raise ConfigError(f"{path}: torch_autocast.enabled = {ta['enabled']} with bf16: the engine would run "
                          "bf16 weights without autocast; leave it out or set it to \"auto\"")
    if ta.get("dtype", "bfloat16") not in ("bfloat16", "bf16", "auto"):
        raise ConfigError(f"{path}: torch_autocast.dtype = {ta['dtype']} disagrees with trainer.precision (bf16)")
    ta.update(enabled=True, dtype="bfloat16")
    ta.setdefault("lower_precision_safe_modules", [])


def check_world(cfg: Config, world_size: int) -> None:
    tr, dl = cfg.trainer, cfg.dataloader
    if tr.global_batch_size is not None:
        got = dl.batch_size * tr.gradient_accumulation_steps * world_size
        if got != tr.global_batch_size:
            raise ConfigError(
                f"trainer.global_batch_size = {tr.global_batch_size} but dataloader.batch_size "
                f"({dl.batch_size}) x trainer.gradient_accumulation_steps ({tr.gradient_accumulation_steps}) "
                f"x world size ({world_size}) = {got}")
    if tr.distributed == "ddp" and tr.zero_stage not in (None, 0):
        raise ConfigError(f"trainer.zero_stage = {tr.zero_stage} needs trainer.distributed=deepspeed "
                          "(it is 'ddp')")


def make_accelerator(cfg: Config, world_size: int) -> tuple[Any, str, dict | None]:
    """The Accelerator for trainer.distributed; returns (accelerator, precision, ds_config)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # bf16 on CPU (explicit trainer.precision=bf16) runs under CPU autocast: slow, but it exercises
    # the GPU's mixed-precision path where there is no GPU.
    precision = resolve_precision(cfg)
    check_world(cfg, world_size)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    # How long a rank waits in a collective for a peer that hangs (a dead peer usually breaks
    # the connection sooner); then it fails and the launcher ends the job.
    pg = InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
    kwargs: dict[str, Any] = dict(
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        kwargs_handlers=[pg],
        log_with=None,
    )
    ds_cfg = None
    if cfg.trainer.distributed == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        class _Plugin(DeepSpeedPlugin):
            """Accelerate 1.x imports transformers here only to register a config weak reference
            that transformers' from_pretrained uses for zero.Init; we build the model ourselves
            (whole, then partitioned by the engine), so the reference is skipped."""

            def set_deepspeed_weakref(self) -> None:
                if self.zero3_init_flag:
                    super().set_deepspeed_weakref()

        ds_cfg = deepspeed_config(cfg, world_size, precision)
        # What `accelerate launch --use_deepspeed` sets; without it torchrun/srun runs fall back
        # to DDP silently. cpu=True must not be passed: it drops the plugin.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        kwargs["deepspeed_plugin"] = _Plugin(hf_ds_config=ds_cfg, zero3_init_flag=False)
    else:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        kwargs["cpu"] = not cuda
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world_size:
        raise ConfigError(f"launcher says world size {world_size} but Accelerate started "
                          f"{accelerator.num_processes} processes (for CPU runs use torchrun: "
                          "`accelerate launch --cpu --num_processes N` starts one)")
    return accelerator, precision, ds_cfg


COMPILE_CACHE = "compile_cache"  # in the run directory


def use_run_compile_cache(cfg: Config) -> str:
    """Inductor's cache (its FX graphs, the AOTAutograd results, the Triton kernels it
    generated) in the run directory, unless TORCHINDUCTOR_CACHE_DIR names one; returns it.

    Inductor's default is /tmp/torchinductor_<user>, on the node: a job requeued after a
    preemption, likely on other nodes, compiled the U-Net again (74.5 s for the ambient step on
    the H100, docs/gpu_run.md), every restart. In the run directory, which the restart shares,
    the ranks and every later restart find it (inductor writes its entries atomically, so ranks
    may share one cache). Inductor writes its default into the variable when it first looks
    (dynamo's set-up does, even for aot_eager), so the default counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    where = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not where or os.path.abspath(where) == os.path.abspath(default_cache_dir()):
        where = str((Path(cfg.trainer.run_dir) / COMPILE_CACHE).resolve())
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = where
    return where


def apply_speed_options(model: torch.nn.Module, cfg: Config, zero_stage: int) -> str:
    """The trainer's speed options (docs/cluster.md, "Speed options") on the freshly built model,
    before Accelerate wraps it in DDP or a DeepSpeed engine; returns what is in effect, for the log.

    torch.compile compiles the U-Net in place (`nn.Module.compile`): parameter names, checkpoints
    and EMA are unchanged, and the wrappers see an ordinary module whose forward runs the
    compiled graph. That is the order DeepSpeed's own `engine.compile()` uses (the engine's
    module compiled in place, hooks outside it), so ZeRO 1/2 reduce the gradients the compiled
    backward produces. ZeRO-3 gathers parameters in per-submodule hooks inside the forward,
    which the graph would have to break at every module: refused.
    """
    tr = cfg.trainer
    torch.backends.cudnn.benchmark = tr.cudnn_benchmark
    # Only what the config asks for by name: "auto" channels_last is no request.
    wanted = {"channels_last": tr.channels_last is True, "compile": tr.compile,
              "activation_checkpointing": tr.activation_checkpointing != "none"}
    unet = getattr(model, "model", None)
    if not isinstance(unet, UNet):
        on = [k for k, v in wanted.items() if v]
        if on:
            raise ConfigError(f"trainer.{on[0]} applies to the diffusion U-Net; model.model_type = "
                              f"{cfg.model.model_type!r} has none")
        return f"no U-Net; cudnn.benchmark {'on' if tr.cudnn_benchmark else 'off'}"
    if tr.compile and zero_stage == 3:
        raise ConfigError("trainer.compile = true with DeepSpeed ZeRO stage 3: its parameter gathering "
                          "hooks split the compiled graph at every module; use ZeRO 1/2 or DDP")
    # DeepSpeed broadcasts and flattens parameters through flat byte views, which need NCHW-
    # contiguous tensors (and ZeRO keeps them in flat buffers anyway): activations only there.
    cl = resolve_channels_last(cfg)
    weights = tr.distributed != "deepspeed"
    unet.set_channels_last(cl, weights=weights)
    unet.set_activation_checkpointing(tr.activation_checkpointing)
    cache = use_run_compile_cache(cfg) if tr.compile and tr.compile_backend == "inductor" else None
    if tr.compile:
        kwargs = {} if tr.compile_mode == "default" else {"mode": tr.compile_mode}
        unet.compile(backend=tr.compile_backend, **kwargs)
    auto = " (auto)" if tr.channels_last == "auto" else ""
    return (f"channels_last {'on' + ('' if weights else ', activations only') if cl else 'off'}{auto}, "
            f"compile {tr.compile_backend + '/' + tr.compile_mode if tr.compile else 'off'}"
            f"{f' (cache {cache})' if cache else ''}, "
            f"fused AdamW {'on' if tr.fused_adamw else 'off'}, activation checkpointing "
            f"{tr.activation_checkpointing}, cudnn.benchmark {'on' if tr.cudnn_benchmark else 'off'}")
