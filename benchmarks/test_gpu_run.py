"""benchmarks/gpu_run.sh in its CPU rehearsal, its time limits and budget, and the wheelhouse.

The rehearsal runs every stage for real on the CPU (Triton interpreter, tiny shapes, the real
trainer entry point with DeepSpeed ZeRO-2), so a change that breaks a stage's wiring fails here
rather than during a scarce GPU lease. Its numbers are not checked: they time the interpreter.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
ALL_STAGES = ["deps", "env", "parity", "calls", "step", "profile", "latent", "trainer", "sample",
              "step_compile", "calls_compile", "gpu_tests"]
FILES = {"summary.txt", "report.md", "log.txt", "env.csv", "parity.csv", "calls.csv", "steps.csv",
         "profile.csv"}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


stages = _load("gpu_stages")
wheelhouse = _load("wheelhouse")


def run_script(tmp_path: Path, timeout: int = 1200, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PY": sys.executable, "TMPDIR": str(tmp_path),
            "REHEARSAL": "1", **env}
    for var in ("DD_STALL_STAGE", "STAGES", "DEPS_MODULES", "WORK", "STEP_MODES", "COMPILE_STEP_MODES"):
        if var not in env:
            full.pop(var, None)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    return proc, out


def summary(out: Path) -> dict[str, tuple[str, str]]:
    """stage -> (status, rc) from summary.txt's stage table."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ALL_STAGES:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def table(out: Path, name: str) -> tuple[list[str], list[dict[str, str]]]:
    with (out / f"{name}.csv").open(newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _why(proc: subprocess.CompletedProcess, out: Path) -> str:
    log = (out / "log.txt").read_text()[-6000:] if (out / "log.txt").exists() else ""
    return f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-2000:]}\nlog.txt:\n{log}"


