"""Part ``lifecycle``: order lifecycles through our worker against two raw loops, one run.

Three sides, measured one after the other with the same closed-loop driver
(:mod:`streams.devtools.bench.driver`) and the same inputs; each side and
the driver run in processes of their own, and the bench process only starts
them and reads end offsets:

- **ours**: a ``paystream worker`` subprocess with every agent;
- **raw-with-state**: :mod:`streams.devtools.bench.raw` doing the same work
  per input, producing as many records per input as ours did (measured just
  before from the end offsets of every topic of ours' run, changelogs
  included);
- **raw-without-state**: the same loop without the row and the extra records.

Records produced per input = (end offsets after - before, summed over every
topic of the side, minus the inputs the driver wrote) / inputs.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from streams.devtools.bench.common import (
    PARTITIONS,
    BenchRun,
    Prober,
    Stalled,
    cpu_seconds,
    create_part_topics,
    end_offsets,
    latency_line,
    percentile,
    start_worker,
    topics_with_prefix,
    wait_caught_up,
    wait_quiet,
)
from streams.devtools.bench.driver import INPUTS_PER_LIFECYCLE, DriverSpec, driver_main
from streams.devtools.bench.raw import OUTPUTS, RawSpec, raw_main
from streams.settings import Settings


@dataclasses.dataclass(frozen=True)
class LifecycleOptions:
    concurrency: int
    warmup: float
    duration: float
    raw_client: str


@dataclasses.dataclass
class Side:
    name: str
    label: str
    driver: dict[str, Any]
    produced: dict[str, int]  # topic (without prefix) -> records the side produced
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def records_per_input(self) -> float:
        return sum(self.produced.values()) / max(self.driver["inputs_total"], 1)


def run_child(target: Callable[..., None], args: tuple[Any, ...], name: str,
              timeout: float) -> dict[str, Any]:
    """Run ``target(*args, conn)`` in a spawned process; its one answer, or its error raised."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=target, args=(*args, send), name=name)
    child.start()
    send.close()
    try:
        deadline = time.monotonic() + timeout
        while not receive.poll(0.5):
            if not child.is_alive():
                raise Stalled(f"{name} exited with {child.exitcode} without an answer")
            if time.monotonic() > deadline:
                raise Stalled(f"{name} gave no answer within {timeout:.0f} s")
        answer: dict[str, Any] = receive.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    if "error" in answer:
        raise Stalled(f"{name}: {answer['error']}\n{answer.get('traceback', '')}")
    return answer


def _drive(settings: Settings, options: LifecycleOptions) -> dict[str, Any]:
    spec = DriverSpec(settings, options.concurrency, options.warmup, options.duration)
    budget = spec.start_timeout + options.warmup + options.duration + spec.drain_timeout + 120
    return run_child(driver_main, (spec,), "bench-driver", budget)


def _produced(settings: Settings, before: dict[str, int], after: dict[str, int],
              driver: dict[str, Any]) -> dict[str, int]:
    prefix = settings.topic_prefix
    produced = {}
    for topic, end in after.items():
        count = end - before.get(topic, 0) - driver["sent"].get(topic, 0)
        if count:
            produced[topic[len(prefix):]] = count
    return produced


def worker_producer_config(settings: Settings) -> tuple[dict[str, Any], int | None, float]:
    """The worker's Faust producer settings, max poll records and commit interval."""
    from streams.app import create_app

    conf = create_app(settings).conf  # built, never started
    producer = {"acks": conf.producer_acks, "linger_ms": int(conf.producer_linger * 1000),
                "compression": conf.producer_compression_type,
                "max_batch_size": conf.producer_max_batch_size}
    return producer, conf.broker_max_poll_records, float(conf.broker_commit_interval)


def run_ours(run: BenchRun, options: LifecycleOptions) -> Side:
    settings = run.settings("life-ours")
    create_part_topics(settings)
    prober = Prober(settings)
    worker = None
    try:
        worker, ready = start_worker(settings, prober)
        prober.close()
        print(f"  ours: worker pid {worker.pid} serving after {ready:.1f} s; driving", flush=True)
        topics = topics_with_prefix(settings)
        before = end_offsets(settings, topics)
        cpu = cpu_seconds(worker.pid)
        driver = _drive(settings, options)
        after = wait_caught_up(settings, worker, timeout=300)
        cpu = cpu_seconds(worker.pid) - cpu
        rss, peak = worker.rss_kib()
        worker.assert_running()
    finally:
        if worker is not None:
            worker.stop()
    return Side("ours", "ours (paystream worker)", driver, _produced(settings, before, after, driver),
                {"rss_kib": rss, "peak_kib": peak, "cpu_s": cpu})


