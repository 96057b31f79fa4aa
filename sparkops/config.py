"""Settings: declared once here, loaded from ``sparkops.toml`` and ``SPARKOPS_*``.

Every setting SparkOps reads is one :class:`Setting` in :data:`SETTINGS`, with its
type, default and help text. ``docs/configuration.md`` is checked against this
list by ``tests/test_docs.py``, so the two cannot drift apart.

Where values come from, last one wins:

1. the defaults below;
2. the TOML file: ``--config PATH``, else ``$SPARKOPS_CONFIG``, else
   ``./sparkops.toml`` (a missing default file means "all defaults"; a missing
   file that was named explicitly is an error);
3. environment variables ``SPARKOPS_<SECTION>_<KEY>``, for example
   ``SPARKOPS_STORAGE_BOARD_URL``.

Relative paths (and relative ``sqlite:///`` URLs) are resolved against the
directory of the config file, or the current directory when there is none, so a
worker running in its workspace sees the same files as the runner that started it.

Secrets (the UI password, the Telegram token) are never settings: they come from
the environment or ``.streamlit/secrets.toml`` (see :class:`Secrets`).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sparkops.core.errors import ConfigError

ENV_PREFIX = "SPARKOPS_"
CONFIG_ENV = "SPARKOPS_CONFIG"
DEFAULT_CONFIG_NAME = "sparkops.toml"
#: Set for the children of ``up --demo``: the pages show that they show a demo.
DEMO_ENV = "SPARKOPS_DEMO"

#: Environment names under ``SPARKOPS_`` that are not settings: the config path,
#: the secrets, and the variables the worker shim hands to agents.
RESERVED_ENV = frozenset(
    {
        "SPARKOPS_CONFIG",
        "SPARKOPS_UI_PASSWORD",
        "SPARKOPS_TELEGRAM_TOKEN",
        "SPARKOPS_TELEGRAM_CHAT_ID",
        "SPARKOPS_VLLM_API_KEY",
        "SPARKOPS_SERVICES",
        "SPARKOPS_REMOTES",
        "SPARKOPS_TASK_ID",
        "SPARKOPS_RUN_ID",
        "SPARKOPS_WORKSPACE",
        "SPARKOPS_PROMPT_FILE",
        "SPARKOPS_LOG_FILE",
    }
)

#: Keys that look like secrets and must never sit in a (committed) config file.
SECRET_KEYS = frozenset({"ui_password", "password", "telegram_token", "token", "api_key",
                         "telegram_chat_id", "chat_id", "vllm_api_key"})


@dataclass(frozen=True)
class Setting:
    """One setting: ``key`` is ``section.name``; ``kind`` drives parsing."""

    key: str
    kind: str  # "str" | "int" | "float" | "bool" | "path" | "url" | "list" | "paths" | "weburl"
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    optional: bool = False  # an empty string is allowed (and means "the default behaviour")

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    def allowed(self) -> str:
        """Human description of what is allowed, used in error messages and docs."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        base = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "path": "a file system path",
            "list": "a list of strings (in the environment: a JSON array)",
            "paths": "a list of paths (in the environment: a JSON array)",
            "weburl": "an http:// or https:// URL",
            "url": "a database URL (sqlite:///PATH or postgresql://...)",
        }[self.kind]
        if self.minimum is not None and self.maximum is not None:
            return f"{base} from {_num(self.minimum)} to {_num(self.maximum)}"
        if self.minimum is not None:
            return f"{base} >= {_num(self.minimum)}"
        return base


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "storage.board_url", "url", "sqlite:///data/kanban.db",
        "The kanban board (Hermes Kanban format). A SQLite file or a PostgreSQL URL.",
    ),
    Setting(
        "storage.ops_url", "url", "sqlite:///data/sparkops.db",
        "SparkOps' own operational data (tables prefixed ops_). Kept apart from the "
        "board so a Hermes kanban.db never gets foreign tables.",
    ),
    Setting(
        "storage.busy_timeout_ms", "int", 30000,
        "How long a SQLite writer waits for the write lock before giving up.",
        minimum=0,
    ),
    Setting(
        "storage.retry_seconds", "float", 60.0,
        "How long a worker's report (`task complete|block --run`) and a shim's bookkeeping "
        "keep retrying, with backoff, while a PostgreSQL database is unreachable (a restart, a "
        "failover) before giving up. 0: no retry.",
        minimum=0,
    ),
    Setting(
        "host.name", "str", "",
        "This host's name in claims and runs (claim_lock is NAME:PID). Empty: the "
        "machine's hostname.",
        optional=True,
    ),
    Setting(
        "host.labels", "list", [],
        "This host's labels, each key=value (e.g. [\"gpu=gb10\", \"zone=lab\"]). A task that "
        "requires labels (`sparkops task require`) runs only on a host that has them all.",
    ),
    Setting(
        "dispatch.mode", "str", "native",
        "native: claim ready tasks and start the worker shim with dispatch.agent_argv; "
        "hermes: run dispatch.hermes_argv (hermes kanban dispatch) for boards served by "
        "Hermes workers; off: dispatch nothing.",
        choices=("native", "hermes", "off"),
    ),
    Setting(
        "dispatch.max_in_progress", "int", 1,
        "How many runs may be live on this host at once (1 on a GB10).",
        minimum=1,
    ),
    Setting(
        "dispatch.interval_seconds", "float", 1.0,
        "How often the runner looks for ready work and free slots; it also looks "
        "right after a worker ends.",
        minimum=0.1,
    ),
    Setting(
        "dispatch.wake_on_worker_exit", "bool", True,
        "Dispatch right after a worker shim started by the runner exits, not only on "
        "the interval. Turn off only to measure fixed ticks (bench/bench_engine.py).",
    ),
    Setting(
        "dispatch.agent_argv", "list", [],
        "The agent command as an argv list, never a shell string. Placeholders: "
        "{task_id} {run_id} {workspace} {prompt_file} {log_file} {python}. Empty: no "
        "agent is configured and ready tasks wait (sparkops up --demo uses the demo agent).",
    ),
    Setting(
        "dispatch.workspace_root", "path", "data/workspaces",
        "Each task runs in WORKSPACE_ROOT/<task_id>, created at dispatch.",
    ),
    Setting(
        "dispatch.run_log_root", "path", "data/logs/runs",
        "Each run's output goes to RUN_LOG_ROOT/<task_id>/run-<run_id>.log.",
    ),
    Setting(
        "dispatch.heartbeat_seconds", "float", 15.0,
        "How often the worker shim records that its run is alive.",
        minimum=0.5,
    ),
    Setting(
        "dispatch.agent_env_pass", "list", [],
        "Environment variables the agent gets from the runner's environment beyond the "
        "system's basics (PATH, HOME, LANG, ...), e.g. [\"ANTHROPIC_API_KEY\"] for an agent "
        "that needs its own API key. SparkOps' secrets never reach an agent.",
    ),
    Setting(
        "dispatch.claim_ttl_seconds", "int", 900,
        "A claim's lease (claim_expires), renewed by every heartbeat. Hermes' dispatcher "
        "releases a claim of another host once it expires; Hermes' default is 900.",
        minimum=2,
    ),
    Setting(
        "dispatch.report_exit_grace_seconds", "float", 60.0,
        "After its own report (`sparkops task complete|block --run`), how long an agent may "
        "go on before its shim stops it. A run closed by anyone else (an operator, Hermes, "
        "another host) has its agent stopped at once.",
        minimum=0,
    ),
    Setting(
        "dispatch.failure_limit", "int", 2,
        "Consecutive failures (crash, timeout, spawn failure, lost workspace) after which "
        "a task is moved to blocked with the reason. A task's own max_retries wins. "
        "Hermes' default is 2.",
        minimum=1,
    ),
    Setting(
        "dispatch.protocol_violation_limit", "int", 3,
        "Consecutive runs that exit 0 without reporting (an agent that could not reach "
        "the model) after which the task is blocked. Counted apart from failure_limit.",
        minimum=1,
    ),
    Setting(
        "dispatch.retry_backoff_seconds", "float", 30.0,
        "Wait before retrying a task that failed twice in a row; doubles with each further "
        "failure. The first retry is immediate, so a crash does not leave the slot idle.",
        minimum=0,
    ),
    Setting(
        "dispatch.retry_backoff_max_seconds", "float", 1800.0,
        "The longest retry backoff.",
        minimum=0,
    ),
    Setting(
        "dispatch.rate_limit_cooldown_seconds", "float", 300.0,
        "Wait before retrying a task whose agent exited 75 (rate limited); not a failure.",
        minimum=0,
    ),
    Setting(
        "dispatch.hermes_argv", "list", ["hermes", "kanban", "dispatch", "--max", "{max}", "--json"],
        "The command of dispatch.mode = hermes. {max} is Hermes' --max: the tasks that may run "
        "on the whole board, i.e. those running now (less other hosts' expired claims) plus "
        "this host's free slots.",
    ),
    Setting(
        "dispatch.hermes_interval_seconds", "float", 120.0,
        "In dispatch.mode = hermes, hermes runs when the board changed, and at least this "
        "often (to notice workers that died without a word; Hermes' gateway looks every 60 s).",
        minimum=1,
    ),
    Setting(
        "reclaim.interval_seconds", "float", 30.0,
        "How often the reclaimer sweeps every open run (dead workers on this host are "
        "also caught by the dispatcher within a second).",
        minimum=0.5,
    ),
    Setting(
        "reclaim.max_runtime_seconds", "int", 7200,
        "A run older than this is terminated and closed as timed_out. A task's own "
        "max_runtime_seconds wins.",
        minimum=1,
    ),
    Setting(
        "reclaim.heartbeat_timeout_seconds", "int", 300,
        "A run of another host (or one with no process identity) whose last heartbeat "
        "is older than this is considered dead.",
        minimum=1,
    ),
    Setting(
        "reclaim.spawn_grace_seconds", "int", 60,
        "A claimed run whose worker never recorded its identity is dead after this long.",
        minimum=1,
    ),
    Setting(
        "reclaim.term_grace_seconds", "float", 10.0,
        "Between SIGTERM and SIGKILL when a run's processes are terminated.",
        minimum=0,
    ),
    Setting(
        "watchdog.interval_seconds", "float", 300.0,
        "How often the watchdog checks the services, the GPU, the disk and stale runs "
        "(the seed's watchdog ran every 5 minutes).",
        minimum=1,
    ),
    Setting(
        "gpu.sample_interval_seconds", "float", 30.0,
        "How often the gpu-sample job stores a GPU sample for the GPU page's history.",
        minimum=1,
    ),
    Setting(
        "gpu.sample_retention_days", "float", 7.0,
        "GPU samples older than this are deleted, and so are the runs' meter samples that no "
        "open run still needs (each run's usage is kept with the run).",
        minimum=0.01,
    ),
    Setting(
        "gpu.zombie_threshold_gb", "float", 100.0,
        "A GPU process holding more memory than this that is not the live, healthy "
        "model server is a zombie.",
        minimum=0.001,
    ),
    Setting(
        "gpu.serving_patterns", "list", ["(?i)vllm.entrypoints", "(?i)vllm serve", "(?i)vllm::"],
        "Regular expressions for the model server's command line (its process tree is "
        "the serving tree).",
    ),
    Setting(
        "gpu.kill_patterns", "list", ["(?i)vllm"],
        "Only GPU processes whose command line matches one of these regular expressions "
        "are ever signalled. The UI, the runner, agents and anything else are never touched.",
    ),
    Setting(
        "gpu.health_failures_before_kill", "int", 3,
        "Serving processes holding GPU memory are zombies once the model server's health "
        "check has failed this many times in a row.",
        minimum=1,
    ),
    Setting(
        "gpu.kill_grace_seconds", "float", 10.0,
        "Between SIGTERM and SIGKILL for a GPU zombie.",
        minimum=0,
    ),
    Setting(
        "gpu.memory_release_timeout_seconds", "float", 60.0,
        "How long to wait for a killed zombie's GPU memory to be released before "
        "restarting the model server anyway.",
        minimum=0,
    ),
    Setting(
        "usage.meter", "bool", True,
        "Meter each run: its shim samples the host's meters (the configured vLLM's /metrics "
        "and the GPUs' energy counter and utilization through NVML) at the run's start, at "
        "each heartbeat and at its end, and keeps the run's share of their increase in the "
        "ops database. A source that cannot be read is said as not measured, never 0.",
    ),
    Setting(
        "usage.gpu_remote", "str", "",
        "The remote host ([remotes.NAME]) whose GPUs serve this host's agents, when the model "
        "server runs on another box: each sample reads their energy counters and utilization "
        "with nvidia-smi over SSH instead of this host's NVML. Empty: this host's GPUs.",
        optional=True,
    ),
    Setting(
        "usage.energy_price_per_kwh", "float", 0.0,
        "What a kWh of electricity costs, in usage.currency, to price the GPUs' energy in "
        "the Sprint review. 0: no price (energy is shown in Wh only).",
        minimum=0,
    ),
    Setting(
        "usage.api_price_per_million_prompt_tokens", "float", 0.0,
        "A hosted API's price per million prompt (input) tokens, in usage.currency: the "
        "Sprint review says what the sprint's tokens would have cost there. 0: no price.",
        minimum=0,
    ),
    Setting(
        "usage.api_price_per_million_generation_tokens", "float", 0.0,
        "A hosted API's price per million generated (output) tokens, in usage.currency. "
        "0: no price.",
        minimum=0,
    ),
    Setting(
        "usage.currency", "str", "USD",
        "The currency the usage prices are in, as shown beside each cost.",
    ),
    Setting(
        "disk.paths", "paths", ["data"],
        "Paths whose file systems are watched.",
    ),
    Setting(
        "disk.threshold_percent", "float", 85.0,
        "Above this usage the watchdog cleans up old logs and finished workspaces.",
        minimum=1, maximum=100,
    ),
    Setting(
        "disk.log_roots", "paths", ["data/logs"],
        "Directories whose old log files may be deleted. Nothing outside them is.",
    ),
    Setting(
        "disk.log_retention_days", "float", 7.0,
        "Log files older than this may be deleted when the disk is above the threshold.",
        minimum=0,
    ),
    Setting(
        "disk.workspace_retention_days", "float", 3.0,
        "Workspaces (under dispatch.workspace_root) of tasks done or archived longer ago "
        "than this may be deleted when the disk is above the threshold; never a running "
        "task's.",
        minimum=0,
    ),
    Setting(
        "alerts.cooldown_minutes", "float", 30.0,
        "A repeat alert about the same thing inside this many minutes is suppressed (and "
        "recorded as such); the cooldown survives restarts.",
        minimum=0,
    ),
    Setting(
        "alerts.webhook_url", "weburl", "",
        "A URL that gets every alert as a JSON POST. Empty: no webhook.",
        optional=True,
    ),
    Setting(
        "alerts.telegram_api_url", "weburl", "https://api.telegram.org",
        "The Telegram Bot API. Used only when SPARKOPS_TELEGRAM_TOKEN and "
        "SPARKOPS_TELEGRAM_CHAT_ID are set.",
    ),
    Setting(
        "alerts.timeout_seconds", "float", 5.0,
        "The longest an alert channel may take; a channel that fails or hangs never "
        "stops the watchdog.",
        minimum=0.1, maximum=120,
    ),
    Setting(
        "review.interval_seconds", "float", 600.0,
        "How often the review job writes a sprint report (the seed's CTO review ran every "
        "10 minutes).",
        minimum=1,
    ),
    Setting(
        "review.window_hours", "float", 24.0,
        "The metrics window: throughput, lead and cycle times, failure rates and WIP cover "
        "this many hours back.",
        minimum=0.01,
    ),
    Setting(
        "review.phase_patterns", "list", [r"\[P(\d+)\]", r"(?i)\bphase\s*(\d+)\s*:"],
        "Regular expressions that read a phase from a task title; the first group is the "
        "phase. Tried in order, after an explicit assignment and before the dependency depth.",
    ),
    Setting(
        "review.promote_next_phase", "bool", False,
        "When a phase is finished, promote the next phase's todo tasks to ready.",
    ),
    Setting(
        "review.stuck_ready_minutes", "float", 30.0,
        "Stuck: ready work exists but no run started for this many minutes.",
        minimum=1,
    ),
    Setting(
        "review.max_reruns", "int", 3,
        "Stuck: a task run more than this many times.",
        minimum=1,
    ),
    Setting(
        "review.no_completion_hours", "float", 4.0,
        "Stuck: open work but no task completed for this many hours.",
        minimum=0.1,
    ),
    Setting(
        "review.stuck_blocked_minutes", "float", 60.0,
        "Stuck: a task blocked (waiting for a person: an answer, a decision) for this many minutes.",
        minimum=1,
    ),
    Setting(
        "review.reports_dir", "path", "reports",
        "Where the review job writes its markdown reports (also kept in ops_reports).",
    ),
    Setting(
        "review.model_url", "weburl", "http://127.0.0.1:8000/v1/chat/completions",
        "An OpenAI-compatible chat completions endpoint for the report's narrative paragraph "
        "(the local vLLM). Empty: no narrative.",
        optional=True,
    ),
    Setting(
        "review.model", "str", "",
        "The model name for the narrative. Empty: the first model the server lists at /v1/models.",
        optional=True,
    ),
    Setting(
        "review.model_timeout_seconds", "float", 30.0,
        "The longest the narrative may take; past it the report says so and keeps the "
        "deterministic summary.",
        minimum=0.1, maximum=600,
    ),
    Setting(
        "export.interval_seconds", "float", 300.0,
        "How often the export job writes the board as CSV and JSON (the seed exported every "
        "5 minutes).",
        minimum=1,
    ),
    Setting(
        "export.dir", "path", "exports",
        "Where the export job writes its files (each replaced atomically).",
    ),
    Setting(
        "runner.promote_interval_seconds", "float", 5.0,
        "How often the jobs runner promotes todo tasks whose parents are done "
        "(a safety net for boards also worked by Hermes).",
        minimum=0.1,
    ),
    Setting(
        "runner.log_file", "path", "data/logs/jobs_runner.log",
        "The jobs runner's log file (rotated).",
    ),
    Setting(
        "runner.log_max_bytes", "int", 5_000_000,
        "Rotate the runner log when it reaches this size.",
        minimum=10_000,
    ),
    Setting(
        "runner.log_backups", "int", 5,
        "How many rotated runner logs to keep.",
        minimum=0,
    ),
    Setting(
        "remote.connect_timeout_seconds", "float", 10.0,
        "The longest an SSH connection to a remote host (TCP, banner, authentication) may take.",
        minimum=0.1, maximum=300,
    ),
    Setting(
        "remote.io_timeout_seconds", "float", 30.0,
        "The longest one remote operation may wait for the other side (an SFTP write, a "
        "command's output); past it the operation fails and the job says so.",
        minimum=0.1, maximum=3600,
    ),
    Setting(
        "remote.keepalive_seconds", "float", 15.0,
        "SSH keepalives on every remote connection, and the TCP keepalive idle time of its "
        "socket, so a dead peer is noticed.",
        minimum=1, maximum=3600,
    ),
    Setting(
        "remote.push_host", "str", "",
        "The remote host (a [remotes.NAME] table) that the push job copies the export to. "
        "Empty: the push job is off.",
        optional=True,
    ),
    Setting(
        "remote.push_dir", "str", "sparkops-export",
        "The directory on the push host that receives the export's files (relative to the "
        "login directory unless absolute); created if missing.",
    ),
    Setting(
        "remote.push_interval_seconds", "float", 300.0,
        "How often the push job runs (the seed pushed every 5 minutes).",
        minimum=1,
    ),
    Setting(
        "remote.tunnel_host", "str", "",
        "The remote host (a [remotes.NAME] table) that gets the reverse tunnel to this host's "
        "app. Empty: the tunnel job is off.",
        optional=True,
    ),
    Setting(
        "remote.tunnel_mode", "str", "paramiko",
        "paramiko: SparkOps holds the SSH connection and its port forward itself; openssh: it "
        "supervises an `ssh -N -R` process (with ExitOnForwardFailure) instead.",
        choices=("paramiko", "openssh"),
    ),
    Setting(
        "remote.tunnel_remote_address", "str", "127.0.0.1",
        "The address the tunnel listens on at the remote host (loopback: only that host's "
        "proxy reaches it).",
    ),
    Setting(
        "remote.tunnel_remote_port", "int", 19300,
        "The port the tunnel listens on at the remote host.",
        minimum=1, maximum=65535,
    ),
    Setting(
        "remote.tunnel_local_port", "int", 0,
        "The local port the tunnel leads to (on 127.0.0.1). 0: ui.port, the app.",
        minimum=0, maximum=65535,
    ),
    Setting(
        "remote.tunnel_probe_path", "str", "/_stcore/health",
        "The HTTP path requested through the tunnel, end to end, to tell that it works.",
    ),
    Setting(
        "remote.tunnel_interval_seconds", "float", 30.0,
        "How often the tunnel job probes the tunnel (and reconnects a broken one, with backoff).",
        minimum=1,
    ),
    Setting(
        "remote.tunnel_backoff_max_seconds", "float", 300.0,
        "The longest wait between reconnection attempts (the wait starts at 1 s and doubles).",
        minimum=1,
    ),
    Setting(
        "remote.ssh_binary", "str", "ssh",
        "The OpenSSH client for remote.tunnel_mode = openssh.",
    ),
    Setting(
        "remote.gpu_hosts", "list", [],
        "Remote hosts (names of [remotes.NAME] tables) whose GPUs the remote-gpu job reads over "
        "SSH with nvidia-smi, for the GPU page.",
    ),
    Setting(
        "remote.gpu_interval_seconds", "float", 60.0,
        "How often the remote-gpu job reads the remote hosts' GPUs.",
        minimum=1,
    ),
    Setting(
        "ui.address", "str", "127.0.0.1",
        "Address the Streamlit app binds to. Anything but loopback needs a UI password "
        "(SPARKOPS_UI_PASSWORD or .streamlit/secrets.toml) or ui.allow_unauthenticated_remote.",
    ),
    Setting(
        "ui.port", "int", 8501,
        "Port of the Streamlit app.",
        minimum=1, maximum=65535,
    ),
    Setting(
        "ui.allow_unauthenticated_remote", "bool", False,
        "Allow binding the app to a non-loopback address without a password. Leave off.",
    ),
)

SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


@dataclass(frozen=True)
class Settings:
    """Validated values for every setting, plus where they came from."""

    values: Mapping[str, Any]
    source: Path | None = None  # the config file that was read, if any
    base_dir: Path = field(default_factory=Path.cwd)
    services: tuple[ServiceSpec, ...] = ()
    remotes: tuple[RemoteSpec, ...] = ()

    def remote(self, name: str) -> RemoteSpec:
        """The remote host ``name`` (a ``[remotes.NAME]`` table); ConfigError if none."""
        for spec in self.remotes:
            if spec.name == name:
                return spec
        known = ", ".join(r.name for r in self.remotes) or "none is configured"
        raise ConfigError(f"no remote host {name!r} in the settings (remotes: {known}); add a "
                          f"[remotes.{name}] table with its address (see docs/configuration.md)")

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __getattr__(self, section: str) -> SimpleNamespace:
        if section not in SECTIONS:
            raise AttributeError(section)
        prefix = section + "."
        return SimpleNamespace(
            **{k[len(prefix):]: v for k, v in self.values.items() if k.startswith(prefix)}
        )

    def describe_source(self) -> str:
        return str(self.source) if self.source else "defaults (no sparkops.toml)"


def load_settings(
    config_path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Read, merge and validate settings. Raises :class:`ConfigError` on any problem."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    explicit = config_path is not None or bool(env.get(CONFIG_ENV))
    raw_path = config_path if config_path is not None else env.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME
    path = Path(raw_path).expanduser()
    if not path.is_absolute():
        path = cwd / path

    file_values: dict[str, Any] = {}
    source: Path | None = None
    if path.exists():
        file_values = _read_toml(path)
        source = path
    elif explicit:
        raise ConfigError(
            f"config file {path} does not exist (named by "
            f"{'--config' if config_path is not None else CONFIG_ENV}); "
            "create it or drop the option to use the defaults"
        )
    base_dir = path.parent
    where = f"in {path}"

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        values[setting.key] = _resolve(setting, setting.default, base_dir, "default")
    file_services = file_values.pop("services", {})
    file_remotes = file_values.pop("remotes", {})
    for key, value in file_values.items():
        values[key] = _resolve(SETTINGS_BY_KEY[key], value, base_dir, where)
    for key, value in _env_values(env).items():
        setting = SETTINGS_BY_KEY[key]
        values[key] = _resolve(setting, _parse_env(setting, value), base_dir,
                               f"in environment variable {setting.env_name}")
    for key in ("gpu.serving_patterns", "gpu.kill_patterns", "review.phase_patterns"):
        for pattern in values[key]:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({exc})") from None
            if key.startswith("gpu.") and compiled.search("") is not None:
                raise ConfigError(f"{key}: {pattern!r} matches an empty command line, so it would match "
                                  "every process; name the program, e.g. \"(?i)vllm\"")
    for key in ("disk.paths", "disk.log_roots"):
        if not values[key]:
            raise ConfigError(f"{key} is empty; it needs at least one directory (default "
                              f"{SETTINGS_BY_KEY[key].default!r})")
    services = load_services(values, file_services, where, env.get("SPARKOPS_SERVICES"), base_dir)
    remotes = load_remotes(values, file_remotes, where, env.get("SPARKOPS_REMOTES"), base_dir)
    gpu_remote = values["usage.gpu_remote"]
    if gpu_remote and gpu_remote not in {r.name for r in remotes}:
        known = ", ".join(r.name for r in remotes) or "none is configured"
        raise ConfigError(f"usage.gpu_remote names {gpu_remote!r}, which is no [remotes.NAME] table "
                          f"(remotes: {known}); add [remotes.{gpu_remote}] or leave usage.gpu_remote empty")
    return Settings(values=values, source=source, base_dir=base_dir, services=services, remotes=remotes)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc

    flat: dict[str, Any] = {}
    for section, table in data.items():
        if section in ("services", "remotes"):
            flat[section] = table
            continue
        if section.lower() in SECRET_KEYS:
            raise _secret_error(section, path)
        if isinstance(table, dict) and any(k.lower() in SECRET_KEYS for k in table):
            secret = next(k for k in table if k.lower() in SECRET_KEYS)
            raise _secret_error(f"{section}.{secret}", path)
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section [{section}] in {path}; "
                f"known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{section} in {path} must be a table ([{section}]), got a value")
        for name, value in table.items():
            key = f"{section}.{name}"
            if name.lower() in SECRET_KEYS:
                raise _secret_error(key, path)
            if key not in SETTINGS_BY_KEY:
                known = ", ".join(s.name for s in SETTINGS if s.section == section)
                raise ConfigError(
                    f"unknown setting {key} in {path}; settings in [{section}]: {known}"
                    " (see docs/configuration.md)"
                )
            flat[key] = value
    return flat


