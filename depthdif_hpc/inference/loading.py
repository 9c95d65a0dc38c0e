"""Load a trained model for inference from any form the trainer leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from depthdif_hpc.config import Config, config_from_dict
from depthdif_hpc.model.depthdif import build_model


def load_model(checkpoint: str | Path, *, use_ema: bool = True,
               overrides: list[str] | None = None) -> tuple[Config, torch.nn.Module]:
    """(config, model in eval mode) from a run folder, a checkpoint folder or an export folder.

    * run folder (`<run_dir>`): its newest complete checkpoint;
    * checkpoint folder (`<run_dir>/checkpoints/step_XXXXXXXX`, any ZeRO stage);
    * export folder (`python -m depthdif_hpc.train.export`): model.safetensors [+ ema.safetensors]
      and config.yaml.
    EMA weights are used when present and `use_ema`; `overrides` are `key=value` config changes
    (for example `model.kernels=eager`).
    """
    from depthdif_hpc.train import checkpoint as ckpt
    from depthdif_hpc.train.weights import checkpoint_weights, load_model_weights

    src = Path(checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if (src / "checkpoints").is_dir() and not (src / ckpt.MANIFEST).is_file():
        newest = ckpt.latest_complete(src / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"{src}/checkpoints holds no complete checkpoint")
        src = newest
    if (src / ckpt.MANIFEST).is_file():
        state = json.loads((src / "trainer_state.json").read_text())
        cfg_dict = state.get("config")
        if not cfg_dict:
            raise ValueError(f"{src}/trainer_state.json carries no config")
        has_ema = bool(ckpt.read_manifest(src).get("ema"))
        weights = checkpoint_weights(src, ema=use_ema and has_ema)
    elif (src / "model.safetensors").is_file():
        from safetensors.torch import load_file

        cfg_file = src / "config.yaml"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"export folder {src} has no config.yaml next to its weights")
        cfg_dict = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
        name = "ema.safetensors" if use_ema and (src / "ema.safetensors").is_file() else "model.safetensors"
        weights = load_file(str(src / name))
    else:
        raise FileNotFoundError(f"{src} is neither a run folder, a checkpoint folder nor an export folder")
    cfg = config_from_dict(cfg_dict, overrides)
    model = build_model(cfg)
    load_model_weights(model, weights, str(src))
    return cfg, model.eval()
