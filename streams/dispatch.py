"""Reading inputs off raw bytes, and the dead-letter records of those that fail.

Agents read their topics as raw bytes and decode here, so a record that cannot
be decoded (or that its aggregate refuses) still has its original bytes for the
dead-letter topic.  Nothing is dropped silently and no bad record crashes the
worker: it lands in ``paystream.dead-letters`` with the error and its source
topic/partition/offset in headers, and processing goes on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import faust
from faust.types import EventT

from streams import catalog
from streams.codec import MalformedRecord, decode
from streams.table_io import json_value

log = logging.getLogger(__name__)


#: Header of a record ``paystream dlq replay`` sent back to its source topic:
#: how many times it has been replayed.  It is the one ``dlq.*`` header a
#: dead letter takes over from the record, so a replayed record that fails
#: again is dead-lettered with its count (and the replay limit holds).
REPLAY_COUNT_HEADER = "dlq.replay.count"


class UnknownEventType(ValueError):
    """A record whose envelope names another event type than its topic carries."""


class Decoder:
    """Decodes the records of one app's topics: Avro events by contract, JSON commands.

    ``names`` maps the Kafka topic (with the deployment's prefix) to the
    catalog name it carries.
    """

    def __init__(self, app: Any, names: dict[str, str]) -> None:
        self.app = app
        self.names = names
        for name in names.values():
            if name not in catalog.CATALOG and name not in catalog.INTERNAL_TOPICS:
                raise LookupError(f"{name!r} is neither an event topic nor an internal topic")

    def decode(self, kafka_topic: str, value: bytes | None) -> dict[str, Any]:
        """The record as a dict; MalformedRecord / UnknownEventType when it is not one."""
        name = self.names.get(kafka_topic)
        if name is None:
            raise MalformedRecord(f"{kafka_topic}: not a topic this agent reads")
        if name not in catalog.CATALOG:
            try:
                record = json_value(value or b"")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MalformedRecord(f"{kafka_topic}: not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise MalformedRecord(f"{kafka_topic}: JSON value is not an object")
            return record
        reader = self.app.event_topic(name).value_serializer
        record = decode(value, reader.cache, reader.reader, kafka_topic)
        if record.get("event_type") != name:
            raise UnknownEventType(
                f"{kafka_topic}: envelope says event_type {record.get('event_type')!r}, "
                f"the topic carries {name!r}"
            )
        return record


def dead_letter_headers(event: EventT, reason: str, error: BaseException) -> list[tuple[str, bytes]]:
    """The ``dlq.*`` headers of a dead letter, then the record's own headers.

    The record's own ``dlq.*`` headers are dropped, except its
    :data:`REPLAY_COUNT_HEADER`, which is kept as it was.
    """
    message = event.message
    headers = [
        ("dlq.reason", reason.encode()),
        ("dlq.error", f"{type(error).__name__}: {error}".encode()[:4000]),
        ("dlq.source.topic", message.topic.encode()),
        ("dlq.source.partition", str(message.partition).encode()),
        ("dlq.source.offset", str(message.offset).encode()),
        ("dlq.source.timestamp", str(int(message.timestamp * 1000)).encode()),
    ]
    headers.extend((k, v) for k, v in (message.headers or [])
                   if not k.startswith("dlq.") or k == REPLAY_COUNT_HEADER)
    log.warning("dead-lettered %s[%d]@%d (%s): %s",
                message.topic, message.partition, message.offset, reason, error)
    return headers


def raw_source(app: Any, topics: list[str]) -> faust.TopicT:
    """``topics`` as one raw-bytes Faust topic (they are co-partitioned)."""
    return app.topic(*topics, key_type=bytes, key_serializer="raw", value_serializer="raw")


def json_topic(app: Any, name: str) -> faust.TopicT:
    """An internal JSON topic, keyed by a string id."""
    return app.topic(
        app.settings.topic(name), key_type=str, key_serializer="raw", value_serializer="json",
        acks=True,
    )
