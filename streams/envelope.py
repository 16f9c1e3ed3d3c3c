"""Building events: the envelope filled in, the payload checked against its contract.

Every event paystream produces is made by :func:`new_event`, so every event
carries a fresh idempotency key, the flow's correlation id and its cause, and
no event that its topic's Avro contract would reject ever reaches a producer:
the error surfaces where the event is built, naming the topic and the field,
instead of as an encoder failure deep in a send.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fastavro.validation import ValidationError, validate

from schemas.contracts import ENVELOPE_FIELDS, parsed_schema, schema_dict


class InvalidEvent(ValueError):
    """An event does not satisfy its topic's contract.

    ``topic`` and ``fields`` (the offending field names) are kept as
    attributes so a dead-letter record or an HTTP 422 can report them.
    """

    def __init__(self, topic: str, problem: str, fields: Iterable[str] = ()) -> None:
        self.topic = topic
        self.fields = tuple(fields)
        super().__init__(f"invalid {topic} event: {problem}")


def new_event(
    topic: str,
    payload: Mapping[str, Any],
    *,
    producer: str,
    cause: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    now_ms: int | None = None,
    event_id: str | uuid.UUID | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Return a complete, valid event for ``topic``: envelope first, then ``payload``.

    - ``event_id``: a new uuid4, unless one is given.  Give one derived from an
      external id (e.g. ``uuid5`` of a Stripe event id) when the same outside
      fact can arrive twice, so that both copies carry the same idempotency key.
    - ``event_type``: ``topic``; ``occurred_at``: ``now_ms`` or the current time.
    - ``correlation_id``: the cause's, else the one given, else a new uuid4:
      an event caused by another stays in its flow.  Passing a cause and a
      different ``correlation_id`` is a caller bug and is refused.
    - ``causation_id``: the cause's ``event_id``, or None.
    - ``schema_version``: the default declared in the topic's contract.
    - payload fields left out take their schema default (optional fields: null).

    Raises :class:`InvalidEvent` (a ``ValueError``) naming the topic and the
    field(s) for an unknown field, a missing required field, an envelope
    field smuggled into the payload, or a value of the wrong type; and
    :class:`schemas.contracts.UnknownContract` for a topic without a contract.
    The payload's values are not copied.  ``check=False`` skips the value
    check, for a caller that encodes the event at once (the Avro encoder
    refuses the same values, with a terser message): the kernel's hot path.
    """
    parsed = parsed_schema(topic)
    fields = _fields(topic)
    if not isinstance(payload, Mapping):
        raise InvalidEvent(topic, f"payload must be a mapping, not {type(payload).__name__}")

    names = _names(topic)
    smuggled = sorted(name for name in payload if name in _ENVELOPE_NAMES)
    if smuggled:
        raise InvalidEvent(
            topic,
            f"envelope field(s) {', '.join(smuggled)} in the payload; new_event sets them "
            "(use its keyword arguments)",
            smuggled,
        )
    unknown = sorted(str(name) for name in payload if name not in names.known)
    if unknown:
        raise InvalidEvent(topic, f"unknown field(s) {', '.join(unknown)}", unknown)
    missing = [name for name in names.required if name not in payload]
    if missing:
        raise InvalidEvent(topic, f"missing required field(s) {', '.join(missing)}", missing)

    if not producer:
        raise InvalidEvent(topic, "producer must name the emitting service", ["producer"])
    envelope = {
        "event_id": _event_id(topic, event_id),
        "event_type": topic,
        "occurred_at": time.time_ns() // 1_000_000 if now_ms is None else now_ms,
        "producer": producer,
        "correlation_id": _correlation_id(topic, cause, correlation_id),
        "causation_id": _causation_id(topic, cause),
        "schema_version": _default_of(fields, "schema_version"),
    }

    event: dict[str, Any] = {}
    for field in fields:
        name = field["name"]
        if name in envelope:
            event[name] = envelope[name]
        elif name in payload:
            event[name] = payload[name]
        else:
            event[name] = _copy_default(field["default"])

    if check:
        try:
            validate(event, parsed, raise_errors=True)
        except ValidationError as exc:
            raise _invalid(topic, parsed, exc) from None
    return event


