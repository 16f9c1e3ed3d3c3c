"""The registry's only state is its Kafka topic: restart, tailing, record format."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import ConfigResource
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from streams.admin import admin_client
from streams.settings import Settings
from tests.integration.registry_support import (
    RegistryThread,
    drop_topic,
    record_schema,
    registry_settings,
)

pytestmark = pytest.mark.integration

V1 = record_schema("Invoice", ("invoice_id", "string"))
V2 = record_schema("Invoice", ("invoice_id", "string"), ("total", "long", 0))
OTHER = record_schema("Refund", ("refund_id", "string"))


@pytest.fixture
def registry_topic(settings, unique_name) -> Iterator[str]:
    topic = unique_name("schemas")
    yield topic
    drop_topic(settings.kafka_bootstrap_servers, topic)


@pytest.fixture
def start_registry(settings, free_port) -> Iterator[Callable[[str], RegistryThread]]:
    started: list[RegistryThread] = []

    def start(topic: str) -> RegistryThread:
        instance = RegistryThread(registry_settings(settings, topic, free_port())).start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes, bytes | None]]:
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"reader-{topic}",
        "enable.auto.commit": False, "enable.partition.eof": True,
    })
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list[tuple[bytes, bytes | None]] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    return out
                continue
            out.append((message.key(), message.value()))
        raise TimeoutError(f"did not reach the end of {topic}")
    finally:
        consumer.close()


def test_restarted_registry_keeps_ids_versions_and_config(start_registry, registry_topic, unique_name):
    orders, refunds = unique_name("orders") + "-value", unique_name("refunds") + "-value"
    first = start_registry(registry_topic)
    with SchemaRegistryClient({"url": first.url}) as client:
        v1 = client.register_schema(orders, Schema(V1, "AVRO"))
        v2 = client.register_schema(orders, Schema(V2, "AVRO"))
        other = client.register_schema(refunds, Schema(OTHER, "AVRO"))
        client.set_compatibility(orders, "FULL")
        client.update_mode(refunds, "READONLY")
        client.delete_version(orders, 2)
    first.stop()

    second = start_registry(registry_topic)
    with SchemaRegistryClient({"url": second.url}) as client:
        assert client.get_versions(orders) == [1]
        assert client.get_versions(orders, deleted=True) == [1, 2]
        assert client.get_version(orders, 1).schema_id == v1
        assert client.get_schema(v2).schema_str is not None
        assert client.lookup_schema(refunds, Schema(OTHER, "AVRO")).schema_id == other
        assert client.get_compatibility(orders) == "FULL"
        assert client.get_mode(refunds) == "READONLY"
        # Ids continue after the highest one ever used.
        client.update_mode(refunds, "READWRITE")
        new = client.register_schema(unique_name("fresh") + "-value",
                                     Schema(record_schema("Fresh", ("x", "int")), "AVRO"))
        assert new == max(v1, v2, other) + 1


def test_second_instance_tails_writes_of_the_first(start_registry, registry_topic, unique_name):
    subject = unique_name("orders") + "-value"
    writer, follower = start_registry(registry_topic), start_registry(registry_topic)
    with SchemaRegistryClient({"url": writer.url}) as client:
        schema_id = client.register_schema(subject, Schema(V1, "AVRO"))
    deadline = time.monotonic() + 15
    answer = None
    while time.monotonic() < deadline:
        answer = httpx.get(f"{follower.url}/subjects/{subject}/versions/latest")
        if answer.status_code == 200:
            break
        time.sleep(0.1)
    assert answer is not None and answer.status_code == 200
    assert answer.json()["id"] == schema_id


async def test_concurrent_registers_of_one_schema_get_one_id(start_registry, registry_topic, unique_name):
    import asyncio

    subjects = [unique_name(f"s{i}") + "-value" for i in range(3)]
    registry = start_registry(registry_topic)
    async with httpx.AsyncClient(base_url=registry.url, timeout=30) as http:
        answers = await asyncio.gather(*(
            http.post(f"/subjects/{subject}/versions", json={"schema": V1})
            for subject in subjects for _ in range(4)
        ))
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["id"] for a in answers}) == 1
        for subject in subjects:
            assert (await http.get(f"/subjects/{subject}/versions")).json() == [1]


def test_topic_records_use_confluent_format(settings: Settings, start_registry, registry_topic,
                                            unique_name):
    subject = unique_name("orders") + "-value"
    registry = start_registry(registry_topic)
    with SchemaRegistryClient({"url": registry.url}) as client:
        schema_id = client.register_schema(subject, Schema(V1, "AVRO"))
        client.set_compatibility(subject, "FORWARD")
        client.set_compatibility(level="BACKWARD")
        client.update_mode(subject, "READWRITE")
        client.delete_subject(subject)
        client.delete_subject(subject, permanent=True)

    described = admin_client(settings.kafka_bootstrap_servers).list_topics(registry_topic, timeout=10)
    assert len(described.topics[registry_topic].partitions) == 1

    raw = read_topic(settings.kafka_bootstrap_servers, registry_topic)
    keys = [key.decode() for key, _ in raw]
    values = [None if value is None else json.loads(value) for _, value in raw]
    schema_key = (f'{{"keytype":"SCHEMA","subject":"{subject}","version":1,"magic":1}}')
    assert keys[0] == schema_key
    assert values[0] == {"subject": subject, "version": 1, "id": schema_id,
                         "schema": json.dumps(json.loads(V1), separators=(",", ":")),
                         "deleted": False}
    assert keys[1] == f'{{"keytype":"CONFIG","subject":"{subject}","magic":0}}'
    assert values[1] == {"compatibilityLevel": "FORWARD"}
    assert keys[2] == '{"keytype":"CONFIG","subject":null,"magic":0}'
    assert values[2] == {"compatibilityLevel": "BACKWARD"}
    assert keys[3] == f'{{"keytype":"MODE","subject":"{subject}","magic":0}}'
    assert values[3] == {"mode": "READWRITE"}
    assert keys[4] == f'{{"keytype":"DELETE_SUBJECT","subject":"{subject}","magic":0}}'
    assert values[4] == {"subject": subject, "version": 1}
    # Permanent delete: tombstones for the version, its config and its mode.
    assert raw[5:] == [(schema_key.encode(), None), (keys[1].encode(), None),
                       (keys[3].encode(), None)]

    admin = admin_client(settings.kafka_bootstrap_servers)
    configs = admin.describe_configs([ConfigResource("topic", registry_topic)])
    for future in configs.values():
        assert future.result(10)["cleanup.policy"].value == "compact"
