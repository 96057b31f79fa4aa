"""The jobs runner process: ``python -m sparkops.runner [--config PATH]`` (or
``python jobs_runner.py`` in a checkout).

Loads the settings, takes the one-runner-per-host lock, sets up logging (a
rotating file at ``runner.log_file`` plus stderr), opens or creates the
databases and runs the jobs until SIGTERM or SIGINT (Ctrl-C), then exits 0.

Exit codes: 0 stopped cleanly, 1 another runner holds the lock,
2 bad configuration or an unusable database.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from logging.handlers import RotatingFileHandler

from sqlalchemy.exc import DBAPIError

from sparkops.board import requirements
from sparkops.config import Settings, load_settings
from sparkops.core.errors import EXIT_USAGE, SparkOpsError
from sparkops.runner.loop import Runner, RunnerLock, install_stop_handlers, lock_path, new_context
from sparkops.storage.db import error_line
from sparkops.storage.store import open_store

log = logging.getLogger("sparkops.jobs_runner")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"


def configure_logging(settings: Settings, level: str) -> None:
    """Log to the rotating ``runner.log_file`` and to stderr."""
    path = settings["runner.log_file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(LOG_FORMAT)
    to_file = RotatingFileHandler(path, maxBytes=settings["runner.log_max_bytes"],
                                  backupCount=settings["runner.log_backups"], encoding="utf-8")
    to_stderr = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    for handler in (to_file, to_stderr):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparkops.runner",
        description="Run SparkOps' periodic jobs until SIGTERM or Ctrl-C.")
    parser.add_argument("--config", metavar="PATH",
                        help="settings file (default: $SPARKOPS_CONFIG or ./sparkops.toml)")
    parser.add_argument("--log-level", default=os.environ.get("SPARKOPS_LOG_LEVEL", "INFO").upper(),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)

    # Before anything slow: a SIGTERM during start-up also means "stop cleanly".
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        settings = load_settings(args.config)
        requirements.parse_labels(settings["host.labels"], what="host.labels entry")
        with RunnerLock(lock_path(settings)) as lock:
            try:
                configure_logging(settings, args.log_level)
            except OSError as exc:
                raise OSError(f"cannot write the runner log {settings['runner.log_file']}: "
                              f"{exc.strerror}; check runner.log_file") from exc
            store = open_store(settings, create=True)
            try:
                runner = Runner(new_context(settings, store), stop=stop)
                runner.install_signal_handlers()
                log.info("jobs runner started on %s (pid %d, lock %s); board %s, ops %s; jobs: %s",
                         runner.ctx.host, os.getpid(), lock.path, store.board.display_url,
                         store.ops.display_url,
                         ", ".join(f"{name} every {every:g}s" for name, every in runner.intervals().items()))
                if settings["dispatch.mode"] == "native" and not settings["dispatch.agent_argv"]:
                    log.warning("no agent configured (dispatch.agent_argv is empty): ready tasks "
                                "will wait; see docs/configuration.md")
                runner.run_forever()
                log.info("jobs runner stopped (%s)", runner.stop_reason or "stop requested")
            finally:
                store.dispose()
    except SparkOpsError as err:
        print(f"jobs_runner: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as exc:
        print(f"jobs_runner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DBAPIError as exc:
        reason = error_line(exc)
        print(f"jobs_runner: error: database error: {reason}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