def _secret_error(key: str, path: Path) -> ConfigError:
    return ConfigError(
        f"{key} in {path} looks like a secret; secrets never go in sparkops.toml. "
        "Set SPARKOPS_UI_PASSWORD / SPARKOPS_TELEGRAM_TOKEN in the environment or "
        "put them in .streamlit/secrets.toml"
    )


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    by_env = {s.env_name: s.key for s in SETTINGS}
    found: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        if name in by_env:
            found[by_env[name]] = value
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is not None:
            known = ", ".join(s.env_name for s in SETTINGS if s.section == section)
            raise ConfigError(
                f"unknown environment variable {name}; settings of [{section}] are "
                f"{known} (see docs/configuration.md)"
            )
    return found


def _parse_env(setting: Setting, text: str) -> Any:
    """Environment values are strings; turn them into the setting's type first."""
    kind = setting.kind
    try:
        if kind == "int":
            return int(text.strip())
        if kind == "float":
            return float(text.strip())
    except ValueError:
        raise ConfigError(
            f"{setting.key} must be {setting.allowed()}, got {text!r} "
            f"(in environment variable {setting.env_name})"
        ) from None
    if kind in ("list", "paths"):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list):
            raise ConfigError(
                f"{setting.key} must be a JSON array of strings, got {text!r} "
                f"(in environment variable {setting.env_name}), e.g. "
                '\'["python", "-m", "sparkops", "demo-agent"]\''
            )
        return value
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(
            f"{setting.key} must be true or false, got {text!r} "
            f"(in environment variable {setting.env_name})"
        )
    return text


