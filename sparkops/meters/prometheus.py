"""vLLM's ``/metrics``: fetched straight from the server and read as Prometheus text.

The watchdog's vLLM check (:mod:`sparkops.watch.services`) reads the gauges (running
and waiting requests) and the generation-token counter to tell a hang; a run's
sample (:mod:`sparkops.meters.sample`) reads the token and request counters.
Several vLLM versions' names are listed, newest first.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

VLLM_RUNNING = ("vllm:num_requests_running",)
VLLM_WAITING = ("vllm:num_requests_waiting",)
VLLM_GENERATION_TOKENS = ("vllm:generation_tokens_total", "vllm:generation_tokens",
                          "vllm:num_generation_tokens_total", "vllm:num_generation_tokens")
VLLM_PROMPT_TOKENS = ("vllm:prompt_tokens_total", "vllm:prompt_tokens",
                      "vllm:num_prompt_tokens_total", "vllm:num_prompt_tokens")
VLLM_REQUESTS = ("vllm:request_success_total", "vllm:request_success")

#: Straight to the server: a proxy from the environment (http_proxy) must not stand
#: between SparkOps and a service on this machine.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float, headers: dict[str, str] | None = None,
             limit: int = 2_000_000) -> tuple[int, bytes]:
    """GET ``url``; the body is read within ``timeout`` seconds in all (a server
    that trickles its answer gets TimeoutError, not the patience of every read)."""
    request = urllib.request.Request(url, headers=headers or {})
    deadline = time.monotonic() + timeout
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            chunks, size = [], 0
            while size < limit:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} sent {size} bytes in {timeout:g}s and was still sending")
                chunk = response.read1(min(65536, limit - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return response.status, b"".join(chunks)
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each metric over its label sets: ``{name: value}``."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head = line.split(" ", 1)[0]
        if "{" in head:  # name{labels} value [timestamp]
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        try:
            values[name] = values.get(name, 0.0) + float(fields[0])
        except (IndexError, ValueError):
            continue
    return values


def first_of(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    """The value of the first of ``names`` that ``metrics`` has."""
    return next((metrics[n] for n in names if n in metrics), None)
