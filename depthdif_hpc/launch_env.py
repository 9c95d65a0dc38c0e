"""What the launcher left in the environment: where the ranks meet (first host of a SLURM node
list, a job-unique port), which rank this process is, and how many CPU threads it may use.

Every launcher (torchrun, accelerate launch, srun, submitit) goes through these functions, and the
sbatch script (slurm/train.sh) computes the rendezvous port the same way in bash: keep the two in step.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

PORT_BASE = 20000
PORT_SPAN = 30000

def _expand_group(group: str) -> list[str]:
    m = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", group)
    if not m:
        return [group]
    prefix, ranges, rest = m.groups()
    hosts = []
    for part in ranges.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            hosts.append(f"{prefix}{part}")
    # A suffix may hold another bracket group (e.g. rack[1-2]-node[01-02]).
    return [h + tail for h in hosts for tail in _expand_group(rest)] if rest else hosts


def expand_hostlist(nodelist: str) -> list[str]:
    """'gpu[003-005,007],login1' -> ['gpu003', 'gpu004', 'gpu005', 'gpu007', 'login1'].

    Pure Python, the same order as `scontrol show hostnames`.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    groups, depth, cur = [], 0, ""
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            groups.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    groups.append(cur)
    return [h for g in groups if g for h in _expand_group(g)]


def first_host(nodelist: str, *, use_scontrol: bool = True) -> str:
    """First host of the allocation, as `scontrol show hostnames` gives it (fallback: parser)."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def job_port(job_id: int | str, restart: int = 0) -> int:
    """A port in [20000, 50000) derived from the job id and the attempt number.

    Every node computes the same value without talking to the others; the attempt number moves a
    requeued job off a port that its previous attempt may still hold in TIME_WAIT. Array jobs
    ("123_4") use both numbers.
    """
    digits = [int(x) for x in re.findall(r"\d+", str(job_id))]
    if not digits:
        raise ValueError(f"job id {job_id!r} has no digits")
    key = digits[0] * 7 + sum(d * 131 for d in digits[1:]) + int(restart)
    return PORT_BASE + key % PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torch" | "slurm" | "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_dist_env(environ: dict[str, str] | None = None, *, export: bool = True) -> DistEnv:
    """Work out rank/world size; with `export`, write the torch variables into os.environ.

    Order: torch variables (torchrun, accelerate launch, submitit's TorchDistributedEnvironment)
    win; otherwise SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (srun); otherwise one process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", rank)))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT", "29500"))
        source = "torch"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        # Same port on every task of a job without talking to each other (as the launchers do).
        port = int(env.get("MASTER_PORT") or job_port(env.get("SLURM_JOB_ID", "0"),
                                                      int(env.get("SLURM_RESTART_COUNT", "0"))))
        source = "slurm"
    else:
        rank, world, local = 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT") or _free_port())
        source = "single"
    if not 0 <= rank < world:
        raise RuntimeError(f"inconsistent launcher environment: rank {rank} with world size {world} ({source})")
    if export and environ is None:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                           "MASTER_ADDR": addr, "MASTER_PORT": str(port)})
        os.environ.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0])
    return DistEnv(rank, world, local, addr, port, source)


@dataclass(frozen=True)
class Threads:
    count: int
    source: str  # how the count was arrived at, for the start-up log


def resolve_threads(setting: int | None, environ: dict[str, str] | None = None,
                    cpus: int | None = None) -> Threads:
    """The intra-op thread count of one trainer process (`trainer.intra_op_threads`).

    An explicit setting wins. Otherwise the CPUs this process may use (its affinity mask, capped
    by SLURM_CPUS_ON_NODE, which srun does not always enforce) shared evenly among the processes
    on its node (LOCAL_WORLD_SIZE). OMP_NUM_THREADS is deliberately not consulted: torchrun sets it
    to 1 only with more than one process per node and Accelerate picks its own number when it is
    unset, so the same global batch would run with different thread counts (and summation
    orders) under different launch layouts.
    """
    env = os.environ if environ is None else environ
    if setting is not None:
        return Threads(int(setting), "trainer.intra_op_threads")
    avail = cpus if cpus is not None else len(os.sched_getaffinity(0))
    slurm = (env.get("SLURM_CPUS_ON_NODE") or "").split("(")[0]
    if slurm.isdigit() and int(slurm) > 0:
        avail = min(avail, int(slurm))
    local = int(env.get("LOCAL_WORLD_SIZE") or 1)
    return Threads(max(1, avail // max(local, 1)), f"{avail} CPUs / {local} process(es) on this node")


def apply_threads(threads: Threads) -> None:
    """Set the count for torch and for what this process starts (loader workers, subprocesses).

    Exporting OMP_NUM_THREADS before the Accelerator is built also keeps Accelerate from choosing
    its own count on multi-process CPU runs.
    """
    import torch

    torch.set_num_threads(threads.count)
    os.environ["OMP_NUM_THREADS"] = str(threads.count)


def node_address(master_addr: str, master_port: int) -> str:
    """This process's own address on the route to the rendezvous host.

    Hostnames do not tell nodes apart everywhere (network-namespace test hosts share one), the
    route's source address does. A UDP connect sends nothing.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, master_port))
            return str(s.getsockname()[0])
    except OSError:
        return "?"


def rank_row(rank: int, world_size: int, local_rank: int, threads: int) -> dict:
    """What one process says about itself for the start-up rank table."""
    env = os.environ
    node = env.get("GROUP_RANK") or env.get("SLURM_NODEID") or "0"
    return {
        "rank": rank, "world_size": world_size, "local_rank": local_rank, "node_rank": int(node),
        "host": socket.gethostname(),
        "addr": node_address(env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500"))),
        "pid": os.getpid(),
        "threads": threads,
        "slurm_job": env.get("SLURM_JOB_ID", "-"),
    }


def format_rank_table(rows: list[dict]) -> str:
    head = f"{'rank':>4} {'local':>5} {'node':>4} {'addr':<15} {'host':<20} {'pid':>7} {'threads':>7} slurm_job"
    lines = [head] + [
        f"{r['rank']:>4} {r['local_rank']:>5} {r['node_rank']:>4} {r['addr']:<15} {r['host'][:20]:<20} "
        f"{r['pid']:>7} {r['threads']:>7} {r['slurm_job']}" for r in sorted(rows, key=lambda r: r["rank"])]
    return "\n".join(lines)
