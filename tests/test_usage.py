"""A run's usage from the host's meters (``sparkops/watch/meter.py``,
``sparkops/sprint/usage.py``): vLLM's counters read over real HTTP from a server on
loopback whose counters the test moves, the GPU's energy counter through the NVML
fake (the one edge without a local stand-in), the clock passed in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from sparkops.meters import gpu, ledger
from sparkops.meters.nvml_fake import FakeDevice, FakeNvml
from sparkops.meters.sample import Sample
from sparkops.meters.sample import read as read_sample
from sparkops.meters.usage import Usage, attribute, increase
from sparkops.storage.schema import ops_meter_samples


class Counters:
    """What the stand-in vLLM has counted; two models, so the sums are tested too."""

    def __init__(self) -> None:
        self.prompt = {"a": 0.0, "b": 0.0}
        self.generation = {"a": 0.0, "b": 0.0}
        self.requests = 0.0
        self.status = 200

    def text(self) -> str:
        lines = ["# HELP vllm:prompt_tokens_total Number of prefill tokens processed."]
        lines += [f'vllm:prompt_tokens_total{{engine="0",model_name="{m}"}} {v}' for m, v in self.prompt.items()]
        lines += [f'vllm:generation_tokens_total{{engine="0",model_name="{m}"}} {v}'
                  for m, v in self.generation.items()]
        lines += [f'vllm:request_success_total{{finished_reason="stop",model_name="a"}} {self.requests}',
                  'vllm:request_success_total{finished_reason="length",model_name="a"} 0',
                  'vllm:num_requests_running{model_name="a"} 1']
        return "\n".join(lines) + "\n"

    def advance(self, prompt: float, generation: float, requests: float) -> None:
        self.prompt["a"] += prompt / 2
        self.prompt["b"] += prompt / 2
        self.generation["a"] += generation
        self.requests += requests

    def restart(self) -> None:
        self.__init__()


@pytest.fixture
def vllm() -> Iterator[tuple[Counters, str]]:
    counters = Counters()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = counters.text().encode() if self.path == "/metrics" else b""
            self.send_response(counters.status if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield counters, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


class Gpu:
    """A GB10-like device whose energy counter (mJ) and utilization the test sets."""

    def __init__(self) -> None:
        self.energy_mj = 5_000_000
        self.util = 0
        self.nvml = FakeNvml(FakeDevice(name="NVIDIA GB10", memory=(0, 0, 0),
                                        energy_mj=lambda: self.energy_mj, util=lambda: self.util))

    def snapshot(self) -> gpu.GpuSnapshot:
        return gpu.snapshot(self.nvml, now=0)


def sample(vllm_url: str | None, device: Gpu | None, at: float) -> Sample:
    return read_sample(metrics_url=vllm_url, gpu=device.snapshot() if device else None, now=at)


def test_one_run_at_a_time_gets_exactly_the_counters_increase(vllm):
    counters, url = vllm
    device = Gpu()
    samples = [sample(url, device, 100.0)]          # the run starts
    counters.advance(prompt=1200, generation=300, requests=2)
    device.energy_mj += 36_000_000                   # 36 kJ = 10 Wh
    device.util = 80
    samples.append(sample(url, device, 130.0))       # a heartbeat
    counters.advance(prompt=800, generation=200, requests=1)
    device.energy_mj += 18_000_000
    samples.append(sample(url, device, 160.0))       # the run ends
    counters.advance(prompt=5000, generation=5000, requests=9)  # after it: someone else's
    device.energy_mj += 99_000_000
    samples.append(sample(url, device, 200.0))

    usage = attribute(samples, {7: (100.0, 160.0)})[7]

    assert samples[0].sources == {"vllm": "ok", "gpu": "ok"}
    assert (usage.prompt_tokens, usage.generation_tokens, usage.requests) == (2000, 500, 3)
    assert usage.energy_j == pytest.approx(54_000) and usage.energy_wh == pytest.approx(15.0)
    assert usage.gpu_seconds == pytest.approx(0.4 * 30 + 0.8 * 30)  # utilization 0 -> 80 -> 80
    assert (usage.seconds, usage.estimated, usage.resets, usage.unmeasured) == (60.0, False, 0, set())


def test_two_runs_at_once_share_each_stretch_and_the_shares_add_up(vllm):
    counters, url = vllm
    samples = [sample(url, None, 0.0)]
    counters.advance(prompt=100, generation=100, requests=1)    # run 1 alone
    samples.append(sample(url, None, 10.0))
    counters.advance(prompt=400, generation=200, requests=2)    # runs 1 and 2
    samples.append(sample(url, None, 20.0))
    counters.advance(prompt=60, generation=30, requests=3)      # run 2 alone
    samples.append(sample(url, None, 30.0))

    found = attribute(samples, {1: (0.0, 20.0), 2: (10.0, 30.0)})

    assert found[1].prompt_tokens == 100 + 200 and found[2].prompt_tokens == 200 + 60
    assert found[1].prompt_tokens + found[2].prompt_tokens == 560  # every token is someone's
    assert found[1].generation_tokens + found[2].generation_tokens == 330
    assert found[1].requests + found[2].requests == 6
    assert found[1].estimated and found[2].estimated
    assert found[1].energy_j is None and "energy_j" in found[1].unmeasured  # no GPU read: not measured


def test_a_run_that_starts_inside_a_stretch_gets_its_part_by_time(vllm):
    counters, url = vllm
    samples = [sample(url, None, 0.0)]
    counters.advance(prompt=1000, generation=0, requests=0)
    samples.append(sample(url, None, 40.0))

    found = attribute(samples, {3: (30.0, None)})  # started at 30, still running

    assert found[3].prompt_tokens == pytest.approx(250) and found[3].estimated
    assert found[3].seconds == 10.0


def test_a_vllm_restart_in_the_middle_counts_from_zero_and_is_said(vllm):
    counters, url = vllm
    samples = [sample(url, None, 0.0)]
    counters.advance(prompt=900, generation=90, requests=3)
    samples.append(sample(url, None, 10.0))
    counters.restart()                                   # vLLM restarted: counters from 0
    counters.advance(prompt=50, generation=5, requests=1)
    samples.append(sample(url, None, 20.0))

    usage = attribute(samples, {4: (0.0, 20.0)})[4]

    assert (usage.prompt_tokens, usage.generation_tokens, usage.requests) == (950, 95, 4)
    assert usage.resets == 1 and not usage.estimated
    assert increase(10, 3) == (3, True) and increase(3, 10) == (7, False) and increase(None, 3) == (None, False)


def test_a_run_killed_keeps_what_it_used_up_to_its_last_sample(vllm):
    counters, url = vllm
    samples = [sample(url, None, 0.0)]
    counters.advance(prompt=300, generation=30, requests=1)
    samples.append(sample(url, None, 15.0))              # its last heartbeat; then kill -9
    counters.advance(prompt=7000, generation=700, requests=9)  # nobody's: no later sample of it

    usage = attribute(samples, {5: (0.0, None)})[5]

    assert (usage.prompt_tokens, usage.generation_tokens, usage.requests) == (300, 30, 1)


def test_no_source_is_not_measured_never_zero(vllm):
    counters, url = vllm
    no_vllm = [read_sample(metrics_url=None, gpu=None, now=t) for t in (0.0, 10.0)]
    assert no_vllm[0].sources == {"vllm": "not configured", "gpu": "not read"}
    usage = attribute(no_vllm, {6: (0.0, 10.0)})[6]
    assert usage == Usage(seconds=10.0, unmeasured={"prompt_tokens", "generation_tokens", "requests",
                                                     "energy_j", "gpu_seconds"})

    counters.status = 500
    failing = read_sample(metrics_url=url, gpu=None, now=0)
    assert failing.prompt_tokens is None and failing.sources["vllm"] == f"{url} answered 500"
    gone = read_sample(metrics_url="http://127.0.0.1:9/metrics", gpu=None, timeout=1, now=0)
    assert gone.prompt_tokens is None and gone.sources["vllm"].startswith("no answer at http://127.0.0.1:9/metrics")


def test_a_gpu_without_an_energy_counter_says_so_and_still_gives_its_busy_time():
    nvml = FakeNvml(FakeDevice(util=50))  # the fake's default: energy not supported
    snap = gpu.snapshot(nvml, now=0)
    assert snap.devices[0].energy_j is None and not any("energy" in n for n in snap.devices[0].notes)
    first, second = (read_sample(metrics_url=None, gpu=snap, now=t) for t in (0.0, 20.0))
    assert first.sources["gpu"] == "no energy counter" and first.energy_j is None
    usage = attribute([first, second], {8: (0.0, 20.0)})[8]
    assert usage.energy_j is None and usage.gpu_seconds == pytest.approx(10.0)


def test_a_sample_round_trips_through_its_stored_form():
    one = Sample(at=12.5, prompt_tokens=3.0, energy_j=7.25, sources={"vllm": "ok", "gpu": "no GPU"})
    assert Sample.from_dict(one.as_dict()) == one
    assert Sample.from_dict({"at": "x", "prompt_tokens": True, "sources": "nope"}) == Sample(at=0.0)


# -- kept in the ops database, on SQLite and PostgreSQL ------------------------------------


def counted(at: float, prompt: float, energy_j: float | None = None) -> Sample:
    return Sample(at=at, prompt_tokens=prompt, generation_tokens=prompt / 10, requests=prompt / 100,
                  energy_j=energy_j, sources={"vllm": "ok"})


def test_a_runs_usage_is_kept_at_each_sample_and_ends_exact(store):
    ops = store.ops
    first = ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(100.0, 1000, 500.0))
    assert first.prompt_tokens is None  # one sample: nothing counted yet
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(130.0, 1600, 4100.0))   # heartbeat
    ended = ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(160.0, 2000, 7700.0), ended=True)

    assert (ended.prompt_tokens, ended.generation_tokens, ended.requests) == (1000, 100, 10)
    assert ended.energy_j == pytest.approx(7200.0) and ended.energy_wh == pytest.approx(2.0)
    assert not ended.estimated and ended.seconds == 60.0
    assert ledger.of_runs(ops, [1, 99]) == {1: ended}
    ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(170.0, 2500))  # the next run
    assert ledger.of_runs(ops, [1])[1] == ended  # an ended run's usage does not move


def test_two_runs_on_one_host_share_and_a_killed_one_keeps_its_last_heartbeat(store):
    ops = store.ops
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(0.0, 0))
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(10.0, 100))     # run 1 alone
    ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(10.0, 100))     # run 2 starts
    ledger.record(ops, run_id=9, task_id="t_x", host="other", sample=counted(12.0, 999_999))  # another host
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(20.0, 500))     # a heartbeat of 1
    one = ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(30.0, 700), ended=True)
    two = ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(40.0, 760))  # then killed -9

    assert one.prompt_tokens == 100 + 400 / 2 + 200 / 2 and one.estimated
    assert two.prompt_tokens == 400 / 2 + 200 / 2 + 60
    assert one.prompt_tokens + two.prompt_tokens == 760  # every token is someone's
    assert ledger.of_runs(ops, [2])[2] == two  # what run 2 used up to its last sample stays


def test_a_heartbeat_adds_its_stretch_and_agrees_with_counting_the_whole_run(store):
    """Heartbeats add only their new stretches (the cost stays flat however long the
    run); what they add up to is what counting all the samples again gives."""
    ops = store.ops
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(0.0, 0, 0.0))
    ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(5.0, 50, 50.0))  # shares from 5 s on
    kept = []
    for n, at in enumerate((10.0, 20.0, 30.0, 40.0), start=1):
        prompt = 100.0 * n * n
        kept.append(ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(at, prompt, prompt)))
        ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(at + 1, prompt + 10, prompt + 10))
    samples = [counted(0.0, 0, 0.0), counted(5.0, 50, 50.0)] + [
        s for n, at in enumerate((10.0, 20.0, 30.0, 40.0), start=1)
        for s in (counted(at, 100.0 * n * n, 100.0 * n * n), counted(at + 1, 100.0 * n * n + 10, 100.0 * n * n + 10))]
    for heartbeat, at in zip(kept, (10.0, 20.0, 30.0, 40.0)):
        whole = attribute([s for s in samples if s.at <= at], {1: (0.0, None), 2: (5.0, None)})[1]
        assert heartbeat.prompt_tokens == pytest.approx(whole.prompt_tokens)
        assert heartbeat.energy_j == pytest.approx(whole.energy_j) and heartbeat.seconds == whole.seconds
        assert heartbeat.estimated == whole.estimated
    end = ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(50.0, 2000, 2000.0), ended=True)
    assert end.prompt_tokens == pytest.approx(attribute(samples + [counted(50.0, 2000, 2000.0)],
                                                        {1: (0.0, 50.0), 2: (5.0, None)})[1].prompt_tokens)


def test_old_samples_go_unless_an_open_run_still_needs_them(store):
    ops = store.ops
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(0.0, 0))
    ledger.record(ops, run_id=1, task_id="t_a", host="h", sample=counted(10.0, 100), ended=True)
    ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(20.0, 200))   # still open
    ledger.record(ops, run_id=2, task_id="t_b", host="h", sample=counted(30.0, 300))
    ledger.record(ops, run_id=3, task_id="t_c", host="dead", sample=counted(5.0, 0))   # its worker died unseen
    ledger.record(ops, run_id=4, task_id="t_d", host="other", sample=counted(1.0, 0))  # another host's, open
    ledger.record(ops, run_id=4, task_id="t_d", host="other", sample=counted(26.0, 50))

    def kept() -> list[tuple[str, float]]:
        with ops.read() as conn:
            return sorted(conn.execute(select(ops_meter_samples.c.host, ops_meter_samples.c.at)).all())
    assert ledger.prune(ops, before=25.0) == 3  # run 1's two (ended), the dead worker's
    assert kept() == [("h", 20.0), ("h", 30.0), ("other", 1.0), ("other", 26.0)]  # runs 2 and 4 from their first
    assert ledger.of_runs(ops, [1])[1].prompt_tokens == 100  # an ended run's usage stays with it
    ledger.close(ops, 2)
    assert ledger.prune(ops, before=25.0) == 1 and kept() == [("h", 30.0), ("other", 1.0), ("other", 26.0)]
