import sys

from depthdif_hpc.train.cli import main

sys.exit(main())
