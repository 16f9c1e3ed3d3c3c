"""Compatibility levels on plain avro schemas (no registry, no Kafka)."""

from __future__ import annotations

import json

import avro.schema
import pytest

from schemas.registry.compatibility import CompatibilityLevel, check, reader_can_read
from schemas.registry.errors import INVALID_COMPATIBILITY_LEVEL, RegistryError


def record(*fields: dict) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps({"type": "record", "name": "Order", "fields": list(fields)}))


ID = {"name": "id", "type": "string"}
OPTIONAL_NOTE = {"name": "note", "type": ["null", "string"], "default": None}
REQUIRED_NOTE = {"name": "note", "type": "string"}
REQUIRED_AMOUNT = {"name": "amount", "type": "long"}

BASE = record(ID)
WITH_OPTIONAL = record(ID, OPTIONAL_NOTE)
WITH_REQUIRED = record(ID, REQUIRED_NOTE)
WITH_AMOUNT = record(ID, REQUIRED_AMOUNT)


def test_pairwise_reader_writer():
    assert reader_can_read(WITH_OPTIONAL, BASE) == []  # default fills the missing field
    reasons = reader_can_read(WITH_REQUIRED, BASE)
    assert reasons and "note" in reasons[0]
    assert reader_can_read(BASE, WITH_REQUIRED) == []  # extra writer fields are skipped


@pytest.mark.parametrize(
    ("level", "new", "compatible"),
    [
        ("BACKWARD", WITH_OPTIONAL, True),
        ("BACKWARD", WITH_REQUIRED, False),
        ("FORWARD", WITH_REQUIRED, True),   # the old schema ignores the new field
        ("FORWARD", WITH_OPTIONAL, True),
        ("FULL", WITH_OPTIONAL, True),
        ("FULL", WITH_REQUIRED, False),
        ("NONE", WITH_REQUIRED, True),
    ],
)
def test_levels_against_one_version(level, new, compatible):
    result = check(CompatibilityLevel.parse(level), new, [BASE])
    assert result.is_compatible is compatible
    assert bool(result.messages) is not compatible


def test_forward_fails_when_the_new_schema_drops_a_field_the_old_one_needs():
    assert check(CompatibilityLevel.FORWARD, BASE, [WITH_REQUIRED]).is_compatible is False
    assert check(CompatibilityLevel.BACKWARD, BASE, [WITH_REQUIRED]).is_compatible is True


def test_transitive_checks_every_version_plain_checks_only_the_latest():
    # v1 has a required amount; v2 dropped it; v3 adds it back without a default.
    history = [WITH_AMOUNT, BASE]
    candidate = WITH_AMOUNT
    # FORWARD: can the old schemas read data written with the candidate?  Yes, all can.
    assert check(CompatibilityLevel.FORWARD_TRANSITIVE, candidate, history).is_compatible
    # BACKWARD (latest only): the candidate cannot read v2 data (no amount) -> refused.
    assert not check(CompatibilityLevel.BACKWARD, candidate, history).is_compatible

    # The transitive/plain difference: compatible with the latest, not with the first.
    history = [WITH_REQUIRED, WITH_OPTIONAL]
    candidate = BASE
    assert check(CompatibilityLevel.FORWARD, candidate, history).is_compatible
    transitive = check(CompatibilityLevel.FORWARD_TRANSITIVE, candidate, history)
    assert not transitive.is_compatible
    assert any("#1" in message for message in transitive.messages)


def test_full_transitive_reports_both_directions():
    result = check(CompatibilityLevel.FULL_TRANSITIVE, WITH_REQUIRED, [BASE, WITH_OPTIONAL])
    assert not result.is_compatible
    assert any(m.startswith("BACKWARD") for m in result.messages)


def test_first_version_and_none_always_pass():
    assert check(CompatibilityLevel.FULL_TRANSITIVE, WITH_REQUIRED, []).is_compatible
    assert check(CompatibilityLevel.NONE, avro.schema.parse('"string"'), [BASE]).is_compatible


def test_type_changes():
    as_int = avro.schema.parse('"int"')
    as_long = avro.schema.parse('"long"')
    assert check(CompatibilityLevel.BACKWARD, as_long, [as_int]).is_compatible  # int promotes
    assert not check(CompatibilityLevel.FORWARD, as_long, [as_int]).is_compatible


def test_enum_symbols():
    old = avro.schema.parse('{"type":"enum","name":"S","symbols":["A","B"]}')
    more = avro.schema.parse('{"type":"enum","name":"S","symbols":["A","B","C"]}')
    assert check(CompatibilityLevel.BACKWARD, more, [old]).is_compatible
    assert not check(CompatibilityLevel.FORWARD, more, [old]).is_compatible


def test_level_parsing():
    assert CompatibilityLevel.parse("full_transitive") is CompatibilityLevel.FULL_TRANSITIVE
    for bad in ("SIDEWAYS", None, 3):
        with pytest.raises(RegistryError) as error:
            CompatibilityLevel.parse(bad)
        assert (error.value.http_status, error.value.error_code) == (422, INVALID_COMPATIBILITY_LEVEL)
