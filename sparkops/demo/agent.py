"""The demo agent: a stand-in for a coding agent, for demos and for testing the shim.

``python -m sparkops demo-agent`` (or ``python -m sparkops.demo.agent``) runs where
the worker shim runs a real agent: in the task's workspace, with the task in
``SPARKOPS_TASK_ID`` / ``SPARKOPS_RUN_ID`` / ``SPARKOPS_WORKSPACE`` and its text in
``TASK.md``. It does a little real work there over a few seconds, in five steps:
it reads ``TASK.md`` (word count, SHA-256), appends progress lines to
``WORKLOG.md`` and stdout (which the shim sends to the run log), checks the task
file did not change, and writes ``RESULT.md``. Then it reports through the real
CLI, ``python -m sparkops task complete TASK --run RUN ...``, as a worker must.

One random draw per run decides how the run ends, so a demo sprint shows every
path the shim has to handle (see :func:`plan_run`):

========================  ===================================================
``--fail-rate``           crashes partway: a traceback on stderr, exit 1
``--hang-rate``           stops making progress and sleeps until killed
``--rate-limit-rate``     "model rate limited" on stderr, exit 75
``--no-report-rate``      "could not reach the model", exit 0 with no report
otherwise                 reports completion; exit 0, or 3 when the report is
                          refused (a stale run), 4 when it cannot be made
========================  ===================================================

The agent never changes the board except through that one report, never retries
a refused report, writes only ``WORKLOG.md`` and ``RESULT.md`` in the workspace,
and prints no environment value but the task and run ids. SIGTERM (or SIGINT)
stops it within :data:`TICK` seconds: it appends ``terminated`` to the worklog
and exits 143 (130). Bad options or a missing task environment: one line on
stderr, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

from sparkops.core.errors import InvalidInput

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_REPORT_REFUSED = 3
EXIT_REPORT_FAILED = 4
EXIT_RATE_LIMITED = 75

#: The longest single sleep: how quickly a signal is noticed.
TICK = 0.05
#: How long the report through the CLI may take before the agent gives up on it.
REPORT_TIMEOUT = 120.0  # longer than storage.retry_seconds (60): the CLI rides out a database restart

WORKLOG = "WORKLOG.md"
RESULT = "RESULT.md"
TASK_FILE = "TASK.md"

#: The work, one line of the worklog each.
STEPS = ("read the task", "plan the change", "make the change", "run the checks",
         "write the result")


class Scenario(StrEnum):
    """How a run ends, drawn once per run."""

    COMPLETE = "complete"
    CRASH = "crash"
    HANG = "hang"
    RATE_LIMITED = "rate_limited"
    NO_REPORT = "no_report"


class SimulatedCrash(RuntimeError):
    """The error a crashing run raises; its traceback goes to stderr."""


class _Stopped(Exception):
    """A run that ends on purpose before reporting: exit code and stderr line."""

    def __init__(self, exit_code: int, message: str):
        self.exit_code = exit_code
        super().__init__(message)


class Terminated(Exception):
    """A stop signal arrived; carries the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


# -- options and the draw -------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The demo agent's options; invalid values raise :class:`InvalidInput`."""

    min_seconds: float = 2.0
    max_seconds: float = 8.0
    fail_rate: float = 0.0
    hang_rate: float = 0.0
    rate_limit_rate: float = 0.0
    no_report_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--min-seconds", self.min_seconds), ("--max-seconds", self.max_seconds)):
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"{flag} must be a number of seconds >= 0, got {value:g}")
        if self.min_seconds > self.max_seconds:
            raise InvalidInput(f"--min-seconds {self.min_seconds:g} is more than --max-seconds "
                               f"{self.max_seconds:g}; make --min-seconds <= --max-seconds")
        rates = self.rates()
        for flag, value in rates.items():
            if not math.isfinite(value) or not 0 <= value <= 1:
                raise InvalidInput(f"{flag} must be between 0 and 1, got {value:g}")
        if sum(rates.values()) > 1 + 1e-9:
            given = " + ".join(f"{flag} {value:g}" for flag, value in rates.items() if value)
            raise InvalidInput(f"the rates add up to {sum(rates.values()):g} ({given}); "
                               "they must add up to at most 1")

    def rates(self) -> dict[str, float]:
        """The outcome rates by option name, in the order the draw uses them."""
        return {"--fail-rate": self.fail_rate, "--hang-rate": self.hang_rate,
                "--rate-limit-rate": self.rate_limit_rate, "--no-report-rate": self.no_report_rate}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                   fail_rate=args.fail_rate, hang_rate=args.hang_rate,
                   rate_limit_rate=args.rate_limit_rate, no_report_rate=args.no_report_rate,
                   seed=args.seed)