# -- what children get from the environment -------------------------------------------

#: The system's basics a child (a worker shim and its agent, a restart command, ssh)
#: gets from the runner's environment. An allowlist: anything else stays in.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
    "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONDONTWRITEBYTECODE",
    "VIRTUAL_ENV", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "SSH_AUTH_SOCK",
    "SPARKOPS_DEMO_GPU",  # `up --demo`'s simulated GB10 (sparkops.meters.nvml_fake), which the shims meter
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "HERMES_HOME", "HERMES_BIN", "SPARKOPS_CONFIG", "SPARKOPS_SERVICES", "SPARKOPS_REMOTES",
    "SPARKOPS_LOG_LEVEL",
})
CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_")
#: SparkOps' secrets (see :class:`Secrets`): never passed to a child.
SECRET_ENV = frozenset({"SPARKOPS_UI_PASSWORD", "SPARKOPS_TELEGRAM_TOKEN", "SPARKOPS_TELEGRAM_CHAT_ID",
                        "SPARKOPS_VLLM_API_KEY"})


def child_environment(base: Mapping[str, str] | None = None, *, passed: Iterable[str] = ()) -> dict[str, str]:
    """The environment for a child process: :data:`CHILD_ENV_NAMES`, the
    :data:`CHILD_ENV_PREFIXES`, SparkOps' own settings variables (so a shim reads
    the runner's settings; the ``alerts.*`` ones excepted, a webhook URL may hold a
    token) and the names in ``passed`` (``dispatch.agent_env_pass``: an agent's own
    API keys). Never :data:`SECRET_ENV`."""
    env = os.environ if base is None else base
    settings_names = {s.env_name for s in SETTINGS if s.section != "alerts"}
    allowed = CHILD_ENV_NAMES | settings_names | set(passed)
    return {k: v for k, v in env.items()
            if k not in SECRET_ENV and (k in allowed or k.startswith(CHILD_ENV_PREFIXES))}


