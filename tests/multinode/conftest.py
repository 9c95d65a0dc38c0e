"""Two real network hosts on this machine (Linux network namespaces joined by a bridge).

The fixture brings them up with slurm/netns_hosts.sh under a prefix and subnet of its own, and
tears them down even when a test fails. Where namespaces cannot be created (no root, no
CAP_NET_ADMIN, no iproute2), the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "netns_hosts.sh"


def _namespaces_permitted() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"ddprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    def __init__(self, prefix: str, subnet: str, nodes: int) -> None:
        self.prefix, self.subnet, self.nodes = prefix, subnet, nodes
        self.env = {**os.environ, "DDHPC_NETNS_PREFIX": prefix, "DDHPC_NETNS_SUBNET": subnet}

    def addr(self, node: int) -> str:
        return f"{self.subnet}.{node}"

    def ns(self, node: int) -> str:
        return f"{self.prefix}-node{node}"

    def popen(self, node: int, cmd: list[str], **kw) -> subprocess.Popen:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", **kw.pop("env", {})}
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *cmd], env=env, **kw)


@pytest.fixture(scope="module")
def two_hosts():
    why = _namespaces_permitted()
    if why:
        pytest.skip(why)
    prefix = f"ddt{os.getpid() % 100000}"
    subnet = f"10.78.{os.getpid() % 200 + 20}"
    hosts = Hosts(prefix, subnet, 2)
    up = subprocess.run([str(SCRIPT), "up", "--nodes", "2"], env=hosts.env, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr
        yield hosts
    finally:
        subprocess.run([str(SCRIPT), "down"], env=hosts.env, capture_output=True, text=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert prefix not in left, f"namespaces left behind: {left}"
