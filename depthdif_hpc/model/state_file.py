"""One state dict from one weights file, whatever wrote it: safetensors (an export), a torch file
holding a state dict, a `{"model": ...}` wrapper, or a Lightning checkpoint of the research code
(`state_dict`, with the module nested one level deeper: docs/model.md#checkpoint-compatibility).

Folders (trainer checkpoints, run folders) are the checkpoint layer's business
(`depthdif_hpc.checkpoint.weights.read_weights`), which reads files through this function.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# The research code (docs/model.md#checkpoint-compatibility, reference commit a399949) names 16
# tensors differently: it split the final block and 1x1 convolution into two attributes and
# nests the coordinate MLP's layers directly. Same shapes, so a rename is the whole conversion.
# Applied only to Lightning checkpoints in the research layout (`model.model.*`), where the
# left-hand names cannot collide with this package's own.
_RESEARCH_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.final_block\."), "model.final_conv.0."),
    (re.compile(r"^model\.final_conv\.(weight|bias)$"), r"model.final_conv.1.\1"),
    (re.compile(r"^coord_mlp\.(\d+)\."), r"coord_mlp.net.\1."),
)


def _research_to_package(key: str) -> str:
    for pattern, repl in _RESEARCH_RENAMES:
        key, n = pattern.subn(repl, key)
        if n:
            break
    return key


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    # Lightning checkpoints pickle hyper-parameters and loop state beside the tensors.
    obj = torch.load(p, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: expected a state dict of tensors, got {type(obj).__name__}")
    if any(k.startswith("model.model.") for k in obj):
        obj = {_research_to_package(k[len("model."):]): v
               for k, v in obj.items() if k.startswith("model.")}
    return obj
