"""One typed config tree, loaded from YAML files and overrides, validated once at start-up.

`load_config(*paths, overrides=[...])` merges the files in order into the schema below, then the
`key=value` overrides. Unknown keys, wrong types and impossible values are `ConfigError`s that
name the dotted key and the file (or override) that set it. The result is a plain `Config`
dataclass tree that the rest of the package receives.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# omegaconf is imported by the loading functions only: the schema (and the model built from it)
# must import on machines that have torch and triton but not the training stack.
if TYPE_CHECKING:
    from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names key and source."""


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


@dataclass
class GaussianBlurConfig:
    enabled: bool = False
    sigma: float = 0.35
    kernel_size: int = 3


@dataclass
class PostProcessConfig:
    gaussian_blur: GaussianBlurConfig = field(default_factory=GaussianBlurConfig)


@dataclass
class CoordConditioningConfig:
    enabled: bool = False
    encoding: str = "unit_sphere"  # unit_sphere | sincos | raw
    include_date: bool = True
    date_encoding: str = "day_of_year_sincos"
    embed_dim: int | None = None  # None -> unet.dim


@dataclass
class UNetConfig:
    dim: int = 64
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    with_time_emb: bool = True
    output_mean_scale: bool = False
    residual: bool = False


@dataclass
class LatentConfig:
    """Latent workflow (docs/model.md#latent-workflow): diffusion in the depth-band autoencoder's
    latent space."""

    ae_config_path: str | None = None  # YAML with the `ae` section the checkpoint was trained with
    ae_checkpoint: str | None = None  # trained autoencoder weights (required for latent_cond_dif)
    freeze_autoencoder: bool = True
    latent_channels: int = 12
    spatial_downsample: int = 1
    eo_in_pixel_space: bool = True


@dataclass
class ModelConfig:
    # cond_px_dif | latent_cond_dif | depth_band_ae (train the latent workflow's autoencoder)
    model_type: str = "cond_px_dif"
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
    parameterization: str = "epsilon"
    log_intermediates: bool = False
    # eager | triton | auto (Triton on CUDA, eager elsewhere)
    kernels: str = "eager"
    ambient_occlusion: AmbientOcclusionConfig = field(default_factory=AmbientOcclusionConfig)
    post_process: PostProcessConfig = field(default_factory=PostProcessConfig)
    coord_conditioning: CoordConditioningConfig = field(default_factory=CoordConditioningConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)


@dataclass
class NoiseConfig:
    num_timesteps: int = 1000
    schedule: str = "linear"  # linear | quadratic | sigmoid | cosine
    beta_start: float = 1e-4
    beta_end: float = 2e-2


@dataclass
class SamplingConfig:
    sampler: str = "ddpm"  # ddpm | ddim
    ddim_num_timesteps: int = 200
    ddim_eta: float = 0.0
    ddim_temperature: float = 1.0
    log_intermediates: bool = False
    max_full_reconstruction_samples: int = 4


