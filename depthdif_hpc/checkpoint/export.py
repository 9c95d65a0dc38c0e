"""`depthdif-export CHECKPOINT --out DIR`: consolidated fp32 weights (and the
EMA weights when the run kept them) in safetensors, from a DDP or any-ZeRO-stage checkpoint.

CHECKPOINT is a checkpoint folder (`<run_dir>/checkpoints/step_XXXXXXXX`) or a run folder (its
newest complete checkpoint is used). The output loads on any number of GPUs with
`model.load_state_dict(safetensors.torch.load_file(DIR/"model.safetensors"))`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from depthdif_hpc.checkpoint import layout
from depthdif_hpc.checkpoint.weights import checkpoint_weights
from depthdif_hpc.command import command


def export(checkpoint: str | Path, out: str | Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    src = layout.resolve(checkpoint)
    if not layout.is_checkpoint(src):
        raise FileNotFoundError(f"{src} is neither a run folder (no {layout.CHECKPOINTS}/) nor a "
                                f"checkpoint folder (no {layout.MANIFEST})")
    # Read before the output folder exists: a source that is not a checkpoint leaves nothing behind.
    weights = {k: v.float().contiguous() for k, v in checkpoint_weights(src).items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = layout.read_manifest(src)
    written: dict[str, Path] = {}
    meta = {"source": str(src.resolve()), "step": str(manifest.get("step", "")), "dtype": "float32"}
    target = out / layout.MODEL
    save_file(weights, str(target) + ".part", metadata=meta)
    os.replace(str(target) + ".part", target)
    written["model"] = target
    if manifest.get("ema"):
        ema = {k: v.float().contiguous() for k, v in checkpoint_weights(src, ema=True).items()}
        target = out / layout.EMA
        save_file(ema, str(target) + ".part", metadata=meta)
        os.replace(str(target) + ".part", target)
        written["ema"] = target
    state = src / layout.TRAINER_STATE
    if state.is_file():
        cfg = json.loads(state.read_text()).get("config")
        if cfg:
            from omegaconf import OmegaConf

            (out / layout.CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return written


@command()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.checkpoint.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint folder or run folder")
    ap.add_argument("--out", required=True, help="output folder for model.safetensors / ema.safetensors")
    args = ap.parse_args(argv)
    written = export(args.checkpoint, args.out)
    for k, p in written.items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
