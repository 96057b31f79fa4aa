"""SparkOps: the operations system for autonomous AI coding sprints on a GPU box."""

import os

__version__ = "0.1.0"

#: The directory that holds the ``sparkops`` package (the checkout, or site-packages
#: when installed): put on a worker shim's PYTHONPATH, so ``python -m
#: sparkops.engine.shim`` works from a task's workspace either way. A string: this
#: module is imported by every report process, which should not pay for pathlib.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
