#!/usr/bin/env bash
# DepthDif training on SLURM: one launcher (torchrun) per node, one trainer process per GPU,
# preemption-safe (checkpoint on signal, requeue, resume).
#
#   sbatch slurm/train.sh [--config FILE ...] [key=value ...]           # standard preset
#   sbatch slurm/train_ambient.sh [--config FILE ...] [key=value ...]   # ambient preset
#   sbatch --nodes=4 --gpus-per-node=8 -p gpu -A myproj slurm/train_ambient.sh trainer.max_steps=200000
#
# Arguments after the script are passed to `python -m depthdif_hpc.train` after the preset's
# configs (configs/px_space/...), so they win. Options on the sbatch command line override the
# #SBATCH headers below (nodes, GPUs, time, partition, account, ...).
#
# Environment knobs (set them in the shell that runs sbatch; sbatch exports them to the job):
#   SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS  read by sbatch itself (same as -p, -A, --qos)
#   DDHPC_ROOT             repository checkout (default: the directory sbatch was run from)
#   DDHPC_PYTHON           python with depthdif_hpc installed (default: $DDHPC_ROOT/.venv/bin/python,
#                          else python3 on PATH)
#   DDHPC_SETUP            shell lines run in the job before launching, e.g.
#                          'module load cuda/12.4 nccl; source ~/venvs/ddhpc/bin/activate'
#   DDHPC_CONTAINER        command prefix for each node's launcher, e.g.
#                          'apptainer exec --nv /images/ddhpc.sif' or 'srun-container-wrapper'
#   DDHPC_PRESET           standard | ambient (train_ambient.sh sets ambient)
#   DDHPC_DEVICE           gpu (default) | cpu: CPU processes with gloo, no GPUs (tests, laptops)
#   DDHPC_PROCS_PER_NODE   trainer processes per node (default: GPUs on the node; cpu: 1)
#   DDHPC_RUN_DIR          run folder, stable across requeues (default runs/<job name>-<job id>;
#                          a trainer.run_dir=... argument wins)
#   DDHPC_LOG_DIR          per-node and per-rank logs (default logs/<job name>-<job id>)
#   DDHPC_MAX_REQUEUES     give up after this many requeues (default 50)
#   DDHPC_RESIGNAL_S       resend the checkpoint signal every this many seconds until the trainer
#                          has stopped (default 10; covers a signal that lands during start-up)
#   DDHPC_SHUTDOWN_GRACE_S seconds torchrun lets a signalled trainer checkpoint before SIGKILL
#                          (default 150; TORCH_ELASTIC_SHUTDOWN_TIMEOUT wins when set)
#
# Preemption and time limits: SLURM sends SIGUSR1 to this script 180 s before the time limit
# (--signal=B:USR1@180). The script forwards it to the trainer processes (the launchers ignore it),
# every rank writes a checkpoint at the next step boundary and exits with 75, and the script runs
# `scontrol requeue $SLURM_JOB_ID`. The next allocation starts this script again with the same job
# id, so the same run folder, and the trainer resumes from the newest complete checkpoint
# (trainer.resume=auto). `scancel --signal=USR1 --batch <jobid>` does the same by hand. A
# preemption or `scontrol requeue` by the scheduler sends SIGTERM to every process: the trainer
# checkpoints on that too, within KillWait, and SLURM requeues the job itself (--requeue).
#
# Logs: the job log is <job name>-<job id>.out in the submit directory (appended across requeues),
# one log per node and per rank under DDHPC_LOG_DIR/attempt-<n>/.
#
#SBATCH --job-name=depthdif
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --mem=0
##SBATCH --exclusive

# Catch the checkpoint signal from the first instant (bash would die of an untrapped SIGUSR1).
STOP=${STOP:-0}
trap 'STOP=1' USR1
set -uo pipefail

