"""The trainer's command line for a preset, user configs and key=value overrides.

Mirrors slurm/train.sh: preset configs first, then the user's --config files, then defaults for
the run folder and resume, then the user's overrides (which win), and on a requeue
`trainer.resume=auto` last (a requeued attempt always continues its own run).
"""

from __future__ import annotations

from pathlib import Path

from depthdif_hpc.config import config_dir

# Relative to the shipped configs (depthdif_hpc.config.config_dir), as slurm/train.sh names them.
PRESETS = {
    "standard": "px_space/model_config.yaml",
    "ambient": "px_space/model_config_ambient.yaml",
}
COMMON = ("px_space/training_config.yaml", "px_space/data_config.yaml")


def preset_configs(preset: str, root: Path | None = None) -> list[Path]:
    """The preset's config files under `root` (default: the shipped configs)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    root = config_dir() if root is None else root
    files = [root / PRESETS[preset], *(root / c for c in COMMON)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"preset {preset!r}: config file(s) not found: {', '.join(missing)}")
    return files


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """['--config', 'a.yaml', 'x=1', '--config=b.yaml'] -> (['a.yaml', 'b.yaml'], ['x=1'])."""
    configs, overrides = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config":
            if i + 1 >= len(args):
                raise ValueError("--config needs a file")
            configs.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            configs.append(a.split("=", 1)[1])
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ValueError(f"unexpected trainer argument {a!r}: pass --config FILE or key=value overrides")
        i += 1
    return configs, overrides


def override_value(overrides: list[str], key: str) -> str | None:
    """The last value given for `key` in key=value overrides, or None."""
    value = None
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            value = v
    return value


def trainer_argv(preset: str, configs: list[str], overrides: list[str], *, run_dir: str | Path,
                 restart: int = 0, root: Path | None = None) -> list[str]:
    argv: list[str] = []
    for f in [*preset_configs(preset, root), *configs]:
        argv += ["--config", str(f)]
    argv += [f"trainer.run_dir={run_dir}", "trainer.resume=auto", *overrides]
    if restart > 0:
        argv.append("trainer.resume=auto")
    return argv
