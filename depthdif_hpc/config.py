"""One typed config tree, loaded from YAML files and overrides, validated once at start-up.

`load_config(*paths, overrides=[...])` merges the files in order into the schema below, then the
`key=value` overrides. Unknown keys, wrong types, values outside a choice (the `Literal` fields)
and impossible values are `ConfigError`s that name the dotted key and the file (or override) that
set it. The result is a plain `Config` dataclass tree that the rest of the package receives.

Each section states its own rules in a `check()` method beside its fields; `validate_config`
walks the tree and adds only the rules that tie sections together.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

# omegaconf is imported by the loading functions only: the schema (and the model built from it)
# must import on machines that have torch and triton but not the training stack.
if TYPE_CHECKING:
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names key and source."""


# --------------------------------------------------------------------------------------------
# Choices. OmegaConf refuses any other value with the list of allowed ones; the modules that
# implement a choice take their registry's names from here (tests keep them in step).
# --------------------------------------------------------------------------------------------

ModelType = Literal["cond_px_dif", "latent_cond_dif", "depth_band_ae"]
KernelMode = Literal["eager", "triton", "auto"]
CoordEncoding = Literal["unit_sphere", "sincos", "raw"]
DateEncoding = Literal["day_of_year_sincos"]
ScheduleName = Literal["linear", "quadratic", "sigmoid", "cosine"]
SamplerName = Literal["ddpm", "ddim"]
DDIMDiscretization = Literal["uniform", "quadratic"]
UpsampleMode = Literal["transposed", "nearest_conv"]
X0Skip = Literal["none", "gaussian", "gaussian_spectral"]
ValidationSampler = Literal["model", "ddim"]
Precision = Literal["auto", "bf16", "fp32"]
Distributed = Literal["ddp", "deepspeed"]
MatmulPrecision = Literal["highest", "high", "medium"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
PlateauMode = Literal["min", "max"]
ThresholdMode = Literal["rel", "abs"]
Compressor = Literal["lz4", "lz4hc", "zstd", "zlib", "blosclz"]
ByteShuffle = Literal["shuffle", "noshuffle", "bitshuffle"]
ArgoTemperature = Literal["potential", "in_situ"]
ArgoQC = Literal["en4", "none"]
NormalizationKind = Literal["global", "per_level"]
AEType = Literal["depth_band_ae"]
CovarianceShape = Literal["gaussian", "roemmich_gilson"]

Problems = Iterator[tuple[str, Any, str]]  # (key relative to the section, value, why)


def _positive(key: str, value: float | None, strict: bool = True) -> Problems:
    if value is not None and (value < 0 or (strict and value == 0)):
        yield key, value, "must be > 0" if strict else "must be >= 0"


def _within(key: str, value: float, lo: float, hi: float) -> Problems:
    if not lo <= value <= hi:
        yield key, value, f"must be in [{lo}, {hi}]"


def _power_of_two(key: str, value: int) -> Problems:
    if value < 1 or value & (value - 1):
        yield key, value, "must be a power of two >= 1"


# --------------------------------------------------------------------------------------------
# Schema. Defaults are the reference constructor defaults (docs/model.md#configuration-presets)
# unless noted.
# --------------------------------------------------------------------------------------------


@dataclass
class AmbientOcclusionConfig:
    enabled: bool = False
    further_drop_prob: float = 0.1
    apply_to_noisy_branch: bool = True
    shared_spatial_mask: bool = True
    min_kept_observed_pixels: int = 1
    require_x0_parameterization: bool = True
    # Project decision (docs/model.md#project-decisions): inference conditions on every observation
    # unless asked.
    drop_at_inference: bool = False
    # Reference behaviour at sampling time: the noisy branch is not masked.
    mask_noisy_branch_at_inference: bool = False

    def check(self) -> Problems:
        if not 0.0 <= self.further_drop_prob < 1.0:
            yield "further_drop_prob", self.further_drop_prob, "must be in [0, 1)"
        yield from _positive("min_kept_observed_pixels", self.min_kept_observed_pixels, strict=False)


@dataclass
class GaussianBlurConfig:
    enabled: bool = False
    sigma: float = 0.35
    kernel_size: int = 3

    def check(self) -> Problems:
        yield from _positive("kernel_size", self.kernel_size, strict=False)
        yield from _positive("sigma", self.sigma, strict=False)


@dataclass
class PostProcessConfig:
    gaussian_blur: GaussianBlurConfig = field(default_factory=GaussianBlurConfig)


@dataclass
class CoordConditioningConfig:
    enabled: bool = False
    encoding: CoordEncoding = "unit_sphere"
    include_date: bool = True
    date_encoding: DateEncoding = "day_of_year_sincos"
    embed_dim: int | None = None  # None -> unet.dim

    def check(self) -> Problems:
        yield from _positive("embed_dim", self.embed_dim)


@dataclass
class UNetConfig:
    dim: int = 64
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    with_time_emb: bool = True
    output_mean_scale: bool = False
    residual: bool = False
    # transposed: the research layout (its checkpoints load); nearest_conv removes the 2-pixel
    # checkerboard of ConvTranspose2d(4, stride 2), other weight shapes (docs/model.md#checkerboard).
    upsample: UpsampleMode = "transposed"

    def check(self) -> Problems:
        yield from _positive("dim", self.dim)
        if self.dim % 2:
            yield "dim", self.dim, "must be even (sinusoidal time embedding halves it)"
        if not self.dim_mults or any(k <= 0 for k in self.dim_mults):
            yield "dim_mults", self.dim_mults, "must be a non-empty list of positive ints"


@dataclass
class LatentConfig:
    """Latent workflow (docs/model.md#latent-workflow): diffusion in the depth-band autoencoder's
    latent space."""

    ae_config_path: str | None = None  # YAML with the `ae` section the checkpoint was trained with
    ae_checkpoint: str | None = None  # trained autoencoder weights (required for latent_cond_dif)
    freeze_autoencoder: bool = True
    latent_channels: int = 12
    spatial_downsample: int = 1

    def check(self) -> Problems:
        yield from _power_of_two("spatial_downsample", self.spatial_downsample)


@dataclass
class NoiseConfig:
    """The forward process (docs/model.md#noise-schedules): part of the model, since sampling a
    trained checkpoint needs the same schedule."""

    num_timesteps: int = 1000
    schedule: ScheduleName = "linear"
    beta_start: float = 1e-4
    beta_end: float = 2e-2

    def check(self) -> Problems:
        yield from _positive("num_timesteps", self.num_timesteps)
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            yield ("beta_start", self.beta_start,
                   f"need 0 < beta_start < beta_end < 1 (beta_end = {self.beta_end}); checked for "
                   "every schedule, cosine included")


@dataclass
class SamplingConfig:
    """The model's default reverse process (docs/model.md#samplers): predict and evaluation start
    from it; the validation reconstruction uses trainer.validation_sampler."""

    sampler: SamplerName = "ddpm"
    ddim_num_timesteps: int = 200
    ddim_eta: float = 0.0
    ddim_temperature: float = 1.0
    # Which model steps a DDIM chain visits: uniform in t, or quadratic (dense near t = 0, where
    # small-spread levels are resolved; docs/model.md#ensemble-spread).
    ddim_discretization: DDIMDiscretization = "uniform"

    def check(self) -> Problems:
        yield from _positive("ddim_num_timesteps", self.ddim_num_timesteps)
        yield from _positive("ddim_eta", self.ddim_eta, strict=False)
        yield from _positive("ddim_temperature", self.ddim_temperature)


@dataclass
class ModelConfig:
    # depth_band_ae trains the latent workflow's autoencoder
    model_type: ModelType = "cond_px_dif"
    # Warm start: weights only (docs/model.md#checkpoint-compatibility); resuming a run is
    # trainer.resume.
    load_checkpoint: str | None = None
    generated_channels: int = 1
    condition_channels: int = 1
    condition_mask_channels: int = 1
    condition_include_eo: bool = False
    condition_use_valid_mask: bool = True
    clamp_known_pixels: bool = True
    mask_loss_with_valid_pixels: bool = False
    parameterization: str = "epsilon"  # see PARAMETERIZATION_ALIASES
    # gaussian: the x0 estimate is the posterior mean of x0 ~ N(output, s^2) given x_t, s^2 learned per
    # generated channel, so members spread by ~s where a network that ignores x_t collapses them;
    # gaussian_spectral: the same with a learned isotropic error spectrum per channel, so members
    # spread with the error's spatial scales (docs/model.md#gaussian-x0-skip); none: the research
    # model and its state-dict layout.
    x0_skip: X0Skip = "none"
    # auto: Triton on CUDA after each kernel's first-use check, eager elsewhere
    kernels: KernelMode = "eager"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ambient_occlusion: AmbientOcclusionConfig = field(default_factory=AmbientOcclusionConfig)
    post_process: PostProcessConfig = field(default_factory=PostProcessConfig)
    coord_conditioning: CoordConditioningConfig = field(default_factory=CoordConditioningConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    def check(self) -> Problems:
        try:
            param = canonical_parameterization(self.parameterization)
        except ValueError as exc:
            yield "parameterization", self.parameterization, str(exc)
            return
        yield from _positive("generated_channels", self.generated_channels)
        yield from _positive("condition_channels", self.condition_channels)
        if self.condition_use_valid_mask:
            yield from _positive("condition_mask_channels", self.condition_mask_channels)
        amb = self.ambient_occlusion
        if amb.enabled and amb.require_x0_parameterization and param != "x0":
            yield ("parameterization", self.parameterization,
                   "ambient occlusion (model.ambient_occlusion.enabled) requires the x0 "
                   "parameterization while require_x0_parameterization is true")
        if self.x0_skip != "none" and param != "x0":
            yield ("x0_skip", self.x0_skip,
                   "shrinks an x0 estimate, so it needs the x0 parameterization")
        if self.unet.residual and self.condition_channels != 0:
            yield ("unet.residual", self.unet.residual,
                   "adds the raw input to the output, which needs input channels "
                   f"({self.generated_channels + self.condition_channels}) == output channels "
                   f"({self.generated_channels})")
        if self.model_type == "latent_cond_dif":
            lat = self.latent
            if self.generated_channels != lat.latent_channels:
                yield ("generated_channels", self.generated_channels,
                       f"the latent model generates model.latent.latent_channels = {lat.latent_channels} channels")
            if lat.spatial_downsample != 1 and self.condition_include_eo:
                yield ("condition_include_eo", True,
                       f"EO stays at pixel resolution, so it cannot join a latent downsampled by "
                       f"{lat.spatial_downsample}")


@dataclass
class TrainingConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def check(self) -> Problems:
        yield from _positive("lr", self.lr)
        yield from _positive("weight_decay", self.weight_decay, strict=False)


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    start_step: int = 0
    update_every: int = 1
    # decay ramps up as min(decay, (1 + n) / (10 + n)) over the n steps since start_step
    # (depthdif_hpc/train/ema.py says why)
    warmup: bool = True
    evaluate_with_ema: bool = True

    def check(self) -> Problems:
        yield from _positive("start_step", self.start_step, strict=False)
        if not 0.0 < self.decay < 1.0:
            yield "decay", self.decay, "must be in (0, 1)"
        yield from _positive("update_every", self.update_every)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_epochs: int = 1500
    precision: Precision = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    gradient_clip_val: float = 1.0
    gradient_accumulation_steps: int = 1
    log_every_n_steps: int = 25
    val_every_n_steps: int = 500
    limit_val_batches: int = 4
    checkpoint_every_n_steps: int = 1000
    keep_last_checkpoints: int = 3
    # Also keep the checkpoint with the lowest val/loss_ckpt (EMA weights when evaluated with EMA):
    # on a long run the newest few are rarely the best.
    keep_best_checkpoint: bool = True
    resume: str = "auto"  # auto | none | <checkpoint dir>
    # The run folder itself (checkpoints/, tb/, config.yaml, steps.jsonl); stable across requeues.
    run_dir: str = "runs/depthdif"
    distributed: Distributed = "ddp"
    deepspeed_config: str | None = None
    # Optional cross-checks, refused at start-up when they disagree with the run:
    zero_stage: int | None = None  # must equal zero_optimization.stage of deepspeed_config
    global_batch_size: int | None = None  # must equal batch_size * accumulation * world size
    matmul_precision: MatmulPrecision = "high"
    # Intra-op CPU threads of each trainer process. null: the CPUs this process may use (its
    # affinity mask, capped by SLURM_CPUS_ON_NODE) divided by the processes on its node. The
    # trainer applies it itself, whatever launched it, and ignores OMP_NUM_THREADS: torchrun sets
    # that to 1 only when it starts more than one process per node, so two launch layouts of the
    # same global batch would otherwise sum in different orders (docs/cluster.md, "CPU threads").
    intra_op_threads: int | None = None
    # Seconds a rank waits in a collective for a peer before it fails (the process group's
    # timeout). A hung or stopped peer otherwise holds the whole allocation; the wait must still
    # cover the slowest rank's validation reconstruction while the others wait in the gather.
    collective_timeout_s: int = 1800
    # Off: validation runs every val_every_n_steps only. Epochs shrink as ranks are added, so an
    # epoch-end validation would cost more of a larger allocation's time (docs/cluster.md).
    val_at_epoch_end: bool = False
    full_reconstruction: bool = True  # reverse diffusion of validation samples, shared over the ranks
    full_reconstruction_samples: int = 2  # taken from the first validation batch
    # The reconstruction's sampler, an in-training diagnostic: "ddim" with validation_ddim_steps
    # steps (eta, temperature from model.sampling; a count above model.noise.num_timesteps is
    # clamped to it) costs validation_ddim_steps / num_timesteps of a DDPM chain (50 of 1000:
    # 1/20); "model": model.sampling, what predict and evaluate use (unchanged by this key).
    validation_sampler: ValidationSampler = "ddim"
    validation_ddim_steps: int = 50
    log_intermediates: bool = False  # figures of the reconstruction's reverse chain
    progress_bar: bool = True  # rank 0, only when stderr is a terminal
    # Each rank appends {"step", "ids"} to logs/samples_rank_NNNNN.jsonl: which samples it trained
    # on at every step (an audit of the data split across ranks and nodes, kept exact on resume).
    record_sample_ids: bool = False
    # Speed options (docs/cluster.md, "Speed options"). Each default keeps the eager, contiguous,
    # un-checkpointed step until a GPU measurement says otherwise; channels_last has one.
    # torch.compile of the U-Net in place (parameter names unchanged; the Triton kernel ops stay
    # whole as custom ops). Not with ZeRO-3, whose parameter gathering hooks break the graph.
    compile: bool = False
    compile_backend: CompileBackend = "inductor"  # aot_eager: no code generation (tests, triage)
    compile_mode: CompileMode = "default"
    # U-Net activations (and, without DeepSpeed, weights) in torch.channels_last. "auto": on CUDA
    # only: the ambient Triton step at batch 48 on an H100 took 130.8 ms channels_last against
    # 207.1 ms NCHW (docs/gpu_run.md); CPU runs keep NCHW, which nothing has measured there.
    channels_last: bool | str = "auto"
    fused_adamw: bool = False  # torch.optim.AdamW(fused=True) instead of foreach
    # U-Net levels (0 = full resolution .. len(dim_mults) - 1) whose stages recompute their
    # activations in the backward pass instead of keeping them: "none", "all" or a list [0, 1].
    activation_checkpointing: list[int] | str = "none"
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark (autotuned convolutions)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def check(self) -> Problems:
        for key in ("max_steps", "gradient_accumulation_steps", "log_every_n_steps",
                    "val_every_n_steps", "checkpoint_every_n_steps", "keep_last_checkpoints",
                    "full_reconstruction_samples", "validation_ddim_steps"):
            yield from _positive(key, getattr(self, key))
        yield from _positive("gradient_clip_val", self.gradient_clip_val, strict=False)
        if self.distributed == "deepspeed" and not self.deepspeed_config:
            yield ("deepspeed_config", self.deepspeed_config,
                   "trainer.distributed=deepspeed needs a DeepSpeed config file (configs/deepspeed/zero2.json, ...)")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            yield "zero_stage", self.zero_stage, "must be 0, 1, 2 or 3"
        yield from _positive("global_batch_size", self.global_batch_size)
        yield from _positive("intra_op_threads", self.intra_op_threads)
        yield from _positive("collective_timeout_s", self.collective_timeout_s)
        if isinstance(self.channels_last, str) and self.channels_last != "auto":
            yield "channels_last", self.channels_last, "must be true, false or 'auto' (on CUDA only)"
        ac = self.activation_checkpointing
        if isinstance(ac, str) and ac not in ("none", "all"):
            yield "activation_checkpointing", ac, "must be 'none', 'all' or a list of U-Net level indices"
        if isinstance(ac, list) and any(level < 0 for level in ac):
            yield "activation_checkpointing", ac, "level indices must be >= 0"
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            yield "compile_mode", self.compile_mode, "needs trainer.compile_backend=inductor"


@dataclass
class WarmupConfig:
    enabled: bool = True
    steps: int = 1000
    start_ratio: float = 0.1

    def check(self) -> Problems:
        yield from _positive("steps", self.steps, strict=False)
        yield from _within("start_ratio", self.start_ratio, 0.0, 1.0)


@dataclass
class ReduceOnPlateauConfig:
    enabled: bool = False
    monitor: str = "val/loss_ckpt"
    mode: PlateauMode = "min"
    factor: float = 0.5
    # In optimizer steps, not validations: the LR drops when the monitor has not improved for
    # more than patience_steps steps (then no drop for cooldown_steps). A count of validations
    # would mean less training at a shorter validation interval (docs/model.md#training).
    patience_steps: int = 5000
    threshold: float = 1e-4
    threshold_mode: ThresholdMode = "rel"
    cooldown_steps: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8

    def check(self) -> Problems:
        yield from _positive("patience_steps", self.patience_steps, strict=False)
        yield from _positive("cooldown_steps", self.cooldown_steps, strict=False)


@dataclass
class CosineConfig:
    enabled: bool = False
    min_lr: float = 0.0


@dataclass
class SchedulerConfig:
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    reduce_on_plateau: ReduceOnPlateauConfig = field(default_factory=ReduceOnPlateauConfig)
    cosine: CosineConfig = field(default_factory=CosineConfig)

    def check(self) -> Problems:
        if self.reduce_on_plateau.enabled and self.cosine.enabled:
            yield "cosine.enabled", True, "cannot be combined with reduce_on_plateau"


@dataclass
class DataloaderConfig:
    batch_size: int = 4
    val_batch_size: int = 2
    num_workers: int = 2
    val_num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    shuffle: bool = True
    val_shuffle: bool = False
    shuffle_buffer: int = 64
    # Every rank gets the same number of samples per epoch (the few left over are dropped,
    # different ones each epoch); DDP needs equal batch counts on all ranks.
    even_ranks: bool = True

    def check(self) -> Problems:
        yield from _positive("batch_size", self.batch_size)
        yield from _positive("val_batch_size", self.val_batch_size)
        yield from _positive("num_workers", self.num_workers, strict=False)
        yield from _positive("shuffle_buffer", self.shuffle_buffer, strict=False)


@dataclass
class ForceIncludeRegion:
    name: str = ""
    lon_min: float = -180.0
    lon_max: float = 180.0
    lat_min: float = -90.0
    lat_max: float = 90.0
    max_land_fraction: float = 0.6

    def check(self) -> Problems:
        if not self.lat_min < self.lat_max:
            yield "lat_min", self.lat_min, f"region {self.name!r} needs lat_min < lat_max"
        yield from _within("max_land_fraction", self.max_land_fraction, 0.0, 1.0)


@dataclass
class GridConfig:
    tile_size: int = 128
    resolution_deg: float = 0.1
    patch_stride: int = 64
    max_land_fraction: float = 0.30
    force_include_regions: list[ForceIncludeRegion] = field(default_factory=list)
    # Optional [lon_min, lon_max, lat_min, lat_max]: keep only tiles inside it (empty = all
    # tiles the sources cover).
    bbox: list[float] = field(default_factory=list)

    def check(self) -> Problems:
        yield from _positive("tile_size", self.tile_size)
        if self.tile_size % 8:
            yield "tile_size", self.tile_size, "must be divisible by 8 (the U-Net halves it 3 times)"
        yield from _positive("patch_stride", self.patch_stride)
        yield from _positive("resolution_deg", self.resolution_deg)
        yield from _within("max_land_fraction", self.max_land_fraction, 0.0, 1.0)
        if self.patch_stride > self.tile_size:
            yield "patch_stride", self.patch_stride, "must be <= tile_size (gaps between tiles)"
        if round(180 / self.resolution_deg) < self.tile_size:
            yield "tile_size", self.tile_size, "larger than the global grid"
        if self.bbox and (len(self.bbox) != 4 or not self.bbox[2] < self.bbox[3]):
            yield ("bbox", self.bbox,
                   "must be [lon_min, lon_max, lat_min, lat_max] with lat_min < lat_max")


@dataclass
class SourcesConfig:
    glorys: str | None = None  # glob of GLORYS thetao NetCDF files
    ostia: str | None = None  # glob of OSTIA analysed_sst NetCDF files
    en4: str | None = None  # glob of EN4 profile NetCDF files


@dataclass
class SamplingWindowConfig:
    temporal_window_days: int = 7
    glorys_var_name: str = "thetao"
    ostia_var_name: str = "analysed_sst"
    argo_temp_var_name: str = "TEMP"
    argo_depth_var_name: str = "DEPH_CORRECTED"
    # Profile temperature and QC (docs/data_store.md#profiles-potential-temperature-and-qc).
    # "potential" matches GLORYS thetao: argo_potm_var_name where a file has it, else computed
    # from argo_temp_var_name (in situ), argo_psal_var_name and depth with gsw (TEOS-10).
    argo_temperature: ArgoTemperature = "potential"
    argo_potm_var_name: str = "POTM_CORRECTED"
    argo_psal_var_name: str = "PSAL_CORRECTED"
    argo_qc: ArgoQC = "en4"  # "en4": drop profiles/levels flagged '4'; "none": ignore flags

    def check(self) -> Problems:
        yield from _positive("temporal_window_days", self.temporal_window_days)


@dataclass
class SelectionConfig:
    require_argo_for_train: bool = True
    require_argo_for_val: bool = True
    # Optional inclusive date range "YYYY-MM-DD" of the samples to build.
    start_date: str | None = None
    end_date: str | None = None

    def check(self) -> Problems:
        for key in ("start_date", "end_date"):
            v = getattr(self, key)
            if v is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
                yield key, v, "must be YYYY-MM-DD"
        if self.start_date and self.end_date and self.start_date > self.end_date:
            yield "end_date", self.end_date, f"is before start_date {self.start_date}"


@dataclass
class StoreLayoutConfig:
    """How depthdif_hpc.data.build writes the Zarr store (see docs/data_store.md)."""

    shard_samples: int = 16  # samples per shard file (and per build work unit)
    quant_step_c: float = 0.001  # uint16 temperature step, degC; error bound = step / 2
    quant_min_c: float = -5.0  # code 1 = this temperature; code 0 = invalid
    max_obs_pixels: int = 256  # observed pixels kept per sample (x is stored as columns)
    compressor: Compressor = "lz4"  # Blosc cname
    clevel: int = 5
    shuffle: ByteShuffle = "shuffle"  # measured: docs/data_store.md
    checksum: bool = True  # crc32c on every inner chunk (catches silent corruption; ~5% of decode)

    def check(self) -> Problems:
        yield from _positive("shard_samples", self.shard_samples)
        yield from _positive("quant_step_c", self.quant_step_c)
        yield from _positive("max_obs_pixels", self.max_obs_pixels)
        yield from _within("clevel", self.clevel, 0, 9)
        if self.quant_min_c + 65534 * self.quant_step_c < 40.0:
            yield ("quant_step_c", self.quant_step_c,
                   f"uint16 codes from {self.quant_min_c} degC must reach at least 40 degC")


@dataclass
class DatasetConfig:
    store: str | None = None  # sharded Zarr store built by depthdif_hpc.data.build
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    sampling: SamplingWindowConfig = field(default_factory=SamplingWindowConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    layout: StoreLayoutConfig = field(default_factory=StoreLayoutConfig)
    return_coords: bool = True
    random_seed: int = 7
    skip_corrupt_samples: bool = False
    # Temperature z-score (depthdif_hpc/normalization.py): "global" = the reference's one mean
    # and std; "per_level" = each depth level its own train-split mean/std, taken from the
    # store manifest when the lists are empty and then written here, so checkpoints carry them
    # and predict decodes with the statistics the model was trained with.
    normalization: NormalizationKind = "global"
    normalization_mean_c: list[float] = field(default_factory=list)
    normalization_std_c: list[float] = field(default_factory=list)

    def check(self) -> Problems:
        m, s = self.normalization_mean_c, self.normalization_std_c
        if len(m) != len(s):
            yield "normalization_std_c", len(s), f"needs as many entries as normalization_mean_c ({len(m)})"
        if any(not v > 0 for v in s):
            yield "normalization_std_c", s, "every level's std must be > 0"
        if m and self.normalization == "global":
            yield "normalization_mean_c", len(m), "per-level statistics given with normalization: global"


@dataclass
class SplitConfig:
    val_year: int | None = 2018


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None


@dataclass
class AELossConfig:
    recon_l1_weight: float = 1.0
    recon_l2_weight: float = 0.5
    masked_only: bool = False


@dataclass
class AEConfig:
    """The depth-band autoencoder of the latent workflow (configs/lat_space/ae_config.yaml)."""

    model_type: AEType = "depth_band_ae"
    in_channels: int = 50
    latent_channels: int = 12
    spatial_downsample: int = 1
    encoder_hidden_channels: list[int] = field(default_factory=lambda: [64, 96, 128])
    decoder_hidden_channels: list[int] = field(default_factory=lambda: [128, 96, 64])
    loss: AELossConfig = field(default_factory=AELossConfig)

    def check(self) -> Problems:
        yield from _positive("in_channels", self.in_channels)
        yield from _positive("latent_channels", self.latent_channels)
        yield from _power_of_two("spatial_downsample", self.spatial_downsample)
        if not self.encoder_hidden_channels or not self.decoder_hidden_channels:
            yield ("encoder_hidden_channels", self.encoder_hidden_channels,
                   "encoder and decoder need >= 1 layer")


@dataclass
class ClimatologyConfig:
    """Per-pixel seasonal climatology (docs/metrics.md#climatology)."""

    harmonics: int = 2  # annual + semi-annual cycle
    # Ridge on the harmonic coefficients, times the pixel's sample count: with a full year of data
    # it shrinks them by ~2 %; with a few weeks it keeps the nearly collinear harmonics bounded.
    ridge: float = 0.01
    block_px: int = 16  # accumulation block of the global grid (memory follows the covered area)

    def check(self) -> Problems:
        yield from _positive("harmonics", self.harmonics, strict=False)
        yield from _positive("ridge", self.ridge, strict=False)
        yield from _positive("block_px", self.block_px)


@dataclass
class OIConfig:
    """Optimal-interpolation baseline (docs/metrics.md#optimal-interpolation)."""

    enabled: bool = True
    covariance: CovarianceShape = "gaussian"
    # Grids of the marginal-likelihood fit per depth level (signal variance is profiled out).
    # 25 km: a few 0.1 degree pixels; on the demo ocean the fit picked the smallest value of a grid
    # that started at 50 km.
    length_grid_km: list[float] = field(default_factory=lambda: [25.0, 50.0, 100.0, 150.0, 250.0, 400.0, 800.0])
    noise_ratio_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    rg_long_km: float = 1100.0  # roemmich_gilson: scale of the exponential part
    rg_short_weight: float = 0.77  # roemmich_gilson: weight of the Gaussian part
    halo_km: float = 300.0  # observations of same-day neighbouring patches within this distance
    fit_samples: int = 64  # train days (evenly spaced) used by the fit, each one draw of the field
    fit_max_obs: int = 250  # columns per day at most (a seeded subset): the fit costs n^3 per day
    # One (length, noise ratio) for all levels (the likelihood summed over levels; the signal
    # variance stays per level) instead of one per level: a few hundred observations per level
    # leave each level's own choice noisy.
    shared_across_levels: bool = True

    def check(self) -> Problems:
        if not self.length_grid_km or min(self.length_grid_km) <= 0:
            yield "length_grid_km", self.length_grid_km, "must be a non-empty list of values > 0"
        if not self.noise_ratio_grid or min(self.noise_ratio_grid) <= 0:
            yield "noise_ratio_grid", self.noise_ratio_grid, "must be a non-empty list of values > 0"
        yield from _positive("rg_long_km", self.rg_long_km)
        yield from _within("rg_short_weight", self.rg_short_weight, 0.0, 1.0)
        yield from _positive("halo_km", self.halo_km, strict=False)
        yield from _positive("fit_samples", self.fit_samples)
        yield from _positive("fit_max_obs", self.fit_max_obs)


@dataclass
class EvaluationConfig:
    """What `evaluate` scores against (docs/metrics.md#baselines)."""

    idw_power: float = 2.0
    climatology: ClimatologyConfig = field(default_factory=ClimatologyConfig)
    oi: OIConfig = field(default_factory=OIConfig)

    def check(self) -> Problems:
        yield from _positive("idw_power", self.idw_power)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The configs shipped with the package: px_space/, lat_space/, deepspeed/, accelerate/.

    DDHPC_CONFIG_DIR when set; else the copy a wheel carries as package data
    (depthdif_hpc/configs); else the top-level configs/ of a source checkout (editable install or
    PYTHONPATH).
    """
    env = os.environ.get("DDHPC_CONFIG_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "px_space").is_dir():
            return candidate
    raise ConfigError(f"the shipped configs are neither in {package / 'configs'} (a wheel) nor in "
                      f"{package.parent / 'configs'} (a checkout); set DDHPC_CONFIG_DIR")


PARAMETERIZATION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon",
                            "x0": "x0", "xstart": "x0"}


def canonical_parameterization(name: str) -> str:
    """Map the accepted spellings (case-free, '_'/'-' ignored) to 'epsilon' or 'x0'."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in PARAMETERIZATION_ALIASES:
        raise ValueError(f"unknown parameterization {name!r}; expected one of "
                         f"{sorted(PARAMETERIZATION_ALIASES)}")
    return PARAMETERIZATION_ALIASES[key]


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested dict (an empty mapping is a leaf)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _flat_keys(node: Any) -> list[str]:
    return list(_flatten(node))


# Keys that moved (old dotted key -> new) or went away (-> None). A file using an old key gets a
# hint; a config saved in an older checkpoint is carried over (`config_from_dict`).
MOVED_KEYS: dict[str, str | None] = {
    "training.noise": "model.noise",
    "training.validation_sampling.sampler": "model.sampling.sampler",
    "training.validation_sampling.ddim_num_timesteps": "model.sampling.ddim_num_timesteps",
    "training.validation_sampling.ddim_eta": "model.sampling.ddim_eta",
    "training.validation_sampling.ddim_temperature": "model.sampling.ddim_temperature",
    "training.validation_sampling.ddim_discretization": "model.sampling.ddim_discretization",
    "training.validation_sampling.log_intermediates": "trainer.log_intermediates",
    "training.validation_sampling.max_full_reconstruction_samples": "trainer.full_reconstruction_samples",
    "model.log_intermediates": None,
    "model.latent.eo_in_pixel_space": None,
    "logging.log_images_every_n_steps": None,
}


# Keys whose unit changed from validations to optimizer steps (old -> new). A config using the old
# key still loads: old value x trainer.val_every_n_steps (the steps between two validations),
# with a warning naming both keys; the new key wins where both are set.
PER_VALIDATION_KEYS: dict[str, str] = {
    "scheduler.reduce_on_plateau.patience": "scheduler.reduce_on_plateau.patience_steps",
    "scheduler.reduce_on_plateau.cooldown": "scheduler.reduce_on_plateau.cooldown_steps",
}


def _take_per_validation(data: dict, source: str, found: dict[str, tuple[Any, str]]) -> None:
    """Remove the PER_VALIDATION_KEYS from a nested dict (in place); their values go to `found`."""
    for old in PER_VALIDATION_KEYS:
        *parents, leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            found[old] = (node.pop(leaf), source)


def _per_validation_overrides(overrides: list[str] | None, found: dict[str, tuple[Any, str]]) -> list[str]:
    kept = []
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key.strip() in PER_VALIDATION_KEYS:
            found[key.strip()] = (value.strip(), f"override '{item}'")
        else:
            kept.append(item)
    return kept


def _convert_per_validation(merged: DictConfig, found: dict[str, tuple[Any, str]],
                            origins: dict[str, str]) -> None:
    from omegaconf import OmegaConf

    for old, (value, where) in found.items():
        new = PER_VALIDATION_KEYS[old]
        if new in origins:
            warnings.warn(f"{where}: {old} ignored: {new} is set ({origins[new]})", stacklevel=3)
            continue
        try:
            count = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {old} = {value!r}: must be an integer (a count of "
                              f"validations; now {new}, in optimizer steps)") from None
        interval = int(OmegaConf.select(merged, "trainer.val_every_n_steps"))
        OmegaConf.update(merged, new, count * interval)
        origins[new] = where
        warnings.warn(f"{where}: {old} = {count} counted validations; it is now {new}, in optimizer "
                      f"steps: set to {count} x trainer.val_every_n_steps {interval} = "
                      f"{count * interval} (docs/model.md#training)", stacklevel=3)


def _moved_entry(key: str) -> tuple[str, str | None] | None:
    """The MOVED_KEYS entry that covers `key` (the key itself or a section above it)."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return old, new
    return None


def _moved_hint(key: str) -> str:
    entry = _moved_entry(key)
    if entry is None:
        return ""
    old, new = entry
    return f" ('{old}' was removed: nothing reads it)" if new is None else f" ('{old}' moved to '{new}')"


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    hint = _moved_hint(key)
    if not hint and ("not in" in msg or "Key '" in msg):
        known = [k for k in _SCHEMA_KEYS if k.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
    return ConfigError(f"{source}: bad config key '{key}': {msg}{hint}")


def _migrate(data: dict) -> dict:
    """A saved config (nested dict) with MOVED_KEYS applied."""
    out: dict[str, Any] = {}
    for key, value in _flatten(data).items():
        entry = _moved_entry(key)
        if entry is not None:
            old, new = entry
            if new is None:
                continue
            key = new + key[len(old):]
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _apply_overrides(merged: DictConfig, overrides: list[str] | None,
                     origins: dict[str, str]) -> DictConfig:
    """`key=value` overrides, in order, onto a merged config; records where each key came from."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override '{item}'") from exc
        origins[item.split("=", 1)[0].strip()] = f"override '{item}'"
    return merged


_SCHEMA_KEYS: list[str] = []


def load_config(*paths: str | Path, overrides: list[str] | None = None) -> Config:
    """Merge YAML files (in order) and `key=value` overrides into a validated `Config`."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    global _SCHEMA_KEYS
    if not _SCHEMA_KEYS:
        _SCHEMA_KEYS = _resolved_schema_keys()
    merged = OmegaConf.structured(Config)
    OmegaConf.set_struct(merged, True)
    origins: dict[str, str] = {}
    per_validation: dict[str, tuple[Any, str]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several exception types
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        container = OmegaConf.to_container(loaded, resolve=False)
        _take_per_validation(container, str(path), per_validation)
        loaded = OmegaConf.create(container)
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from exc
        for key in _flat_keys(OmegaConf.to_container(loaded, resolve=False)):
            origins[key] = str(path)
    merged = _apply_overrides(merged, _per_validation_overrides(overrides, per_validation), origins)
    _convert_per_validation(merged, per_validation, origins)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "config") from exc
    validate_config(cfg, origins)
    return cfg


def _resolved_schema_keys() -> list[str]:
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)
    return _flat_keys(container) + _schema_prefixes(container)


def _schema_prefixes(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.append(key)
            out += _schema_prefixes(v, key)
    return out


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of a Config (for saving next to a run or into a checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """Inverse of `to_dict` (checkpoints carry their config this way), plus `key=value` overrides.

    Configs saved by an older version are carried over to the current keys (MOVED_KEYS).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    origins: dict[str, str] = {}
    per_validation: dict[str, tuple[Any, str]] = {}
    migrated = _migrate(data)
    _take_per_validation(migrated, "saved config", per_validation)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(migrated))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "saved config") from exc
    merged = _apply_overrides(merged, _per_validation_overrides(overrides, per_validation), origins)
    _convert_per_validation(merged, per_validation, origins)
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg, origins)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation: every section's own rules, then the rules that tie sections together
# --------------------------------------------------------------------------------------------