say() { echo "[$(date +%FT%T)] train.sh: $*"; }
die() { echo "[$(date +%FT%T)] train.sh: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "run me with sbatch (no SLURM_JOB_ID), or use python -m depthdif_hpc.launch.submit"

# The trainer runs in the submit directory: relative paths in arguments (trainer.run_dir=...,
# dataset.store=...) are relative to where sbatch was run. Preset configs come from DDHPC_ROOT.
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
ROOT=$(cd "${DDHPC_ROOT:-$SUBMIT_DIR}" 2>/dev/null && pwd) || die "DDHPC_ROOT=${DDHPC_ROOT:-} is not a directory"
[ -f "$ROOT/configs/px_space/training_config.yaml" ] || die "$ROOT is not a depthdif_hpc checkout (submit from the repository root or set DDHPC_ROOT)"
cd "$SUBMIT_DIR" || die "cannot cd to the submit directory $SUBMIT_DIR"

if [ -n "${DDHPC_SETUP:-}" ]; then
  say "setup: $DDHPC_SETUP"
  eval "$DDHPC_SETUP" || die "DDHPC_SETUP failed: $DDHPC_SETUP"
fi

if [ -z "${DDHPC_PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then DDHPC_PYTHON=$ROOT/.venv/bin/python; else DDHPC_PYTHON=python3; fi
fi

PRESET=${DDHPC_PRESET:-standard}
case "$PRESET" in
  standard) MODEL_CONFIG=$ROOT/configs/px_space/model_config.yaml ;;
  ambient) MODEL_CONFIG=$ROOT/configs/px_space/model_config_ambient.yaml ;;
  *) die "DDHPC_PRESET=$PRESET: expected standard or ambient" ;;
esac
DEVICE=${DDHPC_DEVICE:-gpu}
case "$DEVICE" in gpu|cpu) ;; *) die "DDHPC_DEVICE=$DEVICE: expected gpu or cpu" ;; esac

RESTART=${SLURM_RESTART_COUNT:-0}
NAME=${SLURM_JOB_NAME:-depthdif}
RUN_DIR=${DDHPC_RUN_DIR:-runs/$NAME-$SLURM_JOB_ID}
LOG_DIR=${DDHPC_LOG_DIR:-logs/$NAME-$SLURM_JOB_ID}/attempt-$RESTART
mkdir -p "$LOG_DIR"

# Split the pass-through arguments into config files and key=value overrides.
CONFIGS=(--config "$MODEL_CONFIG" --config "$ROOT/configs/px_space/training_config.yaml"
         --config "$ROOT/configs/px_space/data_config.yaml")
