"""Repository-wide pytest set-up.

Without a CUDA device the Triton kernels run in the interpreter, which must be switched on
before any `@triton.jit` function is defined, so it is set here, ahead of every test import.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No dispatch table (kernels/dispatch_table.py) unless a test sets one: on a GPU with a shipped
# table some calls would run their eager reference, and a kernel test would test it instead.
os.environ["DEPTHDIF_DISPATCH_TABLE"] = "none"


import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of `make test`'s two workers on two cores: one intra-op thread each, so that the workers
    # do not oversubscribe the cores (on this 2-core VM, a suite run at load 7 took 120 s for a
    # torch test that takes 19 s alone). Not OMP_NUM_THREADS: the processes a test starts keep
    # their own rule, and coreutils' nproc obeys that variable, so the local SLURM cluster would
    # be configured with one CPU.
    torch.set_num_threads(1)

_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "GROUP_RANK", "OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """In-process training exports torch.distributed variables into os.environ; without this,
    a later test's subprocesses (launchers, torchrun) would inherit a stale rendezvous port, and
    every later test would run with the last trainer's thread count."""
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    threads = torch.get_num_threads()  # the trainer applies trainer.intra_op_threads in-process
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# Tests that bring up or use the local SLURM clusters and network namespaces (tests/launch,
# tests/multinode) share machine-wide state: one work unit, one xdist worker, one at a time.
_SHARED_MACHINE_STATE = ("tests/launch/", "tests/multinode/")


def work_unit(nodeid: str) -> str:
    """What `make test`'s workers are handed whole: a test file (its module fixtures are built
    once), or every test that shares the local clusters."""
    path = nodeid.split("::", 1)[0]
    return next((p for p in _SHARED_MACHINE_STATE if path.startswith(p)), path)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called under `pytest -n N`
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    # xdist's own --dist loadgroup marks groups by rewriting Item._nodeid, which pytest >= 9.2
    # no longer reads (the node id comes from Item._id), so the groups are chosen here.
    if config.getoption("dist") == "worksteal":
        # Asked for by name (the GPU command's CUDA-only tests, none of which touch the local
        # clusters): test by test, idle workers taking from busy ones. In file units the 90
        # parity cases of the front ran on one of 8 workers, and the H100 stage stopped at its
        # limit with that worker alone still busy.
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


# Where every failure's traceback goes as it happens (the GPU command's gpu_tests stage sets
# it): pytest prints tracebacks only at the end of a run, so a run stopped at its time limit
# keeps none; the first H100 run of the CUDA-only tests lost its 4 failures' that way.
FAILURE_LOG_VAR = "DD_PYTEST_FAILURE_LOG"


# Where each test's start and each phase's seconds go as they happen ("start" or the phase,
# seconds, node id; tab-separated): a run stopped at its limit then still says which tests it
# was running and what took the time, which pytest's --durations prints only at the end.
PROGRESS_LOG_VAR = "DD_PYTEST_PROGRESS_LOG"


def _controller_log(var: str, text: str) -> None:
    path = os.environ.get(var)
    # Under xdist the controller sees every worker's reports: it alone writes.
    if path and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(text)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    _controller_log(PROGRESS_LOG_VAR, f"start\t0\t{nodeid}\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _controller_log(PROGRESS_LOG_VAR, f"{report.when}\t{report.duration:.3f}\t{report.nodeid}\n")
    if report.failed:
        _controller_log(FAILURE_LOG_VAR,
                        f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
