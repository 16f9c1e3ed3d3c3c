"""``paystream bench orders``: the order path, measured as a user runs it.

Only a broker is needed.  The bench process starts our schema registry on a
thread (:class:`~streams.devtools.registry_runner.RegistryThread`, the test
suite's runner, on a private ``_schemas`` topic and a free port), then runs
the chosen parts, each on topics, groups and a state directory of its own;
the worker under test, the drivers and the baselines are processes of their
own.  At the end every topic and consumer group of the run is deleted.

Parts (``--parts``, by name or number):

1. ``lifecycle``: ours vs raw-with-state vs raw-without-state (:mod:`.lifecycle`)
2. ``deadlines``: order.expired lag for a burst and for many pending (:mod:`.deadlines`)
3. ``memory``: RSS, warm restart, cold recovery with many orders (:mod:`.memory`)
4. ``failover``: SIGKILL + restart -> partitions served again (:mod:`.failover`)
5. ``metrics``: the lifecycle with Prometheus metrics on vs off (:mod:`.metrics_overhead`);
   not in the default parts: ``--parts metrics``

Prints numbers, asserts nothing about speed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from streams.devtools.bench.common import BenchRun
from streams.devtools.bench.deadlines import DeadlineOptions, run_deadlines
from streams.devtools.bench.failover import run_failover
from streams.devtools.bench.lifecycle import LifecycleOptions, run_lifecycle
from streams.devtools.bench.memory import run_memory
from streams.devtools.bench.metrics_overhead import MetricsOptions, run_metrics
from streams.settings import Settings

PARTS = ("lifecycle", "deadlines", "memory", "failover", "metrics")


@dataclasses.dataclass(frozen=True)
class OrdersOptions:
    parts: tuple[str, ...] = PARTS
    duration: float = 30.0
    warmup: float = 10.0
    concurrency: int = 200
    raw_client: str = "aiokafka"
    burst: int = 10_000
    burst_span: float = 5.0
    deadlines: int = 100_000
    deadline_span: float = 1800.0
    expiry_window: float = 30.0
    table_orders: int = 1_000_000
    kills: int = 3
    rounds: int = 2  # metrics: pairs of rounds (on, off), order alternating


#: ``--quick``: a smoke run of every part in a few minutes, numbers not meant to be quoted.
QUICK = {"duration": 5.0, "warmup": 2.0, "burst": 1_000, "deadlines": 5_000, "deadline_span": 300.0,
         "expiry_window": 10.0, "table_orders": 20_000, "kills": 1}


def parse_parts(text: str) -> tuple[str, ...]:
    """``lifecycle,2`` -> ("lifecycle", "deadlines"); unknown names raise ValueError."""
    chosen = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name = PARTS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(PARTS) else item
        if name not in PARTS:
            raise ValueError(f"unknown part {item!r}: choose from {', '.join(PARTS)} (or 1-{len(PARTS)})")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


def run_orders(settings: Settings, options: OrdersOptions) -> int:
    """Run the parts; print their numbers; 0 unless a part failed."""
    started = time.perf_counter()
    run, registry = BenchRun.start(settings)
    tag = run.tag
    print(f"run {tag}: registry {registry.url} (topic {tag}-_schemas) in this process; state in "
          f"{run.state_root}; parts: {', '.join(options.parts)}", flush=True)
    failures = 0

    def attempt(title: str, body: Callable[[], object]) -> None:
        nonlocal failures
        print(f"\n== {title}", flush=True)
        began = time.perf_counter()
        try:
            body()
        except Exception as exc:
            failures += 1
            print(f"  FAILED: {type(exc).__name__}: {exc}")
        print(f"  (part took {time.perf_counter() - began:.1f} s)", flush=True)

    try:
        for part in options.parts:
            if part == "lifecycle":
                attempt("lifecycle: order lifecycles, ours vs raw loops", lambda: run_lifecycle(
                    run, LifecycleOptions(options.concurrency, options.warmup, options.duration,
                                          options.raw_client)))
            elif part == "deadlines":
                attempt("deadlines: order.expired lag", lambda: run_deadlines(run, DeadlineOptions(
                    options.burst, options.burst_span, options.deadlines, options.deadline_span,
                    options.expiry_window)))
            elif part == "memory":
                attempt(f"memory: a worker with {options.table_orders:,} orders",
                        lambda: run_memory(run, options.table_orders))
            elif part == "metrics":
                attempt(f"metrics: order lifecycles with metrics on vs off, {2 * options.rounds} rounds",
                        lambda: run_metrics(run, MetricsOptions(options.concurrency, options.warmup,
                                                                options.duration, options.rounds)))
            elif part == "failover":
                attempt(f"failover: SIGKILL + immediate restart, {options.kills} times",
                        lambda: run_failover(run, options.kills))
    finally:
        run.close(registry)
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0
