"""Reading records off Kafka for an operator, and decoding them for a human.

Shared by the dead-letter tools and the tail.  Reads use a plain
confluent-kafka consumer with partitions assigned by hand: no consumer group
joins, no offset is committed, so looking at a topic never moves anybody's
position.  Values are decoded with the one codec (:mod:`streams.codec`):
Confluent-framed Avro by the writer schema the registry has for the id in
the frame, else JSON, else shown as hex.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams.codec import (
    MAGIC_BYTE,
    REGISTRY_TRANSPORT_ERRORS,
    MalformedRecord,
    SchemaCache,
    decode,
)

#: How long a metadata or watermark request may take before the tool gives up.
REQUEST_TIMEOUT = 10.0


class OpsError(Exception):
    """Bad input or an unreachable dependency, said in words an operator can act on."""


def open_consumer(bootstrap_servers: str, **extra: Any) -> Consumer:
    """A consumer that only reads: partitions are assigned by hand, nothing is committed.

    ``group.id`` is required by librdkafka even without subscribing; a fresh
    one per consumer keeps it out of every real group.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": f"paystream-ops-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "allow.auto.create.topics": False,
    }
    config.update(extra)
    return Consumer(config)


def partitions_of(consumer: Consumer, topic: str) -> list[int]:
    """The partition numbers of ``topic``; :class:`OpsError` if the topic does not exist."""
    try:
        metadata = consumer.list_topics(topic, timeout=REQUEST_TIMEOUT)
    except Exception as exc:  # KafkaException: broker unreachable within the timeout
        raise OpsError(f"cannot read the metadata of topic {topic!r}: {exc}") from exc
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise OpsError(f"topic {topic!r} does not exist")
    return sorted(found.partitions)


def watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """(first offset, end offset) of one partition; the end is the next offset to be written."""
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=REQUEST_TIMEOUT, cached=False)
    except Exception as exc:
        raise OpsError(f"cannot read the offsets of {topic}[{partition}]: {exc}") from exc
    return int(low), int(high)


