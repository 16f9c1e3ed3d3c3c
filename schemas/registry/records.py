"""The records of the ``_schemas`` topic, in Confluent Schema Registry's format.

Keys are compact JSON with fields in Confluent's fixed order (Jackson writes
them so, and the topic is compacted by key bytes, so the order must match for
a Confluent or Karapace registry to take the topic over):

* ``{"keytype":"SCHEMA","subject":s,"version":v,"magic":1}`` ->
  ``{"subject","version","id","schema","deleted"}`` (+ ``schemaType`` when
  not AVRO); a null value (tombstone) is a permanently deleted version.
* ``{"keytype":"CONFIG","subject":s|null,"magic":0}`` -> ``{"compatibilityLevel"}``.
* ``{"keytype":"MODE","subject":s|null,"magic":0}`` -> ``{"mode"}``.
* ``{"keytype":"DELETE_SUBJECT","subject":s,"magic":0}`` -> ``{"subject","version"}``:
  every version up to ``version`` is soft deleted.
* ``{"keytype":"NOOP","magic":0}``: ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SCHEMA = "SCHEMA"
CONFIG = "CONFIG"
MODE = "MODE"
DELETE_SUBJECT = "DELETE_SUBJECT"
NOOP = "NOOP"


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def schema_key(subject: str, version: int) -> bytes:
    return _dump({"keytype": SCHEMA, "subject": subject, "version": version, "magic": 1})


def config_key(subject: str | None) -> bytes:
    return _dump({"keytype": CONFIG, "subject": subject, "magic": 0})


def mode_key(subject: str | None) -> bytes:
    return _dump({"keytype": MODE, "subject": subject, "magic": 0})


def delete_subject_key(subject: str) -> bytes:
    return _dump({"keytype": DELETE_SUBJECT, "subject": subject, "magic": 0})


def noop_key() -> bytes:
    return _dump({"keytype": NOOP, "magic": 0})


def schema_value(
    subject: str, version: int, schema_id: int, schema: str, *, deleted: bool, schema_type: str
) -> bytes:
    value: dict[str, Any] = {"subject": subject, "version": version, "id": schema_id}
    if schema_type != "AVRO":
        value["schemaType"] = schema_type
    value["schema"] = schema
    value["deleted"] = deleted
    return _dump(value)


def config_value(level: str) -> bytes:
    return _dump({"compatibilityLevel": level})


def mode_value(mode: str) -> bytes:
    return _dump({"mode": mode})


def delete_subject_value(subject: str, version: int) -> bytes:
    return _dump({"subject": subject, "version": version})


@dataclass(frozen=True)
class Record:
    """One decoded record of the topic; ``value`` is None for a tombstone."""

    keytype: str
    key: dict[str, Any]
    value: dict[str, Any] | None
    offset: int


class MalformedRecord(ValueError):
    """A record that is not in the registry format (skipped, never fatal)."""


def decode(key: bytes | None, value: bytes | None, offset: int) -> Record:
    if key is None:
        raise MalformedRecord(f"record at offset {offset} has no key")
    try:
        key_doc = json.loads(key)
        value_doc = None if value is None else json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRecord(f"record at offset {offset} is not JSON: {exc}") from exc
    if not isinstance(key_doc, dict) or not isinstance(key_doc.get("keytype"), str):
        raise MalformedRecord(f"record at offset {offset} has no keytype: {key_doc!r}")
    if value_doc is not None and not isinstance(value_doc, dict):
        raise MalformedRecord(f"record at offset {offset} has a non-object value: {value_doc!r}")
    return Record(key_doc["keytype"], key_doc, value_doc, offset)
