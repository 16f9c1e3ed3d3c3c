"""What every ``paystream bench orders`` part shares: the run, Kafka helpers, worker processes.

A run has a tag (``bench-<hex>``); every part gets its own topic prefix, app
id, consumer groups and state directory under it, and at the end every topic
and consumer group whose name starts with the tag is deleted.  The worker
under test always runs in a process of its own: ``paystream worker`` as a
subprocess (:class:`WorkerProcess`), or the app started in a spawned child
where the bench needs to look inside it (the memory part).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from streams import catalog
from streams.devtools.host import free_port
from streams.devtools.worker_process import WorkerSubprocess, settings_env
from streams.settings import Settings

PARTITIONS = catalog.EVENT_PARTITIONS
ITEMS = [{"product_id": "sku-1", "quantity": 2, "unit_amount": 1250}]
AMOUNT = 2500
CURRENCY = "EUR"

class Stalled(RuntimeError):
    """A part made no progress for too long (a stuck worker, a dead-lettered input)."""

#: The order parts run the order path only, as a worker deployed for it would:
#: the payment and subscription agents' idle partitions would otherwise ride
#: in every fetch, and the payment agent, reacting to order.created with no
#: Stripe to call, would retry its batches all along.
ORDERS_ONLY = "orders"


# ----------------------------------------------------------------------
# Numbers and the machine


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) - 1e-9)))
    return ordered[rank - 1]


def latency_line(label: str, values_ms: list[float], width: int = 36) -> str:
    return (f"  {label:<{width}}: p50 {percentile(values_ms, 0.5):8.1f} ms   "
            f"p99 {percentile(values_ms, 0.99):8.1f} ms   max {max(values_ms, default=float('nan')):8.1f} ms"
            f"   (n={len(values_ms):,})")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def kafka_version(settings: Settings) -> str:
    """The broker's version when it is ``paystream kafka``'s broker, else what is known."""
    from streams.devtools import localkafka

    try:
        local = localkafka.from_settings(settings.state_dir, settings.kafka_bootstrap_servers)
        if local.pid() is not None:
            return f"Apache Kafka {localkafka.KAFKA_VERSION} (paystream kafka, pid {local.pid()})"
    except (OSError, ValueError):
        pass
    return f"unknown (not paystream kafka's broker) at {settings.kafka_bootstrap_servers}"


def machine_line(settings: Settings) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"machine: {cores()} cores ({cpu_model()}), {platform.python_implementation()} "
            f"{platform.python_version()}, {kafka_version(settings)}; load average before the run "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def rss_kib(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in KiB, from /proc (0 when unknown)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    found[name] = int(value.split()[0])
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds process ``pid`` has used (its threads included), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def partition_of(key: bytes, partitions: int = PARTITIONS) -> int:
    """The partition Java's, aiokafka's and our producers' murmur2 partitioner picks."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


# ----------------------------------------------------------------------
# The run


@dataclasses.dataclass
class BenchRun:
    """One ``paystream bench orders`` run: its tag, registry and per-part settings."""

    base: Settings
    tag: str
    state_root: Path
    registry_url: str = ""

    @classmethod
    def start(cls, settings: Settings) -> tuple[BenchRun, Any]:
        """A new run with its schema registry serving in this process; stop both when done.

        Tag ``bench-<8 hex>``, state under a fresh temporary directory, the
        registry on a free port with topic ``<tag>-_schemas``; logging from
        ERROR up; the machine line printed first.  The caller stops the
        returned registry and calls :meth:`cleanup`.
        """
        from streams.devtools.registry_runner import RegistryThread, registry_settings

        logging.basicConfig(level=logging.ERROR)
        tag = f"bench-{uuid.uuid4().hex[:8]}"
        run = cls(settings, tag, Path(tempfile.mkdtemp(prefix=f"{tag}-")))
        print(machine_line(settings))
        registry = RegistryThread(registry_settings(settings, f"{tag}-_schemas", free_port())).start()
        run.registry_url = registry.url
        return run, registry

    def settings(self, part: str, **overrides: Any) -> Settings:
        """Private topics, app id (= consumer group), state dir and web port for one part."""
        prefix = f"{self.tag}-{part}."
        return dataclasses.replace(
            self.base,
            schema_registry_url=self.registry_url,
            topic_prefix=prefix,
            app_id=f"{prefix}paystream",
            state_dir=self.state_root / part,
            worker_web_port=free_port(),
            **overrides,
        )

    def close(self, registry: Any) -> None:
        """Stop ``registry`` (:meth:`start`'s) and :meth:`cleanup` the run, printing what went."""
        registry.stop()
        topics, groups = self.cleanup()
        print(f"\ncleanup: deleted {len(topics)} topics and {len(groups)} consumer groups of {self.tag}")

    def cleanup(self) -> tuple[list[str], list[str]]:
        """Delete every topic and consumer group of the run, and the state root."""
        from confluent_kafka import KafkaError, KafkaException

        client = admin(self.base)
        topics = [t for t in client.list_topics(timeout=30).topics if t.startswith(self.tag)]
        if topics:
            for future in client.delete_topics(topics, operation_timeout=30).values():
                try:
                    future.result(60)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise
        groups: list[str] = []
        try:
            listed = client.list_consumer_groups(request_timeout=30).result(30)
            groups = [g.group_id for g in listed.valid if g.group_id.startswith(self.tag)]
            if groups:
                for future in client.delete_consumer_groups(groups, request_timeout=30).values():
                    try:
                        future.result(30)
                    except Exception:  # a group that still has members: left to expire
                        pass
        except Exception:
            pass
        shutil.rmtree(self.state_root, ignore_errors=True)
        return topics, groups


