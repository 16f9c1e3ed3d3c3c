"""The registry driven by confluent-kafka's AsyncSchemaRegistryClient."""

from __future__ import annotations

import pytest
from confluent_kafka.schema_registry import AsyncSchemaRegistryClient, Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from tests.integration.registry_support import (
    record_schema,
)

pytestmark = pytest.mark.integration

V1 = record_schema("Payment", ("payment_id", "string"), ("amount", "long"))
V2 = record_schema("Payment", ("payment_id", "string"), ("amount", "long"),
                   ("note", "string", ""))
BREAKING = record_schema("Payment", ("payment_id", "long"))



async def test_async_client_full_cycle(registry, unique_name):
    subject = unique_name("payments") + "-value"
    client = AsyncSchemaRegistryClient({"url": registry.url, "max.retries": 0})
    try:
        first = await client.register_schema(subject, Schema(V1, "AVRO"))
        await client.clear_caches()
        assert await client.register_schema(subject, Schema(V1, "AVRO")) == first
        second = await client.register_schema(subject, Schema(V2, "AVRO"))
        assert second == first + 1

        found = await client.lookup_schema(subject, Schema(V2, "AVRO"))
        assert (found.schema_id, found.version) == (second, 2)
        assert "payment_id" in (await client.get_schema(first)).schema_str
        assert (await client.get_latest_version(subject)).version == 2
        assert (await client.get_version(subject, 1)).schema_id == first
        assert await client.get_versions(subject) == [1, 2]
        assert subject in await client.get_subjects()
        assert await client.get_schema_types() == ["AVRO"]

        assert await client.test_compatibility(subject, Schema(V2, "AVRO")) is True
        assert await client.test_compatibility_all_versions(subject, Schema(BREAKING, "AVRO")) is False
        with pytest.raises(SchemaRegistryError) as refused:
            await client.register_schema(subject, Schema(BREAKING, "AVRO"))
        assert refused.value.error_code == 409

        assert await client.set_compatibility(subject, "FORWARD") == {"compatibility": "FORWARD"}
        assert await client.get_compatibility(subject) == "FORWARD"
        assert await client.update_mode(subject, "READWRITE") == "READWRITE"
        assert await client.get_mode(subject) == "READWRITE"

        assert await client.delete_version(subject, 2) == 2
        assert await client.get_versions(subject) == [1]
        assert await client.delete_subject(subject) == [1]
        assert await client.delete_subject(subject, permanent=True) == [1, 2]
        with pytest.raises(SchemaRegistryError) as unknown:
            await client.get_versions(subject)
        assert unknown.value.error_code == 40401
    finally:
        await client.aclose()
