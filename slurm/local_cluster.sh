#!/usr/bin/env bash
# A real SLURM on this machine, for tests and for trying the launchers on a workstation.
#
#   slurm/local_cluster.sh up [--nodes N]   install (if missing) and start munge, MariaDB + slurmdbd,
#                                           slurmctld and one slurmd per node; wait until the
#                                           nodes are idle (N > 1: namespace hosts, see below)
#   slurm/local_cluster.sh down             cancel jobs, stop every daemon by its recorded PID,
#                                           remove the namespace hosts
#   slurm/local_cluster.sh status           daemons, sinfo, squeue
#   slurm/local_cluster.sh env              print `export SLURM_CONF=...` for this cluster
#
# Debian's slurm-wlm 22.05 and munge (plus mariadb-server and slurmdbd for accounting, so that
# sacct and submitit see real job states) are installed with apt-get when missing; that needs
# root. Everything the cluster writes lives under $DDHPC_SLURM_DIR (default /tmp/ddhpc-slurm):
# config, munge key and socket, database, state, spool, logs and the PID file. MariaDB and
# slurmdbd listen on 127.0.0.1; slurmctld is reached at 127.0.0.1 (one node) or at the bridge
# address (several nodes), and nothing is addressed outside loopback and that subnet. Clients find the cluster through SLURM_CONF=$DDHPC_SLURM_DIR/etc/slurm.conf;
# when /etc/slurm/slurm.conf does not exist, `up` also links it there (and `down` removes the
# link), so plain `sbatch` works in a new shell.
#
# Knobs (environment):
#   DDHPC_SLURM_DIR         state folder (default /tmp/ddhpc-slurm)
#   DDHPC_SLURM_PORT_BASE   first of four TCP ports on 127.0.0.1: slurmctld, slurmd, slurmdbd,
#                           MariaDB (default 16817, away from the standard 6817-6819 and 3306)
#   DDHPC_SLURM_CPUS        CPUs the node advertises (default: nproc, without OMP_NUM_THREADS)
#   DDHPC_SLURM_ACCOUNTING  1 (default): MariaDB + slurmdbd; 0: no accounting (sacct fails and
#                           submitit reads job states as UNKNOWN)
#   DDHPC_SLURM_CRED_EXPIRE seconds a requeued job waits before it may start again (default 5;
#                           SLURM's default is 120)
#
#   DDHPC_NETNS_PREFIX      --nodes N > 1: name prefix of the namespaces and links (default ddslurm)
#   DDHPC_NETNS_SUBNET      --nodes N > 1: the hosts' /24 (default 10.77.0: node i at .i, bridge .254)
#
# One node (default): NodeName=localhost at 127.0.0.1. Several nodes (`up --nodes N`, N > 1): N
# real network hosts made by slurm/netns_hosts.sh (network namespaces on a bridge, each with its
# own address, /etc/hosts and hostname), NodeName=node1..nodeN with NodeAddr on the bridge's
# subnet, one slurmd per host; slurmctld, slurmdbd, MariaDB and munged stay in the root namespace
# (slurmctld is reached at the bridge address; the munge socket is a file every host sees).
# Batch scripts and job steps run inside their node's namespace, so `hostname`, rendezvous
# addresses and gloo sockets are those of that node. The file system is shared, as on a cluster
# with a shared home. `down` also removes the namespaces, links and hosts files.
set -euo pipefail

DIR=${DDHPC_SLURM_DIR:-/tmp/ddhpc-slurm}
PORT_BASE=${DDHPC_SLURM_PORT_BASE:-16817}
ACCOUNTING=${DDHPC_SLURM_ACCOUNTING:-1}
CRED_EXPIRE=${DDHPC_SLURM_CRED_EXPIRE:-5}
CLUSTER=ddhpc
PARTITION=debug

CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))

