#!/usr/bin/env bash
# Tiled reconstruction on SLURM: one task per GPU over the whole allocation, each task takes its
# share of the tiles (depthdif_hpc.launch_env reads SLURM_PROCID / SLURM_NTASKS); task 0 waits for
# every tile, blends them and writes the NetCDF file and its figure.
#
#   sbatch --nodes=2 --gpus-per-node=4 -p gpu -A myproj slurm/reconstruct.sh \
#       --checkpoint weights/ --date 2018-01-03 --global \
#       --ostia '/data/ostia/2018/*.nc' --en4 '/data/en4/*.nc' --out recon_20180103.nc --ensemble 8
#
# Arguments after the script go to `python -m depthdif_hpc.inference.reconstruct` unchanged
# (docs/reconstruct.md). Options on the sbatch command line override the #SBATCH headers.
#
# Environment knobs (as slurm/train.sh): DDHPC_ROOT (checkout, default: the submit directory),
# DDHPC_PYTHON (default $DDHPC_ROOT/.venv/bin/python, else python3), DDHPC_SETUP (shell lines
# run first, e.g. 'module load cuda'), DDHPC_CONTAINER (prefix of each task's command),
# DDHPC_DEVICE (gpu, default, or cpu: one task per node on CPUs).
#
# Time limits and preemption: every finished tile is a file in OUT.work/, so nothing but the
# tiles in flight is lost. SLURM sends SIGUSR1 120 s before the limit; the script requeues the
# job and the next allocation runs the same command, which skips the finished tiles.
#
#SBATCH --job-name=depthdif-reconstruct
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-gpu=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

trap 'say "time limit near: requeue"; scontrol requeue "$SLURM_JOB_ID"; kill -TERM "$STEP" 2>/dev/null; exit 0' USR1
set -uo pipefail

say() { echo "[$(date +%FT%T)] reconstruct.sh: $*"; }
die() { echo "[$(date +%FT%T)] reconstruct.sh: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "run me with sbatch (no SLURM_JOB_ID), or run the module directly"
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
ROOT=$(cd "${DDHPC_ROOT:-$SUBMIT_DIR}" 2>/dev/null && pwd) || die "DDHPC_ROOT=${DDHPC_ROOT:-} is not a directory"
cd "$SUBMIT_DIR" || die "cannot cd to $SUBMIT_DIR"
if [ -n "${DDHPC_SETUP:-}" ]; then
  eval "$DDHPC_SETUP" || die "DDHPC_SETUP failed: $DDHPC_SETUP"
fi
PY=${DDHPC_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

NODES=${SLURM_JOB_NUM_NODES:-1}
if [ "${DDHPC_DEVICE:-gpu}" = cpu ]; then
  PER_NODE=1
  EXTRA=(--device cpu)
  GPU_OPTS=()
else
  PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
  PER_NODE=${PER_NODE##*:}
  EXTRA=()
  # One GPU per task: each task sees its own device as cuda:0.
  GPU_OPTS=(--gpus-per-task=1)
fi
TASKS=$((NODES * PER_NODE))
say "job $SLURM_JOB_ID: $TASKS tasks on $NODES node(s), restart ${SLURM_RESTART_COUNT:-0}"

srun --ntasks="$TASKS" --ntasks-per-node="$PER_NODE" ${GPU_OPTS[@]+"${GPU_OPTS[@]}"} --kill-on-bad-exit=1 \
  ${DDHPC_CONTAINER:-} "$PY" -m depthdif_hpc.inference.reconstruct ${EXTRA[@]+"${EXTRA[@]}"} "$@" &
STEP=$!
wait "$STEP"
rc=$?
say "srun finished with exit code $rc"
exit "$rc"
