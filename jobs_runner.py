"""SparkOps jobs runner from a checkout: ``python jobs_runner.py [--config PATH]``.

The same as ``python -m sparkops.runner`` (:mod:`sparkops.runner.main`), which an
install runs; kept at the root for the systemd units and habits of the seed."""

import sys

from sparkops.runner.main import main

if __name__ == "__main__":
    sys.exit(main())
