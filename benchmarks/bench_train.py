"""Training throughput per GPU: samples/s, model FLOPs utilisation and the time a step waits for data.

    python benchmarks/bench_train.py [--preset ambient|standard] [--kernels eager|triton|both]
        [--batch 8,16,32,...|max] [--steps 20] [--store STORE] [--peak-tflops 989]
        [--options none,compile,cl+fused+bench,ckpt,...]

One optimizer step = forward + backward + clip + AdamW (bf16 autocast on GPU, fp32 on CPU), the
same objective the trainer runs. FLOPs per sample come from the analytic count in
depthdif_hpc.model.flops (matmul/conv FLOPs, training step = 3x forward; the same number in
eager and triton modes: 464.5 GFLOP per ambient sample at 128x128, 214.8 for the standard
preset); MFU = samples/s x FLOPs per sample / the GPU's dense bf16 peak (flops.peak_flops:
989.4 TFLOP/s for H100 SXM and H200) unless --peak-tflops. `--batch max` doubles the batch until
the GPU runs out of memory and reports the largest that fits. With --store the batches come from
depthdif_hpc.data's stream (per-step data wait measured); without it, from one pre-built device
batch (pure compute).

--options: step variants, each "none" or "+"-joined trainer speed options (docs/cluster.md,
"Speed options"): compile (torch.compile of the U-Net; aot_eager on CPU, where inductor's C++
build takes minutes), cl (channels_last), fused (fused AdamW), ckpt (activation checkpointing of
every level), bench (cudnn.benchmark), applied as the trainer applies them.

Without a GPU it runs a tiny smoke configuration (no MFU claim). Last line: `samples/s: N`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


OPTION_KEYS = {"compile": "trainer.compile=true", "cl": "trainer.channels_last=true",
               "fused": "trainer.fused_adamw=true", "ckpt": "trainer.activation_checkpointing=all",
               "bench": "trainer.cudnn_benchmark=true"}


def _option_overrides(variant: str, cuda: bool) -> list[str]:
    if variant == "none":
        return []
    names = variant.split("+")
    unknown = [n for n in names if n not in OPTION_KEYS]
    if unknown:
        raise SystemExit(f"--options {variant!r}: unknown {unknown}; known: none, {', '.join(OPTION_KEYS)}")
    over = [OPTION_KEYS[n] for n in names]
    if "compile" in names and not cuda:
        over.append("trainer.compile_backend=aot_eager")
    return over


def _cfg(preset: str, kernels: str, tiny: bool, store: str | None, options: list[str] | None = None):
    from depthdif_hpc.config import load_config

    model_yaml = "model_config_ambient.yaml" if preset == "ambient" else "model_config.yaml"
    files = [ROOT / "configs/px_space" / model_yaml, ROOT / "configs/px_space/training_config.yaml"]
    over = [f"model.kernels={kernels}"]
    if tiny:
        over += ["model.unet.dim=8", "model.unet.dim_mults=[1,2]", "model.noise.num_timesteps=20"]
    if store:
        over += [f"dataset.store={store}"]
    return load_config(*files, overrides=over + (options or []))


def _batch(b: int, size: int, device: torch.device, depth: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(b, depth, size, size, generator=g)
    y_valid = torch.ones(b, depth, size, size, dtype=torch.bool)
    x_valid = (torch.rand(b, 1, size, size, generator=g) < 0.02).expand(b, depth, size, size).clone()
    batch = {"x": y * x_valid, "y": y, "eo": y[:, :1].clone(), "x_valid_mask": x_valid,
             "y_valid_mask": y_valid, "land_mask": torch.ones(b, 1, size, size),
             "coords": torch.zeros(b, 2), "date": torch.full((b,), 20180101)}
    return {k: v.to(device) for k, v in batch.items()}


def run_case(cfg, batch_size: int, steps: int, size: int, device: torch.device, store: str | None) -> dict:
    from depthdif_hpc.model.build import build_model
    from depthdif_hpc.model.flops import train_step_flops_per_sample
    from depthdif_hpc.train.optim import build_optimizer
    from depthdif_hpc.train.setup import apply_speed_options
    from depthdif_hpc.train.stream import to_device

    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    # Counted on the eager model, as the trainer does (the count is the same for every variant).
    flops_per_sample = train_step_flops_per_sample(model, size, size)
    apply_speed_options(model, cfg, zero_stage=0)
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
    flops = flops_per_sample * batch_size
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

    for _ in range(3 if device.type == "cuda" else 1):  # warm-up: allocator, autotuning, lazy init
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
           "flops_per_sample": flops_per_sample, "tflop_per_step": flops / 1e12,
           "achieved_tflops": flops * steps / dt / 1e12,
           "data_wait_s_per_step": wait / steps, "data_wait_fraction": wait / dt}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _mfu(r: dict, device: torch.device, override_tflops: float | None) -> float | None:
    """MFU from flops.mfu (the GPU's dense bf16 peak), or against --peak-tflops."""
    from depthdif_hpc.model.flops import mfu

    if override_tflops:
        return r["samples_per_s"] * r["flops_per_sample"] / (override_tflops * 1e12)
    if device.type != "cuda":
        return None
    return mfu(r["samples_per_s"], r["flops_per_sample"], torch.cuda.get_device_name(device),
               torch.bfloat16)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["ambient", "standard"], default="ambient")
    ap.add_argument("--kernels", choices=["eager", "triton", "both"], default="both")
    ap.add_argument("--batch", default="max", help="comma list, or 'max' (double until OOM)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--store", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration (forced without a GPU)")
    ap.add_argument("--options", default="none",
                    help="comma list of step variants: none or +-joined compile, cl, fused, ckpt, bench")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.smoke or not cuda
    size = 32 if tiny else 128
    steps = 2 if tiny else args.steps
    kernels = ["eager", "triton"] if args.kernels == "both" else [args.kernels]
    if not cuda:
        kernels = ["eager"]  # the Triton interpreter would time the interpreter, not the kernels
    last = 0.0
    variants = [(k, v) for k in kernels for v in args.options.split(",")]
    for k, variant in variants:
        cfg = _cfg(args.preset, k, tiny, args.store, _option_overrides(variant, cuda))
        if "compile" in variant:
            torch._dynamo.reset()  # each compiled variant compiles afresh
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
            u = _mfu(r, device, args.peak_tflops)
            mfu = f"{100 * u:.1f}%" if u is not None else "n/a (no GPU peak known)"
            print(f"[{args.preset} {k} {variant} {device.type}{' smoke' if tiny else ''}] batch {r['batch']}: "
                  f"{r['samples_per_s']:.2f} samples/s, step {1e3 * r['step_s']:.1f} ms, "
                  f"{r['flops_per_sample'] / 1e9:.2f} GFLOP/sample, {r['tflop_per_step']:.3f} TFLOP/step, "
                  f"{r['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}, "
                  f"data wait {1e3 * r['data_wait_s_per_step']:.1f} ms/step "
                  f"({100 * r['data_wait_fraction']:.1f}%)"
                  + (f", peak mem {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""), flush=True)
        if results:
            last = results[-1]["samples_per_s"]
    print(f"samples/s: {last:.3f}")
    return last


def test_bench_train_smoke_cpu(capsys):
    """The benchmark runs end to end (tiny CPU configuration) and reports the analytic FLOPs."""
    from depthdif_hpc.model.build import build_model
    from depthdif_hpc.model.flops import train_step_flops_per_sample

    assert main(["--smoke", "--kernels", "eager", "--batch", "2"]) > 0
    expected = train_step_flops_per_sample(build_model(_cfg("ambient", "eager", True, None)), 32, 32)
    assert f"{expected / 1e9:.2f} GFLOP/sample" in capsys.readouterr().out


def test_bench_train_step_variants_cpu(capsys):
    """A speed-option variant runs the step the trainer would run (torch.compile is left to the
    trainer's tests and the GPU rehearsal: tracing it here would double this test's time)."""
    assert main(["--smoke", "--kernels", "eager", "--batch", "2", "--options", "cl+fused+ckpt+bench"]) > 0
    assert "[ambient eager cl+fused+ckpt+bench cpu smoke] batch 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown.*'fast'"):
        main(["--smoke", "--options", "cl+fast"])


if __name__ == "__main__":
    main(sys.argv[1:])
