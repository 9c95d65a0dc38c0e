"""Where the ranks of a job meet: the first host of the allocation and a port unique to the job.

The sbatch script (slurm/train.sh) does the same in bash; keep the two in step.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

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


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def pick_port(job_id: int | str, restart: int = 0, *, tries: int = 50) -> int:
    """`job_port`, moved up past ports that something already listens on here (the head node)."""
    port = job_port(job_id, restart)
    for _ in range(tries):
        if not port_in_use(port):
            return port
        port += 1
    raise RuntimeError(f"no free rendezvous port in {job_port(job_id, restart)}..{port} on this host")
