"""The host's meters: what vLLM and the GPUs have counted so far, read in one look.

A run's usage (tokens, requests, GPU energy and busy time: :mod:`sparkops.meters.usage`)
is the increase of these counters while it ran, so nothing is asked of the agent.
vLLM's ``/metrics`` counts prompt and generation tokens and finished requests since
it started; NVML counts each GPU's energy since the driver loaded and says how busy
it is now. Each source of a :class:`Sample` says whether it was read and, if not,
why: a sample taken with no vLLM has no token counts (None, "not measured"), never 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sparkops.config import Settings
from sparkops.core import clock, json_text
from sparkops.core.errors import SparkOpsError
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


def read(*, metrics_url: str | None, gpu: GpuSnapshot | Callable[[], GpuSnapshot] | None,
         timeout: float = 2.0, now: float | None = None) -> Sample:
    """One sample: vLLM's counters from ``metrics_url`` (None: no vLLM to read) and
    the GPUs' from ``gpu`` (a snapshot taken now, or the function that takes it;
    None: not read). A function is called after vLLM answered, so that the energy
    counter is read next to the sample's time: a slow ``/metrics`` does not stretch
    the time between them."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if metrics_url is None:
        sources["vllm"] = "not configured"
    else:
        values.update(_vllm_counters(metrics_url, timeout, sources))
    if callable(gpu):
        gpu = gpu()
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
    configured vLLM (the first enabled service whose check is ``vllm``) and the GPUs
    that serve it: this host's through NVML (``nvml``: None is NVML itself, as
    :func:`sparkops.meters.gpu.snapshot`), or, with ``usage.gpu_remote``, another
    host's through ``nvidia-smi`` over SSH (``gpu_remote``)."""

    metrics_url: str | None
    timeout: float = 2.0
    nvml: Any = None
    gpu_remote: str | None = None
    settings: Settings | None = field(default=None, compare=False)

    @classmethod
    def of(cls, settings: Settings) -> Meter | None:
        """The host's meter, or None when ``usage.meter`` is off."""
        if not settings["usage.meter"]:
            return None
        remote = settings["usage.gpu_remote"] or None
        vllm = next((s for s in settings.services if s.check == "vllm" and s.enabled and s.url), None)
        if vllm is None:
            return cls(metrics_url=None, gpu_remote=remote, settings=settings)
        return cls(metrics_url=f"{vllm.url.rstrip('/')}/metrics", timeout=min(2.0, vllm.timeout_seconds),
                   gpu_remote=remote, settings=settings)

    def read(self, *, now: float | None = None) -> Sample:
        snap = self._remote_gpus if self.gpu_remote else (lambda: gpu.snapshot(self.nvml))
        return read(metrics_url=self.metrics_url, gpu=snap, timeout=self.timeout, now=now)

    def _remote_gpus(self) -> GpuSnapshot:
        """The energy counters of ``gpu_remote``'s GPUs, read over SSH (host key verified)."""
        from sparkops.meters import gpu_smi
        from sparkops.net import ssh

        assert self.settings is not None and self.gpu_remote is not None
        name, taken = self.gpu_remote, clock.now()
        try:
            spec = self.settings.remote(name)
            with ssh.connect(self.settings, name) as conn:
                done = conn.run(gpu_smi.energy_argv(spec.nvidia_smi),
                                timeout=self.settings["remote.io_timeout_seconds"])
        except (SparkOpsError, OSError) as exc:
            return GpuSnapshot(False, f"cannot read {name}'s GPUs over SSH: {exc}", taken_at=taken)
        if done.returncode != 0:
            said = (done.stdout.strip() or done.stderr.strip() or "no output").splitlines()[0][:200]
            return GpuSnapshot(False, f"nvidia-smi on {name} exited {done.returncode}: {said}", taken_at=taken)
        return gpu_smi.parse_energy(done.stdout, taken_at=taken, host=name)
