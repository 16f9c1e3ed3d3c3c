"""The AsyncAPI 3.0 document of paystream's event topics, generated from the catalog and the contracts.

Nothing in it is written by hand: channels, keys, partitions and retention
come from :mod:`streams.catalog`, payload schemas are the ``.avsc`` files as
they are (:mod:`schemas.contracts`), producers and consumers are the
catalog's.  ``paystream topics asyncapi`` writes it and the schema registry
serves it at ``GET /asyncapi.json``, so a consumer team reads the same
contracts the registry holds.

Shape, per catalog topic ``t`` (ids are the topic names, which AsyncAPI
allows as map keys):

- ``channels[t]``: ``address`` the Kafka topic of this deployment (prefix
  included), the topic's description and key, the one message ``t``, and
  the Kafka channel binding (partitions, cleanup policy, retention);
- ``components.messages[t]``: the Avro payload
  (``schemaFormat: application/vnd.apache.avro;version=1.9.0``, ``schema``
  the contract), content type Confluent-framed Avro, and the Kafka message
  binding: the key (a string: the catalog's key fields) and where the
  schema id is (Confluent framing in the payload, subject ``<topic>-value``);
- ``operations``: ``<service>.send.<t>`` for the topic's producer and
  ``<service>.receive.<t>`` for each consumer, tagged with the service.

Internal topics (commands, indexes, dead letters) are paystream's own
plumbing in JSON without a contract, and are not part of it.
"""

from __future__ import annotations

import json
from typing import Any

from schemas import contracts
from streams import catalog

ASYNCAPI_VERSION = "3.0.0"
AVRO_SCHEMA_FORMAT = "application/vnd.apache.avro;version=1.9.0"
#: Media type of a record value: Avro binary behind Confluent's 5-byte frame.
CONTENT_TYPE = "application/vnd.apache.avro+binary"
KAFKA_BINDING_VERSION = "0.5.0"
#: The document's own version: bump it when its shape (not a contract) changes.
DOCUMENT_VERSION = "1.0.0"


def _key_description(spec: catalog.TopicSpec) -> str:
    fields = " if set, else ".join(f"`{name}`" for name in spec.key_fields)
    return (f"The aggregate id the topic is partitioned by, as UTF-8 text: the event's {fields}. "
            "All events of one aggregate share a partition, hence their order.")


def _channel(spec: catalog.TopicSpec, address: str) -> dict[str, Any]:
    return {
        "address": address,
        "title": spec.name,
        "summary": spec.description,
        "description": (
            f"{spec.description} Produced by {spec.producer}"
            f"{' (outside paystream)' if spec.inbound else ''}; consumed by "
            f"{', '.join(spec.consumers)}. Key: {', else '.join(spec.key_fields)}. Contract: "
            f"`{spec.schema_file}`, registry subject `{catalog.value_subject(address)}`."),
        "messages": {spec.name: {"$ref": f"#/components/messages/{spec.name}"}},
        "bindings": {"kafka": {
            "topic": address,
            "partitions": spec.partitions,
            "topicConfiguration": {
                "cleanup.policy": [spec.cleanup_policy],
                "retention.ms": spec.retention_ms,
            },
            "bindingVersion": KAFKA_BINDING_VERSION,
        }},
    }


def _message(spec: catalog.TopicSpec) -> dict[str, Any]:
    schema = contracts.schema_dict(spec.name)
    return {
        "name": spec.name,
        "title": schema.get("name", spec.name),
        "summary": spec.description,
        "description": " ".join(str(schema.get("doc", "")).split()),
        "contentType": CONTENT_TYPE,
        "payload": {"schemaFormat": AVRO_SCHEMA_FORMAT, "schema": schema},
        "bindings": {"kafka": {
            "key": {"type": "string", "description": _key_description(spec)},
            "schemaIdLocation": "payload",
            "schemaIdPayloadEncoding": "confluent",
            "schemaLookupStrategy": "TopicIdStrategy",
            "bindingVersion": KAFKA_BINDING_VERSION,
        }},
    }


def _operation(action: str, service: str, spec: catalog.TopicSpec) -> dict[str, Any]:
    verb = "publishes" if action == "send" else "consumes"
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{spec.name}"},
        "title": f"{service} {verb} {spec.name}",
        "summary": f"{service} {verb} {spec.name}.",
        "messages": [{"$ref": f"#/channels/{spec.name}/messages/{spec.name}"}],
        "tags": [{"name": service}],
    }


def document(*, topic_prefix: str = "", bootstrap_servers: str = "localhost:9092",
             registry_url: str = "http://localhost:8081") -> dict[str, Any]:
    """The AsyncAPI document of every catalog topic, addressed as this deployment names them."""
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for spec in catalog.CATALOG.values():
        channels[spec.name] = _channel(spec, f"{topic_prefix}{spec.name}")
        messages[spec.name] = _message(spec)
        operations[f"{spec.producer}.send.{spec.name}"] = _operation("send", spec.producer, spec)
        for consumer in spec.consumers:
            operations[f"{consumer}.receive.{spec.name}"] = _operation("receive", consumer, spec)
    services = sorted({spec.producer for spec in catalog.CATALOG.values()}
                      | {c for spec in catalog.CATALOG.values() for c in spec.consumers})
    servers = {
        f"kafka-{index}" if index else "kafka": {
            "host": host.strip(),
            "protocol": "kafka",
            "description": "A Kafka bootstrap server of this deployment.",
            "bindings": {"kafka": {
                "schemaRegistryUrl": registry_url,
                "schemaRegistryVendor": "confluent",
                "bindingVersion": KAFKA_BINDING_VERSION,
            }},
        }
        for index, host in enumerate(h for h in bootstrap_servers.split(",") if h.strip())
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:paystream:events",
        "info": {
            "title": "paystream events",
            "version": DOCUMENT_VERSION,
            "description": (
                "Every event topic of paystream: one Avro contract per topic (Confluent wire "
                "format: magic byte 0, 4-byte schema id, Avro binary; subject `<topic>-value`), "
                "the record key each topic is partitioned by, and which services produce and "
                "consume it. Every event opens with the envelope "
                f"({', '.join(contracts.ENVELOPE_FIELDS)}); `event_id` is the idempotency key. "
                "Generated from streams/catalog.py and schemas/avro/*.avsc."),
            "tags": [{"name": service} for service in services],
        },
        "servers": servers,
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def document_for(settings: Any) -> dict[str, Any]:
    """:func:`document` for a :class:`streams.settings.Settings` (prefix, broker, registry)."""
    return document(topic_prefix=settings.topic_prefix,
                    bootstrap_servers=settings.kafka_bootstrap_servers,
                    registry_url=settings.schema_registry_url)


def render(doc: dict[str, Any]) -> str:
    """The document as the JSON text written and served (stable key order, trailing newline)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
