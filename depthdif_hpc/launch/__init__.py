"""Launching the trainer on a cluster: `python -m depthdif_hpc.launch.submit` and the SLURM scripts.

* `trainer_args`: the trainer's command line for a preset plus user configs and overrides.
* `submitit_job`: the submitit callable (`TrainJob`) that runs the trainer in each task and turns
  submitit's preemption/timeout hook into the trainer's checkpoint-and-requeue.
* `submit`: the command line that builds and submits the job (or job array).

Host lists and rendezvous ports live in `depthdif_hpc.launch_env` (the trainer needs them too).
"""

from depthdif_hpc.launch.trainer_args import PRESETS, split_args, trainer_argv

__all__ = ["PRESETS", "split_args", "trainer_argv"]