def state_dir(settings: Settings) -> Path:
    """Where SparkOps keeps this host's state files (job locks, the live workers):
    next to a SQLite ops database, else ``data/`` under the settings' base directory."""
    url = settings["storage.ops_url"]
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):].split("?", 1)[0]).parent
    return settings.base_dir / "data"


def _resolve(setting: Setting, value: Any, base_dir: Path, where: str) -> Any:
    """Type-check ``value`` against ``setting`` and normalise paths and URLs."""

    def bad() -> ConfigError:
        shown = mask_web_url(value) if kind == "weburl" and isinstance(value, str) else value
        return ConfigError(f"{setting.key} must be {setting.allowed()}, got {shown!r} ({where})")

    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if kind == "int" and not isinstance(value, int):
            raise bad()
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
            raise bad()
        if setting.minimum is not None and value < setting.minimum:
            raise bad()
        if setting.maximum is not None and value > setting.maximum:
            raise bad()
        if abs(value) > MAX_NUMBER:  # 1e300 seconds would pass every minimum and break later
            raise ConfigError(f"{setting.key} must be at most {MAX_NUMBER:,}, got {value!r} ({where})")
        return float(value) if kind == "float" else value
    if kind in ("list", "paths"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        if kind == "paths" and not all(value):
            raise bad()
        if kind == "paths":
            return [p if p.is_absolute() else base_dir / p for p in map(lambda v: Path(v).expanduser(), value)]
        return list(value)
    if setting.optional and value == "":
        return value
    if not isinstance(value, str) or not value.strip():
        raise bad()
    if setting.choices and value not in setting.choices:
        raise bad()
    if kind == "path":
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path)
    if kind == "url":
        return _resolve_url(setting, value.strip(), base_dir, where)
    if kind == "weburl":
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        try:
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            raise bad() from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad()
        return value.strip()
    return value