def offsets_at(consumer: Consumer, topic: str, partitions: Sequence[int],
               timestamp_ms: int) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is >= ``timestamp_ms`` (-1: none)."""
    wanted = [TopicPartition(topic, p, int(timestamp_ms)) for p in partitions]
    try:
        found = consumer.offsets_for_times(wanted, timeout=REQUEST_TIMEOUT)
    except Exception as exc:
        raise OpsError(f"cannot look up offsets by time in {topic}: {exc}") from exc
    return {tp.partition: tp.offset for tp in found}


def read_ranges(consumer: Consumer, topic: str, ranges: Mapping[int, tuple[int, int]],
                *, timeout: float = 60.0, batch: int = 500) -> Iterator[Message]:
    """Every record of ``topic`` with ``start <= offset < end`` in its partition.

    ``ranges`` maps partition -> (start, end).  Stops when each partition
    reached its end (or the partition's end of log); :class:`OpsError` when
    ``timeout`` seconds pass without a record or an end-of-partition event.
    """
    todo = {p: (start, end) for p, (start, end) in ranges.items() if end > start}
    if not todo:
        return
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
    try:
        quiet_since = time.monotonic()
        while todo:
            messages = consumer.consume(batch, timeout=0.5)
            if not messages:
                if time.monotonic() - quiet_since > timeout:
                    left = ", ".join(f"[{p}] {s}..{e}" for p, (s, e) in sorted(todo.items()))
                    raise OpsError(f"reading {topic} timed out after {timeout:g} s; left: {left}")
                continue
            quiet_since = time.monotonic()
            for message in messages:
                partition = message.partition()
                if partition not in todo:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        todo.pop(partition, None)
                        continue
                    raise OpsError(f"reading {topic}[{partition}] failed: {error}")
                offset = message.offset()
                if offset >= todo[partition][1]:
                    todo.pop(partition, None)
                    continue
                yield message
                if offset + 1 >= todo[partition][1]:
                    todo.pop(partition, None)
    finally:
        consumer.unassign()


def read_one(consumer: Consumer, topic: str, partition: int, offset: int,
             *, timeout: float = 15.0) -> Message:
    """The record at ``offset`` of ``topic[partition]``; :class:`OpsError` if there is none."""
    partitions = partitions_of(consumer, topic)
    if partition not in partitions:
        raise OpsError(f"{topic} has no partition {partition} (partitions: "
                       f"{', '.join(map(str, partitions))})")
    low, high = watermarks(consumer, topic, partition)
    if not low <= offset < high:
        raise OpsError(f"no record at {topic}[{partition}] offset {offset}: the partition "
                       f"holds offsets {low}..{high - 1}" if high > low else
                       f"no record at {topic}[{partition}] offset {offset}: the partition is empty")
    for message in read_ranges(consumer, topic, {partition: (offset, offset + 1)}, timeout=timeout):
        if message.offset() == offset:
            return message
        break
    raise OpsError(f"no record at {topic}[{partition}] offset {offset} (not a data record: "
                   f"a transaction marker or a compacted gap)")


# ----------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class Decoded:
    """A record value, decoded as far as it goes."""

    #: ``avro`` (Confluent framing, decoded by its writer schema), ``json``,
    #: ``hex`` (neither), or ``null`` (no value: a tombstone).
    format: str
    #: The decoded value (a dict for Avro, any JSON value), or the bytes as hex.
    value: Any
    #: Avro only: the writer schema id in the frame and the schema's full name.
    schema_id: int | None = None
    schema_name: str | None = None
    #: Why the bytes were not Avro, when they looked like it (magic byte 0).
    note: str | None = None

    def asdict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "value": self.value}
        if self.schema_id is not None:
            out["schema_id"] = self.schema_id
            out["schema"] = self.schema_name
        if self.note:
            out["note"] = self.note
        return out


class ValueDecoder:
    """Decodes values the way a consumer of the topic would, for display.

    Avro is decoded with the writer's own schema (fetched by id once, through
    the codec's :class:`streams.codec.SchemaCache`), so a record shows what
    was written even when it does not fit the topic's contract.  A registry
    that cannot be reached is an :class:`OpsError`, never a silent hex dump.
    """

    def __init__(self, registry: SchemaCache | str) -> None:
        self.cache = SchemaCache(registry, auto_register=False) if isinstance(registry, str) else registry
        self.registry = registry if isinstance(registry, str) else "the schema registry"

    def decode(self, data: bytes | None, topic: str = "?") -> Decoded:
        if data is None:
            return Decoded("null", None)
        note = None
        if len(data) >= 5 and data[0] == MAGIC_BYTE:
            schema_id = int.from_bytes(data[1:5], "big")
            try:
                writer = self.cache.writer_schema(schema_id)
                value = decode(data, self.cache, writer, topic)
                return Decoded("avro", value, schema_id, _schema_name(writer))
            except MalformedRecord as exc:
                note = str(exc)
            except REGISTRY_TRANSPORT_ERRORS as exc:
                raise OpsError(f"cannot reach {self.registry} to decode schema id {schema_id}: "
                               f"{exc}") from exc
            except SchemaRegistryError as exc:
                raise OpsError(f"{self.registry} failed on schema id {schema_id}: {exc}") from exc
        try:
            return Decoded("json", json.loads(data.decode("utf-8")), note=note)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Decoded("hex", data.hex(), note=note)


def _schema_name(schema: Mapping[str, Any]) -> str | None:
    name = schema.get("name")
    namespace = schema.get("namespace")
    if name and namespace and "." not in str(name):
        return f"{namespace}.{name}"
    return str(name) if name else None


def text(data: bytes | None) -> str | None:
    """Bytes as UTF-8 text when they are, else ``0x`` + hex (keys, header values)."""
    if data is None:
        return None
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + data.hex()
    if any(ord(c) < 32 and c not in "\t\n\r" for c in decoded):
        return "0x" + data.hex()
    return decoded


def header_list(message: Message) -> list[tuple[str, bytes | None]]:
    return list(message.headers() or [])


def headers_text(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, Any]:
    """Headers as a JSON object; a name given twice maps to the list of its values."""
    out: dict[str, Any] = {}
    for name, value in headers:
        shown = text(value)
        if name in out:
            previous = out[name]
            out[name] = [*previous, shown] if isinstance(previous, list) else [previous, shown]
        else:
            out[name] = shown
    return out


def timestamp_ms(message: Message) -> int | None:
    kind, value = message.timestamp()
    return int(value) if kind != 0 and value >= 0 else None  # 0: TIMESTAMP_NOT_AVAILABLE


def json_default(obj: Any) -> Any:
    """For :func:`json.dumps`: bytes as hex (Avro ``bytes``/``fixed``), anything else as text."""
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).hex()
    return str(obj)