@dataclass
class TrainingConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    validation_sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999
    start_step: int = 0
    update_every: int = 1
    evaluate_with_ema: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_epochs: int = 1500
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    gradient_clip_val: float = 1.0
    gradient_accumulation_steps: int = 1
    log_every_n_steps: int = 25
    val_every_n_steps: int = 500
    limit_val_batches: int = 4
    checkpoint_every_n_steps: int = 1000
    keep_last_checkpoints: int = 3
    resume: str = "auto"  # auto | none | <checkpoint dir>
    # The run folder itself (checkpoints/, tb/, config.yaml, steps.jsonl); stable across requeues.
    run_dir: str = "runs/depthdif"
    distributed: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str | None = None
    # Optional cross-checks, refused at start-up when they disagree with the run:
    zero_stage: int | None = None  # must equal zero_optimization.stage of deepspeed_config
    global_batch_size: int | None = None  # must equal batch_size * accumulation * world size
    matmul_precision: str = "high"
    # Intra-op CPU threads of each trainer process. null: the CPUs this process may use (its
    # affinity mask, capped by SLURM_CPUS_ON_NODE) divided by the processes on its node. The
    # trainer applies it itself, whatever launched it, and ignores OMP_NUM_THREADS: torchrun sets
    # that to 1 only when it starts more than one process per node, so two launch layouts of the
    # same global batch would otherwise sum in different orders (docs/cluster.md, "CPU threads").
    intra_op_threads: int | None = None
    val_at_epoch_end: bool = True
    full_reconstruction: bool = True  # rank-0 reverse diffusion of the cached val batch
    progress_bar: bool = True  # rank 0, only when stderr is a terminal
    # Each rank appends {"step", "ids"} to logs/samples_rank_NNNNN.jsonl: which samples it trained
    # on at every step (an audit of the data split across ranks and nodes, kept exact on resume).
    record_sample_ids: bool = False
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class WarmupConfig:
    enabled: bool = True
    steps: int = 1000
    start_ratio: float = 0.1


@dataclass
class ReduceOnPlateauConfig:
    enabled: bool = False
    monitor: str = "val/loss_ckpt"
    mode: str = "min"
    factor: float = 0.5
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0
    eps: float = 1e-8


@dataclass
class CosineConfig:
    enabled: bool = False
    min_lr: float = 0.0


@dataclass
class SchedulerConfig:
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    reduce_on_plateau: ReduceOnPlateauConfig = field(default_factory=ReduceOnPlateauConfig)
    cosine: CosineConfig = field(default_factory=CosineConfig)


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


@dataclass
class ForceIncludeRegion:
    name: str = ""
    lon_min: float = -180.0
    lon_max: float = 180.0
    lat_min: float = -90.0
    lat_max: float = 90.0
    max_land_fraction: float = 0.6


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


@dataclass
class SelectionConfig:
    require_argo_for_train: bool = True
    require_argo_for_val: bool = True
    # Optional inclusive date range "YYYY-MM-DD" of the samples to build.
    start_date: str | None = None
    end_date: str | None = None


@dataclass
class StoreLayoutConfig:
    """How depthdif_hpc.data.build writes the Zarr store (see docs/data_store.md)."""

    shard_samples: int = 16  # samples per shard file (and per build work unit)
    quant_step_c: float = 0.001  # uint16 temperature step, degC; error bound = step / 2
    quant_min_c: float = -5.0  # code 1 = this temperature; code 0 = invalid
    max_obs_pixels: int = 256  # observed pixels kept per sample (x is stored as columns)
    compressor: str = "lz4"  # Blosc cname: lz4 | lz4hc | zstd | zlib | blosclz
    clevel: int = 5
    shuffle: str = "shuffle"  # shuffle | noshuffle | bitshuffle (measured: docs/data_store.md)
    checksum: bool = True  # crc32c on every inner chunk (catches silent corruption; ~5% of decode)


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


@dataclass
class SplitConfig:
    val_year: int | None = 2018


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    log_images_every_n_steps: int = 200


@dataclass
class AELossConfig:
    recon_l1_weight: float = 1.0
    recon_l2_weight: float = 0.5
    masked_only: bool = False


@dataclass
class AEConfig:
    """The depth-band autoencoder of the latent workflow (configs/lat_space/ae_config.yaml)."""

    model_type: str = "depth_band_ae"
    in_channels: int = 50
    latent_channels: int = 12
    spatial_downsample: int = 1
    encoder_hidden_channels: list[int] = field(default_factory=lambda: [64, 96, 128])
    decoder_hidden_channels: list[int] = field(default_factory=lambda: [128, 96, 64])
    loss: AELossConfig = field(default_factory=AELossConfig)


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

PARAMETERIZATION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "noise": "epsilon",
                            "x0": "x0", "xstart": "x0"}


