"""What each run used: the increase of the host's meters while it ran.

The meters (:mod:`sparkops.meters.sample`) are vLLM's token and request counters and
the GPUs' energy counter and utilization, sampled at each run's start and end (and
between, so a run killed with -9 keeps what it used up to its last sample). With
one run at a time (``max_in_progress = 1``, the seed's setting on a GB10) a run's
usage is exactly the counters' increase between its first and last sample. With
several at once, each stretch between two samples is shared equally among the runs
open through it, and their figures are marked estimated.

A counter that went down between two samples was restarted (vLLM restarted): the
new value is what it counted since, what it counted before the restart in that
stretch is lost, and the run says so (``resets``). A source not read at both ends
of a stretch leaves that counter unmeasured there: a run none of whose stretches
measured a counter has None for it ("not measured", never 0), and one that missed
some has it in ``unmeasured``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sparkops.core import json_text
from sparkops.meters.reported import Reported
from sparkops.meters.sample import COUNTERS, Sample

JOULES_PER_WH = 3600.0


def add_known(a: float | None, b: float | None) -> float | None:
    """``a + b`` where both are known, else the known one; None when neither is."""
    return b if a is None else a if b is None else a + b


def sum_known(values: Iterable[float | None]) -> float | None:
    """The sum of the known ``values``; None when none is known (not measured, never 0)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


@dataclass
class Usage:
    """One run's share of the meters' increase."""

    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    requests: float | None = None
    energy_j: float | None = None
    gpu_seconds: float | None = None  # the GPUs' busy time: utilization x time
    seconds: float = 0.0              # how long the samples saw the run
    estimated: bool = False           # shared with other runs, or a stretch cut by time
    resets: int = 0                   # counter restarts seen while it ran
    unmeasured: set[str] = field(default_factory=set)  # counters some stretch could not measure
    #: what the agent said it used (``task complete --usage-json``), kept beside
    #: the measured figures and preferred where it has them; not part of ``as_dict``
    reported: Reported | None = field(default=None, compare=False)

    @property
    def prompt(self) -> float | None:
        """The run's prompt tokens: the agent's own count where it gave one."""
        said = self.reported.prompt_tokens if self.reported else None
        return self.prompt_tokens if said is None else said

    @property
    def generated(self) -> float | None:
        said = self.reported.generation_tokens if self.reported else None
        return self.generation_tokens if said is None else said

    @property
    def tokens(self) -> float | None:
        """Prompt and generated tokens together; None when neither is known."""
        return sum_known((self.prompt, self.generated))

    @property
    def energy_wh(self) -> float | None:
        return None if self.energy_j is None else self.energy_j / JOULES_PER_WH

    def plus(self, later: Usage) -> Usage:
        """This usage followed by ``later`` (the stretches after it)."""
        return Usage(**{name: add_known(getattr(self, name), getattr(later, name))
                        for name in (*COUNTERS, "gpu_seconds")},
                     seconds=self.seconds + later.seconds, estimated=self.estimated or later.estimated,
                     resets=self.resets + later.resets, unmeasured=self.unmeasured | later.unmeasured,
                     reported=self.reported)

    def _add(self, name: str, amount: float) -> None:
        setattr(self, name, (getattr(self, name) or 0.0) + amount)

    def as_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("reported")
        return {**found, "unmeasured": sorted(self.unmeasured)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        def number(key: str) -> float | None:
            return json_text.number_of(data.get(key))
        unmeasured = data.get("unmeasured")
        return cls(prompt_tokens=number("prompt_tokens"), generation_tokens=number("generation_tokens"),
                   requests=number("requests"), energy_j=number("energy_j"), gpu_seconds=number("gpu_seconds"),
                   seconds=number("seconds") or 0.0, estimated=data.get("estimated") is True,
                   resets=int(number("resets") or 0),
                   unmeasured={str(u) for u in unmeasured} if isinstance(unmeasured, list) else set())


def increase(before: float | None, after: float | None) -> tuple[float | None, bool]:
    """How much a counter grew, and whether it was restarted in between (it went
    down: then it counted ``after`` since the restart). None when either is unknown."""
    if before is None or after is None:
        return None, False
    return (after - before, False) if after >= before else (after, True)


def attribute(samples: Sequence[Sample], runs: Mapping[int, tuple[float, float | None]]) -> dict[int, Usage]:
    """Each run's usage from the host's ``samples``.

    ``runs``: run id -> (start, end) on the samples' clock; an end of None means
    still running (up to the last sample). Between two samples, the runs open
    through the stretch share its increase equally; a run that starts or ends
    inside a stretch gets the part of it that it was open for (the counters are
    taken to grow evenly within a stretch: an estimate)."""
    found = {run_id: Usage() for run_id in runs}
    ordered = sorted(samples, key=lambda s: s.at)
    for before, after in zip(ordered, ordered[1:]):
        span = after.at - before.at
        if span <= 0:
            continue
        growth = {name: increase(getattr(before, name), getattr(after, name)) for name in COUNTERS}
        busy = (None if before.gpu_util_pct is None or after.gpu_util_pct is None
                else (before.gpu_util_pct + after.gpu_util_pct) / 200.0)
        for start, end in _pieces(before.at, after.at, runs):
            open_runs = [r for r, (s, e) in runs.items() if s <= start and (e is None or e >= end)]
            if not open_runs:
                continue  # nobody's: the host was idle then
            part = (end - start) / span
            for run_id in open_runs:
                _share(found[run_id], growth, busy, part, end - start, len(open_runs))
    return found


def _pieces(start: float, end: float, runs: Mapping[int, tuple[float, float | None]]) -> list[tuple[float, float]]:
    """The stretch from ``start`` to ``end`` cut wherever a run starts or ends in it."""
    cuts = {t for s, e in runs.values() for t in (s, e) if t is not None and start < t < end}
    points = [start, *sorted(cuts), end]
    return list(zip(points, points[1:]))


def _share(usage: Usage, growth: Mapping[str, tuple[float | None, bool]], busy: float | None,
           part: float, seconds: float, sharers: int) -> None:
    usage.seconds += seconds
    if part < 1 or sharers > 1:
        usage.estimated = True
    restarted = False
    for name, (amount, reset) in growth.items():
        if amount is None:
            usage.unmeasured.add(name)
            continue
        usage._add(name, amount * part / sharers)
        restarted = restarted or reset
    usage.resets += restarted
    if busy is None:
        usage.unmeasured.add("gpu_seconds")
    else:
        usage._add("gpu_seconds", busy * seconds / sharers)