def _section_problems(node: Any, prefix: str) -> Iterator[tuple[str, Any, str]]:
    """Every section's `check()` in schema order, with keys made absolute."""
    if hasattr(node, "check"):
        for key, value, why in node.check():
            yield f"{prefix}.{key}" if prefix else key, value, why
    for f in fields(node):
        child = getattr(node, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        if is_dataclass(child):
            yield from _section_problems(child, path)
        elif isinstance(child, list):
            for i, item in enumerate(child):
                if is_dataclass(item):
                    yield from _section_problems(item, f"{path}.{i}")


def _cross_section_problems(cfg: Config) -> Iterator[tuple[str, Any, str]]:
    ac, levels = cfg.trainer.activation_checkpointing, len(cfg.model.unet.dim_mults)
    if isinstance(ac, list) and any(level >= levels for level in ac):
        yield ("trainer.activation_checkpointing", ac,
               f"the U-Net has {levels} levels (model.unet.dim_mults), indices 0..{levels - 1}")
    n = cfg.trainer.full_reconstruction_samples
    if cfg.trainer.full_reconstruction and n > cfg.dataloader.val_batch_size:
        yield ("trainer.full_reconstruction_samples", n,
               f"exceeds dataloader.val_batch_size = {cfg.dataloader.val_batch_size} (the samples "
               "come from the first validation batch)")
    if cfg.dataset.normalization == "per_level" and cfg.model.model_type != "cond_px_dif":
        yield ("dataset.normalization", "per_level",
               f"only for model.model_type cond_px_dif (the autoencoder and its evaluation "
               f"decode with the global z-score), not {cfg.model.model_type}")


def validate_config(cfg: Config, origins: dict[str, str]) -> None:
    """Raise ConfigError for the first problem, naming the key and the file/override that set it."""
    for key, value, why in (*_section_problems(cfg, ""), *_cross_section_problems(cfg)):
        where = origins.get(key) or _nearest_origin(key, origins) or "defaults"
        raise ConfigError(f"{where}: {key} = {value!r}: {why}")


def _nearest_origin(key: str, origins: dict[str, str]) -> str | None:
    """Origin of the closest enclosing key that a file set (lists are recorded whole)."""
    parts = key.split(".")
    while parts:
        parts.pop()
        hit = origins.get(".".join(parts))
        if hit:
            return hit
    return None


__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "validate_config",
    "canonical_parameterization",
    "to_dict",
    "to_yaml",
    "config_from_dict",
]
