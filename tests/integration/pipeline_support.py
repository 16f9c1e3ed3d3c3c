"""Drive the pipeline from outside, as other services would: real clients only.

Events are written with confluent-kafka's own ``AvroSerializer`` (the way a
wallet or account service would publish them) and read back with its
``AvroDeserializer``; the API is called over HTTP.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer
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
