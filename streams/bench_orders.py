"""``paystream bench orders``: the order pipeline against a raw aiokafka loop, in one run.

Self-contained: only a broker is needed.  The run starts our schema registry
in-process (own thread and loop, private registry topic, free port), gives
every part its own topic prefix, app id and state directory (all under one
run tag), and deletes every topic of that tag at the end.

1. Lifecycles: N orders through an in-process worker (``create_app`` with the
   order agents).  A driver thread plays API and payment service with
   confluent-kafka: a ``create`` command per order, and on its order.created
   a payment.completed; up to ``concurrency`` orders in flight.
2. Baseline: a raw AIOKafkaConsumer/AIOKafkaProducer loop (no Faust, no
   state) turning Confluent-Avro payment.completed into order.completed.
   Throughput on a pre-produced backlog of 2N records, then latency (and
   throughput) with the same driver and the same number of records in flight.
3. Worker RSS with M order rows: rows written straight into the orders
   changelog, a fresh worker (in a spawned child process, so its numbers are
   not those of this process's earlier parts) recovers them.
4. Expiry lag with K pending deadlines: K PENDING orders and their deadlines
   written into the two changelogs, deadlines spread over ``span`` seconds;
   order.expired observed minus the deadline (or minus the moment the worker
   became ready, for deadlines that were due before it could run).

Prints numbers, asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import multiprocessing
import shutil
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from streams.settings import Settings

_HEADER = struct.Struct(">bI")
ITEMS = [{"product_id": "sku-1", "quantity": 2, "unit_amount": 1250}]
AMOUNT = 2500
CURRENCY = "EUR"
PARTITIONS = 4  # catalog.EVENT_PARTITIONS, checked against the app at run time


# ----------------------------------------------------------------------
# Small helpers


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc/self/status."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def _ms(seconds: list[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def partition_of(key: bytes, partitions: int = PARTITIONS) -> int:
    """The partition Java's / aiokafka's / librdkafka's murmur2 partitioner picks."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _latency_line(label: str, values_ms: list[float]) -> str:
    return (f"  {label:<34}: p50 {percentile(values_ms, 0.5):8.1f} ms   "
            f"p99 {percentile(values_ms, 0.99):8.1f} ms   max {max(values_ms, default=0):8.1f} ms")


def _ratio(ours: float, raw: float) -> str:
    return f"{ours / raw:.3f}" if raw else "n/a"


class Stalled(RuntimeError):
    """A part made no progress for too long (a dead-lettered order, a stuck worker)."""


# ----------------------------------------------------------------------
# The run: registry, per-part settings, cleanup


class Registry:
    """Our schema registry (``schemas.registry.server``) on its own thread and loop."""

    def __init__(self, base: Settings, topic: str) -> None:
        self.port = _free_port()
        self.settings = dataclasses.replace(
            base, registry_topic=topic, registry_port=self.port, registry_host="127.0.0.1",
            schema_registry_url=f"http://127.0.0.1:{self.port}",
        )
        self.url = self.settings.schema_registry_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-registry", daemon=True)
        self._runner: Any = None

    def start(self, timeout: float = 60.0) -> Registry:
        import httpx
        from aiohttp import web

        from schemas.registry.server import create_app

        async def serve() -> None:
            self._runner = web.AppRunner(create_app(self.settings), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"registry at {self.url} not ready after {timeout}s")

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@dataclasses.dataclass
class BenchRun:
    base: Settings
    tag: str
    state_root: Path
    registry_url: str = ""

    def settings(self, part: str) -> Settings:
        """Private topics, group, state dir and web port for one part."""
        prefix = f"{self.tag}-{part}."
        return dataclasses.replace(
            self.base,
            schema_registry_url=self.registry_url,
            topic_prefix=prefix,
            app_id=f"{prefix}paystream",
            state_dir=self.state_root / part,
            worker_web_port=_free_port(),
        )

    def cleanup(self) -> list[str]:
        from streams.admin import admin_client, delete_topics

        bootstrap = self.base.kafka_bootstrap_servers
        names = [t for t in admin_client(bootstrap).list_topics(timeout=30).topics if t.startswith(self.tag)]
        delete_topics(bootstrap, names)
        shutil.rmtree(self.state_root, ignore_errors=True)
        return names


