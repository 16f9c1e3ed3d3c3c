"""Part ``lifecycle``: order lifecycles through our worker against two raw loops, one run.

Three sides, measured one after the other with the same closed-loop driver
(:mod:`streams.devtools.bench.driver`) and the same inputs; each side and
the driver run in processes of their own, and the bench process only starts
them and reads end offsets:

- **ours**: a ``paystream worker`` subprocess running the order path
  (``PAYSTREAM_DOMAINS=orders``: the order and user-index agents, their
  tables and deadlines), as a worker deployed for orders would;
- **raw-with-state**: :mod:`streams.devtools.bench.raw` doing the same work
  per input, producing as many records per input of each role as ours did
  (measured just before from the end offsets of every topic of ours' run,
  changelogs included, see :func:`roles_of`): its index updates go to a topic
  it consumes itself and merges into index rows, as ours' second agent does;
- **raw-without-state**: the same loop without the rows, the index hop and
  the extra records.

Records produced per input = (end offsets after - before, summed over every
topic of the side, minus the inputs the driver wrote) / inputs.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from streams import catalog
from streams.devtools.bench.common import (
    ORDERS_ONLY,
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
from streams.devtools.bench.raw import OUTPUTS, IndexHop, RawSpec, raw_main
from streams.settings import Settings
from tables.order_index import USER_ORDERS

#: The user -> orders index table's changelog, as a suffix of its topic name
#: (Faust names it ``{app id}-{table}-changelog``).
INDEX_CHANGELOG_SUFFIX = f"-{USER_ORDERS.name}-changelog"


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


@dataclasses.dataclass(frozen=True)
class Roles:
    """Ours' records per input by role, for raw-with-state to produce as many of each.

    ``index_topic``/``index_changelog`` name ours' topics (without the run's
    prefix), or are None when ours produced none of that role.
    """

    index_topic: str | None
    index_per_input: float
    index_changelog: str | None
    index_rows_per_update: float
    unconsumed: dict[str, float]  # ours' topic -> records per input that nothing consumes in the run

    def lines(self) -> list[str]:
        hop = (f"index updates {self.index_per_input:.2f} per input to {self.index_topic}, consumed "
               f"by the loop itself, each merged into an index row and logged "
               f"{self.index_rows_per_update:.2f} times to mirror.{self.index_changelog}"
               if self.index_topic else "no index hop (ours produced no index updates)")
        rest = ", ".join(f"mirror.{topic} {rate:.2f}" for topic, rate in sorted(self.unconsumed.items()))
        return [hop, f"unconsumed per input: {rest or '-'}"]


def roles_of(ours: Side) -> Roles:
    """Sort ours' produced topics (outputs aside) into the index hop and the unconsumed rest.

    The subscription -> orders index would land in ``unconsumed``: the
    driver creates no subscription orders, so ours produces none of it.
    """
    inputs = max(ours.driver["inputs_total"], 1)
    outputs = set(OUTPUTS.values())
    index_topic = index_changelog = None
    index_count = changelog_count = 0
    unconsumed = {}
    for topic, count in ours.produced.items():
        if topic in outputs:
            continue
        if topic == catalog.USER_ORDER_INDEX:
            index_topic, index_count = topic, count
        elif topic.endswith(INDEX_CHANGELOG_SUFFIX):
            index_changelog, changelog_count = topic, count
        else:
            unconsumed[topic] = count / inputs
    if index_topic is None:  # index rows without index updates: nothing to merge, log them as rows
        if index_changelog is not None:
            unconsumed[index_changelog] = changelog_count / inputs
        return Roles(None, 0.0, None, 0.0, unconsumed)
    return Roles(index_topic, index_count / inputs, index_changelog or f"paystream{INDEX_CHANGELOG_SUFFIX}",
                 changelog_count / index_count, unconsumed)


#: What raw-with-state produces if ours failed: the rates ours' runs have shown
#: (an index update and an index row per input, an order row per input, a
#: deadline record for two inputs of three).
FALLBACK_ROLES = Roles(catalog.USER_ORDER_INDEX, 1.0, f"paystream{INDEX_CHANGELOG_SUFFIX}", 1.0,
                       {"paystream-orders-changelog": 1.0, "paystream-order-deadlines-changelog": 2 / 3})


def worker_producer_config(settings: Settings) -> tuple[dict[str, Any], int | None, float]:
    """The worker's Faust producer settings, max poll records and commit interval."""
    from streams.app import create_app

    conf = create_app(settings).conf  # built, never started
    producer = {"acks": conf.producer_acks, "linger_ms": int(conf.producer_linger * 1000),
                "compression": conf.producer_compression_type,
                "max_batch_size": conf.producer_max_batch_size}
    return producer, conf.broker_max_poll_records, float(conf.broker_commit_interval)


def run_ours(run: BenchRun, options: LifecycleOptions) -> Side:
    settings = run.settings("life-ours", domains=ORDERS_ONLY)
    create_part_topics(settings)
    prober = Prober(settings)
    worker = None
    try:
        worker, ready = start_worker(settings, prober)
        prober.close()
        print(f"  ours: worker pid {worker.pid} (PAYSTREAM_DOMAINS={ORDERS_ONLY}) serving after "
              f"{ready:.1f} s; driving", flush=True)
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


