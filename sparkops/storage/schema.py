"""The board schema (the Hermes Kanban format), the ops schema, and migrations.

The board tables below copy ``hermes kanban init`` (hermes-agent 0.19) column
for column: names, types, defaults and indexes. They were read from a real board
(``tests/fixtures/hermes_board.db``, made by ``tests/fixtures/make_hermes_board.sh``),
and ``tests/test_schema.py`` compares a SparkOps-made board with it. Timestamps
are integer epoch seconds; on PostgreSQL they are BIGINT so they outlive 2038.

Schema versions: a SQLite board records SparkOps' version in ``PRAGMA
user_version`` (Hermes does not use it, and it is not a table, so a Hermes
``kanban.db`` never gets foreign tables). Every other database (the ops store, a
PostgreSQL board) keeps a row in ``ops_schema_version``. A database whose version
is newer than this code knows is refused untouched. Upgrades are migrations:
functions that keep every row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateColumn

from sparkops.core.errors import StorageError
from sparkops.storage.columns import Count, Epoch
from sparkops.storage.db import Database

log = logging.getLogger(__name__)

# Primary keys are declared nullable=True only to render Hermes' exact DDL
# ("id TEXT PRIMARY KEY", no NOT NULL); PostgreSQL makes every key NOT NULL anyway.

board_metadata = MetaData()

tasks = Table(
    "tasks",
    board_metadata,
    Column("id", Text, primary_key=True, nullable=True),
    Column("title", Text, nullable=False),
    Column("body", Text),
    Column("assignee", Text),
    Column("status", Text, nullable=False),
    Column("priority", Count, server_default=text("0")),
    Column("created_by", Text),
    Column("created_at", Epoch, nullable=False),
    Column("started_at", Epoch),
    Column("completed_at", Epoch),
    Column("workspace_kind", Text, nullable=False, server_default=text("'scratch'")),
    Column("workspace_path", Text),
    Column("branch_name", Text),
    Column("project_id", Text),
    Column("claim_lock", Text),
    Column("claim_expires", Epoch),
    Column("tenant", Text),
    Column("result", Text),
    Column("idempotency_key", Text),
    Column("consecutive_failures", Count, nullable=False, server_default=text("0")),
    Column("worker_pid", Count),
    Column("last_failure_error", Text),
    Column("max_runtime_seconds", Count),
    Column("last_heartbeat_at", Epoch),
    Column("current_run_id", Count),
    Column("workflow_template_id", Text),
    Column("current_step_key", Text),
    Column("skills", Text),
    Column("model_override", Text),
    Column("max_retries", Count),
    Column("goal_mode", Count, nullable=False, server_default=text("0")),
    Column("goal_max_turns", Count),
    Column("session_id", Text),
    Column("block_kind", Text),
    Column("block_recurrences", Count, nullable=False, server_default=text("0")),
    Index("idx_tasks_assignee_status", "assignee", "status"),
    Index("idx_tasks_status", "status"),
    Index("idx_tasks_tenant", "tenant"),
    Index("idx_tasks_idempotency", "idempotency_key"),
    Index("idx_tasks_session_id", "session_id"),
)

task_links = Table(
    "task_links",
    board_metadata,
    Column("parent_id", Text, nullable=False),
    Column("child_id", Text, nullable=False),
    PrimaryKeyConstraint("parent_id", "child_id"),
    Index("idx_links_child", "child_id"),
    Index("idx_links_parent", "parent_id"),
)

task_comments = Table(
    "task_comments",
    board_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, nullable=True),
    Column("task_id", Text, nullable=False),
    Column("author", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Epoch, nullable=False),
    Index("idx_comments_task", "task_id", "created_at"),
    sqlite_autoincrement=True,
)

task_events = Table(
    "task_events",
    board_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, nullable=True),
    Column("task_id", Text, nullable=False),
    Column("run_id", Count),
    Column("kind", Text, nullable=False),
    Column("payload", Text),  # JSON
    Column("created_at", Epoch, nullable=False),
    Index("idx_events_task", "task_id", "created_at"),
    Index("idx_events_run", "run_id", "id"),
    sqlite_autoincrement=True,
)

task_runs = Table(
    "task_runs",
    board_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, nullable=True),
    Column("task_id", Text, nullable=False),
    Column("profile", Text),
    Column("step_key", Text),
    # running | done | blocked | crashed | timed_out | failed | released | reclaimed ...
    Column("status", Text, nullable=False),
    Column("claim_lock", Text),
    Column("claim_expires", Epoch),
    Column("worker_pid", Count),
    Column("max_runtime_seconds", Count),
    Column("last_heartbeat_at", Epoch),
    Column("started_at", Epoch, nullable=False),
    Column("ended_at", Epoch),
    # completed | blocked | crashed | timed_out | spawn_failed | gave_up | reclaimed ...
    Column("outcome", Text),
    Column("summary", Text),
    Column("metadata", Text),  # JSON
    Column("error", Text),
    Index("idx_runs_task", "task_id", "started_at"),
    Index("idx_runs_status", "status"),
    sqlite_autoincrement=True,
)

# Hermes creates these two as well; SparkOps creates them so that opening a
# SparkOps board with ``hermes kanban`` needs no schema change at all.
task_attachments = Table(
    "task_attachments",
    board_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, nullable=True),
    Column("task_id", Text, nullable=False),
    Column("filename", Text, nullable=False),
    Column("stored_path", Text, nullable=False),
    Column("content_type", Text),
    Column("size", Integer, nullable=False, server_default=text("0")),
    Column("uploaded_by", Text),
    Column("created_at", Epoch, nullable=False),
    Index("idx_attachments_task", "task_id", "created_at"),
    sqlite_autoincrement=True,
)

kanban_notify_subs = Table(
    "kanban_notify_subs",
    board_metadata,
    Column("task_id", Text, nullable=False),
    Column("platform", Text, nullable=False),
    Column("chat_id", Text, nullable=False),
    Column("thread_id", Text, nullable=False, server_default=text("''")),
    Column("user_id", Text),
    Column("notifier_profile", Text),
    Column("created_at", Epoch, nullable=False),
    Column("last_event_id", Integer, nullable=False, server_default=text("0")),
    PrimaryKeyConstraint("task_id", "platform", "chat_id", "thread_id"),
    Index("idx_notify_task", "task_id"),
)

#: The tables every board must have for SparkOps to read it.
CORE_BOARD_TABLES = ("tasks", "task_runs", "task_events", "task_links", "task_comments")

ops_metadata = MetaData()

ops_schema_version = Table(
    "ops_schema_version",
    ops_metadata,
    Column("component", Text, primary_key=True),  # "board" or "ops"
    Column("version", Integer, nullable=False),
    Column("updated_at", Epoch, nullable=False),
)

ops_job_runs = Table(
    "ops_job_runs",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("trigger", Text, nullable=False),  # schedule | cli | ui
    Column("started_at", Epoch, nullable=False),
    Column("ended_at", Epoch, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("outcome", Text, nullable=False),  # ok | error | skipped
    Column("summary", Text),
    Column("error", Text),
    Column("problems", Integer),  # how many problems an "ok" run found (None: from before v8)
    Index("idx_ops_job_runs_job", "job", "started_at"),
    sqlite_autoincrement=True,
)

ops_hosts = Table(
    "ops_hosts",
    ops_metadata,
    Column("host", Text, primary_key=True),
    Column("pid", Integer, nullable=False),  # the jobs runner
    Column("boot_id", Text),
    Column("version", Text),
    Column("capacity", Integer),
    Column("started_at", Epoch, nullable=False),
    Column("heartbeat_at", Epoch, nullable=False),
    Column("stopped_at", Epoch),
    Column("info", Text),  # JSON: jobs and their intervals, dispatch mode
)

ops_services = Table(
    "ops_services",
    ops_metadata,
    Column("host", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("status", Text, nullable=False),  # up | down | restarting | gave_up | unknown
    Column("since", Epoch, nullable=False),  # when the status last changed
    Column("checked_at", Epoch),
    Column("consecutive_failures", Integer, nullable=False, server_default=text("0")),
    Column("restarts", Text),  # JSON list of restart times (epoch seconds) inside the window
    Column("last_restart_at", Epoch),
    Column("gave_up_at", Epoch),
    Column("detail", Text),  # last check's message
    Column("state", Text),  # JSON: check-specific memory (vLLM token counter, health failures)
    PrimaryKeyConstraint("host", "name"),
)

ops_alerts = Table(
    "ops_alerts",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Epoch, nullable=False),
    Column("host", Text, nullable=False),
    Column("key", Text, nullable=False),  # what the alert is about, e.g. "service:vllm"
    Column("level", Text, nullable=False),  # error | warning | recovery | info
    Column("title", Text, nullable=False),
    Column("message", Text),
    Column("outcome", Text, nullable=False),  # sent | suppressed | failed | logged
    Column("channels", Text),  # JSON: channel -> "sent" | "failed: ..." | "off"
    Index("idx_ops_alerts_key", "key", "created_at"),
    Index("idx_ops_alerts_created", "created_at"),
    sqlite_autoincrement=True,
)

ops_alert_state = Table(
    "ops_alert_state",
    ops_metadata,
    Column("key", Text, primary_key=True),
    Column("last_sent_at", Epoch),  # start of the cooldown
    Column("active", Integer, nullable=False, server_default=text("0")),  # 1 while the problem lasts
)

ops_gpu_samples = Table(
    "ops_gpu_samples",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Epoch, nullable=False),
    Column("host", Text, nullable=False),
    Column("device", Integer, nullable=False),
    Column("name", Text),
    Column("utilization_pct", Float),
    Column("memory_used_mb", Float),
    Column("memory_total_mb", Float),
    Column("temperature_c", Float),
    Column("power_w", Float),
    Column("unified", Integer, nullable=False, server_default=text("0")),
    Column("processes", Integer),
    Index("idx_ops_gpu_samples_time", "created_at"),
    sqlite_autoincrement=True,
)

ops_task_phases = Table(
    "ops_task_phases",
    ops_metadata,
    Column("task_id", Text, primary_key=True),
    Column("phase", Text, nullable=False),
    Column("assigned_by", Text),
    Column("assigned_at", Epoch, nullable=False),
)

ops_phase_boundaries = Table(
    "ops_phase_boundaries",
    ops_metadata,
    Column("phase", Text, primary_key=True),  # recorded once: the key makes a race harmless
    Column("reached_at", Epoch, nullable=False),  # when its last open task finished
    Column("recorded_at", Epoch, nullable=False),
    Column("last_task_id", Text),
    Column("tasks", Integer),
    Column("promoted", Text),  # JSON list of the next phase's tasks promoted, if any
)

ops_events = Table(
    "ops_events",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Epoch, nullable=False),
    Column("kind", Text, nullable=False),  # phase_boundary | phase_assigned | review | export ...
    Column("subject", Text),  # a phase, a task id, a report id
    Column("payload", Text),  # JSON
    Index("idx_ops_events_kind", "kind", "created_at"),
    sqlite_autoincrement=True,
)

ops_reports = Table(
    "ops_reports",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Epoch, nullable=False),
    Column("host", Text, nullable=False),
    Column("path", Text),  # the markdown file under review.reports_dir
    Column("narrative", Text),  # ok | unreachable | timed out | garbage | off
    Column("markdown", Text, nullable=False),
    Column("metrics", Text),  # JSON summary for the UI
    Index("idx_ops_reports_created", "created_at"),
    sqlite_autoincrement=True,
)

ops_audit = Table(
    "ops_audit",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", Epoch, nullable=False),
    Column("actor", Text, nullable=False),  # who pressed it: "ui@127.0.0.1", "cli:alice"
    Column("action", Text, nullable=False),  # e.g. "task.archive", "job.run", "fix.gpu_zombies"
    Column("target", Text),  # a task id, a job, a service
    Column("params", Text),  # JSON
    Column("result", Text, nullable=False),  # ok | refused | error
    Column("message", Text),
    Index("idx_ops_audit_created", "created_at"),
    sqlite_autoincrement=True,
)

#: What a task asks of the host that runs it: labels such as ``gpu=gb10`` that the
#: host's ``host.labels`` must all have (issue 7). Kept beside the board, which
#: stays column for column Hermes'.
ops_task_requirements = Table(
    "ops_task_requirements",
    ops_metadata,
    Column("task_id", Text, nullable=False),
    Column("label", Text, nullable=False),  # key=value
    Column("created_at", Epoch, nullable=False),
    PrimaryKeyConstraint("task_id", "label"),
)

#: What this host knows of its remote hosts (issue 8): the tunnel's state, the last
#: push's manifest, another host's GPUs. One row per (host, kind, remote).
ops_remote = Table(
    "ops_remote",
    ops_metadata,
    Column("host", Text, nullable=False),  # this SparkOps host
    Column("kind", Text, nullable=False),  # tunnel | push | gpu
    Column("remote", Text, nullable=False),  # the [remotes.NAME] it is about
    Column("status", Text, nullable=False),  # up | down | connecting | ok | error | off
    Column("since", Epoch, nullable=False),  # when the status last changed
    Column("checked_at", Epoch, nullable=False),
    Column("detail", Text),  # one line for people
    Column("data", Text),  # JSON: the push manifest, the GPU snapshot, the tunnel's numbers
    PrimaryKeyConstraint("host", "kind", "remote"),
)


#: The host's meter samples (issue 17): vLLM's and the GPUs' counters, taken at each
#: run's start, heartbeats and end (``sparkops.meters.sample.Sample`` as JSON).
ops_meter_samples = Table(
    "ops_meter_samples",
    ops_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", Text, nullable=False),
    Column("at", Float, nullable=False),  # epoch seconds
    Column("data", Text, nullable=False),  # JSON
    Index("idx_ops_meter_samples_host_at", "host", "at"),
    sqlite_autoincrement=True,
)

#: Each run's usage, brought up to date at each of its samples (``sparkops.meters.usage``):
#: kept beside the board, whose tables stay Hermes'.
ops_run_usage = Table(
    "ops_run_usage",
    ops_metadata,
    Column("run_id", Integer, primary_key=True, autoincrement=False),
    Column("task_id", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("first_at", Float, nullable=False),  # its first sample
    Column("last_at", Float, nullable=False),  # its latest sample
    Column("ended", Integer, nullable=False, server_default=text("0")),
    Column("data", Text),  # JSON: the usage
    Column("reported", Text),  # JSON: what the agent reported (sparkops.meters.reported)
    Index("idx_ops_run_usage_task", "task_id"),
    Index("idx_ops_run_usage_host", "host", "first_at"),
)


# -- migrations ------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _board_v1(conn: Connection) -> None:
    """Hermes Kanban schema of hermes-agent 0.19: create what is missing, add
    missing columns to tables an older Hermes made (data kept)."""
    _create_missing(conn, board_metadata)


#: Indexes of a PostgreSQL board that Hermes' schema does not have (a SQLite board
#: keeps Hermes' DDL exactly; Hermes never opens a PostgreSQL one). The claim reads
#: the best few ready tasks in order and counts a host's open runs: without them
#: PostgreSQL sorted every ready task and scanned every run at each claim.
POSTGRES_BOARD_INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_tasks_ready_order ON tasks (priority DESC, created_at, id) "
    "WHERE status = 'ready'",
    "CREATE INDEX IF NOT EXISTS idx_runs_open ON task_runs (id) WHERE ended_at IS NULL",
)


def _board_v2(conn: Connection) -> None:
    """PostgreSQL: the claim's indexes (:data:`POSTGRES_BOARD_INDEXES`). SQLite: nothing."""
    if conn.dialect.name == "postgresql":
        for ddl in POSTGRES_BOARD_INDEXES:
            conn.execute(text(ddl))


