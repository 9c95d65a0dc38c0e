"""Load a trained model for inference from any form the trainer leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.checkpoint.weights import checkpoint_weights, load_model_weights
from depthdif_hpc.config import Config, config_from_dict
from depthdif_hpc.model.build import build_model


def load_model(checkpoint: str | Path, *, use_ema: bool = True,
               overrides: list[str] | None = None) -> tuple[Config, torch.nn.Module]:
    """(config, model in eval mode) from a run folder, a checkpoint folder or an export folder.

    * run folder (`<run_dir>`): its newest complete checkpoint;
    * checkpoint folder (`<run_dir>/checkpoints/step_XXXXXXXX`, any ZeRO stage);
    * export folder (`depthdif-export`): model.safetensors [+ ema.safetensors]
      and config.yaml.
    EMA weights are used when present and `use_ema`; `overrides` are `key=value` config changes
    (for example `model.kernels=eager`).
    """
    src = Path(checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    src = layout.resolve(src)
    if layout.is_checkpoint(src):
        state = json.loads((src / layout.TRAINER_STATE).read_text())
        cfg_dict = state.get("config")
        if not cfg_dict:
            raise ValueError(f"{src}/{layout.TRAINER_STATE} carries no config")
        has_ema = bool(layout.read_manifest(src).get("ema"))
        weights = checkpoint_weights(src, ema=use_ema and has_ema)
    elif (src / layout.MODEL).is_file():
        from omegaconf import OmegaConf
        from safetensors.torch import load_file

        cfg_file = src / layout.CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"export folder {src} has no {layout.CONFIG} next to its weights")
        cfg_dict = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
        name = layout.EMA if use_ema and (src / layout.EMA).is_file() else layout.MODEL
        weights = load_file(str(src / name))
    else:
        raise FileNotFoundError(f"{src} is neither a run folder, a checkpoint folder nor an export folder")
    cfg = config_from_dict(cfg_dict, overrides)
    model = build_model(cfg)
    load_model_weights(model, weights, str(src))
    return cfg, model.eval()
