#!/usr/bin/env bash
# DepthDif, ambient-occlusion preset (learns from sparse Argo observations), on SLURM.
#
#   sbatch slurm/train_ambient.sh [--config FILE ...] [key=value ...]
#   sbatch --nodes=4 --gpus-per-node=8 -p gpu -A myproj slurm/train_ambient.sh trainer.max_steps=200000
#
# Same launcher, knobs and preemption handling as slurm/train.sh (read its header): this script only
# selects configs/px_space/model_config_ambient.yaml. The #SBATCH headers must be repeated here
# because sbatch reads them from the submitted file.
#
#SBATCH --job-name=depthdif-ambient
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
STOP=0
trap 'STOP=1' USR1
ROOT=${DDHPC_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$ROOT/slurm/train.sh" ] || { echo "train_ambient.sh: error: $ROOT/slurm/train.sh not found (submit from the repository root or set DDHPC_ROOT)" >&2; exit 2; }
export DDHPC_PRESET=ambient
# Sourced, not executed: the same shell (the batch step's process) keeps receiving the signal and
# the trap and STOP flag carry over.
source "$ROOT/slurm/train.sh" "$@"
