"""The schema registry itself: subjects, versions, ids, compatibility, config, mode.

Knows nothing of HTTP.  Every method takes plain values and returns the JSON
document the Confluent API answers with, or raises
:class:`schemas.registry.errors.RegistryError`.  Reads come from
:class:`RegistryState`; writes go through :class:`KafkaStore` and return only
after the record is back in the state.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.registry import errors, records
from schemas.registry.compatibility import (
    DEFAULT_LEVEL,
    CompatibilityLevel,
    CompatibilityResult,
    check,
)
from schemas.registry.schema import (
    AVRO,
    SUPPORTED_TYPES,
    AvroSchema,
    check_references,
    check_schema_type,
    parse_avro,
)
from schemas.registry.state import RegistryState, StoredSchema, SubjectVersion

READWRITE = "READWRITE"
READONLY = "READONLY"
READONLY_OVERRIDE = "READONLY_OVERRIDE"
IMPORT = "IMPORT"
MODES = (READWRITE, READONLY, READONLY_OVERRIDE, IMPORT)
MAX_VERSION = 2**31 - 1
LATEST = "latest"


class Store(Protocol):
    """What the core needs from storage (``store.KafkaStore``)."""

    topic: str

    @property
    def ready(self) -> bool: ...

    async def write(self, records: list[tuple[bytes, bytes | None]]) -> None: ...


@dataclass(frozen=True)
class SchemaRequest:
    """The body of register / lookup / compatibility requests."""

    schema: AvroSchema
    schema_type: str
    schema_id: int | None = None
    version: int | None = None

    @classmethod
    def from_body(cls, body: object) -> SchemaRequest:
        if not isinstance(body, dict):
            raise errors.bad_request("Request body must be a JSON object with a 'schema' field")
        if "schema" not in body:
            raise errors.invalid_schema("Invalid schema: the request has no 'schema' field")
        schema_type = check_schema_type(body.get("schemaType"))
        check_references(body.get("references"))
        schema_id = body.get("id")
        version = body.get("version")
        for name, value in (("id", schema_id), ("version", version)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise errors.bad_request(f"'{name}' must be an integer")
        if version is not None and not 1 <= version <= MAX_VERSION:
            raise errors.invalid_version(version)
        return cls(parse_avro(body["schema"]), schema_type, schema_id, version)


def parse_version(raw: str | int, *, allow_latest: bool = True) -> int | None:
    """A version path segment: 1..2^31-1, or ``latest``/``-1`` (returned as None)."""
    if isinstance(raw, str) and raw.lower() == LATEST and allow_latest:
        return None
    try:
        version = int(raw)
    except (TypeError, ValueError):
        raise errors.invalid_version(raw) from None
    if version == -1 and allow_latest:
        return None
    if not 1 <= version <= MAX_VERSION:
        raise errors.invalid_version(raw)
    return version


def _version_document(entry: SubjectVersion) -> dict[str, Any]:
    document: dict[str, Any] = {
        "subject": entry.subject,
        "version": entry.version,
        "id": entry.schema.schema_id,
    }
    if entry.schema.schema_type != AVRO:
        document["schemaType"] = entry.schema.schema_type
    document["schema"] = entry.schema.text
    return document


class Registry:
    """Confluent Schema Registry semantics over a :class:`Store` and its state."""

    def __init__(self, state: RegistryState, store: Store) -> None:
        self.state = state
        self.store = store
        self._subject_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._reserved_ids: dict[str, int] = {}

    # -- readiness ---------------------------------------------------------------

    def ensure_ready(self) -> None:
        if not self.store.ready:
            raise errors.not_ready(self.store.topic)

    # -- schemas by id -----------------------------------------------------------

    def schema_types(self) -> list[str]:
        return list(SUPPORTED_TYPES)

    def get_schema(self, schema_id: int) -> dict[str, Any]:
        """The schema with this global id (soft-deleted ones too: old data needs them).

        The API's ``subject`` parameter only selects a schema context in
        Confluent's registry; every subject here is in the default context, so
        the HTTP layer accepts and ignores it.
        """
        stored = self._schema_by_id(schema_id)
        document: dict[str, Any] = {}
        if stored.schema_type != AVRO:
            document["schemaType"] = stored.schema_type
        document["schema"] = stored.text
        return document

    def get_schema_versions(self, schema_id: int, *, deleted: bool = False) -> list[dict[str, Any]]:
        self._schema_by_id(schema_id)
        return [
            {"subject": u.subject, "version": u.version}
            for u in self.state.uses_of(schema_id)
            if deleted or not u.deleted
        ]

    def get_schema_subjects(self, schema_id: int, *, deleted: bool = False) -> list[str]:
        self._schema_by_id(schema_id)
        return sorted(
            {u.subject for u in self.state.uses_of(schema_id) if deleted or not u.deleted}
        )

    def _schema_by_id(self, schema_id: int) -> StoredSchema:
        stored = self.state.schemas.get(schema_id)
        if stored is None:
            raise errors.schema_not_found(schema_id)
        return stored

    # -- subjects and versions ---------------------------------------------------

    def list_subjects(
        self, *, deleted: bool = False, deleted_only: bool = False, prefix: str | None = None
    ) -> list[str]:
        live = set(self.state.live_subjects())
        if deleted_only:
            names = [s for s in self.state.all_subjects() if s not in live]
        elif deleted:
            names = self.state.all_subjects()
        else:
            names = sorted(live)
        return [s for s in names if prefix is None or s.startswith(prefix)]

    def list_versions(
        self, subject: str, *, deleted: bool = False, deleted_only: bool = False
    ) -> list[int]:
        every = self.state.versions(subject, deleted=True)
        if deleted_only:
            found = [e.version for e in every if e.deleted]
        else:
            found = [e.version for e in every if deleted or not e.deleted]
        if not found and not (deleted_only and every):
            raise errors.subject_not_found(subject)
        return found

    def get_version(self, subject: str, version: str | int, *, deleted: bool = False) -> dict[str, Any]:
        return _version_document(self._find_version(subject, version, deleted=deleted))

    def get_latest_with_metadata(
        self, subject: str, metadata: dict[str, str], *, deleted: bool = False
    ) -> dict[str, Any]:
        """This registry stores no schema metadata, so only an empty filter matches."""
        entry = self._find_version(subject, LATEST, deleted=deleted)
        if metadata:
            raise errors.RegistryError(
                404, errors.VERSION_NOT_FOUND,
                f"No version of subject '{subject}' has metadata {metadata}: this registry "
                "does not store schema metadata",
            )
        return _version_document(entry)

    def referenced_by(self, subject: str, version: str | int) -> list[int]:
        """Schema references are not supported, so nothing references anything."""
        self._find_version(subject, version, deleted=True)
        return []

    def _find_version(self, subject: str, version: str | int, *, deleted: bool) -> SubjectVersion:
        wanted = parse_version(version)
        visible = self.state.versions(subject, deleted=deleted)
        if not visible:
            raise errors.subject_not_found(subject)
        if wanted is None:
            return visible[-1]
        for entry in visible:
            if entry.version == wanted:
                return entry
        raise errors.version_not_found(wanted)

    def lookup(self, subject: str, request: SchemaRequest, *, deleted: bool = False) -> dict[str, Any]:
        """Is this schema registered under ``subject``?  (``POST /subjects/{subject}``)"""
        visible = self.state.versions(subject, deleted=deleted)
        if not visible:
            raise errors.subject_not_found(subject)
        for entry in reversed(visible):
            if entry.schema.fingerprint == request.schema.fingerprint:
                return _version_document(entry)
        raise errors.schema_not_found()

    # -- registering -------------------------------------------------------------

    async def register(
        self, subject: str, request: SchemaRequest, *, normalize: bool = False
    ) -> dict[str, Any]:
        """Register (or find) ``request.schema`` under ``subject``; returns its id.

        ``normalize`` is accepted for compatibility with the API: schemas are
        always compared in their parsed form, so it changes nothing here.
        """
        mode = self.effective_mode(subject)
        if mode in (READONLY, READONLY_OVERRIDE):
            raise errors.operation_not_permitted(f"Subject {subject} is in read-only mode")
        if (request.schema_id is not None or request.version is not None) and mode != IMPORT:
            raise errors.operation_not_permitted(
                f"Subject {subject} is not in import mode: 'id' and 'version' may only be "
                "given in IMPORT mode"
            )
        async with self._subject_locks[subject]:
            self.ensure_ready()
            every = self.state.versions(subject, deleted=True)
            live = [e for e in every if not e.deleted]
            for entry in reversed(live):
                if entry.schema.fingerprint == request.schema.fingerprint:
                    if request.version not in (None, entry.version):
                        break
                    return {"id": entry.schema.schema_id, "subject": subject, "version": entry.version}
            if mode != IMPORT:
                result = self._check(self.effective_compatibility(subject), request.schema, live)
                if not result.is_compatible:
                    raise errors.incompatible_schema(subject, result.messages)
            schema_id = self._schema_id_for(request)
            version = request.version or (max((e.version for e in every), default=0) + 1)
            if any(e.version == version for e in every):
                raise errors.operation_not_permitted(
                    f"Version {version} of subject {subject} already exists"
                )
            await self.store.write([(
                records.schema_key(subject, version),
                records.schema_value(
                    subject, version, schema_id, request.schema.text,
                    deleted=False, schema_type=request.schema_type,
                ),
            )])
            self._reserved_ids.pop(request.schema.fingerprint, None)
            return {"id": schema_id, "subject": subject, "version": version}

    def _schema_id_for(self, request: SchemaRequest) -> int:
        fingerprint = request.schema.fingerprint
        known = self.state.ids_by_fingerprint.get(fingerprint)
        if request.schema_id is not None:
            stored = self.state.schemas.get(request.schema_id)
            if stored is not None and stored.fingerprint != fingerprint:
                raise errors.RegistryError(
                    422, errors.ID_DOES_NOT_MATCH,
                    f"Schema id {request.schema_id} is already used by a different schema",
                )
            return request.schema_id
        if known is not None:
            return known
        reserved = self._reserved_ids.get(fingerprint)
        if reserved is None:
            # No await between choosing and reserving: concurrent registers of
            # other subjects cannot pick the same id, and concurrent registers of
            # the same schema under other subjects share it.
            reserved = max([self.state.max_id, *self._reserved_ids.values()]) + 1
            self._reserved_ids[fingerprint] = reserved
        return reserved

    # -- compatibility -----------------------------------------------------------

    def test_compatibility(
        self, subject: str, request: SchemaRequest, version: str | int | None, *, verbose: bool = False
    ) -> dict[str, Any]:
        """Test against one version (``version``) or, with None, as registering would."""
        level = self.effective_compatibility(subject)
        if version is None:
            result = self._check(level, request.schema, self.state.versions(subject))
        else:
            target = self._find_version(subject, version, deleted=False)
            result = self._check(level, request.schema, [target])
        document: dict[str, Any] = {"is_compatible": result.is_compatible}
        if verbose:
            document["messages"] = result.messages
        return document

    def _check(
        self, level: CompatibilityLevel, new: AvroSchema, against: list[SubjectVersion]
    ) -> CompatibilityResult:
        parsed = [e.schema.parsed for e in against]
        if any(p is None for p in parsed) and level is not CompatibilityLevel.NONE:
            kinds = sorted({e.schema.schema_type for e in against if e.schema.parsed is None})
            return CompatibilityResult(
                False, [f"cannot check an AVRO schema against {', '.join(kinds)} versions"]
            )
        return check(level, new.parsed, [p for p in parsed if p is not None])

    # -- deleting ----------------------------------------------------------------

    async def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        self._refuse_if_readonly(subject)
        async with self._subject_locks[subject]:
            self.ensure_ready()
            every = self.state.versions(subject, deleted=True)
            if not every:
                raise errors.subject_not_found(subject)
            live = [e.version for e in every if not e.deleted]
            if not permanent:
                if not live:
                    raise errors.subject_soft_deleted(subject)
                await self.store.write([(
                    records.delete_subject_key(subject),
                    records.delete_subject_value(subject, every[-1].version),
                )])
                return live
            if live:
                raise errors.subject_not_soft_deleted(subject)
            writes: list[tuple[bytes, bytes | None]] = [
                (records.schema_key(subject, e.version), None) for e in every
            ]
            if subject in self.state.subject_compatibility:
                writes.append((records.config_key(subject), None))
            if subject in self.state.subject_modes:
                writes.append((records.mode_key(subject), None))
            await self.store.write(writes)
            return [e.version for e in every]

    async def delete_version(
        self, subject: str, version: str | int, *, permanent: bool = False
    ) -> int:
        self._refuse_if_readonly(subject)
        wanted = parse_version(version)
        async with self._subject_locks[subject]:
            self.ensure_ready()
            every = self.state.versions(subject, deleted=True)
            if not every:
                raise errors.subject_not_found(subject)
            if wanted is None:
                candidates = every if permanent else [e for e in every if not e.deleted]
                if not candidates:
                    raise errors.version_not_found(LATEST)
                entry = candidates[-1]
            else:
                matches = [e for e in every if e.version == wanted]
                if not matches:
                    raise errors.version_not_found(wanted)
                entry = matches[0]
            if not permanent:
                if entry.deleted:
                    raise errors.version_soft_deleted(subject, entry.version)
                value: bytes | None = records.schema_value(
                    subject, entry.version, entry.schema.schema_id, entry.schema.text,
                    deleted=True, schema_type=entry.schema.schema_type,
                )
            else:
                if not entry.deleted:
                    raise errors.version_not_soft_deleted(subject, entry.version)
                value = None
            await self.store.write([(records.schema_key(subject, entry.version), value)])
            return entry.version

    def _refuse_if_readonly(self, subject: str) -> None:
        if self.effective_mode(subject) in (READONLY, READONLY_OVERRIDE):
            raise errors.operation_not_permitted(f"Subject {subject} is in read-only mode")

    # -- config (compatibility level) --------------------------------------------

    def effective_compatibility(self, subject: str | None) -> CompatibilityLevel:
        level = None
        if subject is not None:
            level = self.state.subject_compatibility.get(subject)
        level = level or self.state.global_compatibility or DEFAULT_LEVEL
        return CompatibilityLevel.parse(level)

    def get_config(self, subject: str | None, *, default_to_global: bool = False) -> dict[str, Any]:
        if subject is not None and subject not in self.state.subject_compatibility:
            if not default_to_global:
                raise errors.subject_compatibility_not_configured(subject)
        return {"compatibilityLevel": self.effective_compatibility(subject).value}

    async def set_config(self, subject: str | None, body: object) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("Request body must be a JSON object like {\"compatibility\": ...}")
        raw = body.get("compatibility", body.get("compatibilityLevel"))
        level = CompatibilityLevel.parse(raw)
        self.ensure_ready()
        await self.store.write([(records.config_key(subject), records.config_value(level.value))])
        return {"compatibility": level.value}

    async def delete_config(self, subject: str | None) -> dict[str, Any]:
        self.ensure_ready()
        if subject is not None:
            if subject not in self.state.subject_compatibility:
                if not self.state.versions(subject, deleted=True):
                    raise errors.subject_not_found(subject)
                raise errors.subject_compatibility_not_configured(subject)
            old = self.state.subject_compatibility[subject]
        else:
            old = self.state.global_compatibility or DEFAULT_LEVEL
        await self.store.write([(records.config_key(subject), None)])
        return {"compatibilityLevel": old}

    # -- mode --------------------------------------------------------------------

    def effective_mode(self, subject: str | None) -> str:
        mode = self.state.subject_modes.get(subject) if subject is not None else None
        return mode or self.state.global_mode or READWRITE

    def get_mode(self, subject: str | None, *, default_to_global: bool = False) -> dict[str, Any]:
        if subject is not None and subject not in self.state.subject_modes and not default_to_global:
            raise errors.subject_mode_not_configured(subject)
        return {"mode": self.effective_mode(subject)}

    async def set_mode(self, subject: str | None, body: object, *, force: bool = False) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("Request body must be a JSON object like {\"mode\": ...}")
        raw = body.get("mode")
        mode = raw.upper() if isinstance(raw, str) else raw
        if mode not in MODES:
            raise errors.invalid_mode(raw)
        self.ensure_ready()
        if mode == IMPORT and not force:
            has_schemas = (
                bool(self.state.versions(subject)) if subject is not None
                else bool(self.state.live_subjects())
            )
            if has_schemas:
                raise errors.operation_not_permitted(
                    "Cannot import since found existing subjects; use force=true to override"
                )
        await self.store.write([(records.mode_key(subject), records.mode_value(mode))])
        return {"mode": mode}

    async def delete_mode(self, subject: str) -> dict[str, Any]:
        self.ensure_ready()
        old = self.state.subject_modes.get(subject)
        if old is None:
            raise errors.subject_not_found(subject)
        await self.store.write([(records.mode_key(subject), None)])
        return {"mode": old}