def _resolve_url(setting: Setting, url: str, base_dir: Path, where: str) -> str:
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        if not rest or rest.startswith(":memory:"):
            raise ConfigError(
                f"{setting.key} must name a SQLite file, not an in-memory database ({where})"
            )
        path, sep, query = rest.partition("?")
        if not path.startswith("/"):
            path = str(base_dir / path)
        return "sqlite:///" + path + (sep + query if sep else "")
    if url.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        return url
    raise ConfigError(
        f"{setting.key} must be {setting.allowed()}, got {_mask_url(url)!r} ({where})"
    )


def _mask_url(url: str) -> str:
    """Hide a password in ``scheme://user:password@host`` for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


mask_url = _mask_url

#: No number setting is larger (about 31 years in seconds).
MAX_NUMBER = 10 ** 9


def mask_web_url(url: str) -> str:
    """Scheme, host and port only, for showing a web URL whose path, query or user
    part may hold a token (a webhook's usually does)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(a malformed URL, not shown)"
    netloc = parts.hostname or ""
    if port:
        netloc = f"{netloc}:{port}"
    tail = "/..." if parts.path.strip("/") or parts.query or parts.username else ""
    return f"{parts.scheme}://{netloc}{tail}" if parts.scheme else "(a URL, not shown)"


# -- services ----------------------------------------------------------------------------
#
# The services the watchdog checks are tables, one per service:
#
#     [services.vllm]
#     check = "vllm"
#     url = "http://127.0.0.1:8000"
#     restart_argv = ["/home/me/start-vllm.sh"]
#
# Each field is declared once in SERVICE_FIELDS. The defaults describe the seed's
# stack (DEFAULT_SERVICES) with no restart commands; a table in sparkops.toml (or
# the JSON object in SPARKOPS_SERVICES) changes fields of a default service or adds
# a new one, and ``enabled = false`` turns one off.

SERVICE_CHECKS = ("http", "tcp", "redis", "process", "vllm")

SERVICE_FIELDS: tuple[Setting, ...] = (
    Setting("services.check", "str", "http",
            "http: GET url, expect expect_status; vllm: /health, the /metrics hang check and "
            "/v1/models at url; tcp: connect to host:port; redis: PING host:port; process: a "
            "running process whose command line matches pattern.", choices=SERVICE_CHECKS),
    Setting("services.url", "str", "", "Base URL for http and vllm checks.", optional=True),
    Setting("services.expect_status", "int", 200, "The HTTP status an http check expects.",
            minimum=100, maximum=599),
    Setting("services.host", "str", "127.0.0.1", "Host of a tcp or redis check."),
    Setting("services.port", "int", 0, "Port of a tcp or redis check.", minimum=0, maximum=65535),
    Setting("services.pattern", "str", "", "Regular expression for a process check.", optional=True),
    Setting("services.timeout_seconds", "float", 3.0, "How long one check may take.",
            minimum=0.1, maximum=60),
    Setting("services.restart_argv", "list", [],
            "The command that restarts the service, as an argv list (never a shell string). "
            "Empty: the watchdog only alerts.", ),
    Setting("services.start_grace_seconds", "float", 60.0,
            "After a restart, failed checks are not counted for this long.", minimum=0),
    Setting("services.failures_before_restart", "int", 2,
            "Consecutive failed checks before a restart (and the alert).", minimum=1),
    Setting("services.restart_limit", "int", 3,
            "At most this many restarts within restart_window_minutes; then the watchdog "
            "stops restarting the service and alerts once.", minimum=1),
    Setting("services.restart_window_minutes", "float", 30.0,
            "The window of restart_limit.", minimum=1),
    Setting("services.enabled", "bool", True, "false: the watchdog ignores this service."),
)

#: The seed's stack. ``ui`` follows ui.port when it is not configured.
DEFAULT_SERVICES: dict[str, dict[str, Any]] = {
    "vllm": {"check": "vllm", "url": "http://127.0.0.1:8000"},
    "gateway": {"check": "tcp", "host": "127.0.0.1", "port": 4860},
    "redis": {"check": "redis", "host": "127.0.0.1", "port": 6379},
    "ui": {"check": "http", "url": "http://127.0.0.1:{ui_port}/_stcore/health"},
    "tunnel": {"check": "process", "pattern": r"ssh .*-R"},  # off when remote.tunnel_host is set
}


@dataclass(frozen=True)
class ServiceSpec:
    """One service the watchdog checks (see SERVICE_FIELDS)."""

    name: str
    check: str
    url: str
    expect_status: int
    host: str
    port: int
    pattern: str
    timeout_seconds: float
    restart_argv: tuple[str, ...]
    start_grace_seconds: float
    failures_before_restart: int
    restart_limit: int
    restart_window_minutes: float
    enabled: bool
    #: Named in sparkops.toml or SPARKOPS_SERVICES. A default of the seed's stack that
    #: is not is watched only once it has been seen up on this host: until then it is
    #: "not configured" (not found here), never red (:func:`sparkops.watch.services.assess`).
    declared: bool = True

    def toggle_hint(self) -> str:
        """The one line of sparkops.toml that turns this service on or off."""
        table = f"[services.{self.name}]"
        if not self.enabled:
            return f"to watch it: `{table} enabled = true` in sparkops.toml"
        if not self.declared:
            return (f"a default of the seed's stack: declare `{table}` in sparkops.toml to watch it "
                    f"(red whenever it is down), or `{table} enabled = false` to stop looking for it")
        return f"to stop watching it: `{table} enabled = false` in sparkops.toml"


def load_services(values: Mapping[str, Any], from_file: Any, where: str, from_env: str | None,
                  base_dir: Path) -> tuple[ServiceSpec, ...]:
    """Merge the default services with the file's and the environment's, and check
    every field. Raises ConfigError naming services.NAME.FIELD."""
    merged: dict[str, dict[str, Any]] = {}
    for name, fields in DEFAULT_SERVICES.items():
        merged[name] = {k: (v.format(ui_port=values["ui.port"]) if isinstance(v, str) else v)
                        for k, v in fields.items()}
    sources: dict[str, str] = {name: "default" for name in merged}
    _merge_tables("services", "service", SERVICE_FIELDS, [(from_file, where)], from_env,
                  '{"vllm": {"url": "http://127.0.0.1:8000"}}', merged, sources)
    if values["remote.tunnel_host"] and sources["tunnel"] == "default":
        # SparkOps holds the tunnel itself (sparkops.remote.tunnel): no `ssh -R` process to look for
        merged["tunnel"]["enabled"] = False
    return tuple(_service(name, fields, sources[name], base_dir) for name, fields in merged.items())


def _merge_tables(section: str, what: str, fields: tuple[Setting, ...], layers: list[tuple[Any, str]],
                  from_env: str | None, example: str, merged: dict[str, dict[str, Any]],
                  sources: dict[str, str], secret_hint: str = "") -> None:
    """Merge ``[SECTION.NAME]`` tables (the file's, then ``SPARKOPS_SECTION``'s JSON) into
    ``merged``, field by field, noting where each name came from; a table that is not
    one, an unknown field or a secret is refused with one line naming SECTION.NAME.FIELD."""
    env_name = ENV_PREFIX + section.upper()
    if from_env:
        try:
            layers = [*layers, (json.loads(from_env), f"in environment variable {env_name}")]
        except ValueError:
            raise ConfigError(f"{env_name} must be a JSON object of {what}s, e.g. '{example}'") from None
    known = {f.name for f in fields}
    for layer, origin in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"{section} must be tables, one per {what} ([{section}.NAME]) ({origin})")
        for name, table in layer.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{section}.{name} must be a table ([{section}.{name}]) ({origin})")
            for field_name in table:
                if field_name.lower() in SECRET_KEYS:
                    raise ConfigError(f"{section}.{name}.{field_name} looks like a secret; secrets never go "
                                      f"in sparkops.toml{secret_hint} ({origin})")
                if field_name not in known:
                    raise ConfigError(f"unknown field {section}.{name}.{field_name} ({origin}); fields: "
                                      + ", ".join(f.name for f in fields))
            merged.setdefault(name, {}).update(table)
            sources[name] = origin


