"""The host's meters: what vLLM and the GPUs have counted so far, read in one look.

A run's usage (tokens, requests, GPU energy and busy time: :mod:`sparkops.meters.usage`)
is the increase of these counters while it ran, so nothing is asked of the agent.
vLLM's ``/metrics`` counts prompt and generation tokens and finished requests since
it started; NVML counts each GPU's energy since the driver loaded and says how busy
it is now. Each source of a :class:`Sample` says whether it was read and, if not,
why: a sample taken with no vLLM has no token counts (None, "not measured"), never 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sparkops.config import Settings
from sparkops.core import clock, json_text
from sparkops.meters import gpu
from sparkops.meters.gpu import GpuSnapshot
from sparkops.meters.prometheus import (
    VLLM_GENERATION_TOKENS,
    VLLM_PROMPT_TOKENS,
    VLLM_REQUESTS,
    first_of,
    http_get,
    parse_prometheus,
)

#: The counters of a sample, which only grow until their source restarts.
COUNTERS = ("prompt_tokens", "generation_tokens", "requests", "energy_j")


@dataclass(frozen=True)
class Sample:
    """The host's counters at ``at`` (epoch seconds); None where a source was not read."""

    at: float
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    requests: float | None = None
    energy_j: float | None = None       # all GPUs' energy counters, joules
    gpu_util_pct: float | None = None   # the GPUs' mean utilization at that moment
    sources: dict[str, str] = field(default_factory=dict)  # "vllm" / "gpu": "ok" or why not

    @property
    def measured(self) -> bool:
        """Whether any source was read."""
        return "ok" in self.sources.values()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        def number(key: str) -> float | None:
            return json_text.number_of(data.get(key))
        sources = data.get("sources")
        return cls(at=number("at") or 0.0, prompt_tokens=number("prompt_tokens"),
                   generation_tokens=number("generation_tokens"), requests=number("requests"),
                   energy_j=number("energy_j"), gpu_util_pct=number("gpu_util_pct"),
                   sources={str(k): str(v) for k, v in sources.items()} if isinstance(sources, dict) else {})


def read(*, metrics_url: str | None, gpu: GpuSnapshot | None, timeout: float = 2.0,
         now: float | None = None) -> Sample:
    """One sample: vLLM's counters from ``metrics_url`` (None: no vLLM to read) and
    the GPUs' from ``gpu`` (a snapshot taken now; None: not read)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if metrics_url is None:
        sources["vllm"] = "not configured"
    else:
        values.update(_vllm_counters(metrics_url, timeout, sources))
    if gpu is None:
        sources["gpu"] = "not read"
    elif not gpu.available:
        sources["gpu"] = gpu.reason
    else:
        energies = [d.energy_j for d in gpu.devices]
        utils = [d.utilization_pct for d in gpu.devices if d.utilization_pct is not None]
        if gpu.devices and all(e is not None for e in energies):
            values["energy_j"] = float(sum(energies))
            sources["gpu"] = "ok"
        else:
            sources["gpu"] = "no energy counter" if gpu.devices else "no GPU"
        if utils:
            values["gpu_util_pct"] = sum(utils) / len(utils)
    return Sample(at=clock.now() if now is None else float(now), sources=sources, **values)


def _vllm_counters(url: str, timeout: float, sources: dict[str, str]) -> dict[str, float]:
    try:
        code, body = http_get(url, timeout)
    except OSError as exc:
        sources["vllm"] = f"no answer at {url}: {exc}"
        return {}
    if code != 200:
        sources["vllm"] = f"{url} answered {code}"
        return {}
    metrics = parse_prometheus(body.decode("utf-8", "replace"))
    found = {"prompt_tokens": first_of(metrics, VLLM_PROMPT_TOKENS),
             "generation_tokens": first_of(metrics, VLLM_GENERATION_TOKENS),
             "requests": first_of(metrics, VLLM_REQUESTS)}
    found = {k: v for k, v in found.items() if v is not None}
    sources["vllm"] = "ok" if found else f"{url} has no token or request counters"
    return found


@dataclass(frozen=True)
class Meter:
    """What a run's shim reads at each of its samples: the ``/metrics`` of the
    configured vLLM (the first enabled service whose check is ``vllm``) and this
    host's GPUs (``nvml``: None is NVML itself, as :func:`sparkops.meters.gpu.snapshot`)."""

    metrics_url: str | None
    timeout: float = 2.0
    nvml: Any = None

    @classmethod
    def of(cls, settings: Settings) -> Meter | None:
        """The host's meter, or None when ``usage.meter`` is off."""
        if not settings["usage.meter"]:
            return None
        vllm = next((s for s in settings.services if s.check == "vllm" and s.enabled and s.url), None)
        if vllm is None:
            return cls(metrics_url=None)
        return cls(metrics_url=f"{vllm.url.rstrip('/')}/metrics", timeout=min(2.0, vllm.timeout_seconds))

    def read(self, *, now: float | None = None) -> Sample:
        return read(metrics_url=self.metrics_url, gpu=gpu.snapshot(self.nvml), timeout=self.timeout, now=now)
