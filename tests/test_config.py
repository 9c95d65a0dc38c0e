from pathlib import Path

import pytest

from depthdif_hpc.config import ConfigError, config_from_dict, load_config, to_dict
from tests.helpers import PRESET_AMBIENT, PRESET_STANDARD, TRAINING

DATA = "configs/px_space/data_config.yaml"


def test_presets_load_and_merge():
    cfg = load_config(PRESET_AMBIENT, TRAINING, DATA)
    assert cfg.model.unet.dim == 96 and cfg.model.ambient_occlusion.enabled
    assert cfg.model.ambient_occlusion.further_drop_prob == 0.25
    assert cfg.model.ambient_occlusion.min_kept_observed_pixels == 4
    assert cfg.model.noise.schedule == "cosine" and cfg.training.lr == 1e-4
    assert cfg.dataloader.batch_size == 48
    std = load_config(PRESET_STANDARD, TRAINING, DATA)
    assert std.model.unet.dim == 64 and not std.model.ambient_occlusion.enabled
    assert std.model.post_process.gaussian_blur.enabled and std.model.post_process.gaussian_blur.sigma == 0.75


def test_overrides_apply_in_order():
    cfg = load_config(PRESET_STANDARD, overrides=["model.unet.dim=32", "training.lr=0.5"])
    assert cfg.model.unet.dim == 32 and cfg.training.lr == 0.5


def test_defaults_match_reference_constructor():
    cfg = load_config()
    m = cfg.model
    assert (m.generated_channels, m.condition_channels, m.clamp_known_pixels, m.parameterization) == (
        1, 1, True, "epsilon")
    assert cfg.model.noise.schedule == "linear" and cfg.model.noise.beta_end == 2e-2
    assert cfg.model.ambient_occlusion.min_kept_observed_pixels == 1


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_key_names_file_and_key(tmp_path):
    bad = _write(tmp_path, "model:\n  unet:\n    dimm: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(PRESET_STANDARD, bad)
    msg = str(err.value)
    assert "bad.yaml" in msg and "model.unet.dimm" in msg and "did you mean 'model.unet.dim'" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.yaml.*optimizer"):
        load_config(_write(tmp_path, "optimizer:\n  lr: 1\n"))


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.unet.dim"):
        load_config(_write(tmp_path, "model:\n  unet:\n    dim: sixty-four\n"))


def test_impossible_betas_name_file(tmp_path):
    bad = _write(tmp_path, "model:\n  noise:\n    beta_start: 0.5\n    beta_end: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.noise.beta_start = 0.5"):
        load_config(TRAINING, bad)


def test_ambient_without_x0_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(PRESET_AMBIENT, overrides=["model.parameterization=epsilon"])
    assert "override 'model.parameterization=epsilon'" in str(err.value)
    assert "x0" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.kernels=cuda", "model.kernels"),
     ("model.noise.schedule=exp", "model.noise.schedule"),
     ("model.ambient_occlusion.further_drop_prob=1.0", "further_drop_prob"),
     ("model.sampling.sampler=euler", "model.sampling.sampler"),
     ("dataset.layout.compressor=gzip", "dataset.layout.compressor"),
     ("trainer.full_reconstruction_samples=9", "exceeds dataloader.val_batch_size"),
     ("model.unet.dim=0", "model.unet.dim"),
     ("model.parameterization=v", "model.parameterization"),
     ("trainer.precision=fp16", "trainer.precision"),
     ("dataloader.batch_size=0", "dataloader.batch_size")],
)
def test_bad_values(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(PRESET_STANDARD, overrides=[override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["model.unet.dim"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="override 'model.unet.dimm=3'"):
        load_config(overrides=["model.unet.dimm=3"])


def test_parameterization_aliases():
    for alias in ("x_0", "XSTART", "x-0"):
        assert load_config(overrides=[f"model.parameterization={alias}"]).model.parameterization == alias
    from depthdif_hpc.config import canonical_parameterization as cp

    assert [cp(a) for a in ("eps", "Noise", "x_start", "X0")] == ["epsilon", "epsilon", "x0", "x0"]


def test_round_trip_through_dict():
    cfg = load_config(PRESET_AMBIENT, TRAINING, DATA)
    assert config_from_dict(to_dict(cfg)) == cfg


def test_choice_fields_list_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.kernels=cuda"])
    assert "override 'model.kernels=cuda'" in str(err.value)
    assert "['eager', 'triton', 'auto']" in str(err.value)


def test_moved_key_in_a_file_names_its_new_home(tmp_path):
    bad = _write(tmp_path, "training:\n  noise:\n    num_timesteps: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'training.noise' moved to 'model.noise'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"'model.log_intermediates' was removed"):
        load_config(overrides=["model.log_intermediates=true"])


def test_config_saved_by_an_older_version_is_carried_over():
    cfg = load_config(PRESET_AMBIENT, TRAINING, DATA)
    old = to_dict(cfg)
    old["training"]["noise"] = old["model"].pop("noise")
    sampling = old["model"].pop("sampling")
    old["training"]["validation_sampling"] = {
        **sampling, "log_intermediates": old["trainer"].pop("log_intermediates"),
        "max_full_reconstruction_samples": old["trainer"].pop("full_reconstruction_samples")}
    old["model"]["log_intermediates"] = True  # a removed knob
    assert config_from_dict(old) == cfg


def test_each_section_states_its_own_rules():
    """A section's rule travels with the section (its check()), whatever tree it sits in."""
    from depthdif_hpc.config import NoiseConfig

    assert list(NoiseConfig().check()) == []
    [(key, value, why)] = list(NoiseConfig(beta_start=0.3, beta_end=0.2).check())
    assert key == "beta_start" and value == 0.3 and "beta_start < beta_end" in why


def test_choices_match_the_owners_registries():
    """A choice the config accepts is one its owner implements, and the other way round."""
    from typing import get_args

    from depthdif_hpc.kernels.dispatch import KERNEL_MODES

    from depthdif_hpc import config as c
    from depthdif_hpc.diffusion.schedules import SCHEDULES
    from depthdif_hpc.model.embeddings import COORD_ENCODING_DIMS, DATE_ENCODING_DIMS

    assert set(get_args(c.ScheduleName)) == set(SCHEDULES)
    assert set(get_args(c.KernelMode)) == set(KERNEL_MODES)
    assert set(get_args(c.CoordEncoding)) == set(COORD_ENCODING_DIMS)
    assert set(get_args(c.DateEncoding)) == set(DATE_ENCODING_DIMS)
    model = build_model_for_sampler_check()
    for name in get_args(c.SamplerName):
        assert model.make_sampler(name).name == name


def build_model_for_sampler_check():
    from depthdif_hpc import build_model
    from tests.helpers import tiny_config

    return build_model(tiny_config())