@dataclass(frozen=True)
class Plan:
    """What one run will do: the scenario, the planned length of the whole work,
    and how many steps are done before a run that does not complete stops."""

    scenario: Scenario
    seconds: float
    stop_after: int
    seed: int

    def describe(self) -> str:
        if self.scenario == Scenario.COMPLETE:
            ending = f"complete after {len(STEPS)} steps"
        else:
            ending = f"{self.scenario} after {self.stop_after} of {len(STEPS)} steps"
        return f"planned: {ending}, {self.seconds:.2f}s of work (seed {self.seed})"


def derive_seed(task_id: str, run_id: int) -> int:
    """A seed from the task and run: a rerun (a new run id) draws again, and the
    same run always draws the same (unlike ``hash()``, stable across processes)."""
    digest = hashlib.sha256(f"{task_id}:{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def plan_run(options: Options, task_id: str, run_id: int) -> Plan:
    """The one draw of a run. ``u`` uniform in [0, 1) falls in consecutive bands
    of width fail, hang, rate-limit and no-report rate, else the run completes.
    The duration (uniform between min and max seconds) and the stopping step
    (uniform in 1..4) are always drawn too, so for a seed they do not depend on
    the rates."""
    seed = options.seed if options.seed is not None else derive_seed(task_id, run_id)
    rng = random.Random(seed)
    u = rng.random()
    seconds = rng.uniform(options.min_seconds, options.max_seconds)
    stop_after = rng.randint(1, len(STEPS) - 1)
    scenario = Scenario.COMPLETE
    edge = 0.0
    bands = zip((Scenario.CRASH, Scenario.HANG, Scenario.RATE_LIMITED, Scenario.NO_REPORT),
                options.rates().values())
    for candidate, rate in bands:
        edge += rate
        if u < edge:
            scenario = candidate
            break
    if scenario == Scenario.COMPLETE:
        stop_after = len(STEPS)
    return Plan(scenario=scenario, seconds=seconds, stop_after=stop_after, seed=seed)


# -- the environment the shim gives -------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """The task handed to the agent by the worker shim."""

    task_id: str
    run_id: int
    workspace: Path
    prompt_file: Path


def read_assignment(environ: Mapping[str, str]) -> Assignment:
    """The assignment from the shim's environment; :class:`InvalidInput` naming
    what is missing (never a value but the task and run ids)."""
    required = ("SPARKOPS_TASK_ID", "SPARKOPS_RUN_ID", "SPARKOPS_WORKSPACE")
    missing = [name for name in required if not environ.get(name, "").strip()]
    if missing:
        raise InvalidInput(f"{', '.join(missing)} not set; the demo agent runs under the worker "
                           "shim, which sets SPARKOPS_TASK_ID, SPARKOPS_RUN_ID and SPARKOPS_WORKSPACE")
    task_id = environ["SPARKOPS_TASK_ID"].strip()
    try:
        run_id = int(environ["SPARKOPS_RUN_ID"])
    except ValueError:
        raise InvalidInput(f"SPARKOPS_RUN_ID must be a run number, got {environ['SPARKOPS_RUN_ID']!r}") from None
    workspace = Path(environ["SPARKOPS_WORKSPACE"])
    if not workspace.is_absolute() or not workspace.is_dir():
        raise InvalidInput("SPARKOPS_WORKSPACE must be an existing directory, given as an absolute path")
    prompt = environ.get("SPARKOPS_PROMPT_FILE", "").strip()
    prompt_file = Path(prompt) if prompt else workspace / TASK_FILE
    if not prompt_file.is_file():
        source = "SPARKOPS_PROMPT_FILE" if prompt else f"{TASK_FILE} in the workspace"
        raise InvalidInput(f"the task text ({source}) is not a readable file; "
                           "the worker shim writes it before it starts the agent")
    return Assignment(task_id=task_id, run_id=run_id, workspace=workspace, prompt_file=prompt_file)


# -- stopping ---------------------------------------------------------------------------


class StopSignal:
    """SIGTERM and SIGINT only record themselves; :meth:`sleep` and :meth:`check`
    raise :class:`Terminated` at the next tick, so files are never half written."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic,
                 nap: Callable[[float], None] = time.sleep):
        self.signum: int | None = None
        self._monotonic = monotonic
        self._nap = nap
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Terminated(self.signum)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` (forever for ``math.inf``) in ticks, checking for a stop."""
        deadline = self._monotonic() + seconds
        while True:
            self.check()
            left = deadline - self._monotonic()
            if left <= 0:
                return
            self._nap(min(TICK, left))


# -- the work ---------------------------------------------------------------------------


class Journal:
    """Progress lines to ``WORKLOG.md`` (appended, flushed each line) and stdout."""

    def __init__(self, path: Path, out: TextIO):
        # O_NOFOLLOW: a WORKLOG.md that is a link (perhaps out of the workspace) is refused.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._out = out

    def line(self, text: str) -> None:
        self._file.write(f"- {time.strftime('%H:%M:%S')} {text}\n")
        self._file.flush()
        print(f"demo-agent: {text}", file=self._out, flush=True)

    def close(self) -> None:
        self._file.close()


@dataclass
class Progress:
    """What the work found and did so far."""

    text: str = ""
    words: int = 0
    sha256: str = ""
    steps_done: int = 0
    top_words: tuple[str, ...] = ()
    checked: bool = False


def _read_task(a: Assignment, p: Progress) -> str:
    data = a.prompt_file.read_bytes()
    p.text = data.decode("utf-8", errors="replace")
    p.words = len(p.text.split())
    p.sha256 = hashlib.sha256(data).hexdigest()
    return f"{p.words} words, sha256 {p.sha256[:12]}"


def _plan_change(a: Assignment, p: Progress) -> str:
    lines = [line for line in p.text.splitlines() if line.strip()]
    return f"{len(lines)} non-empty lines to go through"


def _make_change(a: Assignment, p: Progress) -> str:
    words = Counter(w.strip(".,:;!?()[]`'\"#*").lower() for w in p.text.split())
    p.top_words = tuple(w for w, _ in words.most_common() if len(w) > 3)[:3]
    return "most frequent words: " + (", ".join(p.top_words) or "(none)")


def _run_checks(a: Assignment, p: Progress) -> str:
    p.checked = hashlib.sha256(a.prompt_file.read_bytes()).hexdigest() == p.sha256
    return "task text unchanged" if p.checked else "task text changed while working"


def _write_result(a: Assignment, p: Progress, plan: Plan, seconds: float) -> str:
    title = p.text.splitlines()[0].lstrip("# ").strip() if p.text.strip() else "(untitled)"
    body = (
        f"# Result for {a.task_id} (run {a.run_id})\n\n"
        f"Work by the SparkOps demo agent on: {title}\n\n"
        f"- task words: {p.words}\n"
        f"- task sha256: {p.sha256}\n"
        f"- most frequent words: {', '.join(p.top_words) or '(none)'}\n"
        f"- task text unchanged while working: {'yes' if p.checked else 'no'}\n"
        f"- steps done: {len(STEPS)} of {len(STEPS)}\n"
        f"- duration: {seconds:.2f}s (planned {plan.seconds:.2f}s, seed {plan.seed})\n"
    )
    tmp = a.workspace / f".{RESULT}.tmp"
    tmp.unlink(missing_ok=True)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w", encoding="utf-8") as fh:
        fh.write(body)
    os.replace(tmp, a.workspace / RESULT)  # replaces a link itself, never its target
    return f"wrote {RESULT}"


def _fail_in_step(plan: Plan, step: int) -> None:
    """The simulated failure of a run that does not complete, inside its step."""
    name = STEPS[step - 1]
    if plan.scenario == Scenario.CRASH:
        raise SimulatedCrash(
            f"step {step} ({name}): the model returned a malformed tool call "
            "(expected JSON, got 'Sure! Here is the patch:') [simulated by --fail-rate]")
    if plan.scenario == Scenario.RATE_LIMITED:
        raise _Stopped(EXIT_RATE_LIMITED, "model rate limited (HTTP 429 Too Many Requests, "
                       f"retry after 60s) in step {step} ({name}) [simulated by --rate-limit-rate]")
    if plan.scenario == Scenario.NO_REPORT:
        raise _Stopped(EXIT_OK, f"could not reach the model in step {step} ({name}); "
                       "stopping without a report [simulated by --no-report-rate]")


def do_work(a: Assignment, plan: Plan, journal: Journal, stop: StopSignal,
            *, monotonic: Callable[[], float] = time.monotonic) -> tuple[Progress, float]:
    """The five steps, each after its share of the planned time. A run that
    does not complete stops in step ``plan.stop_after + 1``: it raises
    :class:`SimulatedCrash` or ``_Stopped``, or hangs until a signal."""
    started = monotonic()
    progress = Progress()
    workers = (_read_task, _plan_change, _make_change, _run_checks)
    for step, name in enumerate(STEPS, start=1):
        stop.sleep(plan.seconds / len(STEPS))
        if step > plan.stop_after:
            if plan.scenario == Scenario.HANG:
                stop.sleep(math.inf)  # no more progress, no output: only a signal ends it
            _fail_in_step(plan, step)
        if step <= len(workers):
            detail = workers[step - 1](a, progress)
        else:
            detail = _write_result(a, progress, plan, monotonic() - started)
        progress.steps_done = step
        journal.line(f"step {step}/{len(STEPS)} {name}: {detail}")
    return progress, monotonic() - started


# -- reporting --------------------------------------------------------------------------


def report_argv(a: Assignment, result: str, summary: str, metadata: dict) -> list[str]:
    """The worker's report through the real CLI, as an argv list (never a shell)."""
    return [sys.executable, "-m", "sparkops", "task", "complete", a.task_id,
            "--run", str(a.run_id), "--result", result, "--summary", summary,
            "--metadata", json.dumps(metadata, ensure_ascii=False)]


def report_completion(a: Assignment, progress: Progress, plan: Plan, seconds: float,
                      environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """Report once; never retry. 0 when the CLI accepted the report, 3 when it
    refused it (exit 1: e.g. the run is stale), 4 when it could not be made."""
    result = (f"Demo agent read the task ({progress.words} words, sha256 {progress.sha256[:12]}) "
              f"and wrote {RESULT} and {WORKLOG} in {len(STEPS)} steps ({seconds:.1f}s)")
    summary = f"demo agent: {len(STEPS)} steps in {seconds:.1f}s, {RESULT} written"
    metadata = {"agent": "sparkops demo-agent", "files_written": [WORKLOG, RESULT],
                "duration_seconds": round(seconds, 3), "planned_seconds": round(plan.seconds, 3),
                "steps": len(STEPS), "words": progress.words, "sha256": progress.sha256,
                "seed": plan.seed}
    try:
        done = subprocess.run(report_argv(a, result, summary, metadata), env=dict(environ),
                              cwd=a.workspace, capture_output=True, text=True,
                              timeout=REPORT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        print(f"demo-agent: error: the report did not finish in {REPORT_TIMEOUT:g}s; "
              "not retrying", file=err, flush=True)
        return EXIT_REPORT_FAILED
    except OSError as exc:
        print(f"demo-agent: error: could not start the CLI to report: {exc.strerror}",
              file=err, flush=True)
        return EXIT_REPORT_FAILED
    if done.stdout.strip():
        print(done.stdout.rstrip(), file=out, flush=True)
    if done.returncode == 0:
        return EXIT_OK
    message = done.stderr.strip() or f"the CLI exited {done.returncode}"
    print(message, file=err, flush=True)
    if done.returncode == 1:
        print("demo-agent: the report was refused; not retrying", file=err, flush=True)
        return EXIT_REPORT_REFUSED
    print(f"demo-agent: the report could not be made (CLI exit {done.returncode})",
          file=err, flush=True)
    return EXIT_REPORT_FAILED


# -- one run ------------------------------------------------------------------------------


def run_agent(options: Options, a: Assignment, stop: StopSignal, *,
              environ: Mapping[str, str], out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    """One run of the demo agent in ``a.workspace``; returns the exit code.
    A stop signal wins over everything but a report already on its way: the
    CLI call is let finish (it is short), then the run ends with 128 + signal."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    plan = plan_run(options, a.task_id, a.run_id)
    journal = Journal(a.workspace / WORKLOG, out)
    code: int | None = None
    try:
        journal.line(f"task {a.task_id} run {a.run_id} started; {plan.describe()}")
        try:
            progress, seconds = do_work(a, plan, journal, stop)
            stop.check()
            code = report_completion(a, progress, plan, seconds, environ, out, err)
            stop.check()
        except Terminated as exc:
            after = "" if code is None else f" after the report (report exit {code})"
            journal.line(f"terminated by {exc}{after}; exit {128 + exc.signum}")
            return 128 + exc.signum
        except _Stopped as exc:
            print(f"demo-agent: {exc}", file=err, flush=True)
            journal.line(f"stopped: exit {exc.exit_code}")
            return exc.exit_code
        except SimulatedCrash:
            traceback.print_exc(file=err)
            err.flush()
            return EXIT_CRASH
        journal.line({EXIT_OK: "reported completion",
                      EXIT_REPORT_REFUSED: "the report was refused (exit 3)"}
                     .get(code, f"the report could not be made (exit {code})"))
        return code
    finally:
        journal.close()


# -- entry points ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo agent's options, for its own parser or a CLI subparser."""
    parser.add_argument("--min-seconds", type=float, default=2.0, metavar="S",
                        help="shortest run (default 2)")
    parser.add_argument("--max-seconds", type=float, default=8.0, metavar="S",
                        help="longest run (default 8); the length is uniform between the two")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="P",
                        help="chance of a crash partway (exit 1)")
    parser.add_argument("--hang-rate", type=float, default=0.0, metavar="P",
                        help="chance of hanging until killed")
    parser.add_argument("--rate-limit-rate", type=float, default=0.0, metavar="P",
                        help="chance of 'model rate limited' (exit 75)")
    parser.add_argument("--no-report-rate", type=float, default=0.0, metavar="P",
                        help="chance of exiting 0 without a report")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the draw (default: from the task and run ids)")


def run(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> int:
    """Validate, read the assignment, do the run. Usage errors: one line, exit 2."""
    environ = os.environ if environ is None else environ
    stop = StopSignal()
    stop.install()
    try:
        try:
            options = Options.from_args(args)
            assignment = read_assignment(environ)
        except InvalidInput as exc:
            print(f"demo-agent: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        return run_agent(options, assignment, stop, environ=environ)
    finally:
        stop.restore()


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage block)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="demo-agent",
        description="A stand-in coding agent: a little real work in the task's workspace, "
                    "then a report through the CLI, or a drawn crash, hang, rate limit or "
                    "missing report.")
    add_arguments(parser)
    return parser


class _QuietParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(message)


def run_plain(argv: Sequence[str]) -> int | None:
    """``python -m sparkops demo-agent ARGS`` without loading the command line: the
    exit code, or None when ARGS need the full command line (``--config``, ``--help``,
    a usage error, which it says in its own words)."""
    if any(a in ("-h", "--help") or a.startswith("--config") for a in argv):
        return None
    parser = _QuietParser(prog="demo-agent", add_help=False)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except ValueError:
        return None
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
