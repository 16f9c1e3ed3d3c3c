"""Confluent error bodies and the request validation that produces them."""

from __future__ import annotations

import json

import pytest

from schemas.registry import errors
from schemas.registry.core import SchemaRequest, parse_version
from schemas.registry.errors import RegistryError
from schemas.registry.schema import parse_avro


def test_error_body_shape():
    error = errors.subject_not_found("orders-value")
    assert error.body() == {"error_code": 40401, "message": "Subject 'orders-value' not found."}
    assert error.http_status == 404
    assert json.loads(json.dumps(error.body())) == error.body()


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.subject_not_found("s"), 404, 40401),
        (errors.version_not_found(3), 404, 40402),
        (errors.schema_not_found(7), 404, 40403),
        (errors.subject_soft_deleted("s"), 404, 40404),
        (errors.subject_not_soft_deleted("s"), 404, 40405),
        (errors.version_soft_deleted("s", 1), 404, 40406),
        (errors.version_not_soft_deleted("s", 1), 404, 40407),
        (errors.subject_compatibility_not_configured("s"), 404, 40408),
        (errors.subject_mode_not_configured("s"), 404, 40409),
        (errors.association_not_found("t"), 404, 40410),
        (errors.incompatible_schema("s", ["field x"]), 409, 409),
        (errors.invalid_schema("bad"), 422, 42201),
        (errors.invalid_version("x"), 422, 42202),
        (errors.invalid_compatibility_level("x"), 422, 42203),
        (errors.invalid_mode("x"), 422, 42204),
        (errors.operation_not_permitted("no"), 422, 42205),
        (errors.store_error("down"), 500, 50001),
        (errors.operation_timeout("slow"), 500, 50002),
        (errors.not_ready("_schemas"), 503, 50002),
        (errors.bad_request("junk"), 400, 400),
    ],
)
def test_codes_and_statuses(error: RegistryError, status: int, code: int):
    assert (error.http_status, error.error_code) == (status, code)
    assert set(error.body()) == {"error_code", "message"}
    assert error.body()["message"]


def test_incompatible_message_carries_the_details():
    message = errors.incompatible_schema("orders-value", ["reader field 'x' has no default"]).message
    assert "orders-value" in message and "reader field 'x'" in message


@pytest.mark.parametrize("raw", ['{"type": "record", "name": "A"}', "not json", "", 5, None,
                                 '{"type": "nope"}', '{"type":"enum","name":"E","symbols":["a","a"]}'])
def test_invalid_schemas(raw):
    with pytest.raises(RegistryError) as error:
        parse_avro(raw)
    assert error.value.error_code == 42201


def test_schema_identity_ignores_whitespace_and_key_order_but_not_defaults():
    a = parse_avro('{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}')
    b = parse_avro('{ "fields": [ {"type": "int", "name": "x"} ], "name": "A", "type": "record" }')
    c = parse_avro('{"type":"record","name":"A","fields":[{"name":"x","type":"int","default":1}]}')
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert a.text == '{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}'


def test_field_defaults_must_match_their_type():
    ok = '{"type":"record","name":"A","fields":[{"name":"x","type":["null","int"],"default":null}]}'
    parse_avro(ok)
    bad = '{"type":"record","name":"A","fields":[{"name":"x","type":"long","default":"1"}]}'
    with pytest.raises(RegistryError) as error:
        parse_avro(bad)
    assert "default" in error.value.message


def test_schema_request_shapes():
    schema = '"string"'
    assert SchemaRequest.from_body({"schema": schema}).schema_type == "AVRO"
    assert SchemaRequest.from_body({"schema": schema, "schemaType": "AVRO", "references": []})
    cases = [
        ([1], 400, 400),
        ({"scheme": schema}, 422, 42201),
        ({"schema": schema, "schemaType": "PROTOBUF"}, 422, 42201),
        ({"schema": schema, "references": [{"name": "x", "subject": "y", "version": 1}]}, 422, 42201),
        ({"schema": schema, "id": "seven"}, 400, 400),
        ({"schema": schema, "version": 0}, 422, 42202),
    ]
    for body, status, code in cases:
        with pytest.raises(RegistryError) as error:
            SchemaRequest.from_body(body)
        assert (error.value.http_status, error.value.error_code) == (status, code), body


def test_version_parsing():
    assert parse_version("latest") is None
    assert parse_version("LATEST") is None
    assert parse_version("-1") is None
    assert parse_version("3") == 3
    for bad in ("0", "two", "2147483648", "-2", "1.5"):
        with pytest.raises(RegistryError) as error:
            parse_version(bad)
        assert error.value.error_code == 42202