@pytest.mark.slow
def test_rehearsal_runs_every_stage(tmp_path):
    proc, out = run_script(tmp_path, BUDGET_S="1500")
    assert proc.returncode == 0, _why(proc, out)
    got = summary(out)
    assert list(got) == ALL_STAGES, _why(proc, out)
    assert all(v == ("ok", "0") for v in got.values()), f"{got}\n{_why(proc, out)}"
    # At most 8 files come back from the GPU machine: exactly these, nothing else.
    assert {p.name for p in out.iterdir()} == FILES
    # The summary is printed last.
    assert proc.stdout.rstrip().endswith((out / "summary.txt").read_text().rstrip())

    for name, cols in stages.TABLES.items():
        header, _ = table(out, name)
        assert header == cols, name

    _, env = table(out, "env")
    env = {r["key"]: r["value"] for r in env}
    assert env["mode"].startswith("rehearsal") and env["torch"] and env["triton"]
    assert env["stages"].split() == ALL_STAGES
    # The two measured ceilings (rehearsal sizes) beside the datasheet figure (none for a CPU).
    plan = stages.Plan.make(True)
    assert float(env["copy_tb_s"]) > 0 and float(env[f"bf16_matmul_{plan.ceiling_matmul_n}_tflop_s"]) > 0
    assert env["bf16_datasheet_tflop_s"] == "unknown"

    _, rows = table(out, "parity")
    parity, tests = stages.split_gpu_tests(rows)
    # CPU: every CUDA-only test skipped, none failed
    assert [(r["case"], r["ok"]) for r in tests] == [("(summary)", "yes")], tests
    assert {r["kernel"] for r in parity} == {"convnext_front", "convnext_front_epilogue",
                                             "linear_attention", "layer_norm", "unet"}
    assert all(r["ok"] == "yes" for r in parity)
    assert {r["mix"] for r in parity if r["kernel"] == "convnext_front"} == set(plan.parity_mixes)
    front_cases = {r["case"] for r in parity if r["kernel"] == "convnext_front"}
    # The model's own flags: the first block (no LN, fp32 input) and the last (no time bias).
    assert any("noLN" in c and "x fp32" in c for c in front_cases), front_cases
    assert any("noTB" in c for c in front_cases), front_cases
    tensors = {r["tensor"] for r in parity if r["kernel"] == "convnext_front"}
    assert {"out", "dx", "ddw_weight", "dtime_bias", "dfilm_scale", "dln_weight"} <= tensors
    assert all(0 <= float(r["err_kernel"]) <= float(r["tol"]) for r in parity)

    _, calls = table(out, "calls")
    by_call: dict[str, set[str]] = {}
    for r in calls:
        by_call.setdefault(r["call"], set()).add(r["impl"])
        assert float(r["fwd_ms"]) > 0 and float(r["fwdbwd_ms"]) > 0 and int(r["per_step"]) >= 1
    impls = {f"{i}{lay}" for i in ("eager", "triton", "compile") for lay in plan.call_layouts}
    kinds = {r["call"]: r["kind"] for r in calls}
    # Fronts also time the epilogue variant on channels_last inputs (the dispatch table's input),
    # the attention its kernel on contiguous copies of q, k, v.
    extra = {"front": {"epilogue+cl"}, "attention": {"contig+cl"}, "norm": set()}
    assert all(v == impls | extra[kinds[c]] for c, v in by_call.items()), by_call
    # calls_compile times no eager baseline the calls stage has timed (a headline would count it twice)
    assert len({(r["call"], r["impl"]) for r in calls}) == len(calls)
    assert {r["kind"] for r in calls} == {"front", "attention", "norm"}

    # The dispatch table: per call key and context, the fastest implementation timed, in
    # report.md and written by the dispatch_table command.
    table_file = tmp_path / "dispatch_table.json"
    made = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_stages.py"),
                           "dispatch_table", "--out", str(out), "--table", str(table_file)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    from depthdif_hpc.kernels import DispatchTable

    dtable = DispatchTable.load(table_file)
    keys = {stages.table_key(r, compiled) for r in calls for compiled in (False, True)} - {None}
    assert dtable.device == "cpu" and set(dtable.entries) == keys, (dtable, keys)
    assert {k[0] for k in keys} == {"convnext_front", "layer_norm", "linear_attention"}
    for e in json.loads(table_file.read_text())["entries"]:
        assert e["impl"] == min(e["ms"], key=e["ms"].get) and len(e["ms"]) >= 2, e
        if e["compiled"]:  # the kernels' times stand for both contexts, the reference's do not
            assert "reference" in e["ms"], e

    _, steps = table(out, "steps")
    modes = {(r["stage"], r["mode"]) for r in steps}
    assert len([r for r in steps if r["stage"] == "step"]) == len({m for s, m in modes if s == "step"})
    assert {("step", m) for m in (*plan.step_modes, *plan.compile_step_modes)} <= modes
    assert {("latent", m) for m in plan.kernel_modes} | {("trainer", "zero2"), ("trainer", "ddp")} <= modes
    for r in steps:
        assert float(r["step_ms"]) > 0 and float(r["samples_per_s"]) > 0, r
        assert r["objective"], r
        if r["stage"] == "sample":  # reconstructions, no loss: each mode against fp32 eager
            assert "ms per denoising step; vs eager fp32: max |diff|" in r["note"], r
            continue
        if r["stage"] == "predict":  # the inference CLI on the zero2 run's checkpoint
            assert r["note"].startswith("1 val samples x 2 members, DDIM 2 steps"), r
            assert "PROBLEMS" not in r["note"], r
            continue
        assert float(r["loss_first"]) > 0 and float(r["loss_last"]) > 0, r
    sampled = {r["mode"]: r for r in steps if r["stage"] == "sample"}
    assert set(sampled) == set(plan.sample_modes)
    assert "max |diff| 0 degC" in sampled["eager"]["note"]  # the reference against itself
    for launch, said in (("zero2", "deepspeed zero2"), ("ddp", "ddp")):
        trainer = next(r for r in steps if r["stage"] == "trainer" and r["mode"] == launch)
        assert float(trainer["loss_last"]) < float(trainer["loss_first"])
        assert trainer["note"].startswith(said) and "step_00000010" in trainer["note"], trainer
        assert "PROBLEMS" not in trainer["note"]
    latent = [r for r in steps if r["stage"] == "latent"]
    assert all("than pixel space" in r["note"] for r in latent)

    _, profile = table(out, "profile")
    assert {r["mode"] for r in profile} == set(plan.profile_modes)
    triton = plan.profile_modes[-1]
    share = {(r["mode"], r["class"]): float(r["share"]) for r in profile}
    assert share[(triton, "triton front")] > 0 and share[(triton, "triton attention")] > 0
    assert share[(triton, "conv")] > 0  # the U-Net's other convolutions, and the epilogue's
    for mode in plan.profile_modes:
        assert sum(v for (m, _), v in share.items() if m == mode) == pytest.approx(1.0, abs=1e-3)

    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Headlines", "## Per-call timings", "## Dispatch table",
                    "## Training steps", "## Device time of one step by kernel class"):
        assert heading in report
    text = (out / "summary.txt").read_text()
    for head in ("PARITY OK", "CEILINGS copy", "CALLS", "DISPATCH TABLE (cpu): outside torch.compile: ", "STEP ambient", "LATENT",
                 "TRAINER ambient zero2", "TRAINER ambient ddp", "PREDICT python -m depthdif_hpc.inference.predict",
                 "SAMPLE ambient", f"PROFILE {triton}", "GPU TESTS pytest -m gpu: OK: "):
        assert head in text
    # On a CPU most of them skip; those marked gpu that run anywhere (the TF32 states, the
    # training-mix self-checks) pass.
    assert re.search(r"GPU TESTS pytest -m gpu: OK: \d+ passed, 0 failed, 0 errors, 1\d\d skipped", text), text


def test_a_stage_past_its_limit_is_stopped_and_the_next_one_runs(tmp_path):
    proc, out = run_script(tmp_path, BUDGET_S="300", STAGES="deps env", DD_STALL_STAGE="deps",
                           TIMEOUT_deps="3", timeout=120)
    got = summary(out)
    assert got["deps"] == ("timeout", "124"), _why(proc, out)
    assert got["env"] == ("ok", "0"), _why(proc, out)
    assert "stopped at its 3 s limit" in (out / "summary.txt").read_text()
    _, env = table(out, "env")
    assert env  # the stage after the stopped one wrote its results


