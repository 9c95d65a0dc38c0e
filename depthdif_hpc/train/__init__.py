"""Distributed training: `python -m depthdif_hpc.train --config A.yaml [--config B.yaml] [key=value ...]`.

Exit codes: 0 finished (trainer.max_steps or max_epochs, final checkpoint written); 75 stopped by
SIGUSR1/SIGTERM after writing a checkpoint (requeue me); 2 configuration refused; 3 non-finite
loss (nothing saved after the last good checkpoint); 1 any other failure.
"""

from __future__ import annotations

from depthdif_hpc.train.cli import main

__all__ = ["main"]
