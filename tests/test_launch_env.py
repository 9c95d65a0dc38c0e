"""Rank and rendezvous resolution from the environment: SLURM's variables, and torchrun's taking
precedence over them."""

from depthdif_hpc.launch_env import job_port, resolve_dist_env


def test_ranks_and_rendezvous_from_slurm_or_torchrun():
    env = resolve_dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                            "SLURM_JOB_NODELIST": "gpu[012-015]", "SLURM_JOB_ID": "4242"}, export=False)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 8, 1, "slurm")
    assert env.master_port == job_port(4242) and env.master_addr in ("gpu012",)
    env = resolve_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                            "SLURM_NTASKS": "1"}, export=False)
    assert (env.rank, env.world_size, env.source) == (1, 2, "torch")
