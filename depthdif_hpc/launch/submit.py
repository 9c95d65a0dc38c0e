"""Submit DepthDif training to SLURM (or run it here) with submitit.

    python -m depthdif_hpc.launch.submit --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --account myproj [--preset ambient] [--config FILE ...] [key=value ...]
    python -m depthdif_hpc.launch.submit --local --gpus-per-node 0 --tasks-per-node 2 key=value ...
    python -m depthdif_hpc.launch.submit ... --array model.ambient_occlusion.further_drop_prob=0.1,0.25,0.5

One task per GPU (or --tasks-per-node CPU processes with --gpus-per-node 0), torch.distributed set
up from SLURM, the same trainer as slurm/train.sh. Preemption and time limits: checkpoint, requeue,
resume (see depthdif_hpc/launch/submitit_job.py). Prints the job id(s) and log paths; with --wait
it follows rank 0's log until the job ends and exits 0 only if every task finished.
Sweeps: each --array KEY=V1,V2,... adds a dimension; the cartesian product is one job array.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import time
from pathlib import Path

from depthdif_hpc.launch.trainer_args import PRESETS, override_value, preset_configs, split_args


def parse_time_minutes(text: str) -> int:
    """SLURM time formats -> minutes: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        raise argparse.ArgumentTypeError(f"--time {text!r}: expected minutes, H:M:S or D-H:M:S")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        secs = int(a) * 60 + int(b)
    else:
        secs = int(a) * 60
    return max(1, -(-secs // 60))


def parse_sweep(specs: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x,y'] -> [['a=1','b=x'], ['a=1','b=y'], ['a=2','b=x'], ['a=2','b=y']].

    Values in brackets stay whole: 'model.unet.dim_mults=[1,2],[1,2,4]' gives two values.
    """
    dims = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--array {spec!r}: expected KEY=V1,V2,...")
        parts, depth, cur = [], 0, ""
        for ch in values:
            depth += ch in "[{("
            depth -= ch in "]})"
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        if any(p == "" for p in parts):
            raise ValueError(f"--array {spec!r}: empty value")
        dims.append([f"{key}={v}" for v in parts])
    return [list(c) for c in itertools.product(*dims)] if dims else [[]]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m depthdif_hpc.launch.submit",
        description="Submit DepthDif training with submitit: SLURM (default) or this machine (--local).",
        epilog="Anything else (--config FILE, key=value) goes to the trainer after the preset's configs.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ambient",
                    help="configs/px_space preset (default: ambient)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=1,
                    help="GPUs per node; one task per GPU. 0 = CPU processes (see --tasks-per-node)")
    ap.add_argument("--tasks-per-node", type=int, default=None,
                    help="processes per node (default: --gpus-per-node, or 1 on CPU)")
    ap.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 with GPUs, 1 on CPU")
    ap.add_argument("--mem", default=None, help="memory per node, SLURM syntax (e.g. 200G, 0 = all)")
    ap.add_argument("--partition", "-p", default=None)
    ap.add_argument("--account", "-A", default=None)
    ap.add_argument("--qos", default=None)
    ap.add_argument("--constraint", default=None)
    ap.add_argument("--time", "-t", type=parse_time_minutes, default=parse_time_minutes("24:00:00"),
                    help="time limit per allocation (minutes, H:M:S or D-H:M:S; default 24:00:00)")
    ap.add_argument("--signal-delay", type=int, default=180,
                    help="seconds before the time limit at which the job checkpoints and requeues")
    ap.add_argument("--max-requeues", type=int, default=50,
                    help="time-limit requeues allowed before the job gives up (submitit's max_num_timeout)")
    ap.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="sweep: one array task per combination of values (repeatable)")
    ap.add_argument("--max-parallel", type=int, default=256, help="array tasks running at once")
    ap.add_argument("--job-name", default=None, help="default: depthdif-<preset>")
    ap.add_argument("--log-dir", default="logs/submitit", help="submitit folder: pickles and per-task logs")
    ap.add_argument("--run-root", default="runs",
                    help="run folders are RUN_ROOT/<job name>-<job id> (unless trainer.run_dir=... is given)")
    ap.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="shell line run in the job before the tasks start (module load ..., source ...)")
    ap.add_argument("--python", default=None,
                    help="python command in the job (default: this interpreter); e.g. "
                         "'apptainer exec --nv img.sif python'")
    ap.add_argument("--local", action="store_true", help="run on this machine (submitit LocalExecutor)")
    ap.add_argument("--wait", action="store_true", help="follow rank 0's log until the job(s) end")
    ap.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    return ap


def _executor(args: argparse.Namespace, name: str, tasks: int, cpus: int):
    import submitit

    folder = Path(args.log_dir).resolve() / "%j"
    if args.local:
        if args.nodes != 1:
            raise SystemExit("depthdif_hpc.launch.submit: --local runs on this machine: --nodes must be 1")
        ex = submitit.LocalExecutor(folder=folder, python=args.python)
        ex.update_parameters(timeout_min=args.time, tasks_per_node=tasks, gpus_per_node=args.gpus_per_node)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues, python=args.python)
    params = dict(job_name=name, nodes=args.nodes, ntasks_per_node=tasks, cpus_per_task=cpus,
                  time=args.time, signal_delay_s=args.signal_delay, array_parallelism=args.max_parallel,
                  additional_parameters={"requeue": True},
                  # Slurm 22.05 steps do not inherit --cpus-per-task from the job: pass it to srun.
                  srun_args=[f"--cpus-per-task={cpus}",
                             # A dead task ends the step at once: the others would otherwise
                             # wait in a collective until trainer.collective_timeout_s.
                             "--kill-on-bad-exit=1"])
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.setup:
        params["setup"] = list(args.setup)
    ex.update_parameters(**params)
    return ex


def _submit_error(exc: BaseException) -> str:
    """SLURM's own message out of a failed sbatch call (submitit wraps it in various ways)."""
    text = str(exc)
    out = getattr(exc, "output", None) or getattr(exc, "stderr", None)
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    if out:
        text = f"{text}\n{out}"
    lines = [ln for ln in text.splitlines() if "sbatch: error" in ln or "error:" in ln.lower()]
    return "\n".join(dict.fromkeys(lines)) or text


def _follow(jobs, poll: float = 2.0) -> int:
    """Print rank 0's new log lines until every job is done; return 0 if all succeeded."""
    offsets: dict[Path, int] = {}
    while True:
        done = all(j.done() for j in jobs)
        for j in jobs:
            for path in (j.paths.stdout, j.paths.stderr):
                p = Path(str(path).replace("%t", "0"))
                if not p.is_file():
                    continue
                with p.open("rb") as fh:
                    fh.seek(offsets.get(p, 0))
                    chunk = fh.read()
                    offsets[p] = fh.tell()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
        if done:
            break
        time.sleep(poll)
    failed = 0
    for j in jobs:
        try:
            res = j.results()
            print(f"depthdif_hpc.launch.submit: job {j.job_id} finished: "
                  f"{[{k: r[k] for k in ('rank', 'exit_code', 'step')} for r in res]}; run dir {res[0]['run_dir']}")
        except Exception as exc:  # noqa: BLE001 - report every job
            failed += 1
            print(f"depthdif_hpc.launch.submit: job {j.job_id} FAILED: {exc}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        configs, overrides = split_args(rest)
        preset_configs(args.preset)  # fail early on a broken checkout
        combos = parse_sweep(args.array)
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    configs = [str(Path(c).resolve()) for c in configs]
    missing = [c for c in configs if not Path(c).is_file()]
    if missing:
        ap.error(f"config file(s) not found: {', '.join(missing)}")
    if args.nodes < 1 or args.gpus_per_node < 0:
        ap.error("--nodes must be >= 1 and --gpus-per-node >= 0")
    device = "gpu" if args.gpus_per_node > 0 else "cpu"
    tasks = args.tasks_per_node or (args.gpus_per_node if device == "gpu" else 1)
    cpus = args.cpus_per_task or (8 if device == "gpu" else 1)
    name = args.job_name or f"depthdif-{args.preset}"
    explicit_run_dir = override_value(overrides, "trainer.run_dir")
    if explicit_run_dir and len(combos) > 1:
        ap.error("trainer.run_dir=... with --array would put every array task in one run folder; "
                 "use --run-root instead")
    run_root = str(Path(args.run_root).resolve())

    from depthdif_hpc.launch.submitit_job import TrainJob

    jobs_spec = [TrainJob(args.preset, configs, [*overrides, *combo], run_root=run_root, name=name,
                          device=device, run_dir=explicit_run_dir) for combo in combos]
    where = "this machine (local executor)" if args.local else "SLURM"
    print(f"depthdif_hpc.launch.submit: {len(jobs_spec)} job(s) on {where}: {args.nodes} node(s) x {tasks} "
          f"task(s), {args.gpus_per_node} GPU(s)/node, {cpus} CPU(s)/task, {args.time} min, preset {args.preset}")
    if args.dry_run:
        for j in jobs_spec:
            print("  trainer overrides:", " ".join(j.overrides) or "(none)")
        return 0

    ex = _executor(args, name, tasks, cpus)
    try:
        if len(jobs_spec) == 1:
            jobs = [ex.submit(jobs_spec[0])]
        else:
            with ex.batch():
                pending = [ex.submit(j) for j in jobs_spec]
            jobs = list(pending)
    except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
        print(f"depthdif_hpc.launch.submit: submission refused by SLURM:\n{_submit_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # submitit's own FailedJobError and friends
        if type(exc).__module__.startswith("submitit"):
            print(f"depthdif_hpc.launch.submit: submission refused by SLURM:\n{_submit_error(exc)}", file=sys.stderr)
            return 2
        raise
    for job, spec in zip(jobs, jobs_spec, strict=True):
        run_dir = spec.resolved_run_dir(job.job_id)
        print(f"job {job.job_id}")
        print(f"  run dir  {run_dir}")
        print(f"  logs     {job.paths.stdout}  (and .err; %t = task/rank)")
        if spec.overrides != overrides:
            print(f"  sweep    {' '.join(spec.overrides[len(overrides):])}")
    if args.wait:
        return _follow(jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
