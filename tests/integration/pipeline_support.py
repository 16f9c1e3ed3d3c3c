"""Drive the pipeline from outside, as other services would: real clients only.

Events are written with confluent-kafka's own ``AvroSerializer`` (the way a
wallet or account service would publish them) and read back with its
``AvroDeserializer``; the API is called over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import OFFSET_END, Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from schemas import contracts
from streams import catalog
from streams.envelope import new_event
from streams.producer import producer_config
from streams.settings import Settings


class EventWriter:
    """Publishes contract events to a deployment's (prefixed) topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = SchemaRegistryClient({"url": settings.schema_registry_url})
        self.producer = Producer(producer_config(settings.kafka_bootstrap_servers, client_id="test-writer"))
        self._serializers: dict[str, AvroSerializer] = {}

    def _serializer(self, topic: str) -> AvroSerializer:
        if topic not in self._serializers:
            self._serializers[topic] = AvroSerializer(self.registry, contracts.schema_text(topic))
        return self._serializers[topic]

    def event(self, topic: str, payload: Mapping[str, Any], *, producer: str = "test_service",
              **envelope: Any) -> dict[str, Any]:
        return new_event(topic, payload, producer=producer, **envelope)

    def send(self, topic: str, payload: Mapping[str, Any], **envelope: Any) -> dict[str, Any]:
        """Build, encode and publish one event; return it."""
        event = self.event(topic, payload, **envelope)
        self.send_event(event)
        return event

    def send_event(self, event: Mapping[str, Any]) -> None:
        topic = event["event_type"]
        kafka_topic = self.settings.topic(topic)
        value = self._serializer(topic)(dict(event), SerializationContext(kafka_topic, MessageField.VALUE))
        self.send_raw(kafka_topic, catalog.record_key(topic, event), value)

    def send_raw(self, kafka_topic: str, key: str | bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        self.producer.produce(kafka_topic, key=key, value=value, headers=headers or [])
        assert self.producer.flush(30) == 0, "test record not delivered"


class EventReader:
    """Reads a deployment's topics from the beginning, decoded by confluent-kafka."""

    def __init__(self, settings: Settings, topics: Iterable[str]) -> None:
        self.settings = settings
        self.names = {settings.topic(t): t for t in topics}
        self.deserializer = AvroDeserializer(SchemaRegistryClient({"url": settings.schema_registry_url}))
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe(list(self.names))
        self.seen: list[dict[str, Any]] = []
        self.raw: list[Any] = []

    def poll(self, seconds: float = 0.5) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            self.raw.append(message)
            if self.names.get(message.topic()) in catalog.CATALOG:
                value = self.deserializer(
                    message.value(), SerializationContext(message.topic(), MessageField.VALUE)
                )
                value["event_id"] = str(value["event_id"])
                self.seen.append(value)

    def events(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["event_type"] == topic
                and all(e.get(k) == v for k, v in match.items())]

    async def wait_for(self, topic: str, count: int = 1, timeout: float = 45.0,
                       **match: Any) -> list[dict[str, Any]]:
        """Poll until ``count`` events of ``topic`` matching ``match`` arrived."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            found = self.events(topic, **match)
            if len(found) >= count:
                return found
            await loop.run_in_executor(None, self.poll, 0.3)
        raise AssertionError(f"{len(self.events(topic, **match))}/{count} {topic} {match} "
                             f"within {timeout}s; saw {[e['event_type'] for e in self.seen]}")

    def close(self) -> None:
        self.consumer.close()


async def wait_until(check: Callable[[], Any], timeout: float = 45.0, interval: float = 0.2,
                     what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check() if asyncio.iscoroutinefunction(check) else check()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s")


class Api:
    """The worker's HTTP API."""

    def __init__(self, port: int) -> None:
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0)

    async def close(self) -> None:
        await self.client.aclose()

    async def create_order(self, **body: Any) -> httpx.Response:
        defaults = {"user_id": "u-1", "order_type": "ONE_TIME", "currency": "EUR",
                    "items": [{"product_id": "sku-1", "quantity": 2, "unit_amount": 1250}]}
        return await self.client.post("/orders", json={**defaults, **body})


# ----------------------------------------------------------------------
# Helpers for the order pipeline tests: app health, quiescence, recorded
# writes, dead letters.