def _service(name: str, fields: dict[str, Any], where: str, base_dir: Path) -> ServiceSpec:
    import shutil
    from urllib.parse import urlsplit

    values: dict[str, Any] = {}
    for spec in SERVICE_FIELDS:
        named = Setting(f"services.{name}.{spec.name}", spec.kind, spec.default, spec.help,
                        spec.minimum, spec.maximum, spec.choices, spec.optional)
        values[spec.name] = _resolve(named, fields.get(spec.name, spec.default), base_dir, where)

    def bad(field_name: str, why: str) -> ConfigError:
        return ConfigError(f"services.{name}.{field_name} {why} ({where})")

    check = values["check"]
    if values["enabled"]:
        if check in ("http", "vllm"):
            parts = urlsplit(values["url"])
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise bad("url", f"must be an http:// or https:// URL with a host, got {values['url']!r}")
            try:
                parts.port  # noqa: B018 - raises ValueError for a malformed port
            except ValueError:
                raise bad("url", f"has a malformed port: {values['url']!r}") from None
        if check in ("tcp", "redis") and not 1 <= values["port"] <= 65535:
            raise bad("port", f"must be a port from 1 to 65535 for a {check} check, got {values['port']}")
        if check == "process":
            if not values["pattern"]:
                raise bad("pattern", "must be a regular expression for a process check")
            try:
                re.compile(values["pattern"])
            except re.error as exc:
                raise bad("pattern", f"is not a valid regular expression: {exc}") from None
        argv = values["restart_argv"]
        if argv:
            program = argv[0]
            found = (Path(program).is_file() and os.access(program, os.X_OK)) if "/" in program \
                else shutil.which(program) is not None
            if not found:
                raise bad("restart_argv", f"runs {program!r}, which does not exist or is not "
                                          "executable; give the full path of the restart command")
    values["restart_argv"] = tuple(values["restart_argv"])
    return ServiceSpec(name=name, **values, declared=where != "default")


# -- remote hosts ----------------------------------------------------------------------
#
# The hosts SparkOps reaches over SSH are tables, one per host:
#
#     [remotes.vps]
#     address = "vps.example.net"
#     user = "sparkops"
#     key_file = "~/.ssh/sparkops_ed25519"
#
# and are named by remote.push_host, remote.tunnel_host, remote.gpu_hosts and by
# another host's jump. There are none by default: nothing is contacted until an
# operator declares a host. Each field is declared once in REMOTE_FIELDS.

