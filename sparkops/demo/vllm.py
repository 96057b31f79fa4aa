"""The demo's model server: a stand-in for vLLM's HTTP API, for ``up --demo``.

    python -m sparkops demo-vllm --port PORT [--hang-every 900] [--hang-for 75]

It answers on loopback what SparkOps' vLLM check reads: ``/health`` (200),
``/metrics`` (requests running = the demo agents at work, generation tokens
advancing with them) and ``/v1/models`` (one model, named as a demo). Every
``--hang-every`` seconds it hangs for ``--hang-for`` seconds, the way a real vLLM
engine hangs: requests stay "running" while the token counter stands still, so the
watchdog sees it down, alerts, and sees it back. The GPU memory it "holds" is the
simulated GB10's (:func:`sparkops.meters.nvml_fake.demo_gb10`).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sparkops.meters.nvml_fake import demo_processes

MODEL = "Qwen3-Coder-30B-A3B (demo)"
#: Tokens a working agent's requests generate per second, the prompt tokens they
#: read per second, and the requests each finishes per second.
TOKENS_PER_AGENT_SECOND = 42
PROMPT_TOKENS_PER_AGENT_SECOND = 380
REQUESTS_PER_AGENT_SECOND = 0.25


class Engine:
    """The simulated engine's state, with the clock as a parameter: ``running()``
    (the requests in flight) and the generation-token counter, frozen while hung."""

    def __init__(self, *, hang_every: float, hang_for: float, clock: Callable[[], float] = time.monotonic,
                 agents: Callable[[], int] = lambda: len(demo_processes()[1])):
        self.hang_every, self.hang_for, self.clock, self.agents = hang_every, hang_for, clock, agents
        self.started = clock()
        self.tokens = 1_000_000.0
        self.prompt_tokens = 9_000_000.0
        self.requests = 20_000.0
        self.last = self.started
        self.lock = threading.Lock()

    def hung(self) -> bool:
        """Hung for ``hang_for`` seconds at the end of every ``hang_every`` seconds."""
        if self.hang_every <= 0:
            return False
        return (self.clock() - self.started) % self.hang_every >= self.hang_every - self.hang_for

    def metrics(self) -> tuple[int, float]:
        """(requests running, generation tokens so far)."""
        with self.lock:
            now = self.clock()
            hung = self.hung()
            running = max(2, self.agents()) if hung else self.agents()
            if not hung:
                elapsed = now - self.last
                self.tokens += elapsed * (TOKENS_PER_AGENT_SECOND * running + 3)
                self.prompt_tokens += elapsed * PROMPT_TOKENS_PER_AGENT_SECOND * running
                self.requests += elapsed * REQUESTS_PER_AGENT_SECOND * running
            self.last = now
            return running, self.tokens


def handler_for(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args) -> None:  # quiet
            pass

        def reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/health":
                self.reply(200, b"")
            elif self.path == "/metrics":
                running, tokens = engine.metrics()
                labels = f'engine="0",model_name="{MODEL}"'
                self.reply(200, (
                    "# HELP vllm:num_requests_running Number of requests running (demo).\n"
                    f"vllm:num_requests_running{{{labels}}} {running}\n"
                    f"vllm:num_requests_waiting{{{labels}}} 0\n"
                    f"vllm:generation_tokens_total{{{labels}}} {tokens:.1f}\n"
                    f"vllm:prompt_tokens_total{{{labels}}} {engine.prompt_tokens:.1f}\n"
                    f"vllm:request_success_total{{{labels}}} {int(engine.requests)}\n").encode())
            elif self.path == "/v1/models":
                self.reply(200, json.dumps({"data": [{"id": MODEL, "object": "model"}]}).encode(),
                           "application/json")
            else:
                self.reply(404, b"")
    return Handler


def serve(port: int, engine: Engine) -> ThreadingHTTPServer:
    """The server on 127.0.0.1:``port`` (not started)."""
    return ThreadingHTTPServer(("127.0.0.1", port), handler_for(engine))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, required=True, help="the loopback port to answer on")
    parser.add_argument("--hang-every", type=float, default=900.0,
                        help="hang once every this many seconds (0: never); default 900")
    parser.add_argument("--hang-for", type=float, default=75.0, help="how long a hang lasts; default 75")


def run(args: argparse.Namespace) -> int:
    server = serve(args.port, Engine(hang_every=args.hang_every, hang_for=min(args.hang_for, args.hang_every)))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