class _CrashLog(logging.Handler):
    """Remembers every "Crashed reason=..." record mode logs for a crashed service.

    An agent whose actor crashes is restarted by its supervisor, which clears
    the actor's ``crashed`` flag again: without this log the crash would leave
    no trace on the app a test can look at.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad log call must not break the test
            return
        if "Crashed reason" in message:
            self.records.append(record)


_CRASH_LOG = _CrashLog()
logging.getLogger().addHandler(_CRASH_LOG)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def private_settings(kafka_bootstrap: str, registry_url: str, state_dir: Path, name: str) -> Settings:
    """Settings for one app of its own (topics, group, state, port), like ``app_settings``.

    For module-scoped apps, which cannot use the function-scoped fixture.
    """
    prefix = f"t-app-{name}-{uuid.uuid4().hex[:8]}."
    return Settings.from_env(
        kafka_bootstrap_servers=kafka_bootstrap,
        schema_registry_url=registry_url,
        topic_prefix=prefix,
        app_id=f"{prefix}paystream",
        domains="orders",  # the order pipeline alone; payment tests add "payments"
        state_dir=state_dir,
        worker_web_port=free_port(),
    )


async def start_app(settings: Settings) -> Any:
    """Create and start the whole app in-process; wait until it owns partitions."""
    from streams.app import create_app

    app = create_app(settings)
    app._health_since = time.time()  # crash records before this belong to other apps
    await app.start()
    await wait_until(lambda: app.consumer.assignment(), what="partition assignment")
    return app


def assert_app_healthy(app: Any) -> None:
    """Fail unless the in-process app is still running and nothing in it crashed.

    A crashed Faust service fails silently (its consumer just stops), so
    every pipeline test ends with this: the app, its consumer and every agent
    and actor must be up, the consumer must still own partitions, and mode
    must not have logged a crash since the app started.
    """
    problems: list[str] = []
    services: list[tuple[str, Any]] = [("app", app), ("consumer", app.consumer)]
    for name, agent in app.agents.items():
        services.append((f"agent {name}", agent))
        actors = list(agent._actors)
        if not actors:
            problems.append(f"agent {name} has no running actor")
        services.extend((f"actor of {name}", actor) for actor in actors)
    for label, service in services:
        if service.crashed:
            problems.append(f"{label} crashed: {service.crash_reason!r}")
        elif service.should_stop:
            problems.append(f"{label} is stopping ({service.state})")
    if not app.consumer.assignment():
        problems.append("the consumer owns no partition")
    since = getattr(app, "_health_since", 0.0)
    problems.extend(
        f"crash logged: {record.getMessage()}"
        for record in _CRASH_LOG.records if record.created >= since
    )
    assert not problems, "app unhealthy:\n  " + "\n  ".join(problems)


def app_source_topics(app: Any) -> list[str]:
    """Every Kafka topic the app's agents read."""
    return sorted({topic for agent in app.agents.values() for topic in agent.channel.topics})


