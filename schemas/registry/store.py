"""The registry's storage: one compacted, single-partition Kafka topic.

Reading: a confluent-kafka consumer, assigned to partition 0 from the
beginning (no consumer group, no commits), runs in its own thread for the
registry's whole life.  It hands every batch of records to the event loop,
where they are applied in topic order.  The state counts as loaded at the
first end-of-partition; after that the same consumer keeps tailing, so records
written by another registry instance show up too.

Writing: :meth:`KafkaStore.write` produces with the shared
:class:`streams.producer.EventProducer` (idempotent, acks=all, short delivery
timeout) and then waits until the reader has applied that offset.  Memory is
therefore changed only by records Kafka acknowledged, exactly once each, in
log order, and a caller that got an answer reads its own write.

If Kafka is unreachable at start the store keeps retrying the load in the
background; :attr:`KafkaStore.ready` stays False until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.registry import errors
from schemas.registry.records import MalformedRecord, Record, decode
from streams.admin import TopicSettings, ensure_topics
from streams.producer import EventProducer, ProduceError

log = logging.getLogger(__name__)

#: How the topic is created when it does not exist (what Confluent creates).
TOPIC_CONFIG = {"cleanup.policy": "compact"}

RawRecord = tuple[bytes | None, bytes | None, int]


class KafkaStore:
    """Reads the registry topic into ``on_record`` and writes records to it."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        on_record: Callable[[Record], None],
        *,
        delivery_timeout_ms: int = 5_000,
        apply_timeout: float = 5.0,
        retry_interval: float = 2.0,
        client_id: str = "paystream-registry",
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self._on_record = on_record
        self._delivery_timeout_ms = delivery_timeout_ms
        self._apply_timeout = apply_timeout
        self._retry_interval = retry_interval
        self._client_id = client_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: EventProducer | None = None
        self._reader: threading.Thread | None = None
        self._closing = threading.Event()
        self._ready = asyncio.Event()
        self._position = 0  # next offset to apply
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start reading in the background; returns at once (see :attr:`ready`)."""
        self._loop = asyncio.get_running_loop()
        self._producer = self._new_producer()
        self._reader = threading.Thread(
            target=self._read_forever, name=f"registry-reader-{self.topic}", daemon=True
        )
        self._reader.start()

    async def close(self) -> None:
        self._closing.set()
        loop = asyncio.get_running_loop()
        if self._reader is not None:
            await loop.run_in_executor(None, self._reader.join, 10.0)
        if self._producer is not None:
            await self._producer.close(timeout=2.0)
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(errors.store_error("Schema registry is shutting down"))
        self._waiters.clear()

    @property
    def ready(self) -> bool:
        """True once the topic was read to its end at least once."""
        return self._ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self.ready

    # -- writing ---------------------------------------------------------------

    async def write(self, records: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Produce ``records`` in order, then wait until all are applied to memory.

        Raises a ``50001`` :class:`RegistryError` when Kafka does not acknowledge
        (broker down: after the delivery timeout) and ``50002`` when the write
        was acknowledged but did not come back through the reader in time.
        """
        producer = self._producer
        if producer is None:
            raise errors.store_error("Schema registry store is not started")
        last_offset = -1
        for key, value in records:
            try:
                message = await producer.send(self.topic, value, key, partition=0)
            except ProduceError as exc:
                self._replace_producer_if_fatal(exc)
                raise errors.store_error(
                    f"Error while writing to the backend store (Kafka topic '{self.topic}'): {exc}"
                ) from exc
            last_offset = max(last_offset, message.offset() or 0)
        if last_offset >= 0:
            await self._wait_applied(last_offset)

    async def _wait_applied(self, offset: int) -> None:
        if offset < self._position:
            return
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._waiters, (offset, next(self._tiebreak), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), self._apply_timeout)
        except TimeoutError as exc:
            raise errors.operation_timeout(
                f"Write to Kafka topic '{self.topic}' was acknowledged at offset {offset} but not "
                f"read back within {self._apply_timeout:g}s; it will be applied once the reader "
                "catches up"
            ) from exc

    def _new_producer(self) -> EventProducer:
        return EventProducer(
            self.bootstrap_servers,
            client_id=self._client_id,
            delivery_timeout_ms=self._delivery_timeout_ms,
            error_cb=self._on_client_error,
        )

    def _replace_producer_if_fatal(self, exc: ProduceError) -> None:
        error = exc.kafka_error
        if error is not None and error.fatal() and self._producer is not None:
            log.error("registry producer hit a fatal error (%s); creating a new one", error)
            old, self._producer = self._producer, self._new_producer()
            assert self._loop is not None
            self._loop.create_task(old.close(timeout=0.1))

    # -- reading (reader thread) -----------------------------------------------

    def _read_forever(self) -> None:
        consumer = self._open_consumer()
        if consumer is None:
            return
        try:
            while not self._closing.is_set():
                messages = consumer.consume(num_messages=500, timeout=0.2)
                batch: list[RawRecord] = []
                end: int | None = None
                for message in messages:
                    error = message.error()
                    if error is None:
                        batch.append((message.key(), message.value(), message.offset()))
                    elif error.code() == KafkaError._PARTITION_EOF:
                        end = message.offset()
                    else:
                        self._note_error(f"reading '{self.topic}': {error}")
                if batch or end is not None:
                    self._call_in_loop(self._deliver, batch, end)
        finally:
            consumer.close()

    def _open_consumer(self) -> Consumer | None:
        """Create the topic if needed and assign partition 0; retry until Kafka answers."""
        while not self._closing.is_set():
            try:
                ensure_topics(
                    self.bootstrap_servers,
                    [TopicSettings(self.topic, partitions=1, config=dict(TOPIC_CONFIG))],
                    timeout=5.0,
                )
                consumer = Consumer(self._consumer_config())
                consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
                return consumer
            except Exception as exc:  # any failure means Kafka is not usable yet
                self._note_error(f"cannot load '{self.topic}' yet: {exc}")
                self._closing.wait(self._retry_interval)
        return None

    def _consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": f"{self._client_id}-reader",
            # Required by librdkafka; never joined or committed (assign(), no commits).
            "group.id": f"paystream-registry-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 100,
            "error_cb": self._on_client_error,
        }

    def _on_client_error(self, error: KafkaError) -> None:
        self._note_error(f"kafka client: {error}")

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("schema registry store: %s", message)
        self.last_error = message

    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed while shutting down
            loop.call_soon_threadsafe(callback, *args)

    # -- applying (event loop) -------------------------------------------------

    def _deliver(self, batch: list[RawRecord], end: int | None) -> None:
        for key, value, offset in batch:
            if offset < self._position:
                continue  # already applied (a re-fetch after a reconnect)
            try:
                self._on_record(decode(key, value, offset))
            except MalformedRecord as exc:
                log.warning("skipping malformed registry record: %s", exc)
            except Exception:  # a bug must not wedge the reader: log it, go on
                log.exception("could not apply registry record at offset %d", offset)
            self._position = offset + 1
        if end is not None:
            self._position = max(self._position, end)
            if not self._ready.is_set():
                log.info("schema registry state loaded from '%s' (%d records)", self.topic, end)
                self.last_error = None
                self._ready.set()
        while self._waiters and self._waiters[0][0] < self._position:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
