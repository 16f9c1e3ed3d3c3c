"""The one Kafka producer helper of paystream (outside Faust's own producer).

The webhook ingress and the schema registry must not answer their callers
before Kafka has the record, so every send here is idempotent, ``acks=all``,
and awaitable until the broker acknowledged it.  confluent-kafka's producer is
thread-based; a small poll thread turns its delivery callbacks into asyncio
futures so callers can simply ``await producer.send(...)``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

Headers = Sequence[tuple[str, bytes]]


class ProduceError(Exception):
    """A record was not acknowledged by Kafka (broker down, timeout, rejected)."""

    def __init__(self, topic: str, error: KafkaError | str) -> None:
        self.topic = topic
        self.kafka_error = error if isinstance(error, KafkaError) else None
        self.retriable = bool(self.kafka_error and self.kafka_error.retriable())
        super().__init__(f"record for {topic!r} not acknowledged: {error}")


def producer_config(
    bootstrap_servers: str, *, client_id: str, delivery_timeout_ms: int = 30_000
) -> dict[str, Any]:
    """The configuration every paystream producer uses: no loss, no duplicates."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "client.id": client_id,
        "enable.idempotence": True,
        # Java's and aiokafka's (so Faust's) default partitioner: a key lands
        # on the same partition whoever produces it, which co-partitioned
        # agents rely on.  librdkafka's own default (CRC32) would not.
        "partitioner": "murmur2_random",
        "acks": "all",
        "linger.ms": 2,
        "compression.type": "lz4",
        "delivery.timeout.ms": delivery_timeout_ms,
        "request.timeout.ms": min(delivery_timeout_ms, 30_000),
    }


class EventProducer:
    """Awaitable, idempotent producer; one per process is enough."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str,
        delivery_timeout_ms: int = 30_000,
        **extra: Any,
    ) -> None:
        config = producer_config(
            bootstrap_servers, client_id=client_id, delivery_timeout_ms=delivery_timeout_ms
        )
        config.update(extra)
        self._producer = Producer(config)
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name=f"{client_id}-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.05)

    async def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | str | None = None,
        *,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> Message:
        """Produce one record and return once the broker acknowledged it.

        Raises :class:`ProduceError` if Kafka refuses it or the delivery timeout
        passes (for example while the broker is down).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, future, topic, err, msg)

        kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": on_delivery}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                await asyncio.sleep(0.01)
            except KafkaException as exc:
                raise ProduceError(topic, exc.args[0]) from exc
        return await future

    def flush(self, timeout: float = 30.0) -> int:
        """Block until queued records are delivered; returns how many are left."""
        return self._producer.flush(timeout)

    async def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued, then stop the poll thread."""
        await asyncio.get_running_loop().run_in_executor(None, self._producer.flush, timeout)
        self._closed.set()
        self._poller.join(timeout=1.0)


def _settle(
    future: asyncio.Future[Message], topic: str, err: KafkaError | None, msg: Message
) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(ProduceError(topic, err))
    else:
        future.set_result(msg)
