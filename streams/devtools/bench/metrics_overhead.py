"""Part ``metrics``: the order lifecycle with Prometheus metrics on vs off, one run.

The same closed-loop driver as :mod:`.lifecycle` drives a ``paystream worker``
subprocess running the order path only (as there), started with
``PAYSTREAM_METRICS=on`` or ``off`` (the only difference), in rounds ordered
on, off, off, on, ... so a drift of the machine during the run weighs on both
sides alike. Each round has topics, group and state of its own. While metrics
are on, ``/metrics`` is scraped every second during the round (what Prometheus
would do, more often than its default 15 s), so the collectors' cost is in the
number too; with them off, ``/metrics`` must answer 404.

Reports input events/s per round, the mean of each side and the ratio
on / off (the issue's target: >= 0.97), worker CPU per input on each side,
the time a scrape took, and, measured in this process without a broker, what
the kernel's hooks cost per batch (:func:`hook_cost`): on a shared machine
the throughput of single rounds varies far more than the hooks cost, and
the in-process figure is the steadier one.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
import types
import urllib.error
import urllib.request
from typing import Any

from streams.devtools.bench.common import (
    BenchRun,
    Prober,
    Stalled,
    cpu_seconds,
    create_part_topics,
    start_worker,
    wait_caught_up,
)
from streams.devtools.bench.driver import DriverSpec, driver_main
from streams.devtools.bench.lifecycle import ORDERS_ONLY, run_child

#: Seconds between two scrapes of ``/metrics`` while a metrics-on round is driven.
SCRAPE_EVERY = 1.0


@dataclasses.dataclass(frozen=True)
class MetricsOptions:
    concurrency: int
    warmup: float
    duration: float
    rounds: int = 2  # pairs of rounds: on, off, then off, on, ...


@dataclasses.dataclass
class Round:
    mode: str
    inputs_per_s: float
    cpu_s: float
    inputs: int
    scrapes: int
    scrape_bytes: int
    scrape_seconds: float


class Scraper:
    """GET ``url`` every :data:`SCRAPE_EVERY` seconds on a thread until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.count = 0
        self.size = 0
        self.seconds = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY):
            began = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    self.size = len(answer.read())
                    self.count += 1
                    self.seconds += time.perf_counter() - began
            except OSError as exc:
                self.failures.append(repr(exc))


def metrics_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def run_round(run: BenchRun, options: MetricsOptions, mode: str, index: int) -> Round:
    settings = run.settings(f"metrics-{index}-{mode}", metrics=mode, domains=ORDERS_ONLY)
    create_part_topics(settings)
    prober = Prober(settings)
    worker = None
    url = f"http://127.0.0.1:{settings.worker_web_port}/metrics"
    try:
        worker, ready = start_worker(settings, prober)
        prober.close()
        status = metrics_status(url)
        if status != (200 if mode == "on" else 404):
            raise Stalled(f"metrics {mode}: GET /metrics answered {status}")
        print(f"  round {index + 1} metrics {mode}: worker pid {worker.pid} serving after {ready:.1f} s; "
              "driving", flush=True)
        spec = DriverSpec(settings, options.concurrency, options.warmup, options.duration)
        budget = spec.start_timeout + options.warmup + options.duration + spec.drain_timeout + 120
        cpu = cpu_seconds(worker.pid)
        scraper = Scraper(url)
        if mode == "on":
            with scraper:
                driver: dict[str, Any] = run_child(driver_main, (spec,), "bench-driver", budget)
        else:
            driver = run_child(driver_main, (spec,), "bench-driver", budget)
        wait_caught_up(settings, worker, timeout=300)
        cpu = cpu_seconds(worker.pid) - cpu
        worker.assert_running()
        if scraper.failures:
            raise Stalled(f"metrics scrapes failed: {scraper.failures[:3]}")
    finally:
        if worker is not None:
            worker.stop()
    return Round(mode, driver["inputs_per_s"], cpu, driver["inputs_total"], scraper.count, scraper.size,
                 scraper.seconds)


