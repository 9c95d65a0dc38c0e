"""Launch helpers shared by `python -m depthdif_hpc.submit` and the SLURM scripts.

* `rendezvous`: first host of a SLURM node list, a job-unique rendezvous port.
* `trainer_args`: the trainer's command line for a preset plus user configs and overrides.
* `submitit_job`: the submitit callable (`TrainJob`) that runs the trainer in each task and turns
  submitit's preemption/timeout hook into the trainer's checkpoint-and-requeue.
"""

from depthdif_hpc.launch.rendezvous import expand_hostlist, first_host, job_port, pick_port
from depthdif_hpc.launch.trainer_args import PRESETS, split_args, trainer_argv

__all__ = ["PRESETS", "expand_hostlist", "first_host", "job_port", "pick_port", "split_args", "trainer_argv"]
