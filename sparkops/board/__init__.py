"""The Hermes Kanban board: every status change, the reads, phases and task requirements."""

#: What a block may say it waits for (Hermes' block kinds). Here rather than in
#: :mod:`sparkops.board.model` so that a worker's report process
#: (:mod:`sparkops.cli.report`) can check ``--kind`` without importing the model.
BLOCK_KINDS = frozenset({"dependency", "needs_input", "capability", "transient"})