def _ops_v1(conn: Connection) -> None:
    ops_schema_version.create(conn, checkfirst=True)


def _ops_v2(conn: Connection) -> None:
    """Create the ops tables that are missing (v2: job runs and hosts; v3: the
    watchdog's services, alerts, cooldowns and GPU samples)."""
    _create_missing(conn, ops_metadata)


BOARD_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "Hermes Kanban tables (hermes-agent 0.19)", _board_v1),
    Migration(2, "PostgreSQL: the claim's indexes", _board_v2),
)
OPS_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ops_schema_version", _ops_v1),
    Migration(2, "ops_job_runs, ops_hosts", _ops_v2),
    Migration(3, "ops_services, ops_alerts, ops_alert_state, ops_gpu_samples", _ops_v2),
    Migration(4, "ops_task_phases, ops_phase_boundaries, ops_events, ops_reports", _ops_v2),
    Migration(5, "ops_audit", _ops_v2),
    Migration(6, "ops_task_requirements", _ops_v2),
    Migration(7, "ops_remote", _ops_v2),
    Migration(8, "ops_job_runs.problems", _ops_v2),
    Migration(9, "ops_meter_samples, ops_run_usage", _ops_v2),
    Migration(10, "ops_run_usage.reported", _ops_v2),
)

BOARD_SCHEMA_VERSION = BOARD_MIGRATIONS[-1].version
OPS_SCHEMA_VERSION = OPS_MIGRATIONS[-1].version


