"""The registry driven by confluent-kafka's blocking SchemaRegistryClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.schema_registry_client import (
    ConfigCompatibilityLevel,
    ServerConfig,
)

from tests.integration.registry_support import (
    record_schema,
)

pytestmark = pytest.mark.integration

V1 = record_schema("Order", ("order_id", "string"), ("amount", "long"))
V2 = record_schema("Order", ("order_id", "string"), ("amount", "long"),
                   ("currency", ["null", "string"], None))
V2_REQUIRED = record_schema("Order", ("order_id", "string"), ("amount", "long"),
                            ("currency", "string"))



@pytest.fixture
def client(registry) -> Iterator[SchemaRegistryClient]:
    with SchemaRegistryClient({"url": registry.url, "max.retries": 0}) as sr:
        yield sr


def test_register_is_idempotent_and_ids_are_global(client, unique_name):
    subject, other = unique_name("orders") + "-value", unique_name("copy") + "-value"
    first = client.register_schema(subject, Schema(V1, "AVRO"))
    client.clear_caches()
    assert client.register_schema(subject, Schema(V1, "AVRO")) == first
    assert client.register_schema(subject, Schema(V1, "AVRO"), normalize_schemas=True) == first
    client.clear_caches()
    assert client.register_schema(other, Schema(V1, "AVRO")) == first
    assert client.get_versions(subject) == [1]
    second = client.register_schema(subject, Schema(V2, "AVRO"))
    assert second != first
    assert client.get_versions(subject) == [1, 2]


def test_lookup_get_by_id_versions_and_latest(client, unique_name):
    subject = unique_name("orders") + "-value"
    schema_id = client.register_schema(subject, Schema(V1, "AVRO"))
    client.register_schema(subject, Schema(V2, "AVRO"))
    client.clear_caches()

    found = client.lookup_schema(subject, Schema(V1, "AVRO"))
    assert (found.schema_id, found.version, found.subject) == (schema_id, 1, subject)
    fetched = client.get_schema(schema_id)
    assert fetched.schema_type == "AVRO"
    assert "order_id" in fetched.schema_str
    client.clear_caches()
    assert client.get_schema(schema_id, subject_name=subject).schema_str == fetched.schema_str

    latest = client.get_latest_version(subject)
    assert latest.version == 2 and "currency" in latest.schema.schema_str
    assert client.get_version(subject, 1).schema_id == schema_id
    assert [(v.subject, v.version) for v in client.get_schema_versions(schema_id)] == [(subject, 1)]
    assert client.get_subjects_by_schema_id(schema_id) == [subject]
    assert subject in client.get_subjects()
    assert client.get_schema_types() == ["AVRO"]


def test_lookup_errors(client, unique_name):
    subject = unique_name("orders") + "-value"
    with pytest.raises(SchemaRegistryError) as unknown:
        client.lookup_schema(subject, Schema(V1, "AVRO"))
    assert (unknown.value.http_status_code, unknown.value.error_code) == (404, 40401)
    client.register_schema(subject, Schema(V1, "AVRO"))
    with pytest.raises(SchemaRegistryError) as missing:
        client.lookup_schema(subject, Schema(V2, "AVRO"))
    assert (missing.value.http_status_code, missing.value.error_code) == (404, 40403)
    with pytest.raises(SchemaRegistryError) as no_version:
        client.get_version(subject, 7)
    assert no_version.value.error_code == 40402
    with pytest.raises(SchemaRegistryError) as no_id:
        client.get_schema(987654)
    assert no_id.value.error_code == 40403


def test_incompatible_schema_is_refused_with_409(client, unique_name):
    subject = unique_name("orders") + "-value"
    client.register_schema(subject, Schema(V1, "AVRO"))
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, Schema(V2_REQUIRED, "AVRO"))
    assert refused.value.http_status_code == 409
    assert refused.value.error_code == 409
    assert "currency" in refused.value.error_message
    assert client.get_versions(subject) == [1]


def test_compatibility_endpoints(client, unique_name):
    subject = unique_name("orders") + "-value"
    client.register_schema(subject, Schema(V1, "AVRO"))
    assert client.test_compatibility(subject, Schema(V2, "AVRO")) is True
    assert client.test_compatibility(subject, Schema(V2_REQUIRED, "AVRO"), version=1) is False
    assert client.test_compatibility_all_versions(subject, Schema(V2, "AVRO")) is True
    assert client.test_compatibility_all_versions(subject, Schema(V2_REQUIRED, "AVRO"),
                                                  verbose=True) is False


def test_soft_and_permanent_deletes(client, unique_name):
    subject = unique_name("orders") + "-value"
    first = client.register_schema(subject, Schema(V1, "AVRO"))
    client.register_schema(subject, Schema(V2, "AVRO"))

    assert client.delete_version(subject, 2) == 2
    assert client.get_versions(subject) == [1]
    assert client.get_versions(subject, deleted=True) == [1, 2]
    with pytest.raises(SchemaRegistryError) as not_soft:
        client.delete_version(subject, 1, permanent=True)
    assert not_soft.value.error_code == 40407
    assert client.delete_version(subject, 2, permanent=True) == 2
    assert client.get_versions(subject, deleted=True) == [1]

    assert client.delete_subject(subject) == [1]
    assert subject not in client.get_subjects()
    assert subject in client.get_subjects(deleted=True)
    # A soft-deleted schema still resolves by id: old records must stay readable.
    client.clear_caches()
    assert "order_id" in client.get_schema(first).schema_str
    with pytest.raises(SchemaRegistryError) as gone:
        client.get_latest_version(subject)
    assert gone.value.error_code == 40401
    assert client.delete_subject(subject, permanent=True) == [1]
    assert subject not in client.get_subjects(deleted=True)
    client.clear_caches()
    with pytest.raises(SchemaRegistryError) as unknown:
        client.get_versions(subject)
    assert unknown.value.error_code == 40401

    # Registering again after a permanent delete starts the subject over.
    again = client.register_schema(subject, Schema(V2, "AVRO"))
    assert client.get_versions(subject) == [1]
    assert again != first


def test_permanent_delete_requires_soft_delete_first(client, unique_name):
    subject = unique_name("orders") + "-value"
    client.register_schema(subject, Schema(V1, "AVRO"))
    with pytest.raises(SchemaRegistryError) as refused:
        client.delete_subject(subject, permanent=True)
    assert refused.value.error_code == 40405
    client.delete_subject(subject)
    with pytest.raises(SchemaRegistryError) as twice:
        client.delete_subject(subject)
    assert twice.value.error_code == 40404


def test_config_global_and_subject(client, unique_name):
    subject = unique_name("orders") + "-value"
    assert client.get_compatibility() == "BACKWARD"
    with pytest.raises(SchemaRegistryError) as unset:
        client.get_config(subject)
    assert unset.value.http_status_code == 404

    assert client.set_compatibility(subject, "NONE") == {"compatibility": "NONE"}
    assert client.get_compatibility(subject) == "NONE"
    client.register_schema(subject, Schema(V1, "AVRO"))
    client.register_schema(subject, Schema(V2_REQUIRED, "AVRO"))  # NONE: anything goes

    config = ServerConfig(compatibility=ConfigCompatibilityLevel.FULL_TRANSITIVE)
    client.set_config(subject, config)
    assert client.get_config(subject).compatibility_level == ConfigCompatibilityLevel.FULL_TRANSITIVE
    deleted = client.delete_config(subject)
    assert deleted.compatibility_level == ConfigCompatibilityLevel.FULL_TRANSITIVE
    with pytest.raises(SchemaRegistryError):
        client.get_config(subject)

    with pytest.raises(SchemaRegistryError) as bad:
        client.set_compatibility(subject, "SIDEWAYS")
    assert (bad.value.http_status_code, bad.value.error_code) == (422, 42203)


def test_global_config_change_and_reset(client, registry):
    client.set_compatibility(level="FORWARD")
    try:
        assert client.get_compatibility() == "FORWARD"
    finally:
        client.delete_config()
    assert client.get_compatibility() == "BACKWARD"


def test_mode(client, unique_name):
    subject = unique_name("orders") + "-value"
    assert client.get_global_mode() == "READWRITE"
    assert client.update_mode(subject, "READONLY") == "READONLY"
    assert client.get_mode(subject) == "READONLY"
    with pytest.raises(SchemaRegistryError) as readonly:
        client.register_schema(subject, Schema(V1, "AVRO"))
    assert readonly.value.error_code == 42205
    assert client.delete_mode(subject) == "READONLY"
    client.register_schema(subject, Schema(V1, "AVRO"))
    with pytest.raises(SchemaRegistryError) as bad:
        client.update_mode(subject, "SOMETIMES")
    assert bad.value.error_code == 42204


def test_schema_with_references_is_refused_clearly(client, unique_name):
    from confluent_kafka.schema_registry import SchemaReference

    subject = unique_name("orders") + "-value"
    with_ref = Schema(V1, "AVRO", references=[SchemaReference("paystream.Money", "money", 1)])
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, with_ref)
    assert refused.value.error_code == 42201
    assert "references" in refused.value.error_message
    client.register_schema(subject, Schema(V1, "AVRO", references=[]))


def test_non_avro_schema_type_is_refused(client, unique_name):
    subject = unique_name("orders") + "-value"
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, Schema('{"type": "object"}', "JSON"))
    assert refused.value.error_code == 42201
    assert "AVRO" in refused.value.error_message


def test_import_mode_keeps_the_given_id_and_version(client, registry, unique_name):
    import httpx

    subject = unique_name("imported") + "-value"
    url = f"{registry.url}/subjects/{subject}/versions"
    refused = httpx.post(url, json={"schema": V1, "id": 4242, "version": 3})
    assert (refused.status_code, refused.json()["error_code"]) == (422, 42205)

    assert client.update_mode(subject, "IMPORT") == "IMPORT"
    imported = httpx.post(url, json={"schema": V1, "id": 4242, "version": 3})
    assert imported.status_code == 200, imported.text
    assert imported.json()["id"] == 4242
    assert client.get_version(subject, 3).schema_id == 4242
    client.update_mode(subject, "READWRITE")
    # New ids continue after the highest imported one.
    fresh = client.register_schema(unique_name("after") + "-value",
                                   Schema(record_schema("After", ("x", "int")), "AVRO"))
    assert fresh > 4242