def create_part_topics(settings: Settings) -> None:
    """The catalog's topics under this part's prefix (what the worker creates at start)."""
    from streams.admin import ensure_topics

    prefix = settings.topic_prefix
    ensure_topics(settings.kafka_bootstrap_servers,
                  catalog.topic_settings(name_prefix=prefix) + catalog.internal_topic_settings(prefix))


# ----------------------------------------------------------------------
# Kafka clients (confluent-kafka: librdkafka does the I/O on its own threads)


def producer(settings: Settings, client_id: str, **extra: Any) -> Any:
    """An idempotent acks=all producer, as every paystream producer outside Faust."""
    from confluent_kafka import Producer

    from streams.producer import producer_config

    return Producer({**producer_config(settings.kafka_bootstrap_servers, client_id=client_id), **extra})


def produce(client: Any, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
    """Produce, waiting for queue space when librdkafka's buffer is full."""
    while True:
        try:
            if partition is None:
                client.produce(topic, key=key, value=value)
            else:
                client.produce(topic, key=key, value=value, partition=partition)
            return
        except BufferError:
            client.poll(0.05)


def flush(client: Any, what: str, timeout: float = 120.0) -> None:
    if client.flush(timeout) != 0:
        raise Stalled(f"{what}: records not acknowledged within {timeout:.0f} s")


def watermarks(client: Any, topic: str, partition: int, timeout: float = 60.0) -> tuple[int, int]:
    """(low, high) offsets of a partition, retried while a new topic has no leader yet."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + timeout
    while True:
        try:
            low, high = client.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            return int(low), int(high)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def assigned_consumer(settings: Settings, topics: Iterable[str], **extra: Any) -> Any:
    """A consumer assigned to every partition of ``topics`` at their current end.

    Explicit offsets rather than a group subscription: no rebalance to wait
    for, and nothing produced after this call is missed.
    """
    from confluent_kafka import Consumer, TopicPartition

    client = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"{settings.app_id}-observer-{uuid.uuid4().hex[:6]}",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
        **extra,
    })
    assignment = []
    for topic in topics:
        for partition in range(PARTITIONS):
            _low, high = watermarks(client, topic, partition)
            assignment.append(TopicPartition(topic, partition, high))
    client.assign(assignment)
    return client


def admin(settings: Settings) -> Any:
    """An admin client that keeps librdkafka's informational log lines to itself."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 4})


def topics_with_prefix(settings: Settings, prefix: str | None = None) -> list[str]:
    prefix = settings.topic_prefix if prefix is None else prefix
    return sorted(t for t in admin(settings).list_topics(timeout=30).topics if t.startswith(prefix))


def end_offsets(settings: Settings, topics: Iterable[str]) -> dict[str, int]:
    """Sum over partitions of each topic's end offset (records ever appended)."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import OffsetSpec

    client = admin(settings)
    metadata = client.list_topics(timeout=30).topics
    request = {TopicPartition(topic, partition): OffsetSpec.latest()
               for topic in topics if topic in metadata for partition in metadata[topic].partitions}
    totals = {topic: 0 for topic in topics}
    if request:
        for tp, future in client.list_offsets(request, request_timeout=30).items():
            totals[tp.topic] += future.result(60).offset
    return totals


def group_lag(settings: Settings, group: str | None = None) -> int:
    """Records not yet committed by ``group`` (the worker: ``app_id``) on the partitions it committed.

    Partitions the group never committed are not seen; the callers follow
    this with :func:`wait_quiet`.
    """
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    group = group or settings.app_id
    client = admin(settings)
    answer = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result(30)
    committed = {(tp.topic, tp.partition): tp.offset for tp in answer.topic_partitions or []}
    if not committed:
        return 0
    request = {TopicPartition(topic, partition): OffsetSpec.latest() for topic, partition in committed}
    lag = 0
    for tp, future in client.list_offsets(request, request_timeout=30).items():
        lag += max(0, future.result(60).offset - max(committed[(tp.topic, tp.partition)], 0))
    return lag


def wait_caught_up(settings: Settings, worker: WorkerProcess, timeout: float = 600.0) -> dict[str, int]:
    """Wait until the worker's group has committed everything, then until end offsets rest.

    Returns the end offsets of every topic of the part at that point.
    """
    began = time.monotonic()
    deadline = began + timeout
    zero_in_a_row = 0
    while zero_in_a_row < 2:
        worker.assert_running()
        if time.monotonic() > deadline:
            raise Stalled(f"worker still {group_lag(settings):,} records behind after {timeout:.0f} s")
        zero_in_a_row = zero_in_a_row + 1 if group_lag(settings) == 0 else 0
        time.sleep(1.0)
    return wait_quiet(settings, topics_with_prefix(settings), timeout=max(10.0, deadline - time.monotonic()))


def wait_quiet(settings: Settings, topics: list[str], quiet_for: float = 4.0,
               timeout: float = 60.0) -> dict[str, int]:
    """End offsets once they stopped moving for ``quiet_for`` s (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    last = end_offsets(settings, topics)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = end_offsets(settings, topics)
        if current != last:
            last, still_since = current, time.monotonic()
        elif time.monotonic() - still_since >= quiet_for:
            break
    return last


def changelog_record_sizes(settings: Settings, topics: list[str], stall_after: float = 60.0
                           ) -> dict[str, dict[str, int]]:
    """Read each topic from its start: records, largest key+value bytes, records over 1 KiB.

    Compaction may already have dropped older versions of a key (never the
    newest), so this sees every record still in the log, not all ever written.
    """
    from confluent_kafka import Consumer, TopicPartition

    client = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                       "group.id": f"{settings.app_id}-sizes-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    ends: dict[tuple[str, int], int] = {}
    assignment = []
    for topic in topics:
        for partition in range(PARTITIONS):
            low, high = watermarks(client, topic, partition)
            if high > low:
                ends[(topic, partition)] = high
                assignment.append(TopicPartition(topic, partition, low))
    stats = {topic: {"records": 0, "largest": 0, "over_1kib": 0} for topic in topics}
    client.assign(assignment)
    last = time.monotonic()
    try:
        while ends:
            messages = client.consume(10_000, 0.5)
            for message in messages:
                if message.error() is not None:
                    continue
                size = len(message.key() or b"") + len(message.value() or b"")
                entry = stats[message.topic()]
                entry["records"] += 1
                entry["largest"] = max(entry["largest"], size)
                if size > 1024:
                    entry["over_1kib"] += 1
                place = (message.topic(), message.partition())
                if place in ends and message.offset() + 1 >= ends[place]:
                    del ends[place]
            if messages:
                last = time.monotonic()
            elif time.monotonic() - last > stall_after:
                raise Stalled(f"reading changelogs: {len(ends)} partitions not read to their end")
    finally:
        client.close()
    return stats


# ----------------------------------------------------------------------
# Order commands and an observer of order events


def create_command(order_id: str, user_id: str, *, expires_at_ms: int | None = None,
                   command_id: str | None = None) -> bytes:
    """A ``create`` command on ``paystream.order-commands``, as the order API sends it.

    The one place the bench spells the command format (``make_command`` in
    ``agents/orders.py``); ``expires_at`` sets the order's payment deadline
    (order.created's ``expires_at``).
    """
    args: dict[str, Any] = {"user_id": user_id, "order_type": "ONE_TIME", "total_amount": AMOUNT,
                            "currency": CURRENCY, "items": ITEMS}
    if expires_at_ms is not None:
        args["expires_at"] = expires_at_ms
    return json.dumps({
        "command": "create", "command_id": command_id or str(uuid.uuid4()), "order_id": order_id,
        "correlation_id": str(uuid.uuid4()), "causation_id": None, "issued_at": now_ms(),
        "args": args,
    }).encode()


class Observer:
    """A thread that notes the first time (epoch ms) each key was seen on each topic.

    ``want(key)`` picks the keys worth remembering (the probes or orders of
    this part).  Assigned at the topics' current end before it returns.
    ``stamps``: also keep each noted record's Kafka timestamp in
    :attr:`stamps` (CreateTime: when its producer made it, so ``stamp -
    due`` is the producer's own lateness and ``seen - stamp`` the way to
    the reader).
    """

    def __init__(self, settings: Settings, topics: list[str], want: Callable[[str], bool], *,
                 stamps: bool = False) -> None:
        self.seen: dict[str, dict[str, int]] = {topic: {} for topic in topics}
        self.stamps: dict[str, dict[str, int]] | None = {topic: {} for topic in topics} if stamps else None
        self._want = want
        self._consumer = assigned_consumer(settings, topics)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="bench-observer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            messages = self._consumer.consume(2000, 0.01)
            if not messages:
                continue
            stamp = now_ms()
            noted = False
            for message in messages:
                if message.error() is not None or message.key() is None:
                    continue
                key = message.key().decode()
                if self._want(key):
                    seen = self.seen[message.topic()]
                    if key not in seen:
                        seen[key] = stamp
                        if self.stamps is not None:
                            self.stamps[message.topic()][key] = message.timestamp()[1]
                        noted = True
            if noted:
                with self._changed:
                    self._changed.notify_all()

    def wait_for(self, topic: str, keys: Iterable[str], timeout: float, what: str,
                 stall_after: float | None = None) -> None:
        """Block until every key was seen on ``topic``; Stalled after ``timeout`` s
        (or after ``stall_after`` s without one more key seen)."""
        wanted = list(keys)
        seen = self.seen[topic]
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while True:
            count = sum(1 for key in wanted if key in seen)
            if count == len(wanted):
                return
            now = time.monotonic()
            if count != last_count:
                last_count, last_change = count, now
            if now > deadline or (stall_after is not None and now - last_change > stall_after):
                raise Stalled(f"{what}: {count:,}/{len(wanted):,} seen on {topic}")
            with self._changed:
                self._changed.wait(0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


class Prober:
    """Creates probe orders, one per partition, to learn whether a worker serves them.

    Served = a ``create`` command sent now comes back as ``order.created``:
    partitions assigned, state recovered, the order agent running.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.commands = settings.topic(catalog.ORDER_COMMANDS)
        self.created = settings.topic("order.created")
        self.marker = f"probe-{uuid.uuid4().hex[:8]}-"
        self.observer = Observer(settings, [self.created], lambda key: key.startswith(self.marker))
        self.client = producer(settings, "bench-prober")
        self._counter = 0
        self.sent: list[tuple[str, int, int]] = []  # (order id, partition, sent ms)

    def order_for(self, partition: int) -> str:
        while True:
            self._counter += 1
            order_id = f"{self.marker}{self._counter:07d}"
            if partition_of(order_id.encode()) == partition:
                return order_id

    def send(self, partition: int) -> str:
        order_id = self.order_for(partition)
        produce(self.client, self.commands, order_id.encode(), create_command(order_id, f"u-{order_id}"))
        self.client.poll(0)
        self.sent.append((order_id, partition, now_ms()))
        return order_id

    def wait_serving(self, timeout: float, worker: WorkerProcess | None = None) -> float:
        """Probe every partition once; seconds until all were answered."""
        began = time.monotonic()
        probes = [self.send(p) for p in range(PARTITIONS)]
        self.client.flush(30)
        deadline = began + timeout
        while True:
            if worker is not None:
                worker.assert_running()
            try:
                self.observer.wait_for(self.created, probes, min(2.0, max(0.1, deadline - time.monotonic())),
                                       "probe orders")
                return time.monotonic() - began
            except Stalled:
                if time.monotonic() > deadline:
                    raise Stalled(f"worker not serving all {PARTITIONS} partitions after {timeout:.0f} s"
                                  + (f"\n{worker.log_tail()}" if worker else "")) from None

    def close(self) -> None:
        self.client.flush(10)
        self.observer.close()


# ----------------------------------------------------------------------
# ``paystream worker`` as a subprocess


class WorkerProcess(WorkerSubprocess):
    """One ``paystream worker`` subprocess with the environment of ``settings``."""

    failure = Stalled

    def __init__(self, settings: Settings, *, name: str = "worker", loglevel: str = "warning") -> None:
        self.settings = settings
        state = Path(settings.state_dir)
        super().__init__({**os.environ, **settings_env(settings)},
                         state.parent / f"{state.name}-{name}.log", name=name, loglevel=loglevel)

    def rss_kib(self) -> tuple[int, int]:
        return rss_kib(self.pid) if self.running else (0, 0)


def start_worker(settings: Settings, prober: Prober, *, name: str = "worker",
                 timeout: float = 180.0) -> tuple[WorkerProcess, float]:
    """Launch ``paystream worker`` and wait until it serves every partition."""
    worker = WorkerProcess(settings, name=name).launch()
    try:
        ready = prober.wait_serving(timeout, worker)
    except BaseException:
        worker.stop(10)
        raise
    return worker, ready


def per_topic(counts: Mapping[str, int], prefix: str) -> dict[str, int]:
    """Counts keyed by topic names without the part's prefix (for printing)."""
    return {name[len(prefix):] if name.startswith(prefix) else name: n for name, n in counts.items()}