def run_raw(run: BenchRun, options: LifecycleOptions, *, state: bool,
            mirror: dict[str, float], producer: dict[str, Any], max_records: int | None) -> Side:
    from streams.admin import TopicSettings, ensure_topics

    name = "raw-state" if state else "raw-plain"
    settings = run.settings(f"life-{name}")
    mirror_topics = tuple((settings.topic(f"mirror.{topic}"), rate) for topic, rate in sorted(mirror.items()))
    names = [settings.topic(n) for n in (*OUTPUTS, *OUTPUTS.values())] + [t for t, _ in mirror_topics]
    ensure_topics(settings.kafka_bootstrap_servers, [TopicSettings(n, PARTITIONS) for n in names])
    spec = RawSpec(settings, state, options.raw_client, str(settings.state_dir / "rocksdb"), producer,
                   max_records if options.raw_client == "aiokafka" else (max_records or 500),
                   mirror_topics)
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    stop = context.Event()
    child = context.Process(target=raw_main, args=(spec, send, stop), name=f"bench-{name}")
    child.start()
    send.close()
    try:
        if not receive.poll(120):
            raise Stalled(f"{name} loop not assigned within 120 s")
        hello = receive.recv()
        if hello != "ready":
            raise Stalled(f"{name}: {hello.get('error')}\n{hello.get('traceback', '')}")
        print(f"  {name}: loop pid {child.pid} ({options.raw_client}) assigned; driving", flush=True)
        topics = topics_with_prefix(settings)
        before = end_offsets(settings, topics)
        cpu = cpu_seconds(child.pid)
        driver = _drive(settings, options)
        after = wait_quiet(settings, topics)
        cpu = cpu_seconds(child.pid) - cpu
        stop.set()
        if not receive.poll(60):
            raise Stalled(f"{name} loop did not stop within 60 s")
        summary = receive.recv()
        if "error" in summary:
            raise Stalled(f"{name}: {summary['error']}\n{summary.get('traceback', '')}")
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    label = f"raw-with-state ({options.raw_client})" if state else f"raw-without-state ({options.raw_client})"
    return Side(name, label, driver, _produced(settings, before, after, driver), {**summary, "cpu_s": cpu})


def run_lifecycle(run: BenchRun, options: LifecycleOptions) -> list[Side]:
    """Ours, then raw-with-state (mirroring ours' records per input), then raw-without-state."""
    sides: list[Side] = []
    producer, max_records, commit_interval = worker_producer_config(run.settings("life-ours"))
    print(f"  worker producer (Faust conf, used by the raw loops too): {producer}; "
          f"max poll records {max_records}; commit interval {commit_interval:g} s", flush=True)
    mirror: dict[str, float] = {}
    try:
        ours = run_ours(run, options)
        sides.append(ours)
        outputs = set(OUTPUTS.values())
        inputs = ours.driver["inputs_total"]
        mirror = {topic: count / inputs for topic, count in ours.produced.items() if topic not in outputs}
    except Exception as exc:
        print(f"  ours FAILED: {exc}")
        mirror = {"paystream-orders-changelog": 1.0}
        print("  raw-with-state falls back to one extra (changelog) record per input")
    for state in (True, False):
        try:
            sides.append(run_raw(run, options, state=state, mirror=mirror if state else {},
                                 producer=producer, max_records=max_records))
        except Exception as exc:
            print(f"  {'raw-with-state' if state else 'raw-without-state'} FAILED: {exc}")
    report(sides, options, commit_interval)
    if len(sides) < 3:
        raise Stalled("a side of the lifecycle part failed (see above)")
    return sides


