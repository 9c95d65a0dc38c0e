"""Weights files of every origin read into this package's state-dict names, including a research
Lightning checkpoint (docs/model.md#checkpoint-compatibility)."""

import re

import pytest
import torch

from depthdif_hpc import build_model
from depthdif_hpc.model.state_file import read_state_file
from tests.helpers import tiny_config


def _research_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names the research code gives the same tensors, written out from the table in
    docs/model.md, nested the way its Lightning module saves them."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^model\.final_conv\.0\.", "model.final_block.", k)
        k = re.sub(r"^model\.final_conv\.1\.", "model.final_conv.", k)
        k = re.sub(r"^coord_mlp\.net\.", "coord_mlp.", k)
        out["model." + k] = v
    out["model.betas"] = torch.zeros(20)  # schedule buffers the research module also saves
    return out


def test_research_lightning_checkpoint_loads_strictly(tmp_path):
    model = build_model(tiny_config())
    state = model.state_dict()
    research = _research_layout(state)
    renamed = [k for k in state if not k.startswith(("model.downs", "model.ups", "model.mid",
                                                     "model.init", "model.time"))]
    assert sum(("model." + k) not in research for k in state) == len(renamed) == 16
    path = tmp_path / "epoch=9.ckpt"
    torch.save({"state_dict": research, "hyper_parameters": {"lr": 1e-4}}, path)

    loaded = read_state_file(path)
    assert set(loaded) == set(state) | {"betas"}
    fresh = build_model(tiny_config())
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    assert missing == [] and unexpected == ["betas"]
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_package_names_are_never_renamed(tmp_path):
    state = build_model(tiny_config()).state_dict()
    path = tmp_path / "weights.pt"
    torch.save({"model": state}, path)
    assert set(read_state_file(path)) == set(state)


def test_not_a_state_dict_names_the_file(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"model": {"a": 1}}, path)
    with pytest.raises(ValueError, match="bad.pt"):
        read_state_file(path)