#: ``str(uuid.UUID(text))`` of any UUID: lower case, hyphenated (every derived event id).
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _event_id(topic: str, given: str | uuid.UUID | None) -> str:
    if given is None:
        return str(uuid.uuid4())
    if type(given) is str and _CANONICAL_UUID.fullmatch(given):
        return given  # already what str(UUID(given)) would give (every derived id): no parse
    try:
        return str(given if isinstance(given, uuid.UUID) else uuid.UUID(str(given)))
    except ValueError:
        raise InvalidEvent(topic, f"event_id {given!r} is not a UUID", ["event_id"]) from None


def _correlation_id(topic: str, cause: Mapping[str, Any] | None, given: str | None) -> str:
    inherited = cause.get("correlation_id") if cause is not None else None
    if inherited and given and inherited != given:
        raise InvalidEvent(
            topic,
            f"correlation_id {given!r} contradicts the cause's {inherited!r}; an event "
            "caused by another belongs to its flow",
            ["correlation_id"],
        )
    return str(inherited or given or uuid.uuid4())


@cache
def _fields(topic: str) -> tuple[dict[str, Any], ...]:
    """The contract's fields, copied once per process: :func:`new_event` only reads them
    (defaults are copied per event), and building events is on every agent's hot path."""
    return tuple(schema_dict(topic)["fields"])


_ENVELOPE_NAMES = frozenset(ENVELOPE_FIELDS)


@dataclass(frozen=True)
class _Names:
    known: frozenset[str]  # every field of the contract
    required: tuple[str, ...]  # payload fields without a default, in contract order


@cache
def _names(topic: str) -> _Names:
    """The field names :func:`new_event` checks a payload against, once per topic."""
    fields = _fields(topic)
    return _Names(frozenset(field["name"] for field in fields),
                  tuple(field["name"] for field in fields
                        if field["name"] not in _ENVELOPE_NAMES and "default" not in field))


def _causation_id(topic: str, cause: Mapping[str, Any] | None) -> str | None:
    if cause is None:
        return None
    cause_id = cause.get("event_id")
    if not cause_id:
        raise InvalidEvent(topic, "the cause has no event_id", ["causation_id"])
    return str(cause_id)


def _default_of(fields: Iterable[dict[str, Any]], name: str) -> Any:
    for field in fields:
        if field["name"] == name:
            return field.get("default")
    return None


def _copy_default(default: Any) -> Any:
    # Map and array defaults are mutable; each event gets its own.
    if isinstance(default, dict):
        return dict(default)
    if isinstance(default, list):
        return list(default)
    return default


def _invalid(topic: str, parsed: Mapping[str, Any], exc: ValidationError) -> InvalidEvent:
    """Turn fastavro's errors (one per union branch tried) into one message per field."""
    record_prefix = f"{parsed['name']}."
    namespace = parsed["name"].rpartition(".")[0]
    expected: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for error in exc.errors:
        field = str(error.field)
        if field.startswith(record_prefix):
            field = field[len(record_prefix) :]
        elif namespace and field.startswith(f"{namespace}."):
            field = field[len(namespace) + 1 :]
        expected.setdefault(field, [])
        described = _describe(error.schema)
        if described not in expected[field]:
            expected[field].append(described)
        got[field] = error.datum
    problems = [
        f"{field} is {_show(got[field])}, expected {' or '.join(types)}"
        for field, types in expected.items()
    ]
    return InvalidEvent(topic, "; ".join(problems), expected)


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return " or ".join(_describe(branch) for branch in schema)
    if isinstance(schema, dict):
        kind = schema.get("type")
        if schema.get("logicalType"):
            return f"{kind} ({schema['logicalType']})"
        if kind == "enum":
            return f"one of {', '.join(schema['symbols'])}"
        if kind == "array":
            return f"array of {_describe(schema['items'])}"
        if kind == "map":
            return f"map of {_describe(schema['values'])}"
        if kind == "record":
            return f"record {schema['name'].rpartition('.')[2]}"
        return str(kind)
    return str(schema)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"
