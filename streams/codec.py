"""The one codec of paystream: Confluent's Avro wire format, fast and non-blocking.

Wire format: byte 0 (magic), the writer schema id as a 4-byte big-endian int,
then the Avro binary body.  Faust calls codecs synchronously on the event loop,
so this module never talks to the registry per message: the id of every
contract is resolved once at start (:meth:`SchemaCache.resolve`), and writer
schemas are cached by id.  A record written with an id we have not seen costs
one registry call, once, and the answer is cached.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from faust.serializers import codecs

from schemas import contracts
from streams import catalog

try:  # the HTTP library the registry client really uses (httpx2 when installed, else httpx)
    from confluent_kafka.schema_registry.common._httpx_compat import httpx as _registry_http

    #: What the registry client's HTTP library raises when the registry cannot be reached.
    REGISTRY_HTTP_ERRORS: tuple[type[BaseException], ...] = (_registry_http.TransportError,)
except ImportError:  # pragma: no cover - older confluent-kafka
    REGISTRY_HTTP_ERRORS = ()
#: ... and with the socket errors below it, what "the registry is unreachable" looks like.
REGISTRY_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (*REGISTRY_HTTP_ERRORS, OSError)

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class MalformedRecord(ValueError):
    """A record's bytes are not a decodable Confluent Avro value for its topic."""


class SchemaCache:
    """Schema ids and parsed schemas, filled before the first message flows.

    ``topics`` maps the Kafka topic actually used (tests prefix names) to the
    catalog name whose ``.avsc`` contract it carries.
    """

    def __init__(self, registry: SchemaRegistryClient | str, *, auto_register: bool = True) -> None:
        self._client = (
            SchemaRegistryClient({"url": registry}) if isinstance(registry, str) else registry
        )
        self._auto_register = auto_register
        self._writer_ids: dict[str, int] = {}
        self._by_id: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def resolve(self, topics: Mapping[str, str]) -> dict[str, int]:
        """Look up (or register) each topic's contract; return topic -> schema id.

        Raises the registry's error when a contract is incompatible with what
        the registry holds: a worker must not start writing a breaking schema.
        """
        for topic, contract in topics.items():
            subject = catalog.value_subject(topic)
            schema = Schema(contracts.schema_text(contract), "AVRO")
            try:
                schema_id = self._client.lookup_schema(subject, schema).schema_id
            except SchemaRegistryError as exc:
                if exc.http_status_code != 404 or not self._auto_register:
                    raise
                schema_id = self._client.register_schema(subject, schema)
            self._writer_ids[topic] = schema_id
            self._by_id[schema_id] = decoding_schema(contract)
        return dict(self._writer_ids)

    def preload(self, topic: str, contract: str, schema_id: int) -> None:
        """Seed an id without asking a registry (offline tools and benchmarks)."""
        self._writer_ids[topic] = schema_id
        self._by_id[schema_id] = decoding_schema(contract)

    def writer_id(self, topic: str) -> int:
        try:
            return self._writer_ids[topic]
        except KeyError:
            raise LookupError(
                f"no schema id resolved for topic {topic!r}: SchemaCache.resolve() runs at start"
            ) from None

    def writer_schema(self, schema_id: int) -> dict[str, Any]:
        """The parsed writer schema of ``schema_id`` (one registry call per new id).

        Parsed without logical types, like every schema we decode with.
        """
        parsed = self._by_id.get(schema_id)
        if parsed is not None:
            return parsed
        with self._lock:
            parsed = self._by_id.get(schema_id)
            if parsed is None:
                try:
                    text = self._client.get_schema(schema_id).schema_str
                except SchemaRegistryError as exc:
                    if exc.http_status_code == 404:  # no such id: these bytes never decode
                        raise MalformedRecord(f"unknown writer schema id {schema_id}") from exc
                    raise  # registry trouble is transient: let the caller retry
                parsed = self.add_writer_schema(schema_id, json.loads(text))
        return parsed

    def add_writer_schema(self, schema_id: int, schema: dict[str, Any]) -> dict[str, Any]:
        """Remember the writer schema of ``schema_id``; return it parsed for decoding."""
        parsed = parse_schema(_plain(schema))
        self._by_id[schema_id] = parsed
        return parsed


class ConfluentAvroCodec(codecs.Codec):
    """Faust codec for one topic's values, Confluent-framed Avro."""

    def __init__(self, topic: str, contract: str, cache: SchemaCache, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.topic = topic
        self.contract = contract
        self.cache = cache
        self.writer = contracts.parsed_schema(contract)
        self.reader = decoding_schema(contract)

    def _dumps(self, obj: Any) -> bytes:
        return encode(self.writer, self.cache.writer_id(self.topic), _as_record(obj))

    def _loads(self, data: bytes) -> Any:
        return decode(data, self.cache, self.reader, self.topic)


def encode(schema: dict[str, Any], schema_id: int, record: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(_HEADER.pack(MAGIC_BYTE, schema_id))
    try:
        schemaless_writer(buffer, schema, record)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise MalformedRecord(f"record does not match schema {schema.get('name')}: {exc}") from exc
    return buffer.getvalue()


def decode(
    data: bytes, cache: SchemaCache, reader: dict[str, Any], topic: str = "?"
) -> dict[str, Any]:
    """Decode Confluent-framed Avro, resolving the writer schema to our reader schema."""
    if data is None or len(data) < _HEADER.size:
        raise MalformedRecord(f"{topic}: {0 if data is None else len(data)} bytes is too short")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise MalformedRecord(f"{topic}: magic byte {magic} is not the Confluent framing")
    writer = cache.writer_schema(schema_id)
    body = io.BytesIO(data)
    body.seek(_HEADER.size)
    try:
        if writer is reader:
            return schemaless_reader(body, writer, None)  # type: ignore[return-value]
        return schemaless_reader(body, writer, reader)  # type: ignore[return-value]
    except Exception as exc:
        raise MalformedRecord(
            f"{topic}: Avro body does not decode with writer schema id {schema_id}: {exc}"
        ) from exc


def _as_record(obj: Any) -> Mapping[str, Any]:
    if hasattr(obj, "asdict"):
        obj = obj.asdict()
    if isinstance(obj, Mapping) and "__faust" in obj:
        obj = {k: v for k, v in obj.items() if k != "__faust"}
    return obj


@cache
def decoding_schema(contract: str) -> dict[str, Any]:
    """The contract parsed without logical types, for decoding.

    Decoded events then carry what producers put in (``occurred_at`` as epoch
    milliseconds, ids as strings) instead of datetime and UUID objects, so a
    decoded event can be compared with, hashed and re-encoded like a new one;
    the bytes on the wire are the same either way.
    """
    return parse_schema(_plain(contracts.schema_dict(contract)))


def _plain(schema: Any) -> Any:
    """A copy of ``schema`` with every ``logicalType`` annotation removed."""
    if isinstance(schema, list):
        return [_plain(branch) for branch in schema]
    if not isinstance(schema, dict):
        return schema
    return {key: _plain(value) for key, value in schema.items() if key != "logicalType"}


def contract_topics(names: Iterable[str], prefix: str = "") -> dict[str, str]:
    """Map the topic names actually used (with ``prefix``) to their contracts."""
    return {f"{prefix}{name}": name for name in names}
