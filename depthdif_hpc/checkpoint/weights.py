"""Full fp32 weights from any checkpoint form: trainer checkpoints (DDP or any ZeRO stage),
exported safetensors, or a plain/Lightning torch state dict. Used for the warm start
(`model.load_checkpoint`: weights only) and by the export command."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.model.state_file import read_state_file


def _deepspeed_weights(ds_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidate `<ckpt>/deepspeed/` (written with tag 'deepspeed') into fp32 tensors."""
    model_states = ds_dir / "mp_rank_00_model_states.pt"
    optim = sorted(ds_dir.glob("*optim_states.pt"))
    if model_states.is_file() and not optim:
        # ZeRO stage 0 (plain data parallel): the module is whole in the model states file.
        sd = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in sd.items()}
    if model_states.is_file():
        head = torch.load(model_states, map_location="cpu", weights_only=False)
        if head.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 0 and not optim:
            return {k: v.float() for k, v in head["module"].items()}
    bf16 = sorted(ds_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"), key=_dp_rank)
    if bf16 and model_states.is_file() and _is_bf16_optimizer(bf16[0]):
        return _bf16_optimizer_weights(model_states, bf16)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # The fp32 master copy lives in the (sharded) optimizer states: exact for any stage.
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _dp_rank(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


def _is_bf16_optimizer(shard: Path) -> bool:
    """BF16_Optimizer's files (stage 0/1) carry fragment maps and no `zero_stage`; ZeRO-2/3
    under bf16 use the same file name with the ZeRO layout that zero_to_fp32 reads."""
    opt = torch.load(shard, map_location="cpu", weights_only=False).get("optimizer_state_dict", {})
    return "zero_stage" not in opt and "param_slice_mappings" in opt


def _bf16_optimizer_weights(model_states: Path, shards: list[Path]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint written by DeepSpeed's BF16_Optimizer.

    DeepSpeed uses that optimizer for bf16 with fp32 gradient accumulation at ZeRO stage 0/1 (what
    the trainer configures); its optimizer files lack the `zero_stage` key that zero_to_fp32
    requires. Each rank's file holds, per parameter group, one flat fp32 partition and the
    (numel, start) of every parameter fragment in it; a parameter is its fragments in rank order.
    """
    head = torch.load(model_states, map_location="cpu", weights_only=False)
    shapes: dict[str, torch.Size] = {}
    for group in head["param_shapes"]:
        shapes.update(group)
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in shapes}
    for shard in shards:
        opt = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"],
                                 strict=True):
            for name, frag in mapping.items():
                pieces[name].append(flat.narrow(0, frag.start, frag.numel))
    out = {}
    for name, shape in shapes.items():
        flat = torch.cat(pieces[name]) if pieces[name] else torch.empty(0)
        if flat.numel() != shape.numel():
            raise ValueError(f"{model_states.parent}: {name} has {flat.numel()} values in the bf16 "
                             f"optimizer shards, its shape {tuple(shape)} needs {shape.numel()}")
        out[name] = flat.float().view(shape).clone()
    return out


def merge_zero3_shards(shards: list[dict[str, torch.Tensor]], shapes: dict[str, str]) -> dict[str, torch.Tensor]:
    """Consolidate per-rank ZeRO-3 EMA partitions (rank order) into full tensors.

    `shapes` is the shard files' metadata: name -> "d0,d1,..." of the full tensor.
    """
    out = {}
    for name, shape_str in shapes.items():
        shape = tuple(int(v) for v in shape_str.split(",")) if shape_str else ()
        numel = math.prod(shape)
        flat = torch.cat([s[name].reshape(-1) for s in shards])
        if flat.numel() < numel:
            raise ValueError(f"EMA shards of {name} hold {flat.numel()} values, need {numel}")
        out[name] = flat[:numel].view(shape).clone()
    return out


def checkpoint_weights(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 model (or EMA) weights from a trainer checkpoint folder."""
    from safetensors.torch import load_file

    d = Path(path)
    why = layout.check_complete(d)
    if why is not None:
        raise ValueError(f"checkpoint {d} is not usable: {why}")
    if ema:
        if (d / layout.EMA).is_file():
            return load_file(str(d / layout.EMA))
        shards = sorted(d.glob(layout.EMA_SHARDS))
        if not shards:
            raise FileNotFoundError(f"checkpoint {d} holds no EMA weights (trainer.ema.enabled was false)")
        from safetensors import safe_open

        with safe_open(str(shards[0]), "pt") as fh:
            shapes = dict(fh.metadata() or {})
        return merge_zero3_shards([load_file(str(s)) for s in shards], shapes)
    if (d / layout.MODEL).is_file():
        return load_file(str(d / layout.MODEL))
    if (d / layout.DEEPSPEED_TAG).is_dir():
        return _deepspeed_weights(d / layout.DEEPSPEED_TAG)
    raise FileNotFoundError(f"checkpoint {d} has neither {layout.MODEL} nor {layout.DEEPSPEED_TAG}/")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from: a trainer checkpoint folder, an export folder or .safetensors file, or a
    torch file (.pt/.pth/.ckpt, a state dict or a Lightning checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model.load_checkpoint: {p} does not exist")
    if p.is_dir():
        p = layout.resolve(p)
        if layout.is_checkpoint(p):
            return checkpoint_weights(p)
        if (p / layout.MODEL).is_file():
            from safetensors.torch import load_file

            return load_file(str(p / layout.MODEL))
        raise FileNotFoundError(f"{p}: no {layout.MANIFEST}, {layout.MODEL} or {layout.CHECKPOINTS}/ inside")
    return read_state_file(p)


def load_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load weights into `model` (strict on shapes); returns a note about unexpected keys and
    about tensors the model lets start fresh (`warm_start_fresh` prefixes) that the file lacks."""
    sd = read_weights(path)
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"model.load_checkpoint {path}: shape mismatch for {len(bad)} tensors, e.g. {bad[:3]} "
                         "(different model.unet settings?)")
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items() if k in own}, strict=False)
    fresh_prefixes = getattr(model, "warm_start_fresh", ())
    fresh = [k for k in result.missing_keys if k.startswith(fresh_prefixes)]
    missing = [k for k in result.missing_keys if k not in fresh]
    extra = [k for k in sd if k not in own]
    if missing:
        raise ValueError(f"model.load_checkpoint {path}: {len(missing)} model tensors missing from the file, "
                         f"e.g. {missing[:3]}")
    notes = [f"ignored {len(extra)} extra tensors, e.g. {extra[:3]}"] if extra else []
    if fresh:
        notes.append(f"not in the file, left at their initial values: {fresh}")
    return "; ".join(notes)


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load full weights, or trainable-only weights (checkpoints leave frozen modules out, e.g.
    the latent workflow's autoencoder, which the config rebuilds from its own checkpoint)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise ValueError(f"weights from {source} do not fit the configured model: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
