#!/usr/bin/env bash
# Test hosts on one machine: Linux network namespaces joined by veth pairs to a bridge.
#
#   slurm/netns_hosts.sh up [--nodes N]   create hosts node1..nodeN at 10.77.0.1..N/24
#   slurm/netns_hosts.sh down             remove every namespace, link and the bridge it recorded
#   slurm/netns_hosts.sh status           list the recorded hosts and whether they answer
#   slurm/netns_hosts.sh exec NODE CMD... run a command on a host, under the host's own name
#
# The root namespace joins the bridge at 10.77.0.254, so daemons there (slurmctld) and processes
# inside the hosts reach each other. Traffic stays on this subnet and loopback. Needs root and
# iproute2 (installed from Debian if missing). Names and the subnet can be changed with
# DDHPC_NETNS_PREFIX (default ddhpc) and DDHPC_NETNS_SUBNET (default 10.77.0).
#
# Each host also gets the name resolution a real cluster has: `exec` mounts the host's own
# /etc/netns/<namespace>/hosts (node1..nodeN and their addresses) over /etc/hosts and runs the
# command in a UTS namespace whose hostname is the node's name. So `node2`
# resolves from node1, and a process's own hostname resolves to its host's address, which is the
# interface gloo picks when GLOO_SOCKET_IFNAME is not set.
set -euo pipefail

PREFIX=${DDHPC_NETNS_PREFIX:-ddhpc}
SUBNET=${DDHPC_NETNS_SUBNET:-10.77.0}
STATE_DIR=${DDHPC_NETNS_STATE:-/tmp/${PREFIX}-netns}
STATE=$STATE_DIR/hosts
BRIDGE=${PREFIX}-br

die() { echo "netns_hosts: $*" >&2; exit 1; }

need_ip() {
  command -v ip >/dev/null 2>&1 && return
  [ "$(id -u)" = 0 ] || die "iproute2 is missing and installing it needs root"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
}

up() {
  local nodes=2
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes=$2; shift 2 ;;
      *) die "unknown argument to up: $1" ;;
    esac
  done
  [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 200 ] || die "--nodes must be 1..200"
  need_ip
  [ -s "$STATE" ] && die "hosts already up (state in $STATE); run '$0 down' first"
  mkdir -p "$STATE_DIR"
  : > "$STATE"
  # Record every name before creating it, so `down` can clean up after a partial `up`.
  echo "bridge $BRIDGE" >> "$STATE"
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$nodes"); do
    local ns=${PREFIX}-node$i veth=${PREFIX}-v$i
    echo "host node$i $ns $veth $SUBNET.$i" >> "$STATE"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  write_hosts_files
  status
}

# /etc/hosts for every host: loopback, the bridge, and all nodes.
write_hosts_files() {
  local lines ns
  lines=$(printf '127.0.0.1 localhost\n::1 localhost\n%s.254 %s-bridge\n' "$SUBNET" "$PREFIX"
          awk '$1=="host" {print $5, $2}' "$STATE")
  for ns in $(awk '$1=="host" {print $3}' "$STATE"); do
    mkdir -p "/etc/netns/$ns"
    echo "$lines" > "/etc/netns/$ns/hosts"
  done
}

down() {
  [ -f "$STATE" ] || { echo "netns_hosts: nothing recorded in $STATE"; return 0; }
  while read -r kind a b c _; do
    case "$kind" in
      host)
        # Processes left inside a namespace would keep it alive: end them first.
        if ip netns pids "$b" >/dev/null 2>&1; then
          for pid in $(ip netns pids "$b"); do kill "$pid" 2>/dev/null || true; done
          sleep 0.2
          for pid in $(ip netns pids "$b" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        fi
        ip link del "$c" 2>/dev/null || true
        ip netns del "$b" 2>/dev/null || true
        rm -rf "/etc/netns/$b" ;;
      bridge) ;;
    esac
  done < "$STATE"
  ip link del "$BRIDGE" 2>/dev/null || true
  rmdir /etc/netns 2>/dev/null || true  # only when no other namespace has files there
  rm -f "$STATE"
  echo "netns_hosts: down"
}

status() {
  [ -s "$STATE" ] || { echo "netns_hosts: down"; return 0; }
  while read -r kind a b c addr; do
    [ "$kind" = host ] || continue
    if ip -n "$b" addr show eth0 2>/dev/null | grep -q "inet $addr/"; then
      echo "$a $addr up ($b)"
    else
      echo "$a $addr missing ($b)"
    fi
  done < "$STATE"
}

node_ns() {
  local node=$1
  [ -s "$STATE" ] || die "no hosts are up"
  awk -v n="$node" '$1=="host" && $2==n {print $3}' "$STATE" | grep . || die "unknown host $node"
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  status) status ;;
  ns) node_ns "$1" ;;
  exec)
    [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."
    ns=$(node_ns "$1"); node=$1; shift
    # Not `ip netns exec`: it remounts /sys, which hides /sys/fs/cgroup (slurmd needs it). Enter
    # the network namespace, then give the host its own /etc/hosts (a private mount namespace)
    # and its own hostname (a UTS namespace); the machine's own files and name are untouched.
    exec nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- \
      sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' \
      "$node" "/etc/netns/$ns/hosts" "$@" ;;
  *) die "usage: $0 up [--nodes N] | down | status | ns NODE | exec NODE CMD..." ;;
esac
