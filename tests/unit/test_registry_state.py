"""The _schemas record format and how records rebuild the registry state."""

from __future__ import annotations

import json

import pytest

from schemas.registry import records
from schemas.registry.records import MalformedRecord, decode
from schemas.registry.state import RegistryState

SCHEMA_A = '{"type":"record","name":"A","fields":[{"name":"x","type":"int"}]}'
SCHEMA_B = '{"type":"record","name":"B","fields":[{"name":"y","type":"string"}]}'


class Log:
    """Feeds encoded records through decode() into a state, with offsets."""

    def __init__(self) -> None:
        self.state = RegistryState()
        self.offset = 0

    def put(self, key: bytes, value: bytes | None) -> None:
        self.state.apply(decode(key, value, self.offset))
        self.offset += 1

    def schema(self, subject: str, version: int, schema_id: int, text: str, deleted: bool = False):
        self.put(records.schema_key(subject, version),
                 records.schema_value(subject, version, schema_id, text, deleted=deleted,
                                      schema_type="AVRO"))


def test_keys_are_compact_json_in_confluent_field_order():
    assert records.schema_key("s", 2) == b'{"keytype":"SCHEMA","subject":"s","version":2,"magic":1}'
    assert records.config_key(None) == b'{"keytype":"CONFIG","subject":null,"magic":0}'
    assert records.config_key("s") == b'{"keytype":"CONFIG","subject":"s","magic":0}'
    assert records.mode_key("s") == b'{"keytype":"MODE","subject":"s","magic":0}'
    assert records.delete_subject_key("s") == b'{"keytype":"DELETE_SUBJECT","subject":"s","magic":0}'
    assert records.noop_key() == b'{"keytype":"NOOP","magic":0}'


def test_values():
    value = json.loads(records.schema_value("s", 1, 5, SCHEMA_A, deleted=False, schema_type="AVRO"))
    assert value == {"subject": "s", "version": 1, "id": 5, "schema": SCHEMA_A, "deleted": False}
    other = json.loads(records.schema_value("s", 1, 5, "{}", deleted=True, schema_type="JSON"))
    assert other["schemaType"] == "JSON" and other["deleted"] is True
    assert json.loads(records.config_value("FULL")) == {"compatibilityLevel": "FULL"}
    assert json.loads(records.mode_value("READONLY")) == {"mode": "READONLY"}
    assert json.loads(records.delete_subject_value("s", 3)) == {"subject": "s", "version": 3}


def test_schema_records_build_subjects_and_ids():
    log = Log()
    log.schema("a", 1, 1, SCHEMA_A)
    log.schema("b", 1, 1, SCHEMA_A)
    log.schema("a", 2, 2, SCHEMA_B)
    state = log.state
    assert [v.version for v in state.versions("a")] == [1, 2]
    assert state.max_id == 2
    assert state.ids_by_fingerprint[state.schemas[1].fingerprint] == 1
    assert [(u.subject, u.version) for u in state.uses_of(1)] == [("a", 1), ("b", 1)]


def test_applying_a_record_twice_changes_nothing():
    log = Log()
    log.schema("a", 1, 1, SCHEMA_A)
    before = (dict(log.state.subjects["a"]), dict(log.state.schemas), log.state.max_id)
    log.schema("a", 1, 1, SCHEMA_A)
    assert (dict(log.state.subjects["a"]), dict(log.state.schemas), log.state.max_id) == before


def test_soft_delete_keeps_the_id_resolvable_and_tombstone_forgets_it():
    log = Log()
    log.schema("a", 1, 1, SCHEMA_A)
    log.schema("a", 1, 1, SCHEMA_A, deleted=True)
    assert log.state.versions("a") == []
    assert log.state.versions("a", deleted=True)[0].deleted
    assert 1 in log.state.schemas
    log.put(records.schema_key("a", 1), None)
    assert "a" not in log.state.subjects
    assert 1 not in log.state.schemas
    assert log.state.max_id == 1  # ids are never reused


def test_delete_subject_marks_versions_up_to_the_given_one():
    log = Log()
    log.schema("a", 1, 1, SCHEMA_A)
    log.schema("a", 2, 2, SCHEMA_B)
    log.put(records.delete_subject_key("a"), records.delete_subject_value("a", 1))
    assert [v.version for v in log.state.versions("a")] == [2]
    log.put(records.delete_subject_key("a"), records.delete_subject_value("a", 2))
    assert log.state.live_subjects() == []
    assert log.state.all_subjects() == ["a"]


def test_config_and_mode_records_and_tombstones():
    log = Log()
    log.put(records.config_key(None), records.config_value("FULL"))
    log.put(records.config_key("a"), records.config_value("NONE"))
    log.put(records.mode_key("a"), records.mode_value("READONLY"))
    state = log.state
    assert (state.global_compatibility, state.subject_compatibility, state.subject_modes) == (
        "FULL", {"a": "NONE"}, {"a": "READONLY"})
    log.put(records.config_key("a"), None)
    log.put(records.config_key(None), None)
    log.put(records.mode_key("a"), None)
    assert (state.global_compatibility, state.subject_compatibility, state.subject_modes) == (
        None, {}, {})


def test_noop_and_unknown_keytypes_are_ignored():
    log = Log()
    log.put(records.noop_key(), None)
    log.put(b'{"keytype":"CONTEXT","magic":0}', b"{}")
    assert log.state.subjects == {}


def test_non_avro_records_from_another_registry_are_kept():
    log = Log()
    log.put(records.schema_key("j", 1),
            records.schema_value("j", 1, 9, '{"type":"object"}', deleted=False, schema_type="JSON"))
    stored = log.state.schemas[9]
    assert (stored.schema_type, stored.parsed, stored.fingerprint) == ("JSON", None, None)


@pytest.mark.parametrize(("key", "value"), [
    (None, b"{}"),
    (b"not json", b"{}"),
    (b'{"magic":1}', b"{}"),
    (b'{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}', b"[1]"),
    (b'{"keytype":"SCHEMA","subject":"s","version":1,"magic":1}', b'{"schema":"x"}'),
    (b'{"keytype":"CONFIG","subject":null,"magic":0}', b'{"compatibility":1}'),
])
def test_malformed_records_raise(key, value):
    with pytest.raises(MalformedRecord):
        RegistryState().apply(decode(key, value, 0))