def _high_watermarks(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """End offset of every partition of ``topics``, in one request.

    Asked on an idle consumer of its own: on a consumer that is fetching, the
    request queues behind the broker's long-polled fetch (up to 500 ms each).
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-watermarks"})
    try:
        latest = consumer.offsets_for_times(
            [TopicPartition(t, p, OFFSET_END) for t in topics for p in range(catalog.EVENT_PARTITIONS)],
            timeout=10,
        )
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): tp.offset for tp in latest}


async def wait_consumed(app: Any, timeout: float = 45.0, rounds: int = 2) -> None:
    """Wait until the app's group committed every record of every topic it reads.

    Done ``rounds`` times in a row: what one round's records caused (commands,
    index updates) lands on source topics too, and is waited for next round.
    Faust commits what its agents acknowledged, so after this every record
    produced before the call has been handled (and its output sent).
    """
    settings: Settings = app.settings
    topics = app_source_topics(app)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers,
                         "group.id": settings.app_id, "enable.auto.commit": False})
    loop = asyncio.get_running_loop()

    def behind() -> list[str]:
        high = _high_watermarks(settings.kafka_bootstrap_servers, topics)
        committed = consumer.committed([TopicPartition(t, p) for t, p in high], timeout=10)
        return [f"{tp.topic}[{tp.partition}] {tp.offset}/{high[tp.topic, tp.partition]}"
                for tp in committed if 0 < high[tp.topic, tp.partition] > tp.offset]

    try:
        for _ in range(rounds):
            deadline = time.monotonic() + timeout
            while True:
                lagging = await loop.run_in_executor(None, behind)
                if not lagging:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"app did not consume within {timeout}s: {lagging}")
                await asyncio.sleep(0.3)
    finally:
        consumer.close()


def group_lag(bootstrap: str, group: str, topics: Iterable[str] = ()) -> list[str]:
    """What consumer group ``group`` has not committed yet, as ``"topic[p] committed/end"``.

    Covers every partition the group has committed an offset for, and every
    partition of ``topics`` (full names), committed or not; a partition that
    holds no record is never behind.  For worker subprocesses, where
    :func:`wait_consumed` (which needs the in-process app) cannot be used.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    [future] = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)]).values()
    committed = {(tp.topic, tp.partition): tp.offset for tp in future.result(timeout=10).topic_partitions}
    wanted = set(committed) | {(t, p) for t in topics for p in range(catalog.EVENT_PARTITIONS)}
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-watermarks"})
    try:
        ends = consumer.offsets_for_times(
            [TopicPartition(t, p, OFFSET_END) for t, p in sorted(wanted)], timeout=10)
    finally:
        consumer.close()
    return [f"{tp.topic}[{tp.partition}] {committed.get((tp.topic, tp.partition), -1)}/{tp.offset}"
            for tp in ends if tp.offset > max(committed.get((tp.topic, tp.partition), 0), 0)]


async def drain(reader: EventReader, timeout: float = 30.0) -> None:
    """Poll ``reader`` until it read every record its topics hold right now."""
    await _drain(reader.settings.kafka_bootstrap_servers, reader.consumer, list(reader.names),
                 reader.poll, timeout)


async def _drain(bootstrap: str, consumer: Consumer, topics: list[str],
                 poll: Callable[[float], None], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    high = await loop.run_in_executor(None, _high_watermarks, bootstrap, topics)

    def done() -> bool:
        positions = consumer.position([TopicPartition(t, p) for t, p in high])
        return all(tp.offset >= high[tp.topic, tp.partition] for tp in positions
                   if high[tp.topic, tp.partition] > 0)

    deadline = time.monotonic() + timeout
    while True:
        await loop.run_in_executor(None, poll, 0.2)
        if consumer.assignment() and done():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"reader of {topics} did not catch up within {timeout}s")


async def settle(app: Any, reader: EventReader) -> None:
    """Everything sent so far is handled by the app and read by ``reader``."""
    await wait_consumed(app)
    await drain(reader)


@dataclass
class Sent:
    """One record a :class:`RecordingWriter` produced, where Kafka put it."""

    topic: str
    key: str | bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int = -1
    offset: int = -1


class RecordingWriter(EventWriter):
    """An :class:`EventWriter` that remembers every record and where it landed."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sent: list[Sent] = []

    def encode(self, topic: str, event: Mapping[str, Any]) -> bytes:
        """``event`` in Confluent Avro as ``topic``'s contract (whatever its event_type says)."""
        kafka_topic = self.settings.topic(topic)
        return self._serializer(topic)(dict(event), SerializationContext(kafka_topic, MessageField.VALUE))

    def send_raw(self, kafka_topic: str, key: str | bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes]] | None = None) -> None:
        record = Sent(kafka_topic, key, value, list(headers or []))

        def delivered(err: Any, message: Any) -> None:
            if err is None:
                record.partition, record.offset = message.partition(), message.offset()

        self.producer.produce(kafka_topic, key=key, value=value, headers=headers or [],
                              on_delivery=delivered)
        assert self.producer.flush(30) == 0, "test record not delivered"
        assert record.offset >= 0, f"no delivery report for {kafka_topic}"
        self.sent.append(record)

    def last(self) -> Sent:
        return self.sent[-1]

    def replay(self, records: Iterable[Sent]) -> list[Sent]:
        """Produce ``records`` again, same key, bytes and headers."""
        records = list(records)
        for record in records:
            self.send_raw(record.topic, record.key, record.value, record.headers)
        return self.sent[-len(records):] if records else []


@dataclass
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]

    def header(self, name: str) -> str:
        return self.headers[name].decode()


