"""The Hermes Kanban board: every status change, the reads, phases and task requirements."""