def hook_cost(batch: int, repeat: int = 2_000) -> float:
    """Seconds the kernel's hooks (``taken`` + ``done``) take for one batch of ``batch`` inputs.

    The orders agent's shape: inputs on three topics, 1.5 outgoing records
    per input on five, one row per input, the deadline table's histograms.
    """
    from streams import metrics

    class App:
        tables = None
        _consumer = None

    app = App()
    worker = metrics.WorkerMetrics(app)
    hooks = worker.agent("order_events", dead_letter_topic="dead-letters",
                         deadlines=types.SimpleNamespace(name="order-deadlines", table=None))
    inputs = ("order-commands", "payment.intent.created", "payment.completed")
    outputs = ("order.created", "order.payment_pending", "order.completed", "user-order-index",
               "orders-changelog")
    events = [types.SimpleNamespace(message=types.SimpleNamespace(topic=inputs[i % 3])) for i in range(batch)]
    outgoing = [types.SimpleNamespace(topic=outputs[i % 5], headers=None) for i in range(batch * 3 // 2)]
    slots = [types.SimpleNamespace(fired=()) for _ in range(batch)]
    began = time.perf_counter()
    for _ in range(repeat):
        hooks.taken(events)
        hooks.done(outgoing, slots, 0.001, 0.002, 0.003)
    return (time.perf_counter() - began) / repeat


def run_metrics(run: BenchRun, options: MetricsOptions) -> dict[str, float]:
    """Alternate metrics on/off rounds; print each and the ratio of the means."""
    modes = []
    for pair in range(options.rounds):
        modes.extend(("on", "off") if pair % 2 == 0 else ("off", "on"))
    rounds = [run_round(run, options, mode, index) for index, mode in enumerate(modes)]
    print(f"\n  closed loop, {options.concurrency} lifecycles in flight, warm-up {options.warmup:g} s, "
          f"measured {options.duration:g} s per round; /metrics scraped every {SCRAPE_EVERY:g} s when on")
    print(f"  {'round':<7} {'metrics':<8} {'input events/s':>14} {'worker CPU s':>13} {'us/input':>9} "
          f"{'scrapes':>8} {'bytes/scrape':>13}")
    for index, r in enumerate(rounds, start=1):
        print(f"  {index:<7} {r.mode:<8} {r.inputs_per_s:>14,.0f} {r.cpu_s:>13.1f} "
              f"{1e6 * r.cpu_s / max(r.inputs, 1):>9,.0f} {r.scrapes:>8} {r.scrape_bytes:>13,}")
    on = [r.inputs_per_s for r in rounds if r.mode == "on"]
    off = [r.inputs_per_s for r in rounds if r.mode == "off"]
    cpu_on = [1e6 * r.cpu_s / max(r.inputs, 1) for r in rounds if r.mode == "on"]
    cpu_off = [1e6 * r.cpu_s / max(r.inputs, 1) for r in rounds if r.mode == "off"]
    ratio = statistics.mean(on) / max(statistics.mean(off), 1e-9)
    print(f"  metrics on / off, input events/s (mean of {len(on)} rounds each): {statistics.mean(on):,.0f} / "
          f"{statistics.mean(off):,.0f} = {ratio:.3f} (target >= 0.97); best of each: "
          f"{max(on) / max(max(off), 1e-9):.3f}")
    cpu_ratio = statistics.mean(cpu_on) / max(statistics.mean(cpu_off), 1e-9)
    print(f"  worker CPU per input: on {statistics.mean(cpu_on):,.0f} us, "
          f"off {statistics.mean(cpu_off):,.0f} us (on / off {cpu_ratio:.3f})")
    scraped = [r for r in rounds if r.scrapes]
    if scraped:
        per_scrape = sum(r.scrape_seconds for r in scraped) / sum(r.scrapes for r in scraped)
        print(f"  a scrape of /metrics: {1e3 * per_scrape:.1f} ms for {scraped[-1].scrape_bytes:,} bytes "
              "(HTTP included)")
    for batch in (10, 100, 1000):
        cost = hook_cost(batch)
        print(f"  kernel hooks in this process, a batch of {batch:>4}: {1e6 * cost:,.1f} us "
              f"({1e6 * cost / batch:.2f} us per input; the worker spends about "
              f"{statistics.mean(cpu_off):,.0f} us per input in all)")
    return {"ratio": ratio, "on": statistics.mean(on), "off": statistics.mean(off)}
