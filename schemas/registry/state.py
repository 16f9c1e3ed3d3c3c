"""The registry's in-memory state: a pure function of the ``_schemas`` records.

Nothing else writes here: every change goes to Kafka first and comes back
through :meth:`RegistryState.apply` in topic order, so a restarted registry,
a second instance tailing the topic, and this one all hold the same state.
Applying a record is an upsert by key, so applying it again changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import avro.schema

from schemas.registry import records
from schemas.registry.errors import RegistryError
from schemas.registry.records import MalformedRecord, Record
from schemas.registry.schema import AVRO, parse_avro

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredSchema:
    """A schema text under its global id; ``parsed`` is None for non-AVRO records."""

    schema_id: int
    text: str
    schema_type: str
    fingerprint: str | None
    parsed: avro.schema.Schema | None = field(compare=False, repr=False)


@dataclass(frozen=True)
class SubjectVersion:
    subject: str
    version: int
    schema: StoredSchema
    deleted: bool


@dataclass
class RegistryState:
    subjects: dict[str, dict[int, SubjectVersion]] = field(default_factory=dict)
    schemas: dict[int, StoredSchema] = field(default_factory=dict)
    ids_by_fingerprint: dict[str, int] = field(default_factory=dict)
    global_compatibility: str | None = None
    subject_compatibility: dict[str, str] = field(default_factory=dict)
    global_mode: str | None = None
    subject_modes: dict[str, str] = field(default_factory=dict)
    max_id: int = 0
    _uses: dict[int, set[tuple[str, int]]] = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------

    def versions(self, subject: str, *, deleted: bool = False) -> list[SubjectVersion]:
        """The subject's versions, oldest first; soft-deleted ones only with ``deleted``."""
        found = self.subjects.get(subject, {})
        return [found[v] for v in sorted(found) if deleted or not found[v].deleted]

    def live_subjects(self) -> list[str]:
        return sorted(s for s in self.subjects if self.versions(s))

    def all_subjects(self) -> list[str]:
        return sorted(s for s in self.subjects if self.subjects[s])

    def uses_of(self, schema_id: int) -> list[SubjectVersion]:
        """Every subject version registered with ``schema_id`` (deleted ones included)."""
        return [
            self.subjects[s][v] for s, v in sorted(self._uses.get(schema_id, set()))
        ]

    # -- applying records ------------------------------------------------------

    def apply(self, record: Record) -> None:
        """Apply one record of the topic; a malformed one raises :class:`MalformedRecord`."""
        kind = record.keytype
        if kind == records.SCHEMA:
            self._apply_schema(record)
        elif kind == records.CONFIG:
            subject = _optional_subject(record)
            level = None
            if record.value is not None:
                level = record.value.get("compatibilityLevel")
                if not isinstance(level, str):
                    raise MalformedRecord(f"config record without compatibilityLevel: {record}")
            _set(self, "global_compatibility", self.subject_compatibility, subject, level)
        elif kind == records.MODE:
            subject = _optional_subject(record)
            mode = None
            if record.value is not None:
                mode = record.value.get("mode")
                if not isinstance(mode, str):
                    raise MalformedRecord(f"mode record without mode: {record}")
            _set(self, "global_mode", self.subject_modes, subject, mode)
        elif kind == records.DELETE_SUBJECT:
            if record.value is None:
                return
            subject = record.value.get("subject", record.key.get("subject"))
            upto = record.value.get("version")
            if not isinstance(subject, str) or not isinstance(upto, int):
                raise MalformedRecord(f"delete-subject record without subject/version: {record}")
            for version, entry in list(self.subjects.get(subject, {}).items()):
                if version <= upto and not entry.deleted:
                    self.subjects[subject][version] = SubjectVersion(
                        subject, version, entry.schema, True
                    )
        elif kind == records.NOOP:
            return
        else:
            log.info("ignoring %s record at offset %d", kind, record.offset)

    def _apply_schema(self, record: Record) -> None:
        subject = record.key.get("subject")
        version = record.key.get("version")
        if not isinstance(subject, str) or not isinstance(version, int):
            raise MalformedRecord(f"schema record key without subject/version: {record.key}")
        if record.value is None:
            self._forget(subject, version)
            return
        value = record.value
        schema_id, text = value.get("id"), value.get("schema")
        if not isinstance(schema_id, int) or not isinstance(text, str):
            raise MalformedRecord(f"schema record without id/schema at offset {record.offset}")
        schema_type = value.get("schemaType") or AVRO
        self._forget(subject, version)  # an update (soft delete) replaces the version
        stored = self.schemas.get(schema_id)
        if stored is None or stored.text != text:
            stored = _stored(schema_id, text, schema_type)
            self.schemas[schema_id] = stored
            if stored.fingerprint is not None:
                self.ids_by_fingerprint.setdefault(stored.fingerprint, schema_id)
        self.subjects.setdefault(subject, {})[version] = SubjectVersion(
            subject, version, stored, bool(value.get("deleted", False))
        )
        self._uses.setdefault(schema_id, set()).add((subject, version))
        self.max_id = max(self.max_id, schema_id)

    def _forget(self, subject: str, version: int) -> None:
        """Remove a version (permanent delete); its id is dropped once nothing uses it."""
        entry = self.subjects.get(subject, {}).pop(version, None)
        if entry is None:
            return
        if not self.subjects[subject]:
            del self.subjects[subject]
        schema_id = entry.schema.schema_id
        uses = self._uses.get(schema_id, set())
        uses.discard((subject, version))
        if not uses:
            self._uses.pop(schema_id, None)
            gone = self.schemas.pop(schema_id, None)
            if gone is not None and gone.fingerprint is not None:
                if self.ids_by_fingerprint.get(gone.fingerprint) == schema_id:
                    del self.ids_by_fingerprint[gone.fingerprint]


def _stored(schema_id: int, text: str, schema_type: str) -> StoredSchema:
    if schema_type != AVRO:
        return StoredSchema(schema_id, text, schema_type, None, None)
    try:
        parsed = parse_avro(text)
    except RegistryError as exc:
        log.warning("schema id %d in the topic does not parse (%s); serving it as is", schema_id, exc)
        return StoredSchema(schema_id, text, schema_type, None, None)
    return StoredSchema(schema_id, text, schema_type, parsed.fingerprint, parsed.parsed)


def _optional_subject(record: Record) -> str | None:
    subject = record.key.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise MalformedRecord(f"record key with a non-string subject: {record.key}")
    return subject


def _set(
    state: RegistryState, global_attr: str, per_subject: dict[str, str], subject: str | None,
    value: str | None,
) -> None:
    if subject is None:
        setattr(state, global_attr, value)
    elif value is None:
        per_subject.pop(subject, None)
    else:
        per_subject[subject] = value