def run_raw(run: BenchRun, options: LifecycleOptions, *, roles: Roles | None,
            producer: dict[str, Any], max_records: int | None) -> Side:
    """raw-with-state with ``roles`` (ours' records per input by role), raw-without-state without."""
    from streams.admin import TopicSettings, ensure_topics

    state = roles is not None
    name = "raw-state" if state else "raw-plain"
    settings = run.settings(f"life-{name}")
    mirror_topics: tuple[tuple[str, float], ...] = ()
    index = None
    if roles is not None:
        mirror_topics = tuple((settings.topic(f"mirror.{topic}"), rate)
                              for topic, rate in sorted(roles.unconsumed.items()))
        if roles.index_topic is not None:
            index = IndexHop(settings.topic(roles.index_topic), roles.index_per_input,
                             settings.topic(f"mirror.{roles.index_changelog}"), roles.index_rows_per_update)
    names = [settings.topic(n) for n in (*OUTPUTS, *OUTPUTS.values())] + [t for t, _ in mirror_topics]
    if index is not None:
        names += [index.topic, index.changelog]
    ensure_topics(settings.kafka_bootstrap_servers, [TopicSettings(n, PARTITIONS) for n in names])
    spec = RawSpec(settings, state, options.raw_client, str(settings.state_dir / "rocksdb"), producer,
                   max_records if options.raw_client == "aiokafka" else (max_records or 500),
                   mirror_topics, index)
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
    """Ours, then raw-with-state (ours' records per input by role), then raw-without-state."""
    sides: list[Side] = []
    worker_settings = run.settings("life-ours")
    producer, max_records, commit_interval = worker_producer_config(worker_settings)
    print(f"  worker producer (Faust conf, used by the raw loops too): {producer}; "
          f"max poll records {max_records}; commit interval {commit_interval:g} s; "
          f"event loop {worker_settings.event_loop} on every side but the driver's", flush=True)
    try:
        ours = run_ours(run, options)
        sides.append(ours)
        roles = roles_of(ours)
    except Exception as exc:
        print(f"  ours FAILED: {exc}")
        roles = FALLBACK_ROLES
        print("  raw-with-state falls back to the records per input ours' runs have shown")
    for line in roles.lines():
        print(f"  raw-with-state, as ours: {line}", flush=True)
    for state in (True, False):
        try:
            sides.append(run_raw(run, options, roles=roles if state else None,
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
        if side.extra.get("index_handled"):
            produced = side.produced.get(catalog.USER_ORDER_INDEX, 0)
            print(f"    index updates read back and merged by the loop: {side.extra['index_handled']:,} "
                  f"of the {produced:,} it produced")
        if "rss_kib" in side.extra:
            print(f"    worker RSS at the end {side.extra['rss_kib'] / 1024:.0f} MiB "
                  f"(peak {side.extra['peak_kib'] / 1024:.0f} MiB)")
    print("\n  what still differs between ours and raw-with-state:")
    for line in differences(ours, by_name.get("raw-state"), commit_interval):
        print(f"    - {line}")
    print("  what still differs between ours and raw-without-state: all of the above, and it keeps no "
          "state (no RocksDB, no row JSON), has no index hop and produces exactly one record per input")


def differences(ours: Side | None, raw: Side | None, commit_interval: float) -> list[str]:
    lines = [
        "ours decides through the order state machine (validation, derived uuid5 event ids, "
        "applied-id lists, the deadline index); raw does a fixed dict update and a uuid4 event id",
        "ours runs Faust: agents, stream buffers, table wrappers, its own per-partition RocksDB options; "
        "raw uses one rocksdict DB per partition of each of its two tables (order rows, user index rows) "
        "with rocksdict's default options",
        "ours' extra records are its real changelog, index and deadline records (their own sizes, "
        "keys and partitions); raw produces as many per input of each role: the index update (the "
        "order summary JSON keyed by user id), the index row JSON keyed by user id, and its order row "
        "JSON keyed by order id standing for ours' order-row and deadline changelog records",
        "both consume their index updates and merge them into a user's index row (get, JSON decode, "
        "merge, encode, put, changelog record); ours in a second agent with its own stream, raw in the "
        "same consumer and loop as its inputs, its merge a plain dict update",
        "both put a deadline key in RocksDB when an order is created and delete it when it is paid; "
        "ours also runs the expiry timer over them",
        f"ours commits offsets on Faust's timer (every {commit_interval:g} s) after the acks; raw commits "
        "each batch's offsets (inputs and index topic) right after that batch's acks, without waiting "
        "for the commit",
        "ours hands a batch's records to aiokafka as one batch per partition (create_batch/send_batch, "
        "or appended to the partition's batch still waiting to be sent) and "
        "takes fetched records off its channel queue in lists; raw sends record by record (aiokafka "
        "send, or confluent produce) from the records getmany/consume returned; both on one producer "
        "with the worker's settings and await every ack of a batch before its offsets",
        "ours' consumer runs in Faust's consumer thread (its own event loop, records handed over per "
        "fetch); raw's aiokafka consumer runs in the loop's own thread",
        "ours writes a batch's rows and deadline keys into one RocksDB write batch per partition and "
        "records its changelog offsets in the store once a second; raw puts record by record and "
        "records no offsets",
        "the same: the event loop kind (PAYSTREAM_EVENT_LOOP) on both; ours runs the order path only "
        "(PAYSTREAM_DOMAINS=orders), raw consumes the driver's three inputs and its index topic",
    ]
    if ours and raw and abs(ours.records_per_input - raw.records_per_input) > 0.05:
        lines.append(f"records per input differ: ours {ours.records_per_input:.2f}, "
                     f"raw-with-state {raw.records_per_input:.2f}")
    return lines
