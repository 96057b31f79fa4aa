"""SparkOps: the operations system for autonomous AI coding sprints on a GPU box."""

from pathlib import Path

__version__ = "0.1.0"

#: The directory that holds the ``sparkops`` package (the checkout, or site-packages
#: when installed): put on a worker shim's PYTHONPATH, so ``python -m
#: sparkops.engine.shim`` works from a task's workspace either way.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
