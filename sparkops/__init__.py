"""SparkOps: the operations system for autonomous AI coding sprints on a GPU box."""

__version__ = "0.1.0"
