"""Training throughput per GPU: samples/s, model FLOPs utilisation and the time a step waits for data.

    python benchmarks/bench_train.py [--preset ambient|standard] [--kernels eager|triton|both]
        [--batch 8,16,32,...|max] [--steps 20] [--store STORE] [--peak-tflops 989]

One optimizer step = forward + backward + clip + AdamW (bf16 autocast on GPU, fp32 on CPU), the
same objective the trainer runs. FLOPs are counted on the U-Net objective with
torch.utils.flop_counter (convolutions and matmuls, forward + backward) at the measured batch;
MFU = FLOPs per step x steps/s / peak (989 TFLOP/s dense bf16 for H100 SXM and H200 unless
--peak-tflops). `--batch max` doubles the batch until the GPU runs out of memory and reports the
largest that fits. With --store the batches come from depthdif_hpc.data's stream (per-step data
wait measured); without it, from one pre-built device batch (pure compute).

Without a GPU it runs a tiny smoke configuration (no MFU claim). Last line: `samples/s: N`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _cfg(preset: str, kernels: str, tiny: bool, store: str | None):
    from depthdif_hpc.config import load_config

    model_yaml = "model_config_ambient.yaml" if preset == "ambient" else "model_config.yaml"
    files = [ROOT / "configs/px_space" / model_yaml, ROOT / "configs/px_space/training_config.yaml"]
    over = [f"model.kernels={kernels}"]
    if tiny:
        over += ["model.unet.dim=8", "model.unet.dim_mults=[1,2]", "training.noise.num_timesteps=20"]
    if store:
        over += [f"dataset.store={store}"]
    return load_config(*files, overrides=over)


def _batch(b: int, size: int, device: torch.device, depth: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(b, depth, size, size, generator=g)
    y_valid = torch.ones(b, depth, size, size, dtype=torch.bool)
    x_valid = (torch.rand(b, 1, size, size, generator=g) < 0.02).expand(b, depth, size, size).clone()
    batch = {"x": y * x_valid, "y": y, "eo": y[:, :1].clone(), "x_valid_mask": x_valid,
             "y_valid_mask": y_valid, "land_mask": torch.ones(b, 1, size, size),
             "coords": torch.zeros(b, 2), "date": torch.full((b,), 20180101)}
    return {k: v.to(device) for k, v in batch.items()}


def count_flops(model: torch.nn.Module, batch: dict, precision_ctx) -> float:
    """FLOPs of one training step's forward + backward (U-Net convs/matmuls dominate)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, precision_ctx():
        loss, _ = model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_case(cfg, batch_size: int, steps: int, size: int, device: torch.device, store: str | None) -> dict:
    from depthdif_hpc.model.depthdif import build_model
    from depthdif_hpc.train.optim import build_optimizer
    from depthdif_hpc.train.stream import to_device

    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = build_optimizer(model, cfg)
    bf16 = device.type == "cuda"

    def ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    loader = None
    if store:
        from depthdif_hpc.data import make_dataloader

        loader = iter(make_dataloader(cfg, "train", 0, 1, batch_size=batch_size))
        fixed = None
    else:
        fixed = _batch(batch_size, size, device)
    flops = count_flops(model, fixed if fixed is not None else to_device(next(loader), device), ctx)
    wait = 0.0

    def step() -> None:
        nonlocal wait
        if loader is not None:
            t0 = time.perf_counter()
            b = next(loader)
            wait += time.perf_counter() - t0
            b = to_device(b, device)
        else:
            b = fixed
        with ctx():
            loss, _ = model(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, autotuning, lazy init
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {"batch": batch_size, "step_s": dt / steps, "samples_per_s": batch_size * steps / dt,
           "tflop_per_step": flops / 1e12, "achieved_tflops": flops * steps / dt / 1e12,
           "data_wait_s_per_step": wait / steps, "data_wait_fraction": wait / dt}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["ambient", "standard"], default="ambient")
    ap.add_argument("--kernels", choices=["eager", "triton", "both"], default="both")
    ap.add_argument("--batch", default="max", help="comma list, or 'max' (double until OOM)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--store", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration (forced without a GPU)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.smoke or not cuda
    size = 32 if tiny else 128
    steps = 2 if tiny else args.steps
    kernels = ["eager", "triton"] if args.kernels == "both" else [args.kernels]
    if not cuda:
        kernels = ["eager"]  # the Triton interpreter would time the interpreter, not the kernels
    peak = _peak(device, args.peak_tflops)
    last = 0.0
    for k in kernels:
        cfg = _cfg(args.preset, k, tiny, args.store)
        if args.batch == "max" and not tiny:
            results, b = [], 4
            while True:
                try:
                    results.append(run_case(cfg, b, steps, size, device, args.store))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    break
                b *= 2
        else:
            sizes = [2] if tiny and args.batch == "max" else [int(v) for v in args.batch.split(",")]
            results = [run_case(cfg, b, steps, size, device, args.store) for b in sizes]
        for r in results:
            mfu = f"{100 * r['achieved_tflops'] / peak:.1f}%" if peak else "n/a (no GPU peak known)"
            print(f"[{args.preset} {k} {device.type}{' smoke' if tiny else ''}] batch {r['batch']}: "
                  f"{r['samples_per_s']:.2f} samples/s, step {1e3 * r['step_s']:.1f} ms, "
                  f"{r['tflop_per_step']:.3f} TFLOP/step, {r['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}, "
                  f"data wait {1e3 * r['data_wait_s_per_step']:.1f} ms/step "
                  f"({100 * r['data_wait_fraction']:.1f}%)"
                  + (f", peak mem {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""), flush=True)
        if results:
            last = results[-1]["samples_per_s"]
    print(f"samples/s: {last:.3f}")
    return last


def test_bench_train_smoke_cpu():
    """The benchmark runs end to end (tiny CPU configuration) and counts FLOPs."""
    assert main(["--smoke", "--kernels", "eager", "--batch", "2"]) > 0


if __name__ == "__main__":
    main(sys.argv[1:])