def canonical_parameterization(name: str) -> str:
    """Map the accepted spellings (case-free, '_'/'-' ignored) to 'epsilon' or 'x0'."""
    key = name.lower().replace("_", "").replace("-", "")
    if key not in PARAMETERIZATION_ALIASES:
        raise ValueError(f"unknown parameterization {name!r}; expected one of "
                         f"{sorted(PARAMETERIZATION_ALIASES)}")
    return PARAMETERIZATION_ALIASES[key]


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            out += _flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
        return out or [prefix]
    return [prefix]


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    hint = ""
    if "not in" in msg or "Key '" in msg:
        known = [k for k in _SCHEMA_KEYS if k.count(".") == key.count(".")]
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
    return ConfigError(f"{source}: bad config key '{key}': {msg}{hint}")


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
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from exc
        for key in _flat_keys(OmegaConf.to_container(loaded, resolve=False)):
            origins[key] = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key = item.split("=", 1)[0].strip()
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override '{item}'") from exc
        origins[key] = f"override '{item}'"
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
    """Inverse of `to_dict` (checkpoints carry their config this way), plus `key=value` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data))
    origins = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override '{item}'") from exc
        origins[item.split("=", 1)[0].strip()] = f"override '{item}'"
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(cfg, origins)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation of values that types alone do not catch
# --------------------------------------------------------------------------------------------


def validate_config(cfg: Config, origins: dict[str, str]) -> None:
    def fail(key: str, value: Any, why: str) -> None:
        where = origins.get(key) or _nearest_origin(key, origins) or "defaults"
        raise ConfigError(f"{where}: {key} = {value!r}: {why}")

    def choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            fail(key, value, f"must be one of {list(allowed)}")

    def positive(key: str, value: float, strict: bool = True) -> None:
        if value < 0 or (strict and value == 0):
            fail(key, value, "must be > 0" if strict else "must be >= 0")

    m, t, tr = cfg.model, cfg.training, cfg.trainer
    choice("model.model_type", m.model_type, ("cond_px_dif", "latent_cond_dif", "depth_band_ae"))
    _validate_latent(cfg, fail, choice, positive)
    choice("model.kernels", m.kernels, ("eager", "triton", "auto"))
    try:
        param = canonical_parameterization(m.parameterization)
    except ValueError as exc:
        fail("model.parameterization", m.parameterization, str(exc))
    for key in ("generated_channels", "condition_channels"):
        positive(f"model.{key}", getattr(m, key))
    if m.condition_use_valid_mask:
        positive("model.condition_mask_channels", m.condition_mask_channels)
    amb = m.ambient_occlusion
    if amb.enabled and amb.require_x0_parameterization and param != "x0":
        fail("model.parameterization", m.parameterization,
             "ambient occlusion (model.ambient_occlusion.enabled) requires the x0 "
             "parameterization while require_x0_parameterization is true")
    if not 0.0 <= amb.further_drop_prob < 1.0:
        fail("model.ambient_occlusion.further_drop_prob", amb.further_drop_prob, "must be in [0, 1)")
    positive("model.ambient_occlusion.min_kept_observed_pixels", amb.min_kept_observed_pixels, strict=False)
    blur = m.post_process.gaussian_blur
    positive("model.post_process.gaussian_blur.kernel_size", blur.kernel_size, strict=False)
    positive("model.post_process.gaussian_blur.sigma", blur.sigma, strict=False)
    cc = m.coord_conditioning
    choice("model.coord_conditioning.encoding", cc.encoding, ("unit_sphere", "sincos", "raw"))
    choice("model.coord_conditioning.date_encoding", cc.date_encoding, ("day_of_year_sincos",))
    if cc.embed_dim is not None:
        positive("model.coord_conditioning.embed_dim", cc.embed_dim)
    u = m.unet
    positive("model.unet.dim", u.dim)
    if u.dim % 2:
        fail("model.unet.dim", u.dim, "must be even (sinusoidal time embedding halves it)")
    if not u.dim_mults or any(k <= 0 for k in u.dim_mults):
        fail("model.unet.dim_mults", u.dim_mults, "must be a non-empty list of positive ints")
    if u.residual and m.condition_channels != 0:
        fail("model.unet.residual", u.residual,
             "adds the raw input to the output, which needs input channels "
             f"({m.generated_channels + m.condition_channels}) == output channels "
             f"({m.generated_channels})")

    n = t.noise
    positive("training.noise.num_timesteps", n.num_timesteps)
    choice("training.noise.schedule", n.schedule, ("linear", "quadratic", "sigmoid", "cosine"))
    if not 0.0 < n.beta_start < n.beta_end < 1.0:
        fail("training.noise.beta_start", n.beta_start,
             f"need 0 < beta_start < beta_end < 1 (beta_end = {n.beta_end}); checked for every "
             "schedule, cosine included")
    positive("training.lr", t.lr)
    positive("training.weight_decay", t.weight_decay, strict=False)
    vs = t.validation_sampling
    choice("training.validation_sampling.sampler", vs.sampler, ("ddpm", "ddim"))
    positive("training.validation_sampling.ddim_num_timesteps", vs.ddim_num_timesteps)
    positive("training.validation_sampling.ddim_eta", vs.ddim_eta, strict=False)
    positive("training.validation_sampling.ddim_temperature", vs.ddim_temperature)

    choice("trainer.precision", tr.precision, ("auto", "bf16", "fp32"))
    choice("trainer.distributed", tr.distributed, ("ddp", "deepspeed"))
    for key in ("max_steps", "gradient_accumulation_steps", "log_every_n_steps",
                "val_every_n_steps", "checkpoint_every_n_steps", "keep_last_checkpoints"):
        positive(f"trainer.{key}", getattr(tr, key))
    positive("trainer.gradient_clip_val", tr.gradient_clip_val, strict=False)
    if tr.distributed == "deepspeed" and not tr.deepspeed_config:
        fail("trainer.deepspeed_config", tr.deepspeed_config,
             "trainer.distributed=deepspeed needs a DeepSpeed config file (configs/deepspeed/zero2.json, ...)")
    if tr.zero_stage is not None and tr.zero_stage not in (0, 1, 2, 3):
        fail("trainer.zero_stage", tr.zero_stage, "must be 0, 1, 2 or 3")
    if tr.global_batch_size is not None:
        positive("trainer.global_batch_size", tr.global_batch_size)
    if tr.intra_op_threads is not None:
        positive("trainer.intra_op_threads", tr.intra_op_threads)
    positive("trainer.ema.start_step", tr.ema.start_step, strict=False)
    if not 0.0 < tr.ema.decay < 1.0:
        fail("trainer.ema.decay", tr.ema.decay, "must be in (0, 1)")
    positive("trainer.ema.update_every", tr.ema.update_every)

    s = cfg.scheduler
    positive("scheduler.warmup.steps", s.warmup.steps, strict=False)
    if not 0.0 <= s.warmup.start_ratio <= 1.0:
        fail("scheduler.warmup.start_ratio", s.warmup.start_ratio, "must be in [0, 1]")
    if s.reduce_on_plateau.enabled and s.cosine.enabled:
        fail("scheduler.cosine.enabled", True, "cannot be combined with reduce_on_plateau")

    d = cfg.dataloader
    positive("dataloader.batch_size", d.batch_size)
    positive("dataloader.val_batch_size", d.val_batch_size)
    positive("dataloader.num_workers", d.num_workers, strict=False)

    g = cfg.dataset.grid
    positive("dataset.grid.tile_size", g.tile_size)
    if g.tile_size % 8:
        fail("dataset.grid.tile_size", g.tile_size, "must be divisible by 8 (the U-Net halves it 3 times)")
    positive("dataset.grid.patch_stride", g.patch_stride)
    positive("dataset.grid.resolution_deg", g.resolution_deg)
    if not 0.0 <= g.max_land_fraction <= 1.0:
        fail("dataset.grid.max_land_fraction", g.max_land_fraction, "must be in [0, 1]")
    positive("dataset.sampling.temporal_window_days", cfg.dataset.sampling.temporal_window_days)
    if g.patch_stride > g.tile_size:
        fail("dataset.grid.patch_stride", g.patch_stride, "must be <= tile_size (gaps between tiles)")
    if round(180 / g.resolution_deg) < g.tile_size:
        fail("dataset.grid.tile_size", g.tile_size, "larger than the global grid")
    if g.bbox and (len(g.bbox) != 4 or not g.bbox[2] < g.bbox[3]):
        fail("dataset.grid.bbox", g.bbox, "must be [lon_min, lon_max, lat_min, lat_max] with lat_min < lat_max")
    for i, r in enumerate(g.force_include_regions):
        if not r.lat_min < r.lat_max:
            fail(f"dataset.grid.force_include_regions.{i}", r.name, "needs lat_min < lat_max")
        if not 0.0 <= r.max_land_fraction <= 1.0:
            fail(f"dataset.grid.force_include_regions.{i}.max_land_fraction", r.max_land_fraction,
                 "must be in [0, 1]")
    sel = cfg.dataset.selection
    for key in ("start_date", "end_date"):
        v = getattr(sel, key)
        if v is not None:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
                fail(f"dataset.selection.{key}", v, "must be YYYY-MM-DD")
    if sel.start_date and sel.end_date and sel.start_date > sel.end_date:
        fail("dataset.selection.end_date", sel.end_date, f"is before start_date {sel.start_date}")
    lay = cfg.dataset.layout
    positive("dataset.layout.shard_samples", lay.shard_samples)
    positive("dataset.layout.quant_step_c", lay.quant_step_c)
    positive("dataset.layout.max_obs_pixels", lay.max_obs_pixels)
    choice("dataset.layout.compressor", lay.compressor, ("lz4", "lz4hc", "zstd", "zlib", "blosclz"))
    choice("dataset.layout.shuffle", lay.shuffle, ("bitshuffle", "shuffle", "noshuffle"))
    if not 0 <= lay.clevel <= 9:
        fail("dataset.layout.clevel", lay.clevel, "must be in [0, 9]")
    if lay.quant_min_c + 65534 * lay.quant_step_c < 40.0:
        fail("dataset.layout.quant_step_c", lay.quant_step_c,
             f"uint16 codes from {lay.quant_min_c} degC must reach at least 40 degC")
    positive("dataloader.shuffle_buffer", d.shuffle_buffer, strict=False)


def _validate_latent(cfg: Config, fail, choice, positive) -> None:
    a, m = cfg.ae, cfg.model
    choice("ae.model_type", a.model_type, ("depth_band_ae",))
    positive("ae.in_channels", a.in_channels)
    positive("ae.latent_channels", a.latent_channels)
    for key, value in (("ae.spatial_downsample", a.spatial_downsample),
                       ("model.latent.spatial_downsample", m.latent.spatial_downsample)):
        if value < 1 or value & (value - 1):
            fail(key, value, "must be a power of two >= 1")
    if not a.encoder_hidden_channels or not a.decoder_hidden_channels:
        fail("ae.encoder_hidden_channels", a.encoder_hidden_channels, "encoder and decoder need >= 1 layer")
    if m.model_type != "latent_cond_dif":
        return
    lat = m.latent
    if m.generated_channels != lat.latent_channels:
        fail("model.generated_channels", m.generated_channels,
             f"the latent model generates model.latent.latent_channels = {lat.latent_channels} channels")
    if lat.spatial_downsample != 1 and lat.eo_in_pixel_space and m.condition_include_eo:
        fail("model.latent.eo_in_pixel_space", True,
             f"EO stays at pixel resolution, so it cannot join a latent downsampled by {lat.spatial_downsample}")


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
