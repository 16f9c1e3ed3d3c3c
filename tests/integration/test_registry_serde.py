"""confluent-kafka's AvroSerializer/AvroDeserializer against the registry, through Kafka.

The serializers' default subject strategy (confluent-kafka >= 2.14) first asks
``GET /associations/...``; only a 404 makes it fall back to ``<topic>-value``,
so this round trip proves the registry answers that lookup the right way.
"""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streams.admin import TopicSettings, ensure_topics
from tests.integration.registry_support import (
    drop_topic,
    record_schema,
)

pytestmark = pytest.mark.integration

ORDER = record_schema("OrderCreated", ("order_id", "string"), ("amount_minor", "long"),
                      ("currency", "string"))



def test_associations_lookup_answers_404_with_confluent_body(registry):
    import httpx

    answer = httpx.get(f"{registry.url}/associations/resources/-/orders",
                       params={"resourceType": "topic", "associationType": "value"})
    assert answer.status_code == 404
    assert answer.json()["error_code"] == 40410
    assert answer.headers["content-type"].startswith("application/vnd.schemaregistry.v1+json")


def test_avro_serializer_round_trip_through_kafka(registry, settings, unique_name):
    topic = unique_name("order.created")
    ensure_topics(settings.kafka_bootstrap_servers, [TopicSettings(topic, partitions=1)])
    try:
        client = SchemaRegistryClient({"url": registry.url})
        serializer = AvroSerializer(client, ORDER)
        deserializer = AvroDeserializer(client)
        record = {"order_id": "o-1", "amount_minor": 1999, "currency": "EUR"}

        payload = serializer(record, SerializationContext(topic, MessageField.VALUE))
        assert payload[0] == 0
        schema_id = int.from_bytes(payload[1:5], "big")
        latest = client.get_latest_version(f"{topic}-value")
        assert latest.schema_id == schema_id

        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
        producer.produce(topic, value=payload, key=b"o-1")
        assert producer.flush(15) == 0

        consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": unique_name("group"),
            "auto.offset.reset": "earliest",
        })
        consumer.subscribe([topic])
        try:
            message = None
            for _ in range(60):
                message = consumer.poll(0.5)
                if message is not None and message.error() is None:
                    break
            assert message is not None and message.error() is None
            # A fresh client: the deserializer must fetch the writer schema by id.
            fresh = AvroDeserializer(SchemaRegistryClient({"url": registry.url}))
            decoded = fresh(message.value(), SerializationContext(topic, MessageField.VALUE))
            assert decoded == record
            assert deserializer(message.value(), SerializationContext(topic, MessageField.VALUE)) == record
        finally:
            consumer.close()
    finally:
        drop_topic(settings.kafka_bootstrap_servers, topic)
