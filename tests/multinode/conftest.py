"""Two real network hosts on this machine (Linux network namespaces joined by a bridge), bare
(`two_hosts`, for torchrun) or as the two nodes of a SLURM cluster (`two_node_slurm`).

The fixtures bring them up under a prefix, subnet, state folder and ports of their own (apart from
the single-node cluster of tests/launch, which may be up at the same time), and tear them down
even when a test fails, checking that nothing is left behind. Where namespaces cannot be created
(no root, no CAP_NET_ADMIN, no iproute2), the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "netns_hosts.sh"
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
sys.path.insert(0, str(ROOT / "tests" / "launch"))  # launch_helpers: sbatch, sacct, step logs


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


@pytest.fixture(scope="module")
def two_node_slurm(tmp_path_factory):
    """`slurm/local_cluster.sh up --nodes 2`: slurmctld here, slurmd on node1 and node2 (namespace
    hosts). Yields the client environment (SLURM_CONF and the cluster's knobs)."""
    why = _namespaces_permitted()
    if why:
        pytest.skip(why)
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it (not Debian-like)")
    tag = os.getpid() % 100
    state = Path(f"/tmp/ddhpc-slurm2n-{os.getpid()}")
    knobs = {
        "DDHPC_SLURM_DIR": str(state),
        "DDHPC_SLURM_PORT_BASE": str(18817 + 4 * tag),
        "DDHPC_NETNS_PREFIX": f"dds{tag}",
        "DDHPC_NETNS_SUBNET": f"10.79.{tag + 20}",
        "SLURM_CONF": str(state / "etc" / "slurm.conf"),
    }
    env = {**os.environ, **knobs}
    up = subprocess.run(["bash", str(CLUSTER), "up", "--nodes", "2"], env=env, capture_output=True,
                        text=True, timeout=600)
    try:
        assert up.returncode == 0, f"local_cluster.sh up --nodes 2 failed:\n{up.stdout}\n{up.stderr}"
        yield env
    finally:
        down = subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, text=True,
                              timeout=300)
        print(down.stdout, down.stderr, file=sys.stderr)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert knobs["DDHPC_NETNS_PREFIX"] + "-node" not in left, f"namespaces left behind: {left}"
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert knobs["DDHPC_NETNS_PREFIX"] + "-" not in links, f"links left behind: {links}"
        daemons = subprocess.run(["pgrep", "-af", str(state)], capture_output=True, text=True).stdout
        assert not daemons.strip(), f"daemons left behind: {daemons}"