# ----------------------------------------------------------------------
# Kafka clients for the driver side (threads; librdkafka does the I/O)


def _consumer(settings: Settings, topics: list[str], group: str) -> Any:
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
    })
    consumer.subscribe(topics)
    deadline = time.monotonic() + 60
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise Stalled(f"observer of {topics} got no assignment in 60 s")
        consumer.poll(0.1)
    return consumer


def _producer(settings: Settings, client_id: str, **extra: Any) -> Any:
    from confluent_kafka import Producer

    from streams.producer import producer_config

    return Producer({**producer_config(settings.kafka_bootstrap_servers, client_id=client_id), **extra})


def _produce(producer: Any, topic: str, key: bytes, value: bytes, partition: int | None = None) -> None:
    while True:
        try:
            if partition is None:
                producer.produce(topic, key=key, value=value)
            else:
                producer.produce(topic, key=key, value=value, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


def _schema_ids(settings: Settings, topics: dict[str, str]) -> dict[str, int]:
    """Kafka topic -> schema id of its contract (registered if missing)."""
    from streams.codec import SchemaCache

    return SchemaCache(settings.schema_registry_url).resolve(topics)


class _PaymentEncoder:
    """payment.completed as payment_service would write it (Confluent framing + Avro)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        from schemas import contracts

        self.topic = topic
        self.schema = contracts.parsed_schema("payment.completed")
        self.schema_id = _schema_ids(settings, {topic: "payment.completed"})[topic]

    def __call__(self, order_id: str, user_id: str) -> bytes:
        from streams.codec import encode
        from streams.envelope import new_event

        event = new_event("payment.completed", {
            "payment_intent_id": f"pi_{order_id}", "order_id": order_id, "user_id": user_id,
            "amount": AMOUNT, "currency": CURRENCY,
        }, producer="payment_service")
        return encode(self.schema, self.schema_id, event)


def _wait_progress(last: float, stall_after: float, what: str) -> None:
    if time.monotonic() - last > stall_after:
        raise Stalled(f"{what}: no progress for {stall_after:.0f} s")


# ----------------------------------------------------------------------
# Part 1: order lifecycles through the worker


@dataclasses.dataclass
class LifecycleResult:
    orders: int
    wall: float
    end_to_end: list[float]  # seconds, per order: create sent -> order.completed seen
    create_hop: list[float]  # create sent -> order.created seen
    payment_hop: list[float]  # payment.completed sent -> order.completed seen

    @property
    def events_per_second(self) -> float:
        return 2 * self.orders / self.wall


def _drive_lifecycles(settings: Settings, n: int, concurrency: int, stall_after: float) -> LifecycleResult:
    from agents.orders import make_command

    commands = settings.topic("paystream.order-commands")
    created_topic, completed_topic = settings.topic("order.created"), settings.topic("order.completed")
    payment = _PaymentEncoder(settings, settings.topic("payment.completed"))
    consumer = _consumer(settings, [created_topic, completed_topic], f"{settings.app_id}-driver")
    producer = _producer(settings, "bench-driver")
    run = uuid.uuid4().hex[:8]
    sent: dict[str, float] = {}
    created: dict[str, float] = {}
    done: dict[str, float] = {}
    next_index = in_flight = 0
    last = time.monotonic()
    try:
        while len(done) < n:
            while in_flight < concurrency and next_index < n:
                order_id = f"o-{run}-{next_index:07d}"
                command = make_command(
                    "create", order_id, cause=None, user_id=f"u-{run}-{next_index}",
                    order_type="ONE_TIME", total_amount=AMOUNT, currency=CURRENCY, items=ITEMS,
                )
                _produce(producer, commands, order_id.encode(), json.dumps(command).encode())
                sent[order_id] = time.perf_counter()
                next_index += 1
                in_flight += 1
            producer.poll(0)
            messages = consumer.consume(1000, 0.005)
            now = time.perf_counter()
            for message in messages:
                if message.error() is not None or message.key() is None:
                    continue
                order_id = message.key().decode()
                if order_id not in sent:
                    continue
                if message.topic() == created_topic and order_id not in created:
                    created[order_id] = now
                    user_id = f"u-{run}-{int(order_id.rsplit('-', 1)[1])}"
                    _produce(producer, payment.topic, order_id.encode(), payment(order_id, user_id))
                    last = time.monotonic()
                elif message.topic() == completed_topic and order_id not in done:
                    done[order_id] = now
                    in_flight -= 1
                    last = time.monotonic()
            _wait_progress(last, stall_after, f"lifecycles ({len(done)}/{n} completed)")
        producer.flush(30)
    finally:
        consumer.close()
    first = min(sent.values())
    wall = max(done.values()) - first
    return LifecycleResult(
        orders=n,
        wall=wall,
        end_to_end=[done[o] - sent[o] for o in done],
        create_hop=[created[o] - sent[o] for o in done],
        payment_hop=[done[o] - created[o] for o in done],
    )


async def _start_worker(settings: Settings, *, app: Any = None, table: str | None = None,
                        expect: int | None = None, timeout: float = 1800.0) -> tuple[Any, float, float]:
    """Start an in-process worker; return (app, seconds to ready, wall ms at ready).

    Ready = partitions assigned and table recovery completed (and, if given,
    ``table`` holding ``expect`` keys).
    """
    from streams.app import create_app

    app = app if app is not None else create_app(settings)
    began = time.perf_counter()
    await app.start()
    deadline = time.monotonic() + timeout
    while not (app.consumer.assignment() and app.tables.recovery.completed.is_set()):
        if time.monotonic() > deadline:
            raise Stalled(f"worker not ready after {timeout:.0f} s")
        await asyncio.sleep(0.02)
    ready = time.perf_counter() - began
    ready_ms = time.time_ns() // 1_000_000
    if table is not None and expect is not None:
        held = len(app.tables[table])
        if held != expect:
            raise Stalled(f"recovery completed but table {table!r} holds {held} keys, not {expect}")
    return app, ready, ready_ms


async def _lifecycles(settings: Settings, n: int, concurrency: int) -> LifecycleResult:
    app, _, _ = await _start_worker(settings)
    try:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _drive_lifecycles, settings, n, concurrency, 60.0)
    finally:
        await app.stop()


# ----------------------------------------------------------------------
# Part 2: the raw aiokafka baseline


@dataclasses.dataclass
class RawResult:
    backlog_records: int
    backlog_wall: float
    closed_records: int
    closed_wall: float
    latency: list[float]  # seconds, closed loop: input sent -> output seen

    @property
    def backlog_rate(self) -> float:
        return self.backlog_records / self.backlog_wall

    @property
    def closed_rate(self) -> float:
        return self.closed_records / self.closed_wall


class RawLoop:
    """payment.completed -> order.completed with AIOKafkaConsumer/Producer and fastavro."""

    def __init__(self, settings: Settings, source: str, sink: str, ids: dict[str, int]) -> None:
        from schemas import contracts
        from streams.codec import decoding_schema

        self.settings = settings
        self.source, self.sink = source, sink
        self.reader = decoding_schema("payment.completed")  # the same reader schema as ours
        self.writer = contracts.parsed_schema("order.completed")
        self.sink_header = _HEADER.pack(0, ids[sink])
        self.first_record: float | None = None
        self.handled = 0
        self.stopping = asyncio.Event()

    def transform(self, value: bytes) -> bytes:
        from fastavro import schemaless_reader, schemaless_writer

        body = io.BytesIO(value)
        body.seek(_HEADER.size)  # magic byte + schema id: the id is ours, one writer schema
        payment = schemaless_reader(body, self.reader, None)
        completed = {
            "event_id": str(uuid.uuid4()),
            "event_type": "order.completed",
            "occurred_at": time.time_ns() // 1_000_000,
            "producer": "order_service",
            "correlation_id": payment["correlation_id"],
            "causation_id": payment["event_id"],
            "schema_version": 1,
            "order_id": payment["order_id"],
            "user_id": payment["user_id"],
            "order_type": "ONE_TIME",
            "total_amount": payment["amount"],
            "currency": payment["currency"],
            "payment_id": payment["payment_intent_id"],
        }
        out = io.BytesIO()
        out.write(self.sink_header)
        schemaless_writer(out, self.writer, completed)
        return out.getvalue()

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        consumer = AIOKafkaConsumer(
            self.source, bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=f"{self.settings.app_id}-raw", auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        # acks=all and no linger, as the worker's producer (producer_acks=-1)
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap_servers, acks="all")
        await consumer.start()
        await producer.start()
        try:
            while not self.stopping.is_set():
                batches = await consumer.getmany(timeout_ms=100, max_records=500)
                if not batches:
                    continue
                if self.first_record is None:
                    self.first_record = time.perf_counter()
                pending = []
                for records in batches.values():
                    for record in records:
                        pending.append(await producer.send(
                            self.sink, key=record.key, value=self.transform(record.value),
                        ))
                await asyncio.gather(*pending)  # at least once: acked before committed
                await consumer.commit()
                self.handled += len(pending)
        finally:
            await consumer.stop()
            await producer.stop()


def _preload_payments(settings: Settings, topic: str, count: int, run: str) -> None:
    payment = _PaymentEncoder(settings, topic)
    producer = _producer(settings, "bench-preload", **{"linger.ms": 20})
    for index in range(count):
        order_id = f"b-{run}-{index:07d}"
        _produce(producer, topic, order_id.encode(), payment(order_id, f"u-{run}-{index}"))
        if index % 10_000 == 0:
            producer.poll(0)
    if producer.flush(60) != 0:
        raise Stalled("baseline input records not delivered")


def _observe_all(settings: Settings, topic: str, count: int, stall_after: float) -> dict[str, float]:
    """Wait until ``count`` distinct keys were seen on ``topic``; key -> perf_counter."""
    consumer = _consumer(settings, [topic], f"{settings.app_id}-observer-{uuid.uuid4().hex[:6]}")
    seen: dict[str, float] = {}
    last = time.monotonic()
    try:
        while len(seen) < count:
            messages = consumer.consume(1000, 0.005)
            now = time.perf_counter()
            for message in messages:
                if message.error() is None and message.key() is not None:
                    seen.setdefault(message.key().decode(), now)
                    last = time.monotonic()
            _wait_progress(last, stall_after, f"baseline backlog ({len(seen)}/{count})")
    finally:
        consumer.close()
    return seen


def _drive_raw(settings: Settings, source: str, sink: str, count: int, concurrency: int,
               stall_after: float) -> tuple[float, list[float]]:
    """Closed loop: up to ``concurrency`` inputs in flight; (wall, per-record latencies)."""
    payment = _PaymentEncoder(settings, source)
    consumer = _consumer(settings, [sink], f"{settings.app_id}-raw-driver")
    producer = _producer(settings, "bench-raw-driver")
    run = uuid.uuid4().hex[:8]
    sent: dict[str, float] = {}
    done: dict[str, float] = {}
    next_index = in_flight = 0
    last = time.monotonic()
    try:
        while len(done) < count:
            while in_flight < concurrency and next_index < count:
                order_id = f"c-{run}-{next_index:07d}"
                _produce(producer, source, order_id.encode(), payment(order_id, f"u-{run}-{next_index}"))
                sent[order_id] = time.perf_counter()
                next_index += 1
                in_flight += 1
            producer.poll(0)
            messages = consumer.consume(1000, 0.005)
            now = time.perf_counter()
            for message in messages:
                if message.error() is not None or message.key() is None:
                    continue
                order_id = message.key().decode()
                if order_id in sent and order_id not in done:
                    done[order_id] = now
                    in_flight -= 1
                    last = time.monotonic()
            _wait_progress(last, stall_after, f"baseline closed loop ({len(done)}/{count})")
    finally:
        consumer.close()
    wall = max(done.values()) - min(sent.values())
    return wall, [done[k] - sent[k] for k in done]


async def _raw_baseline(settings: Settings, records: int, concurrency: int) -> RawResult:
    from streams.admin import TopicSettings, ensure_topics

    source, sink = settings.topic("payment.completed"), settings.topic("order.completed")
    ensure_topics(settings.kafka_bootstrap_servers,
                  [TopicSettings(source, PARTITIONS), TopicSettings(sink, PARTITIONS)])
    ids = _schema_ids(settings, {source: "payment.completed", sink: "order.completed"})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _preload_payments, settings, source, records, uuid.uuid4().hex[:8])
    raw = RawLoop(settings, source, sink, ids)
    observed = loop.run_in_executor(None, _observe_all, settings, sink, records, 60.0)
    task = asyncio.create_task(raw.run())
    try:
        seen = await observed
        assert raw.first_record is not None
        backlog_wall = max(seen.values()) - raw.first_record
        closed_wall, latency = await loop.run_in_executor(
            None, _drive_raw, settings, source, sink, records, concurrency, 60.0,
        )
    finally:
        raw.stopping.set()
        await task
    return RawResult(records, backlog_wall, records, closed_wall, latency)


# ----------------------------------------------------------------------
# Preloading changelogs (parts 3 and 4)


def _changelog_names(app: Any) -> dict[str, str]:
    """Table name -> changelog topic, as the app's own tables name them."""
    names = {name: app.tables[name].changelog_topic.get_topic_name()
             for name in ("orders", "order-deadlines")}
    partitions = app.tables["orders"].partitions
    if partitions != PARTITIONS:
        raise RuntimeError(f"orders table has {partitions} partitions, the bench assumes {PARTITIONS}")
    return names


def _create_changelogs(settings: Settings, names: Iterable[str]) -> None:
    from streams.admin import TopicSettings, ensure_topics

    ensure_topics(settings.kafka_bootstrap_servers, [
        TopicSettings(name, PARTITIONS, config={"cleanup.policy": "compact"}) for name in names
    ])


def _order_row(order_id: str, user_id: str, deadline_ms: int, window_ms: int) -> dict[str, Any]:
    from tables.order_state import Order, OrderStatus

    created = deadline_ms - window_ms
    return Order(
        order_id=order_id, user_id=user_id, order_type="ONE_TIME", status=OrderStatus.PENDING,
        total_amount=AMOUNT, currency=CURRENCY, items=[dict(i) for i in ITEMS],
        created_at_ms=created, updated_at_ms=created, payment_deadline_ms=deadline_ms,
        applied_event_ids=[str(uuid.uuid4())],
    ).to_dict()


def _preload_orders(settings: Settings, topic: str, rows: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Write order rows (key = order id bytes, value = JSON as Faust's json codec) to ``topic``."""
    producer = _producer(settings, "bench-changelog", **{
        "linger.ms": 50, "batch.size": 1_000_000, "queue.buffering.max.messages": 500_000,
        "enable.idempotence": False, "acks": "1",
    })
    count = 0
    for order_id, row in rows:
        key = order_id.encode()
        _produce(producer, topic, key, json.dumps(row).encode(), partition_of(key))
        count += 1
        if count % 20_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise Stalled("changelog records not delivered")
    return count


# ----------------------------------------------------------------------
# Part 3: worker RSS with M rows in the orders table (in a child process)


def _table_rss_child(settings: Settings, rows: int, conn: Any) -> None:
    try:
        conn.send(asyncio.run(_table_rss(settings, rows)))
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


async def _table_rss(settings: Settings, rows: int) -> dict[str, Any]:
    import gc

    import streams.app  # noqa: F401  (imports counted in the "before" figure)

    gc.collect()
    before, _ = rss_kib()
    app, ready, _ = await _start_worker(settings)
    try:
        after, peak = rss_kib()
        began = time.perf_counter()
        held = len(app.tables["orders"])
        count_seconds = time.perf_counter() - began
        after_scan, peak_scan = rss_kib()
    finally:
        await app.stop()
    return {"before": before, "after": after, "peak": peak, "recovery": ready, "held": held,
            "count_seconds": count_seconds, "after_scan": after_scan, "peak_scan": peak_scan,
            "rows": rows}


def _table_rss_part(settings: Settings, rows: int) -> dict[str, Any]:
    from streams.app import create_app

    names = _changelog_names(create_app(settings))  # this app is never started
    _create_changelogs(settings, names.values())
    run = uuid.uuid4().hex[:8]
    far = time.time_ns() // 1_000_000 + 30 * 24 * 3600 * 1000  # never due while we watch
    template = _order_row("x", "x", far, 1_800_000)

    def generate() -> Iterable[tuple[str, dict[str, Any]]]:
        for index in range(rows):
            order_id = f"m-{run}-{index:08d}"
            row = dict(template)
            row["order_id"], row["user_id"] = order_id, f"u-{run}-{index}"
            row["applied_event_ids"] = [str(uuid.uuid4())]
            yield order_id, row

    began = time.perf_counter()
    _preload_orders(settings, names["orders"], generate())
    preload = time.perf_counter() - began
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_table_rss_child, args=(settings, rows, send), name="bench-rss")
    child.start()
    send.close()
    result: dict[str, Any] = receive.recv()  # the child always answers
    child.join(60)
    result["preload"] = preload
    return result


# ----------------------------------------------------------------------
# Part 4: expiry lag with K pending deadlines


@dataclasses.dataclass
class ExpiryResult:
    pending: int
    measured: int
    span: float
    bucket_max: int
    recovery: float
    due_before_ready: int
    lags: list[float]  # ms
    all_expired_after: float  # s, from the first measured deadline (or ready) to the last expiry
    preload: float


def _observe_expired(settings: Settings, topic: str, wanted: set[str], stall_after: float,
                     started: threading.Event) -> dict[str, int]:
    consumer = _consumer(settings, [topic], f"{settings.app_id}-expiry-observer")
    started.set()
    seen: dict[str, int] = {}
    last = time.monotonic()
    try:
        while len(seen) < len(wanted):
            messages = consumer.consume(1000, 0.005)
            now_ms = time.time_ns() // 1_000_000
            for message in messages:
                if message.error() is None and message.key() is not None:
                    order_id = message.key().decode()
                    if order_id in wanted and order_id not in seen:
                        seen[order_id] = now_ms
                        last = time.monotonic()
            _wait_progress(last, stall_after, f"expiry ({len(seen)}/{len(wanted)} expired)")
    finally:
        consumer.close()
    return seen


async def _expiry(settings: Settings, pending: int, span: float, window: float,
                  recovery_rate: float | None) -> ExpiryResult:
    from streams.app import create_app

    probe = create_app(settings)  # the worker of this part, started once preloaded
    names = _changelog_names(probe)
    _create_changelogs(settings, names.values())
    await asyncio.get_running_loop().run_in_executor(None, probe.prepare_topics)  # order.expired exists
    deadlines = probe.orders.deadlines
    payment_window_ms = probe.orders.window_ms
    # Deadlines start after the worker should be ready: preload + recovery
    # estimate; any that fall due earlier are measured from the ready moment.
    rate = recovery_rate or 20_000.0
    lead = 15.0 + 1.5 * pending / rate + pending / 50_000
    first_deadline = time.time_ns() // 1_000_000 + int(lead * 1000)
    run = uuid.uuid4().hex[:8]
    step = span * 1000 / max(pending, 1)
    orders: dict[str, int] = {}
    buckets: dict[tuple[str, int], dict[str, int]] = {}
    for index in range(pending):
        order_id = f"e-{run}-{index:07d}"
        deadline = first_deadline + int(index * step)
        orders[order_id] = deadline
        partition = partition_of(order_id.encode())
        key = deadlines._key(deadline, partition)
        buckets.setdefault((key, partition), {})[order_id] = deadline
    began = time.perf_counter()
    _preload_orders(settings, names["orders"], (
        (order_id, _order_row(order_id, f"u-{run}-{order_id}", deadline, payment_window_ms))
        for order_id, deadline in orders.items()
    ))
    _preload_buckets(settings, names["order-deadlines"], buckets)
    preload = time.perf_counter() - began
    horizon = first_deadline + int(window * 1000)
    wanted = {order_id for order_id, deadline in orders.items() if deadline <= horizon}

    loop = asyncio.get_running_loop()
    started = threading.Event()
    stall = max(120.0, window)
    observed = loop.run_in_executor(
        None, _observe_expired, settings, settings.topic("order.expired"), wanted, stall, started,
    )
    await loop.run_in_executor(None, started.wait, 120)
    app, ready, ready_ms = await _start_worker(settings, app=probe, table="orders", expect=pending)
    try:
        seen = await observed
    finally:
        await app.stop()
    lags = [seen[o] - max(orders[o], ready_ms) for o in seen]
    start_ms = max(min(orders[o] for o in wanted), ready_ms)
    return ExpiryResult(
        pending=pending, measured=len(wanted), span=span,
        bucket_max=max((len(b) for b in buckets.values()), default=0), recovery=ready,
        due_before_ready=sum(1 for o in wanted if orders[o] <= ready_ms), lags=lags,
        all_expired_after=(max(seen.values()) - start_ms) / 1000, preload=preload,
    )


def _preload_buckets(settings: Settings, topic: str, buckets: dict[tuple[str, int], dict[str, int]]) -> None:
    producer = _producer(settings, "bench-deadlines", **{"linger.ms": 20, "message.max.bytes": 1_000_000})
    for (key, partition), entries in buckets.items():
        value = json.dumps(entries).encode()
        if len(value) > 950_000:
            raise RuntimeError(
                f"deadline bucket {key} would hold {len(entries)} entries ({len(value)} bytes), over "
                "Kafka's 1 MB record limit: spread the deadlines over a longer --deadline-span"
            )
        _produce(producer, topic, key.encode(), value, partition)
    if producer.flush(60) != 0:
        raise Stalled("deadline buckets not delivered")


# ----------------------------------------------------------------------
# Printing


def _part(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _report_lifecycles(ours: LifecycleResult, concurrency: int) -> None:
    print(f"  {ours.orders} orders, up to {concurrency} in flight, 2 input events per order "
          f"(create command + payment.completed)")
    print(f"  wall time                         : {ours.wall:8.2f} s")
    print(f"  throughput                        : {ours.events_per_second:8,.0f} input events/s "
          f"({ours.orders / ours.wall:,.0f} orders/s)")
    print(_latency_line("end to end (create -> completed)", _ms(ours.end_to_end)))
    print(_latency_line("hop create -> order.created", _ms(ours.create_hop)))
    print(_latency_line("hop payment -> order.completed", _ms(ours.payment_hop)))


def _report_raw(raw: RawResult, ours: LifecycleResult | None, concurrency: int) -> None:
    print("  raw loop: AIOKafkaConsumer.getmany -> fastavro decode -> order.completed dict -> "
          "fastavro encode -> AIOKafkaProducer.send (acks=all), commit per batch")
    print(f"  backlog of {raw.backlog_records} pre-produced records : {raw.backlog_rate:10,.0f} records/s "
          f"({raw.backlog_wall:.2f} s)")
    print(f"  closed loop, {concurrency} in flight      : {raw.closed_rate:10,.0f} records/s "
          f"({raw.closed_wall:.2f} s)")
    raw_ms = _ms(raw.latency)
    print(_latency_line("latency payment -> order.completed", raw_ms))
    if ours is None:
        return
    e2e, hop = _ms(ours.end_to_end), _ms(ours.payment_hop)
    print("  ours vs raw (ratio ours/raw; throughput > 1 is better, latency < 1 is better)")
    print(f"    throughput, ours vs raw closed loop : {ours.events_per_second:10,.0f} vs "
          f"{raw.closed_rate:10,.0f}  ratio {_ratio(ours.events_per_second, raw.closed_rate)}")
    print(f"    throughput, ours vs raw backlog     : {ours.events_per_second:10,.0f} vs "
          f"{raw.backlog_rate:10,.0f}  ratio {_ratio(ours.events_per_second, raw.backlog_rate)}")
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        print(f"    {name} payment hop (same work)      : {percentile(hop, q):8.1f} vs "
              f"{percentile(raw_ms, q):8.1f} ms  ratio {_ratio(percentile(hop, q), percentile(raw_ms, q))}")
        print(f"    {name} order end to end (2 hops)    : {percentile(e2e, q):8.1f} vs "
              f"{percentile(raw_ms, q):8.1f} ms  ratio {_ratio(percentile(e2e, q), percentile(raw_ms, q))}")


def _report_rss(result: dict[str, Any]) -> None:
    mib = 1024.0
    print(f"  preload {result['rows']:,} rows into the orders changelog : {result['preload']:8.1f} s "
          f"({result['rows'] / result['preload']:,.0f} rows/s)")
    print(f"  worker start + recovery            : {result['recovery']:8.1f} s "
          f"({result['rows'] / result['recovery']:,.0f} rows/s); table holds {result['held']:,} keys")
    print(f"  RSS before app start               : {result['before'] / mib:8.1f} MiB")
    print(f"  RSS after recovery                 : {result['after'] / mib:8.1f} MiB  "
          f"(+{(result['after'] - result['before']) / mib:.1f} MiB; peak so far "
          f"{result['peak'] / mib:.1f} MiB)")
    print(f"  RSS after counting every key       : {result['after_scan'] / mib:8.1f} MiB  "
          f"(+{(result['after_scan'] - result['before']) / mib:.1f} MiB; len(table) took "
          f"{result['count_seconds']:.1f} s)")


def _report_expiry(result: ExpiryResult) -> None:
    print(f"  {result.pending:,} PENDING orders with deadlines spread over {result.span:g} s "
          f"({result.pending / result.span:,.0f} due/s); largest deadline bucket "
          f"{result.bucket_max:,} entries")
    print(f"  preload both changelogs            : {result.preload:8.1f} s")
    print(f"  worker start + recovery            : {result.recovery:8.1f} s")
    print(f"  measured: the {result.measured:,} deadlines of the first window "
          f"({result.due_before_ready:,} already due when the worker became ready: lag counted "
          f"from that moment)")
    print(_latency_line("expiry lag (order.expired seen - due)", result.lags))
    print(f"  all measured expired after         : {result.all_expired_after:8.1f} s "
          f"({result.measured / max(result.all_expired_after, 1e-9):,.0f} expiries/s)")


# ----------------------------------------------------------------------


def run_orders(settings: Settings, *, count: int, table_orders: int, deadlines: int,
               concurrency: int = 200, deadline_span: float = 1800.0, expiry_window: float = 30.0,
               parts: Iterable[int] = (1, 2, 3, 4)) -> int:
    """Run the parts; print their numbers; 0 unless a part failed."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    wanted = set(parts)
    started = time.perf_counter()
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    run = BenchRun(settings, tag, Path(tempfile.mkdtemp(prefix=f"{tag}-")))
    registry = Registry(settings, f"{tag}-_schemas").start()
    run.registry_url = registry.url
    print(f"run {tag}: registry {registry.url} (topic {tag}-_schemas), state in {run.state_root}")
    failures = 0
    ours: LifecycleResult | None = None
    recovery_rate: float | None = None

    def attempt(title: str, body: Callable[[], None]) -> None:
        nonlocal failures
        _part(title)
        began = time.perf_counter()
        try:
            body()
        except Exception as exc:
            failures += 1
            print(f"  FAILED: {type(exc).__name__}: {exc}")
        print(f"  (part took {time.perf_counter() - began:.1f} s)", flush=True)

    try:
        if 1 in wanted:
            def part1() -> None:
                nonlocal ours
                ours = asyncio.run(_lifecycles(run.settings("p1"), count, concurrency))
                _report_lifecycles(ours, concurrency)

            attempt("1. order lifecycles through an in-process worker", part1)
        if 2 in wanted:
            def part2() -> None:
                raw = asyncio.run(_raw_baseline(run.settings("p2"), 2 * count, concurrency))
                _report_raw(raw, ours, concurrency)

            attempt(f"2. raw aiokafka baseline ({2 * count} records, same kind of input)", part2)
        if 3 in wanted:
            def part3() -> None:
                nonlocal recovery_rate
                result = _table_rss_part(run.settings("p3"), table_orders)
                if "error" in result:
                    raise Stalled(result["error"])
                recovery_rate = result["rows"] / result["recovery"]
                _report_rss(result)

            attempt(f"3. worker RSS with {table_orders:,} orders in the table", part3)
        if 4 in wanted:
            def part4() -> None:
                result = asyncio.run(_expiry(run.settings("p4"), deadlines, deadline_span,
                                             expiry_window, recovery_rate))
                _report_expiry(result)

            attempt(f"4. expiry lag with {deadlines:,} pending deadlines", part4)
    finally:
        registry.stop()
        deleted = run.cleanup()
        print(f"\ncleanup: deleted {len(deleted)} topics of {tag}")
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0
