"""The Confluent Avro codec, offline: framing, evolution and bad bytes."""

from __future__ import annotations

import io
import json
import struct

import pytest
from fastavro import parse_schema, schemaless_writer

from schemas import contracts
from schemas.samples import sample_record
from streams.codec import ConfluentAvroCodec, MalformedRecord, SchemaCache, decoding_schema


def _codec(topic: str, schema_id: int = 7) -> ConfluentAvroCodec:
    cache = SchemaCache("http://registry.invalid")
    cache.preload(topic, topic, schema_id)
    return ConfluentAvroCodec(topic, topic, cache)


@pytest.mark.parametrize("topic", contracts.contract_names())
def test_every_contract_round_trips_with_confluent_framing(topic: str) -> None:
    codec = _codec(topic, schema_id=4242)
    record = sample_record(topic)
    data = codec.dumps(record)
    assert data[0] == 0
    assert struct.unpack(">I", data[1:5])[0] == 4242
    assert codec.loads(data) == record


def test_decoded_events_keep_plain_ids_and_epoch_millis() -> None:
    codec = _codec("order.created")
    decoded = codec.loads(codec.dumps(sample_record("order.created")))
    assert isinstance(decoded["event_id"], str)
    assert isinstance(decoded["occurred_at"], int)


def test_faust_metadata_key_is_not_written() -> None:
    codec = _codec("order.expired")
    record = sample_record("order.expired")
    assert codec.loads(codec.dumps({**record, "__faust": {"ns": "x"}})) == record


def test_old_writer_schema_is_resolved_to_the_current_contract() -> None:
    topic = "order.expired"
    current = contracts.schema_dict(topic)
    optional = [f for f in current["fields"] if f.get("default", 0) is None]
    assert optional, "order.expired needs an optional field for this test"
    dropped = optional[-1]["name"]
    old = {**current, "fields": [f for f in current["fields"] if f["name"] != dropped]}
    old_record = {k: v for k, v in sample_record(topic).items() if k != dropped}
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(old), old_record)

    cache = SchemaCache("http://registry.invalid")
    cache.preload(topic, topic, 1)
    cache.add_writer_schema(2, old)  # as if fetched from the registry for id 2
    codec = ConfluentAvroCodec(topic, topic, cache)
    decoded = codec.loads(b"\x00" + struct.pack(">I", 2) + body.getvalue())
    assert decoded[dropped] is None
    assert decoded["event_id"] == str(old_record["event_id"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (b"\x00\x00\x00", "too short"),
        (b"\x01\x00\x00\x00\x07" + b"x" * 20, "magic byte 1"),
        (b"\x00\x00\x00\x00\x07" + b"\xff" * 3, "does not decode"),
        (b"{\"order_id\": \"o-1\"}", "magic byte 123"),
    ],
)
def test_bad_bytes_raise_malformed_record(data: bytes, message: str) -> None:
    with pytest.raises(MalformedRecord, match=message):
        _codec("order.created").loads(data)


def test_record_that_breaks_the_contract_is_refused_on_encode() -> None:
    record = sample_record("order.created")
    record["total_amount"] = "twelve euros"
    with pytest.raises(MalformedRecord):
        _codec("order.created").dumps(record)


def test_encoding_needs_a_resolved_id() -> None:
    codec = ConfluentAvroCodec("order.created", "order.created", SchemaCache("http://registry.invalid"))
    with pytest.raises(LookupError, match="resolve"):
        codec.dumps(sample_record("order.created"))


def test_decoding_schema_has_no_logical_types() -> None:
    assert "logicalType" not in json.dumps(decoding_schema("order.created"))