ETC=$DIR/etc
CONF=$ETC/slurm.conf
PIDS=$DIR/pids
LOG=$DIR/log
MUNGE_DIR=$DIR/munge
MUNGE_SOCK=$MUNGE_DIR/munge.socket
DB_DIR=$DIR/db
DB_SOCK=$DIR/dbsock/mysqld.sock
ETC_LINK=/etc/slurm/slurm.conf
NODES_FILE=$DIR/nodes
NETNS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/netns_hosts.sh
export DDHPC_NETNS_PREFIX=${DDHPC_NETNS_PREFIX:-ddslurm}
export DDHPC_NETNS_SUBNET=${DDHPC_NETNS_SUBNET:-10.77.0}
export DDHPC_NETNS_STATE=$DIR/netns
SUBNET=$DDHPC_NETNS_SUBNET

export SLURM_CONF=$CONF

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- install
need_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  if [ "$ACCOUNTING" = 1 ]; then
    command -v slurmdbd >/dev/null 2>&1 || missing+=(slurmdbd)
    command -v mariadbd >/dev/null 2>&1 || missing+=(mariadb-server)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}) and installing them needs root"
  command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"
  say "installing ${missing[*]} (apt-get)"
  # Debian containers forbid service starts in postinst (policy-rc.d); we start daemons ourselves.
  apt-get update -qq >"$LOG/apt.log" 2>&1 || { cat "$LOG/apt.log" >&2; die "apt-get update failed"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" \
    >>"$LOG/apt.log" 2>&1 || { tail -20 "$LOG/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
}

# ---------------------------------------------------------------- pid bookkeeping
record() { echo "$1 $2" >>"$PIDS"; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -f "$PIDS" ] && awk -v n="$1" '$1==n {p=$2} END {if (p) print p}' "$PIDS"; }

any_alive() {
  [ -f "$PIDS" ] || return 1
  local name pid
  while read -r name pid; do alive "$pid" && return 0; done <"$PIDS"
  return 1
}

