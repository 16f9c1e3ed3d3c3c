"""The AsyncAPI document: valid against the official AsyncAPI 3.0.0 JSON Schema, and true to the catalog.

The schema is the one the AsyncAPI initiative publishes in the npm package
``@asyncapi/specs`` (fetched once by :mod:`streams.devtools.asyncapi_spec`),
applied with ``jsonschema``; the same validator must also reject broken
variants, so a validation that accepts anything cannot pass here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from schemas import asyncapi, contracts
from streams import catalog
from streams.cli import main
from streams.devtools import asyncapi_spec


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    try:
        schema = asyncapi_spec.load_schema()
    except asyncapi_spec.SpecUnavailable as exc:
        pytest.fail(f"the AsyncAPI 3.0.0 JSON Schema could not be fetched: {exc}")
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return asyncapi.document(topic_prefix="staging.", bootstrap_servers="k1:9092,k2:9092",
                             registry_url="http://registry:8081")


def errors(validator: jsonschema.protocols.Validator, document: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(document)]


def test_the_document_is_valid_asyncapi_3(validator: jsonschema.protocols.Validator,
                                          doc: dict[str, Any]) -> None:
    assert errors(validator, doc) == []
    # What the server and the command line give out is the same JSON, and valid too.
    assert errors(validator, json.loads(asyncapi.render(asyncapi.document()))) == []


@pytest.mark.parametrize("breakage", [
    "wrong version", "unknown action", "avro payload that is not avro", "channel without address type",
    "operation without channel"])
def test_the_validator_rejects_broken_documents(validator: jsonschema.protocols.Validator,
                                                doc: dict[str, Any], breakage: str) -> None:
    broken = copy.deepcopy(doc)
    if breakage == "wrong version":
        broken["asyncapi"] = "2.6.0"
    elif breakage == "unknown action":
        broken["operations"]["order_service.send.order.created"]["action"] = "publish"
    elif breakage == "avro payload that is not avro":
        broken["components"]["messages"]["order.created"]["payload"]["schema"] = {
            "type": "record", "fields": "not a list"}
    elif breakage == "channel without address type":
        broken["channels"]["order.created"]["address"] = 42
    else:
        del broken["operations"]["order_service.send.order.created"]["channel"]
    assert errors(validator, broken)


def test_one_channel_and_message_per_catalog_topic(doc: dict[str, Any]) -> None:
    assert set(doc["channels"]) == set(catalog.CATALOG) == set(doc["components"]["messages"])
    for name, spec in catalog.CATALOG.items():
        channel = doc["channels"][name]
        assert channel["address"] == f"staging.{name}"
        assert channel["messages"] == {name: {"$ref": f"#/components/messages/{name}"}}
        binding = channel["bindings"]["kafka"]
        assert binding["partitions"] == spec.partitions
        assert binding["topicConfiguration"] == {"cleanup.policy": [spec.cleanup_policy],
                                                 "retention.ms": spec.retention_ms}
        message = doc["components"]["messages"][name]
        assert message["payload"] == {"schemaFormat": "application/vnd.apache.avro;version=1.9.0",
                                      "schema": contracts.schema_dict(name)}
        key = message["bindings"]["kafka"]["key"]
        assert key["type"] == "string"
        assert all(f"`{field}`" in key["description"] for field in spec.key_fields)
        assert message["bindings"]["kafka"]["schemaIdLocation"] == "payload"


def test_operations_are_the_catalogs_producers_and_consumers(doc: dict[str, Any]) -> None:
    expected = set()
    for name, spec in catalog.CATALOG.items():
        expected.add((spec.producer, "send", name))
        expected |= {(consumer, "receive", name) for consumer in spec.consumers}
    found = set()
    for op_id, operation in doc["operations"].items():
        [tag] = operation["tags"]
        topic = operation["channel"]["$ref"].removeprefix("#/channels/")
        found.add((tag["name"], operation["action"], topic))
        assert op_id == f"{tag['name']}.{operation['action']}.{topic}"
        assert operation["messages"] == [{"$ref": f"#/channels/{topic}/messages/{topic}"}]
    assert found == expected
    assert ("wallet_service", "send", "wallet.credits_added") in found  # inbound topics too
    assert ("payment_service", "receive", "order.created") in found


def test_servers_name_the_broker_and_the_registry(doc: dict[str, Any]) -> None:
    assert [s["host"] for s in doc["servers"].values()] == ["k1:9092", "k2:9092"]
    for server in doc["servers"].values():
        assert server["protocol"] == "kafka"
        assert server["bindings"]["kafka"]["schemaRegistryUrl"] == "http://registry:8081"


def test_paystream_topics_asyncapi_writes_the_document(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      validator: jsonschema.protocols.Validator) -> None:
    monkeypatch.setenv("PAYSTREAM_TOPIC_PREFIX", "cli.")
    target = tmp_path / "asyncapi.json"
    assert main(["topics", "asyncapi", "--output", str(target)]) == 0
    written = json.loads(target.read_text())
    assert written["channels"]["order.created"]["address"] == "cli.order.created"
    assert errors(validator, written) == []
