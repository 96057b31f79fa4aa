"""A task's workspace: ``dispatch.workspace_root/<task id>``, where its agent works,
with ``TASK.md`` holding the task's title and body (the only way the task's text
reaches the agent). Made from the plain id alone: the row's ``workspace_path`` says
that a task had a workspace, but it is data another tool may have written, never a
path to use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparkops.board import model
from sparkops.core.errors import Refused

PROMPT_NAME = "TASK.md"


def path_of(settings: Any, task_id: str) -> Path:
    """The workspace of ``task_id``; :class:`Refused` for an id that is not a plain id."""
    if not model.is_safe_id(task_id):
        raise Refused(model.unsafe_id_reason(task_id))
    return Path(settings["dispatch.workspace_root"]) / task_id


def prompt_text(title: str, body: str | None) -> str:
    return f"# {title}\n\n{body or ''}\n"


def prepare(settings: Any, task_id: str, title: str, body: str | None) -> tuple[Path, Path]:
    """Create the workspace if it is missing and (re)write its ``TASK.md``; returns
    ``(workspace, prompt file)``. Raises ``OSError`` when the disk says no."""
    workspace = path_of(settings, task_id)
    workspace.mkdir(parents=True, exist_ok=True)
    prompt_file = workspace / PROMPT_NAME
    prompt_file.write_text(prompt_text(title, body), encoding="utf-8")
    return workspace, prompt_file
