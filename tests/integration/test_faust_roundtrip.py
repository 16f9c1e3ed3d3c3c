"""confluent-kafka's own Avro serde on both ends, our codec in a Faust agent between."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from confluent_kafka import DeserializingConsumer, SerializingProducer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import StringDeserializer, StringSerializer

from schemas import contracts
from schemas.samples import sample_record
from streams.app import PaystreamApp, create_app
from streams.envelope import new_event
from streams.settings import Settings

pytestmark = pytest.mark.integration


def _derive_payment_pending(app: PaystreamApp) -> None:
    """A test agent: every order.created becomes an order.payment_pending."""
    pending = app.event_topic("order.payment_pending")

    @app.agent(app.event_topic("order.created"), name="derive_payment_pending")
    async def derive(stream: Any) -> None:
        async for order in stream:
            event = new_event(
                "order.payment_pending",
                {
                    "order_id": order["order_id"],
                    "user_id": order["user_id"],
                    "payment_intent_id": f"pi_{order['order_id']}",
                    "amount": order["total_amount"],
                    "currency": order["currency"],
                },
                producer="order_service",
                cause=order,
            )
            await pending.send(key=order["order_id"], value=event)


def _consume_one(settings: Settings, topic: str, timeout: float = 60.0) -> Any:
    client = SchemaRegistryClient({"url": settings.schema_registry_url})
    consumer = DeserializingConsumer({
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "group.id": f"{settings.app_id}-reader",
        "auto.offset.reset": "earliest",
        "key.deserializer": StringDeserializer(),
        "value.deserializer": AvroDeserializer(client),
    })
    consumer.subscribe([topic])
    try:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                return message
        raise AssertionError(f"nothing arrived on {topic} within {timeout}s")
    finally:
        consumer.close()


async def test_confluent_serializer_to_faust_agent_to_confluent_deserializer(
    app_settings: Settings,
) -> None:
    app = create_app(app_settings, registrars=[_derive_payment_pending])
    await app.start()
    try:
        client = SchemaRegistryClient({"url": app_settings.schema_registry_url})
        producer = SerializingProducer({
            "bootstrap.servers": app_settings.kafka_bootstrap_servers,
            "key.serializer": StringSerializer(),
            "value.serializer": AvroSerializer(client, contracts.schema_text("order.created")),
            "partitioner": "murmur2_random",
        })
        order = new_event(
            "order.created",
            {k: v for k, v in sample_record("order.created").items() if k not in contracts.ENVELOPE_FIELDS},
            producer="order_service",
        )
        producer.produce(app_settings.topic("order.created"), key=order["order_id"], value=order)
        producer.flush(30)

        loop = asyncio.get_running_loop()
        message = await loop.run_in_executor(
            None, _consume_one, app_settings, app_settings.topic("order.payment_pending")
        )
    finally:
        await app.stop()

    derived = message.value()
    assert message.key() == order["order_id"]
    assert derived["event_type"] == "order.payment_pending"
    assert derived["order_id"] == order["order_id"]
    assert derived["amount"] == order["total_amount"]
    assert derived["causation_id"] == order["event_id"]
    assert str(derived["correlation_id"]) == order["correlation_id"]