class DeadLetterReader:
    """Reads the dead-letter topic with a plain confluent-kafka consumer."""

    def __init__(self, settings: Settings) -> None:
        self.topic = settings.topic(catalog.DEAD_LETTERS)
        self.bootstrap = settings.kafka_bootstrap_servers
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"test-dlq-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe([self.topic])
        self.seen: list[DeadLetter] = []

    def poll(self, seconds: float = 0.3) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self.consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            self.seen.append(DeadLetter(message.key(), message.value(), dict(message.headers() or [])))

    def of(self, record: Sent) -> list[DeadLetter]:
        """Dead letters of ``record`` (by its source topic, partition and offset)."""
        where = (record.topic, str(record.partition), str(record.offset))
        return [d for d in self.seen
                if (d.headers.get("dlq.source.topic", b"").decode(),
                    d.headers.get("dlq.source.partition", b"").decode(),
                    d.headers.get("dlq.source.offset", b"").decode()) == where]

    async def wait_for(self, record: Sent, timeout: float = 45.0) -> DeadLetter:
        """The one dead letter of ``record``, once it arrived."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while not self.of(record):
            if time.monotonic() > deadline:
                raise AssertionError(f"no dead letter for {record.topic}[{record.partition}]"
                                     f"@{record.offset} within {timeout}s")
            await loop.run_in_executor(None, self.poll, 0.3)
        [letter] = self.of(record)
        return letter

    async def drain(self, timeout: float = 30.0) -> None:
        """Poll until every dead letter written so far was read."""
        await _drain(self.bootstrap, self.consumer, [self.topic], self.poll, timeout)

    def close(self) -> None:
        self.consumer.close()


ORDER_EVENTS = ("order.created", "order.updated", "order.canceled", "order.completed",
                "order.expired", "order.payment_pending", "order.refunded", "order.fulfilled")


class Pipeline:
    """One running in-process app with its outside clients: API, writer, readers."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings: Settings = app.settings
        self.api = Api(self.settings.worker_web_port)
        self.reader = EventReader(self.settings, ORDER_EVENTS)
        self.writer = RecordingWriter(self.settings)
        self.dead_letters = DeadLetterReader(self.settings)

    @classmethod
    async def start(cls, settings: Settings) -> Pipeline:
        return cls(await start_app(settings))

    async def stop(self) -> None:
        try:
            self.reader.close()
            self.dead_letters.close()
            await self.api.close()
        finally:
            await self.app.stop()

    async def settle(self) -> None:
        """Everything sent so far is handled, and its order.* events and dead letters read."""
        await settle(self.app, self.reader)
        await self.dead_letters.drain()

    def order_events(self, order_id: str) -> list[str]:
        """The event types published for ``order_id`` so far, in arrival order.

        Arrival order is defined per topic only: two events of one batch on two topics may
        arrive in either order, so compare those as a multiset.
        """
        return [e["event_type"] for e in self.reader.seen if e.get("order_id") == order_id]

    async def order(self, order_id: str) -> dict[str, Any]:
        response = await self.api.client.get(f"/orders/{order_id}")
        assert response.status_code == 200, response.text
        return response.json()

    async def create_order(self, user_id: str, **body: Any) -> dict[str, Any]:
        response = await self.api.create_order(user_id=user_id, **body)
        assert response.status_code == 201, response.text
        return response.json()

    def payment(self, order: Mapping[str, Any], intent_id: str | None = None,
                **fields: Any) -> dict[str, Any]:
        """A payment payload for ``order`` (amount, currency, user from the order)."""
        return {"payment_intent_id": intent_id or f"pi_{order['order_id'][:8]}",
                "order_id": order["order_id"], "user_id": order["user_id"],
                "amount": order["total_amount"], "currency": order["currency"], **fields}

    async def pay(self, order: Mapping[str, Any]) -> dict[str, Any]:
        """Drive ``order`` through payment.intent.created and payment.completed."""
        order_id = order["order_id"]
        self.writer.send("payment.intent.created", self.payment(order))
        await self.reader.wait_for("order.payment_pending", order_id=order_id)
        self.writer.send("payment.completed", self.payment(order))
        await self.reader.wait_for("order.completed", order_id=order_id)
        return await self.order(order_id)


def uid(prefix: str) -> str:
    """A unique id for one test's users, orders and subscriptions."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
