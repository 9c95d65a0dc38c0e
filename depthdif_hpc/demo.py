"""`make demo`: the largest end-to-end path that runs on a laptop CPU in about a minute.

Builds the ambient preset shrunk to a small U-Net, trains it for a few steps on generated
ocean-like tensors (low-rank depth structure, sparse observed columns, a land strip), samples
with DDIM and prints the reconstruction error in degC on the valid pixels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from depthdif_hpc import build_model, load_config
from depthdif_hpc.normalization import denormalize_temperature

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "px_space"


def generated_batch(b: int, h: int, w: int, depth: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ocean-like tensors in the SPEC 1 contract (model space), for the demo only."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    z = torch.linspace(0, 1, depth)
    surface = 1.0 - 1.5 * yy[None] + 0.2 * torch.randn(b, 1, 1, 1, generator=g)  # warm south, cold north
    eddies = 0.3 * torch.sin(6.28 * (xx * 2 + torch.rand(b, 1, 1, 1, generator=g))) * torch.cos(9 * yy)
    decay = torch.exp(-z / 0.15)[None, :, None, None]
    y = -1.2 + (surface + eddies + 1.2) * decay
    y_valid = torch.ones(b, depth, h, w, dtype=torch.bool)
    y_valid[..., : w // 8] = False  # a coast
    y = y * y_valid
    cols = torch.rand(b, 1, h, w, generator=g) < 0.04
    x_valid = cols & y_valid
    x_valid[:, 40:] = False  # floats reach about 2000 m
    x = (y + 0.02 * torch.randn(y.shape, generator=g)) * x_valid
    return {
        "eo": (surface + eddies) * y_valid[:, :1],
        "x": x, "y": y, "x_valid_mask": x_valid, "y_valid_mask": y_valid,
        "land_mask": y_valid[:, :1].float(),
        "coords": torch.tensor([[30.0, -40.0]]).repeat(b, 1),
        "date": torch.full((b,), 20180615, dtype=torch.long),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ddim-steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = load_config(
        CONFIGS / "model_config.yaml", CONFIGS / "training_config.yaml",
        overrides=["model.unet.dim=16", "model.unet.dim_mults=[1,2,4]", "model.kernels=eager",
                   "training.lr=2e-3", f"training.validation_sampling.ddim_num_timesteps={args.ddim_steps}"],
    )
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"[1/3] model: standard preset, unet.dim=16, {n:,} parameters")
    train = generated_batch(4, args.size, args.size, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        loss, _ = model(train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        if step == 1 or step % 25 == 0:
            print(f"[2/3] train step {step:4d}/{args.steps}  loss {loss.item():.4f}")
    print(f"      {args.steps} steps in {time.time() - t0:.1f}s")
    model.eval()
    test = generated_batch(2, args.size, args.size, seed=2)
    out = model.predict(test, sampler="ddim", generator=torch.Generator().manual_seed(0))
    truth = denormalize_temperature(test["y"])
    valid = test["y_valid_mask"]
    err = (out["y_hat_denorm"] - truth)[valid]
    baseline = (denormalize_temperature(torch.zeros_like(truth)) - truth)[valid]
    print(f"[3/3] DDIM {args.ddim_steps} steps: RMSE {err.pow(2).mean().sqrt():.3f} degC on valid pixels "
          f"(mean-state baseline {baseline.pow(2).mean().sqrt():.3f} degC)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