REMOTE_FIELDS: tuple[Setting, ...] = (
    Setting("remotes.address", "str", "", "The host name or IP address to connect to (required).",
            optional=True),
    Setting("remotes.port", "int", 22, "The SSH port.", minimum=1, maximum=65535),
    Setting("remotes.user", "str", "", "The user to log in as. Empty: the local user.", optional=True),
    Setting("remotes.key_file", "path", "",
            "The private key to log in with. Empty: the keys of ssh-agent and ~/.ssh/id_*. "
            "A key with a passphrase must be in ssh-agent.", optional=True),
    Setting("remotes.known_hosts", "path", "~/.ssh/known_hosts",
            "The known_hosts file the host's key is verified against (OpenSSH's format; "
            "`python -m sparkops remote trust-host NAME` records a key there after showing its "
            "fingerprint). An unknown or changed key is refused."),
    Setting("remotes.jump", "str", "",
            "Another remote host to connect through (like ssh -J). Empty: connect directly.",
            optional=True),
    Setting("remotes.nvidia_smi", "str", "nvidia-smi",
            "The nvidia-smi command on that host, for the remote-gpu job."),
)


@dataclass(frozen=True)
class RemoteSpec:
    """One remote host (see REMOTE_FIELDS)."""

    name: str
    address: str
    port: int
    user: str
    key_file: Path | None
    known_hosts: Path
    jump: str
    nvidia_smi: str

    @property
    def destination(self) -> str:
        """``user@address:port`` for messages."""
        return f"{self.user}@{self.address}:{self.port}"


def load_remotes(values: Mapping[str, Any], from_file: Any, where: str, from_env: str | None,
                 base_dir: Path) -> tuple[RemoteSpec, ...]:
    """The ``[remotes.NAME]`` tables of the file and ``SPARKOPS_REMOTES``, checked, and
    every reference to one (push, tunnel, GPU hosts, jumps) resolved. Raises
    ConfigError naming remotes.NAME.FIELD or the setting that names a missing host."""
    import getpass

    merged: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    _merge_tables("remotes", "remote host", REMOTE_FIELDS, [(from_file, where)], from_env,
                  '{"vps": {"address": "vps.example.net"}}', merged, sources,
                  secret_hint=": use key_file or ssh-agent")
    remotes: dict[str, RemoteSpec] = {}
    for name, fields in merged.items():
        resolved: dict[str, Any] = {}
        for spec in REMOTE_FIELDS:
            named = Setting(f"remotes.{name}.{spec.name}", spec.kind, spec.default, spec.help,
                            spec.minimum, spec.maximum, spec.choices, spec.optional)
            resolved[spec.name] = _resolve(named, fields.get(spec.name, spec.default), base_dir,
                                           sources[name])
        if not str(resolved["address"]).strip():
            raise ConfigError(f"remotes.{name}.address is required: the host name or IP address to "
                              f"connect to ({sources[name]})")
        resolved["user"] = resolved["user"] or getpass.getuser()
        resolved["key_file"] = resolved["key_file"] or None
        remotes[name] = RemoteSpec(name=name, **resolved)

    def known(key: str, name: str, origin: str) -> None:
        if name not in remotes:
            listed = ", ".join(remotes) or "none is configured"
            raise ConfigError(f"{key} names the remote host {name!r}, which has no [remotes.{name}] "
                              f"table (remotes: {listed}) ({origin})")

    for key in ("remote.push_host", "remote.tunnel_host"):
        if values[key]:
            known(key, values[key], "settings")
    for name in values["remote.gpu_hosts"]:
        known("remote.gpu_hosts", name, "settings")
    for name, spec in remotes.items():
        seen = [name]
        hop = spec.jump
        while hop:
            known(f"remotes.{seen[-1]}.jump", hop, sources[seen[-1]])
            if hop in seen:
                raise ConfigError(f"remotes.{name}.jump goes round in a circle ({' -> '.join(seen + [hop])}); "
                                  f"a jump host must not lead back ({sources[name]})")
            seen.append(hop)
            hop = remotes[hop].jump
    return tuple(remotes.values())


@dataclass(frozen=True)
class Secrets:
    """Secrets from the environment, else ``.streamlit/secrets.toml``. Never logged."""

    ui_password: str | None = None
    telegram_token: str | None = None
    telegram_chat_id: str | None = None
    vllm_api_key: str | None = None

    def __repr__(self) -> str:  # never print the values
        state = {k: "set" if getattr(self, k) else "unset"
                 for k in ("ui_password", "telegram_token", "telegram_chat_id", "vllm_api_key")}
        return "Secrets(" + ", ".join(f"{k}={v}" for k, v in state.items()) + ")"


def load_secrets(
    env: Mapping[str, str] | None = None, secrets_file: Path | None = None
) -> Secrets:
    env = os.environ if env is None else env
    secrets_file = secrets_file or Path(".streamlit") / "secrets.toml"
    from_file: dict[str, Any] = {}
    if secrets_file.exists():
        try:
            with secrets_file.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read secrets file {secrets_file}: {exc}") from exc
        table = data.get("sparkops") or {}
        if not isinstance(table, dict):
            raise ConfigError(f"sparkops in {secrets_file} must be a table ([sparkops]), got a value")
        from_file = {**data, **table}

    def pick(env_name: str, key: str) -> str | None:
        value = env.get(env_name) or from_file.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{key} in {secrets_file} must be a string")
        return value or None

    return Secrets(
        ui_password=pick("SPARKOPS_UI_PASSWORD", "ui_password"),
        telegram_token=pick("SPARKOPS_TELEGRAM_TOKEN", "telegram_token"),
        telegram_chat_id=pick("SPARKOPS_TELEGRAM_CHAT_ID", "telegram_chat_id"),
        vllm_api_key=pick("SPARKOPS_VLLM_API_KEY", "vllm_api_key"),
    )


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); hostnames
    other than localhost count as remote (they are not resolved)."""
    address = address.strip()
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False