def _create_missing(conn: Connection, metadata: MetaData) -> None:
    """Create missing tables and indexes; add missing columns (never drop any)."""
    inspector = inspect(conn)
    existing = set(inspector.get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in existing:
            table.create(conn)
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                ddl = CreateColumn(column).compile(dialect=conn.dialect)
                log.info("migration: adding column %s.%s", table.name, column.name)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
        have_indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in have_indexes:
                index.create(conn)


# -- versions ----------------------------------------------------------------------


def read_version(db: Database, conn: Connection, component: str) -> int:
    """The recorded schema version (0 when none is recorded)."""
    if component == "board" and db.is_sqlite:
        return db.sqlite_user_version(conn)
    if not inspect(conn).has_table("ops_schema_version"):
        return 0
    row = conn.execute(
        select(ops_schema_version.c.version).where(ops_schema_version.c.component == component)
    ).first()
    return int(row[0]) if row else 0


def _write_version(db: Database, conn: Connection, component: str, version: int, now: int) -> None:
    if component == "board" and db.is_sqlite:
        db.set_sqlite_user_version(conn, version)
        return
    ops_schema_version.create(conn, checkfirst=True)
    updated = conn.execute(
        ops_schema_version.update()
        .where(ops_schema_version.c.component == component)
        .values(version=version, updated_at=now)
    )
    if updated.rowcount == 0:
        conn.execute(
            ops_schema_version.insert().values(component=component, version=version, updated_at=now)
        )


def _plan(component: str) -> tuple[tuple[Migration, ...], int]:
    if component == "board":
        return BOARD_MIGRATIONS, BOARD_SCHEMA_VERSION
    return OPS_MIGRATIONS, OPS_SCHEMA_VERSION


def inspect_database(db: Database, component: str) -> tuple[int, set[str]]:
    """Recorded schema version (0 if none) and table names, changing nothing.

    SQLite files are read over a read-only connection (see :meth:`Database.probe`).
    """
    if db.is_sqlite:
        if not db.exists():
            return 0, set()
        probe = db.probe()
        version = probe.user_version if component == "board" else probe.versions.get(component, 0)
        return version, probe.tables
    try:
        with db.read() as conn:
            return read_version(db, conn, component), set(inspect(conn).get_table_names())
    except DBAPIError as exc:
        raise db.error("cannot read", exc) from exc


def refuse_newer(db: Database, component: str, version: int) -> None:
    _, latest = _plan(component)
    if version > latest:
        raise StorageError(
            f"the {db.role} database {db.display_url} has schema version {version}, newer "
            f"than this SparkOps knows ({latest}); upgrade SparkOps. Nothing was changed"
        )


def required_tables(component: str) -> tuple[str, ...]:
    """The tables that show a database was initialized (migrations add the rest)."""
    return CORE_BOARD_TABLES if component == "board" else ("ops_schema_version",)


def migrate(db: Database, component: str, now: int) -> list[Migration]:
    """Bring ``db`` to the latest schema in one transaction; return what ran."""
    migrations, latest = _plan(component)
    applied: list[Migration] = []
    try:
        with db.write() as conn:
            version = read_version(db, conn, component)
            refuse_newer(db, component, version)
            applied = [m for m in migrations if m.version > version]
            # Versions 2-9 of the ops schema share one step ("create what is missing"):
            # it runs once for all of them.
            for step in dict.fromkeys(m.apply for m in applied):
                covered = [m for m in applied if m.apply is step]
                log.info("migrating %s database to v%d: %s", component, covered[-1].version,
                         "; ".join(m.description for m in covered))
                step(conn)
            if applied or version != latest:
                _write_version(db, conn, component, latest, now)
    except DBAPIError as exc:
        raise db.error("cannot migrate", exc) from exc
    return applied
