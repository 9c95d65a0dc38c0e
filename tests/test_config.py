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
    assert cfg.training.noise.schedule == "cosine" and cfg.training.lr == 1e-4
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
    assert cfg.training.noise.schedule == "linear" and cfg.training.noise.beta_end == 2e-2
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
    bad = _write(tmp_path, "training:\n  noise:\n    beta_start: 0.5\n    beta_end: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: training.noise.beta_start = 0.5"):
        load_config(TRAINING, bad)


def test_ambient_without_x0_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(PRESET_AMBIENT, overrides=["model.parameterization=epsilon"])
    assert "override 'model.parameterization=epsilon'" in str(err.value)
    assert "x0" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [("model.kernels=cuda", "model.kernels"),
     ("training.noise.schedule=exp", "training.noise.schedule"),
     ("model.ambient_occlusion.further_drop_prob=1.0", "further_drop_prob"),
     ("training.validation_sampling.sampler=euler", "sampler"),
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
