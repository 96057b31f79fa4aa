"""The live workers of this host: one small file per run whose agent may still run.

A run's row says whether the run is open, not whether the agent that worked on it
is gone: the board is shared, and an operator's block, ``hermes kanban complete``
or another host's reclaimer close a run while its agent still works. Its shim then
stops the agent (see :mod:`sparkops.engine.shim`), which takes a moment. So each shim
registers its worker in ``<state dir>/workers/<run id>.json`` (task, run, and the
identity of the shim and the agent: pid, start time, process group) before it
starts the agent, and removes the file once the agent's process group is gone.

The dispatcher reads the registry at every tick (:func:`live`): each live worker
takes a slot whether or not its run is still open, a task with a live worker is
never started again (never two agents in one workspace), and an agent whose shim
died and whose run someone else closed is stopped (:func:`strays`).

Entries are this host's own files, but still read as data: a malformed one is
ignored, and a process is "live" only if its recorded start time matches
(:func:`sparkops.core.procs.is_alive`), so nothing here ever signals a stranger.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sparkops.config import Settings, state_dir
from sparkops.core import procs
from sparkops.core.procs import RunIdentity

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^(\d{1,18})\.json$")


@dataclass(frozen=True)
class Worker:
    """One registered worker: the run it was started for and its processes."""

    task_id: str
    run_id: int
    identity: RunIdentity

    @property
    def shim_alive(self) -> bool:
        return procs.is_alive(self.identity.shim)

    @property
    def agent_alive(self) -> bool:
        """The agent, or any process left in its process group."""
        agent = self.identity.agent
        return agent is not None and (procs.is_alive(agent) or procs.group_alive(agent))

    @property
    def alive(self) -> bool:
        return self.shim_alive or self.agent_alive


def directory(settings: Settings) -> Path:
    return state_dir(settings) / "workers"


def register(root: Path, task_id: str, run_id: int, identity: RunIdentity) -> None:
    """Record (or update) the worker of ``run_id``; written whole, then renamed."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{int(run_id)}.json"
    tmp = root / f".{int(run_id)}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"task_id": task_id, "run_id": int(run_id), "process": identity.as_dict()}))
    os.replace(tmp, path)


def unregister(root: Path, run_id: int) -> None:
    (root / f"{int(run_id)}.json").unlink(missing_ok=True)


def scan(root: Path) -> list[Worker]:
    """Every well-formed entry, live or not."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _ENTRY.match(name)
        if match is None:
            continue
        worker = _read(root / name, int(match.group(1)))
        if worker is not None:
            found.append(worker)
    return found


def live(root: Path) -> list[Worker]:
    """The workers whose shim or agent still runs. Entries whose processes are all
    gone are removed (a shim killed with SIGKILL leaves its entry behind)."""
    alive = []
    for worker in scan(root):
        if worker.alive:
            alive.append(worker)
        else:
            unregister(root, worker.run_id)
    return alive


def strays(workers: list[Worker], open_runs: Collection[int]) -> list[Worker]:
    """Workers whose shim is gone while their agent still runs, for a run that is
    no longer open: nobody else will stop them."""
    return [w for w in workers if w.run_id not in open_runs and not w.shim_alive and w.agent_alive]


def stop(root: Path, worker: Worker, *, grace: float) -> str:
    """Stop a stray agent's process group (identity-checked) and forget it."""
    what = procs.terminate_group(worker.identity.agent, grace=grace)
    if not worker.agent_alive:
        unregister(root, worker.run_id)
    log.warning("stopped the agent of %s (run %d), whose run was closed while its shim was gone: %s",
                worker.task_id, worker.run_id, what)
    return what


def _read(path: Path, run_id: int) -> Worker | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable worker entry %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("task_id"), str) or data.get("run_id") != run_id:
        log.warning("ignoring malformed worker entry %s", path)
        return None
    try:
        identity = RunIdentity.from_metadata({"process": data.get("process")})
    except (TypeError, ValueError):
        identity = None
    if identity is None:
        log.warning("ignoring worker entry %s without a process identity", path)
        return None
    return Worker(task_id=data["task_id"], run_id=run_id, identity=identity)