# Start a daemon in the foreground of a new session, so it survives the caller and its PID is
# the one we record (no pid-file races).
spawn() {
  local name=$1; shift
  setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
  record "$name" "$!"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  local run=(timeout 10)
  [ "$(type -t "$1")" = function ] && run=()  # functions bound their own commands
  until "${run[@]}" "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "local_cluster: error: timed out after ${limit}s waiting for $what" >&2
      for f in "$LOG"/*.log "$LOG"/*.out; do
        [ -s "$f" ] && { echo "--- $f (tail)" >&2; tail -15 "$f" >&2; }
      done
      return 1
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- config
node_memory_mb() {
  # 90% of MemTotal: a RealMemory above what slurmd detects drains the node.
  awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo
}

# How many nodes this cluster has: set by `up`, recorded for `down` and `status`.
node_count() { if [ -n "${NODES:-}" ]; then echo "$NODES"; elif [ -s "$NODES_FILE" ]; then cat "$NODES_FILE"; else echo 1; fi; }

node_lines() {  # one NodeName line per node
  # nproc obeys OMP_NUM_THREADS (often 1 in a job or a test runner): ask for the CPUs we may use.
  local cpus=${DDHPC_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)} mem i
  mem=$(node_memory_mb)
  if [ "$(node_count)" = 1 ]; then
    echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    return
  fi
  for i in $(seq 1 "$(node_count)"); do
    echo "NodeName=node$i NodeAddr=$SUBNET.$i NodeHostname=node$i CPUs=$cpus RealMemory=$mem State=UNKNOWN"
  done
}

node_names() {
  if [ "$(node_count)" = 1 ]; then echo localhost; else seq -f 'node%g' 1 "$(node_count)"; fi
}

# Where slurmd's reach slurmctld: loopback for one node, the bridge for namespace hosts.
ctld_addr() { if [ "$(node_count)" = 1 ]; then echo 127.0.0.1; else echo "$SUBNET.254"; fi; }

write_config() {
  mkdir -p "$ETC" "$DIR/state" "$DIR/spool" "$LOG"
  local acct_lines
  if [ "$ACCOUNTING" = 1 ]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK"
  else
    acct_lines="AccountingStorageType=accounting_storage/none"
  fi
  cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a test cluster on one machine ($(node_count) node(s)). Not for production.
ClusterName=$CLUSTER
SlurmctldHost=localhost($(ctld_addr))
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$acct_lines
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
JobRequeue=1
EnforcePartLimits=ALL
$(node_lines)
PartitionName=$PARTITION Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP
EOF
  if [ "$ACCOUNTING" = 1 ]; then
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=ddhpc-local
StorageLoc=ddhpc_acct
EOF
    chmod 600 "$ETC/slurmdbd.conf"
  fi
}

# ---------------------------------------------------------------- daemons
start_munge() {
  mkdir -p "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
  fi
  chown -R munge:munge "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"  # clients need to reach the socket
  chmod 400 "$MUNGE_DIR/munge.key"
  # munged refuses to run as root; it runs as the munge user with its own key and socket.
  spawn munged runuser -u munge -- /usr/sbin/munged --foreground --force \
    --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed"
  wait_for 10 "munged" munge_ok
}
munge_ok() { timeout 5 munge -S "$MUNGE_SOCK" -n </dev/null | timeout 5 unmunge -S "$MUNGE_SOCK"; }

start_db() {
  mkdir -p "$DB_DIR" "$(dirname "$DB_SOCK")"
  chown mysql:mysql "$DB_DIR" "$(dirname "$DB_SOCK")"
  if [ ! -d "$DB_DIR/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install.log" 2>&1 \
      || { tail -20 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
  fi
  spawn mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" \
    --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --pid-file="$(dirname "$DB_SOCK")/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
    --innodb-buffer-pool-size=64M --skip-name-resolve
  wait_for 30 "MariaDB" mariadb-admin --no-defaults --socket="$DB_SOCK" ping
  mariadb --no-defaults --socket="$DB_SOCK" -u root <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'ddhpc-local';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'ddhpc-local';
GRANT ALL ON ddhpc_acct.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON ddhpc_acct.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_dbd() {
  spawn slurmdbd slurmdbd -D
  wait_for 30 "slurmdbd" sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurm() {
  # -c: start from a clean state (job ids from 1); -i: ignore errors in the saved state.
  spawn slurmctld slurmctld -D -c -i -f "$CONF"
  wait_for 30 "slurmctld" scontrol ping
  local n
  for n in $(node_names); do
    if [ "$(node_count)" = 1 ]; then
      spawn "slurmd-$n" slurmd -D -N "$n" -f "$CONF"
    else
      # Inside the node's namespace, under its hostname: the PID stays slurmd's (exec all the way).
      spawn "slurmd-$n" "$NETNS" exec "$n" slurmd -D -N "$n" -f "$CONF"
    fi
  done
  wait_for 60 "the node(s) to become idle" nodes_idle
}
nodes_idle() {
  local states
  states=$(timeout 10 sinfo -h -N -o %t 2>/dev/null) || return 1
  [ -n "$states" ] && ! echo "$states" | grep -vq '^idle$'
}

# ---------------------------------------------------------------- verbs
up() {
  local nodes=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes=${2:-}; shift 2 ;;
      --nodes=*) nodes=${1#--nodes=}; shift ;;
      *) die "unknown argument to up: $1" ;;
    esac
  done
  [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 64 ] \
    || die "--nodes must be a number from 1 to 64, got '$nodes'"
  if any_alive; then
    if scontrol ping >/dev/null 2>&1 && nodes_idle_or_busy; then
      [ "$(node_count)" = "$nodes" ] || die "already up with $(node_count) node(s) ($DIR); run '$0 down' first"
      say "already up ($DIR)"; return 0
    fi
    die "some daemons recorded in $PIDS are alive but the cluster does not answer; run '$0 down' first"
  fi
  [ "$(id -u)" = 0 ] || die "needs root (daemons run as root/munge/mysql)"
  # Namespaces of an earlier cluster that was never taken down would outlive their record.
  [ -s "$DIR/netns/hosts" ] && "$NETNS" down >/dev/null
  rm -rf "$DIR"
  mkdir -p "$DIR" "$LOG"
  : >"$PIDS"
  NODES=$nodes
  echo "$nodes" >"$NODES_FILE"
  need_packages
  if [ "$nodes" -gt 1 ]; then
    "$NETNS" up --nodes "$nodes" >"$LOG/netns.log" 2>&1 || { cat "$LOG/netns.log" >&2; "$NETNS" down >/dev/null 2>&1 || true; die "could not create $nodes namespace hosts (slurm/netns_hosts.sh)"; }
  fi
  write_config
  start_munge
  if [ "$ACCOUNTING" = 1 ]; then start_db; start_dbd; fi
  start_slurm
  if [ ! -e "$ETC_LINK" ] && [ -d "$(dirname "$ETC_LINK")" ]; then
    ln -s "$CONF" "$ETC_LINK" && echo "$ETC_LINK" >"$DIR/etc_link"
  fi
  say "up: partition '$PARTITION', node(s) $(node_names | paste -sd,), $(sinfo -h -o %c | head -1) CPUs, accounting=$ACCOUNTING"
  say "clients: export SLURM_CONF=$CONF"
}
nodes_idle_or_busy() { sinfo -h -N -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)$'; }

stop_pids() {  # stop_pids NAME:PID...: TERM all, wait up to 10 s, KILL what is left
  local entry left
  for entry in "$@"; do alive "${entry##*:}" && { kill -TERM "${entry##*:}" 2>/dev/null || true; }; done || true
  for _ in $(seq 1 100); do
    left=0
    for entry in "$@"; do alive "${entry##*:}" && left=1; done || true
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  for entry in "$@"; do
    if alive "${entry##*:}"; then
      echo "local_cluster: ${entry%%:*} (${entry##*:}) ignored SIGTERM; killing it" >&2
      kill -KILL "${entry##*:}" 2>/dev/null || true
    fi
  done
}

down() {
  if [ ! -f "$PIDS" ]; then say "down (nothing recorded in $DIR)"; return 0; fi
  # Jobs first, so no slurmstepd outlives its slurmd.
  if scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 60); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  # SLURM daemons first, then what they use (slurmdbd, MariaDB, munged).
  local slurm=() rest=() name pid
  while read -r name pid; do
    case "$name" in
      slurmd-*|slurmctld) slurm+=("$name:$pid") ;;
      *) rest+=("$name:$pid") ;;
    esac
  done <"$PIDS"
  [ ${#slurm[@]} -gt 0 ] && stop_pids "${slurm[@]}"
  [ ${#rest[@]} -gt 0 ] && stop_pids "${rest[@]}"
  if [ -f "$DIR/etc_link" ]; then
    local link; link=$(cat "$DIR/etc_link")
    [ -L "$link" ] && [ "$(readlink "$link")" = "$CONF" ] && rm -f "$link"
    rm -f "$DIR/etc_link"
  fi
  rm -f "$PIDS"
  # After the daemons: the hosts' namespaces, links and hosts files (and anything left in them).
  [ -s "$DIR/netns/hosts" ] && "$NETNS" down >/dev/null
  rm -f "$NODES_FILE"
  say "down"
}

status() {
  if [ ! -f "$PIDS" ]; then say "down"; return 0; fi
  local name pid
  while read -r name pid; do
    if alive "$pid"; then echo "$name $pid running"; else echo "$name $pid DEAD"; fi
  done <"$PIDS"
  echo "SLURM_CONF=$CONF"
  [ -s "$DIR/netns/hosts" ] && "$NETNS" status
  sinfo 2>&1 || true
  squeue 2>&1 || true
}

cmd=${1:-}
shift || true
case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: $0 up [--nodes N] | down | status | env" ;;
esac