OVERRIDES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || die "--config needs a file"; CONFIGS+=(--config "$2"); shift 2 ;;
    --config=*) CONFIGS+=(--config "${1#--config=}"); shift ;;
    trainer.run_dir=*) OVERRIDES+=("$1"); RUN_DIR=${1#trainer.run_dir=}; shift ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unexpected argument '$1': pass --config FILE or key=value overrides" ;;
  esac
done
# Defaults first (an argument wins), except on a requeue: then always resume from the newest
# checkpoint of this run, whatever trainer.resume said for the first start.
TRAIN_ARGS=("${CONFIGS[@]}" "trainer.run_dir=$RUN_DIR" "trainer.resume=auto" "${OVERRIDES[@]}")
[ "$RESTART" -gt 0 ] && TRAIN_ARGS+=("trainer.resume=auto")

# Rendezvous: the first host of the allocation and a port derived from the job id and attempt,
# skipping ports already in use here (this script runs on the first node).
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[ -n "$HEAD" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=$((20000 + (SLURM_JOB_ID * 7 + RESTART) % 30000))
for _ in $(seq 1 50); do port_in_use "$PORT" || break; PORT=$((PORT + 1)); done

say "job $SLURM_JOB_ID attempt $RESTART: $NNODES node(s) [$SLURM_JOB_NODELIST], preset $PRESET, device $DEVICE"
say "rendezvous $HEAD:$PORT, run dir $RUN_DIR, logs $LOG_DIR"
say "trainer args: ${TRAIN_ARGS[*]}"

# One launcher per node. Runs inside srun, so it is exported as a function.
# shellcheck disable=SC2317  # invoked through srun, not directly
node_launch() {
  local nproc=${DDHPC_PROCS_PER_NODE:-}
  if [ -z "$nproc" ]; then
    if [ "$DEVICE" = cpu ]; then
      nproc=1
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
      nproc=$SLURM_GPUS_ON_NODE
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      nproc=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
    else
      nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || true
    fi
  fi
  if [ -z "$nproc" ] || [ "$nproc" -lt 1 ]; then
    echo "node $(hostname): no GPUs found (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, nvidia-smi); request GPUs (--gpus-per-node) or set DDHPC_DEVICE=cpu / DDHPC_PROCS_PER_NODE" >&2
    return 2
  fi
  if [ "$DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=""
  fi
  # CPU threads per process: the trainer applies trainer.intra_op_threads (default: this node's
  # CPUs / processes), the same rule under every launcher.
  # torchrun SIGKILLs its workers this long after passing on a SIGTERM (default 30 s): give them
  # the time a checkpoint takes, inside SLURM's warning lead (--signal=B:USR1@180).
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${DDHPC_SHUTDOWN_GRACE_S:-150}}
  # The launcher must survive the checkpoint signal; the trainer processes install a handler.
  # (An ignored signal stays ignored across exec, so set the trainer's own handler in Python.)
  trap '' USR1
  # shellcheck disable=SC2086
  exec $DDHPC_CONTAINER "$DDHPC_PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node-rank="$SLURM_NODEID" --nproc-per-node="$nproc" \
    --master-addr="$HEAD" --master-port="$PORT" \
    --log-dir="$LOG_DIR/node-$SLURM_NODEID" --redirects=3 --tee=3 \
    -m depthdif_hpc.train "$@"
}
export -f node_launch
export DEVICE NNODES HEAD PORT LOG_DIR DDHPC_PYTHON
export DDHPC_CONTAINER=${DDHPC_CONTAINER:-}

# shellcheck disable=SC2317  # invoked by the USR1 trap
on_signal() {
  STOP=1
  say "checkpoint signal received: asking the trainer to checkpoint and stop"
  [ -n "${STEP_PID:-}" ] && scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null
}
trap on_signal USR1

if [ "$RESTART" -ge "${DDHPC_MAX_REQUEUES:-50}" ]; then
  die "job $SLURM_JOB_ID was requeued $RESTART times (DDHPC_MAX_REQUEUES); not starting again"
fi

if [ "$STOP" = 1 ]; then
  say "checkpoint signal before the trainer started: requeueing job $SLURM_JOB_ID without running"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
  sleep 60
  exit 75
fi

# The trainer writes $RUN_DIR/stopped.json only after the checkpoint of a stop on a signal; one
# left by an earlier attempt must not make this one requeue.
STOPPED="$RUN_DIR/stopped.json"
rm -f "$STOPPED"

# Slurm 22.05 steps do not inherit --cpus-per-task from the job (they get 1 CPU per task, and with
# CPU binding every trainer on the node would share it): pass it on.
STEP_CPUS=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && STEP_CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
STEP_PID=
srun --nodes="$NNODES" --ntasks-per-node=1 "${STEP_CPUS[@]}" --kill-on-bad-exit=1 \
  --output="$LOG_DIR/node-%n.out" bash -c 'node_launch "$@"' node_launch "${TRAIN_ARGS[@]}" &
STEP_PID=$!
# A signal that came before srun started is forwarded now.
[ "$STOP" = 1 ] && scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null

# `wait` returns early when a trapped signal arrives. Once stopping, poll the step and resend the
# signal now and then, so a trainer still starting up (the signal is ignored until its handler is
# installed) is reached too.
RC=0
while :; do
  if [ "$STOP" = 1 ]; then
    LAST_SENT=$SECONDS
    while kill -0 "$STEP_PID" 2>/dev/null; do
      sleep 1
      if [ $((SECONDS - LAST_SENT)) -ge "${DDHPC_RESIGNAL_S:-10}" ]; then
        scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null; LAST_SENT=$SECONDS
      fi
    done
    wait "$STEP_PID"; RC=$?
    break
  fi
  wait "$STEP_PID"; RC=$?
  if ! kill -0 "$STEP_PID" 2>/dev/null; then
    [ "$STOP" = 1 ] && { wait "$STEP_PID"; RC=$?; }  # a signal raced the step's end
    break
  fi
done

if [ "$RC" = 0 ] && [ "$STOP" = 0 ]; then
  say "training finished (exit 0)"
  exit 0
fi
if [ "$STOP" = 1 ] || [ "$RC" = 75 ]; then
  if [ "$RC" = 0 ]; then
    say "the trainer finished before it could stop: nothing to requeue"
    exit 0
  fi
  # torchrun reports a worker's 75 as 1, so the exit code cannot tell a checkpointed stop from a
  # crash in the final save (disk full, quota, OOM, NaN): the trainer's marker does. Without it a
  # requeue would only repeat the lost work, up to DDHPC_MAX_REQUEUES times.
  if [ ! -f "$STOPPED" ]; then
    say "the trainer stopped without recording a checkpointed stop ($STOPPED missing, step exit $RC): not requeueing; see $LOG_DIR"
    exit $(( RC == 0 ? 1 : RC ))
  fi
  say "trainer stopped after checkpointing (step exit $RC, $(tr -d '\n ' < "$STOPPED")); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
  # The requeue ends this allocation (and this script) from the outside.
  sleep 60
  exit 75
fi
say "training failed (step exit $RC); see $LOG_DIR"
exit "$RC"