def test_a_spent_budget_skips_the_remaining_stages(tmp_path):
    proc, out = run_script(tmp_path, BUDGET_S="8", MIN_STAGE_S="2", STAGES="deps,env,parity",
                           DD_STALL_STAGE="deps", timeout=120)
    got = summary(out)
    # deps gets what is left of the budget as its limit and is stopped there (or, on a machine
    # too slow to leave MIN_STAGE_S after start-up, is skipped itself).
    assert got["deps"][0] in ("timeout", "skipped"), _why(proc, out)
    assert got["env"][0] == "skipped" and got["parity"][0] == "skipped", _why(proc, out)
    assert "budget spent" in (out / "summary.txt").read_text()
    assert proc.returncode == 0
    assert (out / "report.md").exists()  # the report is written whatever ran


def test_stages_run_in_the_order_named_and_an_unknown_one_is_refused(tmp_path):
    """A later GPU session runs first what earlier ones did not measure; a typo in STAGES must
    fail at once, not be skipped silently on a lent GPU."""
    proc, out = run_script(tmp_path, STAGES="env deps", DEPS_MODULES="json", timeout=120)
    assert list(summary(out)) == ["env", "deps"], _why(proc, out)  # in the summary's line order

    typo = tmp_path / "typo"
    typo.mkdir()
    proc, out = run_script(typo, STAGES="deps step_compiel", timeout=60)
    assert proc.returncode == 2
    assert "unknown stage 'step_compiel'" in proc.stderr
    assert not (out / "summary.txt").exists()  # refused before any stage ran
    # the same for a step mode
    proc, out = run_script(typo, STAGES="deps step_compile", COMPILE_STEP_MODES="compile+cl+tabel",
                           timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "COMPILE_STEP_MODES: mode 'compile+cl+tabel' has unknown options ['tabel']" in proc.stderr
    assert not (out / "summary.txt").exists()


def test_a_stages_leftover_processes_finish_before_the_next_stage(tmp_path):
    """A stage's child that outlives it (the trainer writing the checkpoint its SIGTERM asked
    for) runs to its end before the next stage starts; one that hangs is killed after
    STRAGGLER_S. A stand-in python: deps leaves a 2 s child, env leaves a hanging one."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        "case $1$2 in -c*gpu_stages*) exit 0 ;; -c*) exit 1 ;; esac  # modes fine; no CUDA\n"
        "out=$4\n"
        "case $2 in\n"
        "  deps) (sleep 2; echo deps-child >> \"$out/order.txt\") & ;;\n"
        "  env) echo env >> \"$out/order.txt\"; (sleep 600; echo hung >> \"$out/order.txt\") & ;;\n"
        "  *) echo \"$2\" >> \"$out/order.txt\" ;;\n"
        "esac\n")
    fake.chmod(0o755)
    t0 = time.monotonic()
    proc, out = run_script(tmp_path, STAGES="deps env", PY=str(fake), STRAGGLER_S="5", timeout=120)
    order = (out / "order.txt").read_text().split()
    assert order[:2] == ["deps-child", "env"], _why(proc, out)
    assert "hung" not in order and time.monotonic() - t0 < 60, order


def test_compile_stages_alone_time_their_own_baselines(tmp_path):
    """The compile stages first, then the kernels per call (the next lent session's first
    command): each compiled row has an uncompiled baseline from the same run and machine, and
    the calls stage after them does not time those baselines again."""
    proc, out = run_script(tmp_path, STAGES="env step_compile calls_compile calls", BUDGET_S="900")
    assert all(v == ("ok", "0") for v in summary(out).values()), _why(proc, out)
    plan = stages.Plan.make(True)
    _, calls = table(out, "calls")
    impls: dict[str, list[str]] = {}
    for r in calls:
        impls.setdefault(r["call"], []).append(r["impl"])
    kernels = {"front": ["epilogue+cl", "triton+cl"], "attention": ["contig+cl", "triton+cl"],
               "norm": ["triton+cl"]}
    kinds = {r["call"]: r["kind"] for r in calls}
    assert impls and all(sorted(v) == sorted(["compile+cl", "eager+cl", *kernels[kinds[c]]])
                         for c, v in impls.items()), impls
    # the baselines first: a stage stopped at its limit still compares what it compiled
    assert [r["impl"] for r in calls[:len(impls)]] == ["eager+cl"] * len(impls)
    # then the compilations, the calls that weigh most in a step (eager time x calls per step)
    # first: a stage stopped at its limit has compiled what matters most
    weight = {r["call"]: float(r["fwdbwd_ms"]) * int(r["per_step"]) for r in calls[:len(impls)]}
    compiled = [weight[r["call"]] for r in calls if r["impl"] == "compile+cl"]
    assert compiled == sorted(compiled, reverse=True), compiled
    _, steps = table(out, "steps")
    assert [r["mode"] for r in steps] == [plan.kernel_modes[0], *plan.compile_step_modes]
    # no calls stage with kernels ran: the table mode says which table it used
    assert "dispatch table: none (every kernel runs)" in steps[-1]["note"]
    text = (out / "summary.txt").read_text()
    assert "eager+cl" in next(line for line in text.splitlines() if line.startswith("CALLS"))


def _fake_wheel(directory: Path, name: str, version: str, requires: list[str] = (),
                tag: str = "py3-none-any", module: str | None = None) -> Path:
    """A minimal installable wheel (one module, METADATA with Requires-Dist, RECORD)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    meta = "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    files = {f"{info}/METADATA": meta,
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    if module:
        files[f"{module}/__init__.py"] = "VALUE = 42\n"
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def test_deps_stage_installs_the_wheelhouse_offline(tmp_path):
    wh = tmp_path / "wh"
    _fake_wheel(wh, "ddhpc_probe_pkg", "1.0", module="ddhpc_probe_mod")
    work = tmp_path / "work"
    proc, out = run_script(tmp_path, STAGES="deps", DEPS_MODULES="ddhpc_probe_mod",
                           WHEELHOUSE=str(wh), WORK=str(work), timeout=120)
    assert summary(out)["deps"] == ("ok", "0"), _why(proc, out)
    assert (work / "site" / "ddhpc_probe_mod" / "__init__.py").is_file()
    assert "import ddhpc_probe_mod: ok" in (out / "log.txt").read_text()
    # Missing modules and no wheelhouse: the stage fails and says what to do.
    proc, out = run_script(tmp_path, STAGES="deps", DEPS_MODULES="ddhpc_probe_absent",
                           WHEELHOUSE=str(tmp_path / "empty"), timeout=120)
    assert summary(out)["deps"][0] == "FAIL"
    assert "make wheelhouse" in (out / "log.txt").read_text()


def test_wheelhouse_check_finds_duplicates_unmet_requirements_and_wrong_tags(tmp_path):
    image = frozenset({"numpy", "pyyaml"})
    good = [_fake_wheel(tmp_path, "alpha", "1.0", ["beta>=2", "numpy", "PyYAML>=5",
                                                    'gamma; python_version < "3.10"',
                                                    'delta; extra == "docs"']),
            _fake_wheel(tmp_path, "beta", "2.1")]
    wheels = [wheelhouse.Wheel.of(p) for p in good]
    assert wheelhouse.check(wheels, image=image) == []
    old_beta = wheelhouse.Wheel.of(_fake_wheel(tmp_path / "o", "beta", "1.5"))
    problems = wheelhouse.check([wheels[0], old_beta], image=image)
    assert any("alpha needs beta>=2" in p for p in problems), problems
    unmet = wheelhouse.Wheel.of(_fake_wheel(tmp_path / "u", "eps", "1.0", ["zeta"]))
    assert any("neither in the wheelhouse nor in the GPU image" in p
               for p in wheelhouse.check([unmet], image=image))
    two = wheelhouse.check([wheels[1], old_beta], image=image)
    assert any("two versions of beta" in p for p in two), two
    arm = wheelhouse.Wheel.of(_fake_wheel(tmp_path / "a", "eta", "1.0",
                                          tag="cp312-cp312-manylinux_2_17_aarch64"))
    cp311 = wheelhouse.Wheel.of(_fake_wheel(tmp_path / "b", "theta", "1.0",
                                            tag="cp311-cp311-manylinux_2_17_x86_64"))
    abi3 = wheelhouse.Wheel.of(_fake_wheel(tmp_path / "c", "iota", "1.0",
                                           tag="cp311-abi3-manylinux_2_28_x86_64"))
    problems = wheelhouse.check([arm, cp311, abi3], image=image)
    assert sum("cannot be installed" in p for p in problems) == 2
    assert not any("iota" in p for p in problems)  # abi3 from 3.11 installs on 3.12


def test_wheelhouse_closure_is_what_the_gpu_image_lacks():
    """From the installed venv: the trainer's stack minus the GPU image, followed recursively."""
    carried = wheelhouse.closure(wheelhouse.project_requirements())
    for name in ("omegaconf", "zarr", "numcodecs", "google-crc32c", "deepspeed", "submitit",
                 "netcdf4", "cftime", "global-land-mask", "donfig", "hjson", "pydantic",
                 "pydantic-core", "typing-extensions"):
        assert name in carried, (name, sorted(carried))
    for name in ("torch", "triton", "numpy", "xarray", "accelerate", "scipy", "pyyaml", "packaging"):
        assert name not in carried


def test_closure_follows_requirements_with_markers():
    class Dist:
        def __init__(self, version: str, requires: list[str]) -> None:
            self.version, self.requires = version, requires

    dists = {"top": Dist("1.0", ["mid>=1", "img", 'win; sys_platform == "win32"',
                                 'docs; extra == "docs"']),
             "mid": Dist("1.2", ["leaf"]), "leaf": Dist("0.1", []), "img": Dist("9", ["hidden"])}
    from packaging.requirements import Requirement

    got = wheelhouse.closure([Requirement("top")], image=frozenset({"img"}), also=frozenset(),
                             dist=lambda n: dists[n])
    assert got == {"top": "1.0", "mid": "1.2", "leaf": "0.1"}


def test_mini_yaml_reads_the_model_and_training_configs_as_yaml_does():
    yaml = pytest.importorskip("yaml")
    for f in [*stages.PRESETS["ambient"], *stages.PRESETS["latent"], "configs/lat_space/ae_config.yaml"]:
        text = (ROOT / f).read_text()
        assert stages.mini_yaml(text) == yaml.safe_load(text), f


def test_profile_classes_of_gpu_kernel_names():
    names = stages.kernel_names()
    assert "_fwd_kernel" in names["triton front"] and "_out_kernel" in names["triton attention"]
    cases = {
        "_bwd_main_kernel": "triton front",
        "_ctx_partial_kernel": "triton attention",
        "_ln_bwd_kernel": "triton norm",
        "void multi_tensor_apply_kernel<TensorListMetadata<4>, _AdamW...>": "optimizer",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "conv",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "conv",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "gemm",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>": "norm/reduce",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "norm/reduce",
        "triton_poi_fused_add_gelu_0": "elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "elementwise",
        "Memcpy DtoD (Device -> Device)": "other",
    }
    for name, cls in cases.items():
        assert stages.classify(name, names) == cls, name


@pytest.mark.parametrize("preset", ["ambient", "latent"])
def test_presets_read_without_omegaconf_equal_the_loader(monkeypatch, preset):
    """A GPU image without omegaconf builds the same model and objective settings."""
    from depthdif_hpc import config

    real, how = stages.load_cfg(stages.PRESETS[preset], {"model": {"unet": {"dim": 8}}})
    assert how == "load_config"

    def no_omegaconf(*a, **k):
        raise ModuleNotFoundError("No module named 'omegaconf'", name="omegaconf")

    monkeypatch.setattr(config, "load_config", no_omegaconf)
    plain, how = stages.load_cfg(stages.PRESETS[preset], {"model": {"unet": {"dim": 8}}})
    assert how.startswith("YAML onto the schema")
    assert plain == real
    assert plain.model.unet.dim == 8


def test_calls_headline_compares_partial_implementations_on_their_own_calls():
    shapes = {"f1": "4x2x2", "f2": "8x2x2", "n1": "4x2x2"}

    def row(kind: str, call: str, per_step: int, impl: str, ms: float) -> dict[str, str]:
        return {"kind": kind, "call": call, "per_step": str(per_step), "batch": "48", "impl": impl,
                "fwdbwd_ms": str(ms), "host_ms": "0.5", "shape": shapes[call],
                "dtypes": "x=bf16 w=fp32"}

    rows = [row("front", "f1", 2, "eager", 10.0), row("front", "f1", 2, "triton", 5.0),
            row("front", "f1", 2, "triton+cl", 4.0), row("front", "f1", 2, "epilogue+cl", 2.0),
            row("norm", "n1", 1, "eager", 4.0), row("norm", "n1", 1, "triton", 2.0),
            row("norm", "n1", 1, "triton+cl", 1.0),
            row("front", "f2", 1, "eager", 6.0), row("front", "f2", 1, "triton", 3.0),
            row("front", "f2", 1, "triton+cl", 3.0), row("front", "f2", 1, "epilogue+cl", 4.0),
            row("front", "f1", 2, "compile", 1.0), row("norm", "n1", 1, "compile", float("nan"))]
    head = stages.calls_headline(rows)
    # eager 2x10 + 4 + 6 = 30; triton 10 + 2 + 3 = 15; table+cl: min(4, 2) x 2 + 1 + min(3, 4) = 8
    assert "(3 calls): eager 30.00 ms, triton 15.00 ms (2.00x), triton+cl 12.00 ms (2.50x)" in head
    assert "table+cl 8.00 ms (3.75x)" in head
    # measured on f1 only (n1 failed): compared with eager's f1, not with eager's total
    assert "compile on 1 of 3 calls: 2.00 ms vs eager 20.00 ms (10.00x)" in head
    assert "epilogue+cl on 2 of 3 calls: 8.00 ms vs eager 26.00 ms (3.25x)" in head
    # channels_last only (the GPU plan): eager+cl is the baseline
    cl_only = [r | {"impl": "eager+cl"} for r in rows if r["impl"] == "eager"] + \
        [r for r in rows if r["impl"] == "triton+cl"]
    assert "(3 calls): eager+cl 30.00 ms, triton+cl 12.00 ms (2.50x)" in stages.calls_headline(cl_only)
    # Compiled: the table picks per call among the kernels and the compiled reference:
    # min(4, 2, 1.5) x 2 + min(1, 0.5) + min(3, 4, 5) = 6.5; eager's reference is not a candidate.
    compiled = rows + [row("front", "f1", 2, "compile+cl", 1.5), row("norm", "n1", 1, "compile+cl", 0.5),
                       row("front", "f2", 1, "compile+cl", 5.0), row("front", "f2", 1, "eager+cl", 0.1)]
    head = stages.calls_headline(compiled)
    assert "table+compile+cl 6.50 ms (4.62x)" in head, head
    assert "table+cl 5.10 ms" in head, head  # 2 x 2 + 1 + 0.1: f2's eager+cl reference wins uncompiled


@pytest.mark.parametrize("rehearsal", [False, True], ids=["gpu", "rehearsal"])
def test_every_planned_step_mode_is_made_of_known_tokens(rehearsal):
    """The GPU plan's modes never run on CPU: a typo there would cost a lent GPU's stage."""
    plan = stages.Plan.make(rehearsal)
    modes = {*plan.step_modes, *plan.compile_step_modes, *plan.kernel_modes, *plan.profile_modes}
    for mode in modes:
        tokens = mode.split("+")
        assert tokens[0] in ("eager", "triton", "compile"), mode
        assert set(tokens) <= stages.MODE_TOKENS, mode
        assert len(tokens) == len(set(tokens)), mode


def test_pytest_outcomes_of_verbose_output():
    text = """benchmarks/bench_a.py::test_x[bf16-1] PASSED                               [ 33%]
benchmarks/bench_a.py::test_x[fp32-2] FAILED                               [ 66%]
tests/kernels/test_b.py::test_y SKIPPED (needs a CUDA device)              [100%]
=========================== short test summary info ============================
FAILED benchmarks/bench_a.py::test_x[fp32-2] - AssertionError: parity failed (tol 5e-05)
"""
    outcome, why = stages.pytest_outcomes(text)
    assert outcome == {"benchmarks/bench_a.py::test_x[bf16-1]": "PASSED",
                       "benchmarks/bench_a.py::test_x[fp32-2]": "FAILED",
                       "tests/kernels/test_b.py::test_y": "SKIPPED"}
    assert why == {"benchmarks/bench_a.py::test_x[fp32-2]": "AssertionError: parity failed (tol 5e-05)"}
    # the same under pytest-xdist (the GPU plan's workers), which prints the outcome first
    xdist = """[gw1] [ 33%] PASSED benchmarks/bench_a.py::test_x[bf16-1] 
[gw0] [ 66%] FAILED benchmarks/bench_a.py::test_x[fp32-2] 
[gw1] [100%] SKIPPED tests/kernels/test_b.py::test_y 
=========================== short test summary info ============================
FAILED benchmarks/bench_a.py::test_x[fp32-2] - AssertionError: parity failed (tol 5e-05)
"""
    assert stages.pytest_outcomes(xdist) == (outcome, why)


def test_step_modes_from_the_environment(monkeypatch):
    """A session that needs one compiled step, not three, names it."""
    monkeypatch.delenv("STEP_MODES", raising=False)
    monkeypatch.setenv("COMPILE_STEP_MODES", "compile+cl, triton+compile+cl")
    plan = stages.Plan.make(False)
    assert plan.compile_step_modes == ("compile+cl", "triton+compile+cl")
    assert plan.step_modes == stages.STEP_MODES and plan.batch == 48
    monkeypatch.setenv("STEP_MODES", "triton+cl+tabel")
    with pytest.raises(ValueError, match=r"STEP_MODES: mode 'triton\+cl\+tabel' has unknown options \['tabel'\]"):
        stages.Plan.make(True)
    monkeypatch.delenv("STEP_MODES")
    monkeypatch.delenv("COMPILE_STEP_MODES")
    assert stages.Plan.make(True).compile_step_modes == ("triton+compile+cl+table",)


def test_failure_lines_of_the_conftest_failure_log():
    """A run stopped at its limit prints no summary: the failures' reasons come from the log
    the repository conftest writes as they happen."""
    text = """===== tests/data/test_stream.py::test_pinned_batches[0] (call)
tiny_store = PosixPath('/tmp/store.zarr'), workers = 0

>           assert b[k].is_pinned() and torch.equal(a[k], b[k]), k
E           AssertionError: eo
E           assert False

===== tests/kernels/test_x.py::test_setup (setup)
E   fixture 'nope' not found

"""
    assert stages.failure_lines(text) == {
        "tests/data/test_stream.py::test_pinned_batches[0]": "AssertionError: eo",
        "tests/kernels/test_x.py::test_setup": "fixture 'nope' not found"}
    assert stages.FAILURE_LOG_VAR in (ROOT / "conftest.py").read_text()


def test_progress_log_names_the_tests_a_stop_interrupted(tmp_path):
    """The gpu_tests stage stopped at its limit must say which tests were still running and
    how long the finished ones took: the repository conftest logs both as they happen."""
    import shutil

    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(
        "import time\n\ndef test_fast():\n    time.sleep(0.2)\n\n"
        "def test_slow():\n    time.sleep(600)\n\ndef test_never():\n    pass\n")
    log = tmp_path / "progress.txt"
    env = {**os.environ, stages.PROGRESS_LOG_VAR: str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)  # the child is a controller, even under `make test`
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_a.py"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "test_a.py::test_slow" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, "test_slow never started"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    running, seconds = stages.pytest_progress(log.read_text() + "call\t1.0")  # a cut line
    assert running == ["test_a.py::test_slow"]
    assert list(seconds) == ["test_a.py::test_fast"] and 0.2 <= seconds["test_a.py::test_fast"] < 60


def test_worksteal_by_name_bypasses_the_file_units():
    """`make test` hands xdist workers whole files; the GPU command's --dist worksteal must reach
    xdist's own scheduler (in file units one worker ran the front's 90 parity cases alone)."""
    spec = importlib.util.spec_from_file_location("_root_conftest", ROOT / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)

    class Config:
        def __init__(self, dist: str) -> None:
            self.dist = dist

        def getoption(self, name: str) -> str:
            assert name == "dist"
            return self.dist

    assert conftest.pytest_xdist_make_scheduler(Config("worksteal"), None) is None
    assert conftest.work_unit("tests/launch/test_x.py::t") == "tests/launch/"
    assert conftest.work_unit("benchmarks/bench_a.py::t[1]") == "benchmarks/bench_a.py"


def test_table_steps_use_this_runs_table_else_the_devices_shipped_one(tmp_path, monkeypatch):
    """A command of the compile stages alone has no calls rows: its `table` modes must run the
    table the trainer would use on that GPU, not silently every kernel."""
    import torch
    from depthdif_hpc.kernels import dispatch_table as dt

    out = tmp_path / "out"
    out.mkdir()
    cpu = torch.device("cpu")
    shipped_dir = tmp_path / "dispatch_tables"
    shipped_dir.mkdir()
    monkeypatch.setattr(dt, "SHIPPED", shipped_dir)
    dt.reset_dispatch_table()
    try:
        table, source = stages.step_dispatch_table(out, cpu)
        assert table is None and source == "none (every kernel runs)"

        (shipped_dir / "cpu.json").write_text(json.dumps({
            "format": dt.FORMAT, "device": "cpu", "source": "test",
            "entries": [{"op": "convnext_front", "shape": [8, 8, 8], "dtype": "bf16",
                         "layout": "channels_last", "compiled": False, "impl": "epilogue"}]}))
        dt.reset_dispatch_table()
        table, source = stages.step_dispatch_table(out, cpu)
        assert source == "shipped cpu.json"
        assert table.choose("convnext_front", (8, 8, 8), "bf16", "channels_last", False, "cpu") == "epilogue"

        stages.append(out, "env", {"key": "mode", "value": "rehearsal"})
        base = {"kind": "front", "call": "front C4 2x2", "sites": "a", "per_step": 1, "batch": 1,
                "shape": "4x2x2", "dtypes": "x=bf16 dw_weight=fp32", "fwd_ms": 1.0}
        stages.append(out, "calls", base | {"impl": stages.FUSED_IMPL, "fwdbwd_ms": 2.0})
        stages.append(out, "calls", base | {"impl": stages.EPILOGUE_IMPL, "fwdbwd_ms": 3.0})
        stages.append(out, "calls", base | {"impl": "eager+cl", "fwdbwd_ms": 1.0})
        table, source = stages.step_dispatch_table(out, cpu)
        assert source == "this run's calls"
        picks = [(e["shape"], e["compiled"], e["impl"]) for e in table["entries"]]
        assert picks == [([4, 2, 2], False, "reference"), ([4, 2, 2], True, "fused")], picks
        # The rehearsal's: among the kernels only (its interpreted kernels lose to any eager op).
        table, _ = stages.step_dispatch_table(out, cpu, kernels_only=True)
        assert [e["impl"] for e in table["entries"]] == ["fused", "fused"]
        # The "shipped" modes: the shipped table beside this run's, to compare the two in steps.
        table, source = stages.step_dispatch_table(out, cpu, shipped_only=True)
        assert source == "shipped cpu.json" and table.source == "test"
        assert stages.check_mode("triton+cl+shipped+fused") == {"triton", "cl", "shipped", "fused"}
        with pytest.raises(ValueError, match="'table' .this run's. or 'shipped', not both"):
            stages.check_mode("triton+cl+table+shipped")
    finally:
        dt.reset_dispatch_table()


def test_dispatch_table_of_several_runs_and_their_devices(tmp_path):
    """A later results folder's timing of a call replaces an earlier one's; folders of two
    devices are refused, naming both."""
    folders = []
    for i, (device, fused_ms) in enumerate((("NVIDIA X", 1.0), ("NVIDIA X", 5.0), ("NVIDIA Y", 1.0))):
        out = tmp_path / f"run{i}"
        out.mkdir()
        stages.append(out, "env", {"key": "device", "value": device})
        base = {"kind": "norm", "call": "norm C4 2x2", "sites": "a", "per_step": 1, "batch": 1,
                "shape": "4x2x2", "dtypes": "x=bf16 weight=fp32", "fwd_ms": 1.0}
        stages.append(out, "calls", base | {"impl": "triton+cl", "fwdbwd_ms": fused_ms})
        stages.append(out, "calls", base | {"impl": "compile+cl", "fwdbwd_ms": 2.0})
        folders.append(out)
    assert [e["impl"] for e in stages.dispatch_table(folders[:1])["entries"]] == ["triton"]
    table = stages.dispatch_table(folders[:2])
    assert [(e["impl"], e["ms"]) for e in table["entries"]] == [
        ("reference", {"reference": 2.0, "triton": 5.0})]
    assert table["device"] == "NVIDIA X" and "run0" in table["source"] and "run1" in table["source"]
    with pytest.raises(ValueError, match="different devices.*NVIDIA X.*NVIDIA Y"):
        stages.dispatch_table(folders)


@pytest.mark.parametrize("flag", ["0", "1"])
def test_trainer_command_is_a_valid_config_and_compiles_on_request(flag, monkeypatch, tmp_path):
    """The trainer stage's command line, parsed by the trainer's own config loader (a renamed
    key fails here, not on a lent GPU); TRAINER_COMPILE=1 compiles with the plan's backend."""
    from depthdif_hpc.config import load_config
    from depthdif_hpc.train.cli import parse_args

    monkeypatch.setenv("TRAINER_COMPILE", flag)
    for rehearsal in (False, True):
        plan = stages.Plan.make(rehearsal)
        for launch in plan.trainer_launches:
            cmd = stages.trainer_command(tmp_path / "store.zarr", tmp_path / "run", plan, 4, 5, launch)
            assert cmd[1:3] == ["-m", "depthdif_hpc.train"]
            args = parse_args(cmd[3:])
            cfg = load_config(*args.config, overrides=args.overrides)
            assert cfg.trainer.compile is (flag == "1")
            compiled_on_cpu = rehearsal and flag == "1"
            assert cfg.trainer.compile_backend == ("aot_eager" if compiled_on_cpu else "inductor")
            assert cfg.trainer.distributed == ("deepspeed" if launch == "zero2" else "ddp")
    monkeypatch.setenv("TRAINER_COMPILE", "yes")
    with pytest.raises(ValueError, match="TRAINER_COMPILE='yes'"):
        stages.Plan.make(False)


def test_bench_times_the_device_not_the_launches(monkeypatch):
    """Bench's repetition loop on a simulated device queue: a call that takes the host 1 ms to
    issue and the device 0.2 ms must time 0.2 ms (and report the 1 ms as host_ms); without the
    hold the same loop times the launches, as the first H100 runs did for small calls."""
    import types

    import torch

    class Device:  # one stream: an op starts when the device is free and the host has issued it
        host = free = 0.0  # ms

        def issue(self, cost: float) -> float:
            self.free = max(self.free, self.host) + cost
            return self.free

    dev = Device()

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = 0.0

        def record(self) -> None:
            self.t = dev.issue(0.0)

        def synchronize(self) -> None:
            dev.host = max(dev.host, self.t)

        def elapsed_time(self, end: Event) -> float:
            return end.t - self.t

    def call() -> None:  # ten launches: 0.1 ms of host, 0.02 ms of device each
        for _ in range(10):
            dev.host += 0.1
            dev.issue(0.02)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: dev.issue(cycles / 1000.0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: setattr(dev, "host", max(dev.host, dev.free)))
    monkeypatch.setattr(stages, "time", types.SimpleNamespace(perf_counter=lambda: dev.host / 1e3))
    bench = stages.Bench(torch.device("cpu"))
    bench.cuda, bench.cycles_per_ms = True, 1000.0
    bench.flush = types.SimpleNamespace(zero_=lambda: dev.issue(0.01))
    assert bench(call) == pytest.approx(0.2)
    assert bench.host_ms == pytest.approx(1.0) and bench.late == 0 and bench.spread < 1e-6
    bench.cycles_per_ms = 1e-9  # a hold of one cycle: the launches are timed
    assert bench(call) == pytest.approx(1.0, abs=0.03)


def test_launch_timed_references_are_not_chosen_outside_compile(tmp_path):
    """Results from before the device was held (no host_ms column) timed small calls by their
    launches: outside torch.compile their eager references are left out of the choice (the H100
    step with them chosen ran 10 ms slower); the compiled references stay."""
    out = tmp_path / "old"
    out.mkdir()
    (out / "env.csv").write_text("key,value\ndevice,NVIDIA X\n")
    header = "kind,call,sites,per_step,batch,shape,dtypes,impl,fwd_ms,fwdbwd_ms,bwd_ms,speedup_fwdbwd,note\n"
    rows = [f"norm,norm C4 2x2,a,1,48,4x2x2,x=bf16 weight=fp32,{impl},0.1,{ms},0.1,,\n"
            for impl, ms in (("eager+cl", 0.8), ("triton+cl", 1.0), ("compile+cl", 0.9))]
    (out / "calls.csv").write_text(header + "".join(rows))
    picks = {e["compiled"]: (e["impl"], e["ms"]) for e in stages.dispatch_table([out])["entries"]}
    assert picks == {True: ("reference", {"reference": 0.9, "triton": 1.0})}
    # The same rows timed with the device held: the eager reference is a candidate again.
    (out / "calls.csv").write_text(header.replace("speedup", "host_ms,speedup")
                                   + "".join(r.replace(",0.1,,", ",0.1,0.3,,") for r in rows))
    picks = {e["compiled"]: e["impl"] for e in stages.dispatch_table([out])["entries"]}
    assert picks == {False: "reference", True: "reference"}


def test_shipped_tables_are_what_their_committed_results_give():
    """Each shipped table is the dispatch_table command's output for the results its source
    names, so that a table cannot drift from the measurements committed with it."""
    from depthdif_hpc.kernels import DispatchTable
    from depthdif_hpc.kernels import dispatch_table as dt

    for path in sorted(dt.SHIPPED.glob("*.json")):
        shipped = json.loads(path.read_text())
        folders = [ROOT / Path(part.split(" (")[0]).parent
                   for part in shipped["source"].split("; ") if part.endswith(")")]
        assert folders and all((f / "calls.csv").is_file() for f in folders), shipped["source"]
        remade = stages.dispatch_table([f.relative_to(ROOT) for f in folders])
        assert DispatchTable.from_dict(remade).entries == DispatchTable.load(path).entries, path