def report(sides: list[Side], options: LifecycleOptions, commit_interval: float) -> None:
    by_name = {side.name: side for side in sides}
    print(f"\n  closed loop, {options.concurrency} lifecycles in flight, warm-up {options.warmup:g} s, "
          f"measured {options.duration:g} s; {INPUTS_PER_LIFECYCLE} inputs per lifecycle (create command "
          "JSON, payment.intent.created Avro, payment.completed Avro)")
    print(f"  {'side':<34} {'input events/s':>14} {'lifecycles/s':>13} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'records/input':>14}")
    for side in sides:
        d = side.driver
        print(f"  {side.label:<34} {d['inputs_per_s']:>14,.0f} {d['lifecycles_per_s']:>13,.0f} "
              f"{percentile(d['end_to_end_ms'], 0.5):>9.1f} {percentile(d['end_to_end_ms'], 0.99):>9.1f} "
              f"{side.records_per_input:>14.2f}")
    ours = by_name.get("ours")
    for other, what in (("raw-state", "raw-with-state (the ratio that counts, target >= 0.8)"),
                        ("raw-plain", "raw-without-state (the client's limit)")):
        if ours and other in by_name:
            ratio = ours.driver["inputs_per_s"] / max(by_name[other].driver["inputs_per_s"], 1e-9)
            print(f"  ours / {what}: {ratio:.3f}")
    for side in sides:
        d = side.driver
        print(f"\n  {side.label}: {d['lifecycles_in_window']:,} lifecycles in the window "
              f"({d['outputs_in_window']:,} outputs), first lifecycle after {d['waited_for_first']:.1f} s, "
              f"{d['lifecycles_total']:,} started in all, {d['duplicates']} duplicate outputs seen")
        print(latency_line("lifecycle (create sent -> completed)", d["end_to_end_ms"]))
        for hop, label in (("create", "create -> order.created"),
                           ("intent", "intent -> order.payment_pending"),
                           ("payment", "payment -> order.completed")):
            print(latency_line(f"  hop {label}", d["hops_ms"][hop]))
        per_input = ", ".join(f"{topic} {count / max(d['inputs_total'], 1):.2f}"
                              for topic, count in sorted(side.produced.items()))
        print(f"    records produced per input: {side.records_per_input:.2f} = {per_input or '-'}")
        inputs = max(d["inputs_total"], 1)
        print(f"    CPU while driven: {side.extra['cpu_s']:.1f} s in the side's process "
              f"({1e6 * side.extra['cpu_s'] / inputs:,.0f} us per input), {d['cpu_s']:.1f} s in the driver "
              f"({1e6 * d['cpu_s'] / inputs:,.0f} us per input) for {inputs:,} inputs")
        if "rss_kib" in side.extra:
            print(f"    worker RSS at the end {side.extra['rss_kib'] / 1024:.0f} MiB "
                  f"(peak {side.extra['peak_kib'] / 1024:.0f} MiB)")
    print("\n  what still differs between ours and raw-with-state:")
    for line in differences(ours, by_name.get("raw-state"), commit_interval):
        print(f"    - {line}")
    print("  what still differs between ours and raw-without-state: all of the above, and it keeps no "
          "state (no RocksDB, no row JSON) and produces exactly one record per input")


def differences(ours: Side | None, raw: Side | None, commit_interval: float) -> list[str]:
    lines = [
        "ours decides through the order state machine (validation, derived uuid5 event ids, "
        "applied-id lists, the deadline index); raw does a fixed dict update and a uuid4 event id",
        "ours runs Faust: agents, stream buffers, table wrappers, its own per-partition RocksDB options; "
        "raw uses one rocksdict DB per input partition with rocksdict's default options",
        "ours' extra records are its real changelog, index and deadline records (their own sizes, "
        "keys and partitions); raw's extra records are its row JSON keyed by order id, to mirror topics",
        "ours also consumes what it produces to its internal topics (e.g. the user -> orders index "
        "feeds a second agent and its table); raw's mirror topics have no consumer",
        f"ours commits offsets on Faust's timer (every {commit_interval:g} s) after the acks; raw commits "
        "each batch's offsets right after that batch's acks, without waiting for the commit",
    ]
    if ours and raw and abs(ours.records_per_input - raw.records_per_input) > 0.05:
        lines.append(f"records per input differ: ours {ours.records_per_input:.2f}, "
                     f"raw-with-state {raw.records_per_input:.2f}")
    return lines
