"""The pure half of the aggregate kernel: decisions, refusals and a domain's flow as data.

Every domain (orders, the order indexes, and later payments, subscriptions,
invoices) is declared here in the same shape and run by the one driver in
:mod:`streams.kernel`:

- a row type with ``load``/``dump`` (what the changelog-backed table stores);
- a :class:`Flow`: a table of :class:`Step` rows, one per input (an event
  topic, or a verb on the domain's command topic), each naming its seed
  handler, its pure ``decide(row, message, now_ms) -> Decision``, the topics
  it may emit and its deadline effect;
- ``deadline_of(row)``: the one deadline a row has pending, if any.  The driver
  derives every deadline write from rows (before and after a decision), never
  from a separate field a decision could forget, so a row and its deadline
  cannot disagree for long: see the crash argument in :mod:`streams.kernel`.

Nothing here imports Faust, Kafka or aiohttp: decisions are unit-tested
without a broker, and the driver stays the only place that knows how records
are batched, published, acknowledged and written.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# --------------------------------------------------------------------------
# Refusals: what a domain says when a well-formed input may not be applied.


class Refusal(ValueError):
    """A domain refusal: the input is understood, and the aggregate says no.

    ``status`` is what the HTTP API answers when a request caused it, ``code``
    its machine-readable error; a refused *event* goes to the dead-letter topic
    with ``code`` as its reason.  Retrying a refusal unchanged cannot succeed,
    which is why the driver never retries one.
    """

    status: int = 400
    code: str = "invalid"
    #: ``dlq.reason`` of the dead letter a refused event becomes.
    dead_letter_reason: str = "rejected"


class Invalid(Refusal):
    """Malformed input: a missing or mistyped field, an unknown verb (400)."""


class NotFound(Refusal):
    """The input is about an aggregate that does not exist (404)."""

    status = 404
    code = "not_found"


class Conflict(Refusal):
    """The aggregate's current state forbids the input (409)."""

    status = 409
    code = "illegal_transition"


class IdempotencyKeyReused(Refusal):
    """An Idempotency-Key seen before with other parameters (422, as Stripe answers)."""

    status = 422
    code = "idempotency_key_reused"


# --------------------------------------------------------------------------
# What a decision produces.


@dataclass(frozen=True, slots=True)
class Emission:
    """One event to publish on catalog topic ``topic`` (envelope added by the driver).

    Its ``event_id`` is derived from (cause id, topic, ``discriminator``), so
    re-deciding the same input republishes the same id; ``discriminator``
    tells apart two emissions of one topic caused by one input.
    """

    topic: str
    payload: dict[str, Any]
    discriminator: str = ""
    occurred_at: int | None = None  # the fact's own time; default: the batch's time
    #: The event id when the fact has an identity of its own outside the input
    #: (a Stripe PaymentIntent or refund id, via :func:`derived_id`): two
    #: inputs reporting the same fact (our call's answer and Stripe's webhook)
    #: then publish it under one id.
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Send:
    """One internal record (a command to another aggregate, an index update).

    ``topic`` is a catalog internal topic name; the value is JSON.
    """

    topic: str
    key: str
    value: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Call:
    """An external call (Stripe, a service client) a decision needs the answer of.

    ``idempotency_key`` is derived from the causing input, so a replayed input
    repeats the call under the same key and the service does the work once.
    """

    service: str
    operation: str
    args: Mapping[str, Any]
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to a :class:`Call`: a value, or the refusal the service gave.

    Transient failures never become an Outcome: the driver retries the batch.
    """

    value: Any = None
    refused: str | None = None
    code: str | None = None  # the service's machine-readable reason (e.g. "card_declined")

    @property
    def ok(self) -> bool:
        return self.refused is None


@dataclass(frozen=True, slots=True)
class Decision:
    """What one input does to one aggregate; the driver applies all of it or nothing.

    - ``row``: the new row, or None when the row does not change;
    - ``emit``: events to publish; ``send``: internal records to publish;
    - ``duplicate``: the input was applied before (nothing changes, nothing
      is published again; a waiting requester gets the current row);
    - ``reply``: what a waiting requester gets instead of the row's view.
    """

    row: Any = None
    emit: tuple[Emission, ...] = ()
    send: tuple[Send, ...] = ()
    duplicate: bool = False
    reply: Any = None


NOOP = Decision()
DUPLICATE = Decision(duplicate=True)


# --------------------------------------------------------------------------
# A domain's flow, as data.


class DeadlineEffect(StrEnum):
    """What a step does to the row's pending deadline (the flow table's last column).

    Documentation that tests hold the decisions to; the driver itself derives
    deadline writes from ``deadline_of`` on the rows before and after.
    """

    NONE = "none"  # the step never touches the deadline
    SET = "set"  # the step creates a row with a deadline
    CLEAR = "clear"  # on success the row no longer has a deadline
    FIRE = "fire"  # the step is the timer's hand-over: expire, or re-arm if early


Decide = Callable[[Any, Mapping[str, Any], int], Decision]
DecideWithResults = Callable[[Any, Mapping[str, Any], int, Mapping[str, Outcome]], Decision]
PlanCalls = Callable[[Any, Mapping[str, Any]], Sequence[Call]]


@dataclass(frozen=True, slots=True)
class Step:
    """One row of a flow table: input -> decide -> emitted topics -> deadline effect.

    ``input`` is a catalog topic (an event) or ``"<verb>"`` on the flow's
    command topic.  ``handler`` is the seed's name for it, so a reader finds
    ``handle_payment_completed`` by grep.  A step that needs external answers
    first declares ``calls(row, message)``; its ``decide`` then takes the
    outcomes as a fourth argument.
    """

    input: str
    handler: str
    decide: Decide | DecideWithResults
    emits: tuple[str, ...] = ()
    sends: tuple[str, ...] = ()
    deadline: DeadlineEffect = DeadlineEffect.NONE
    calls: PlanCalls | None = None


@dataclass(frozen=True)
class Flow:
    """A domain on the kernel: its row codec, its flow table and its queries.

    - ``name``: the table (and changelog) name;
    - ``key_field``: the message field the aggregate is keyed by (commands
      carry it; it is also the record key of every input);
    - ``command_topic``: the internal topic whose verbs are steps (or None);
    - ``load``/``dump``: row <-> the JSON object the table stores;
    - ``deadline_of``: the deadline a row has pending (None: none);
    - ``follow``: internal records a row change causes, computed once per
      batch from the row before the batch and after it (index updates);
    - ``view``: what a waiting requester is answered with;
    - ``shares_rows``: its decisions never change a row they are given (they
      return new rows), so the kernel may hand one loaded row object to
      several batches, decoding a stored value once (see
      :meth:`streams.kernel.Aggregate._load`).
    """

    name: str
    producer: str
    key_field: str
    steps: tuple[Step, ...]
    load: Callable[[Mapping[str, Any]], Any]
    dump: Callable[[Any], dict[str, Any]]
    command_topic: str | None = None
    deadline_of: Callable[[Any], int | None] | None = None
    follow: Callable[[Any, Any], Sequence[Send]] | None = None
    view: Callable[[Any], Any] = field(default=lambda row: row)
    shares_rows: bool = False

    def __post_init__(self) -> None:
        inputs = [step.input for step in self.steps]
        if len(set(inputs)) != len(inputs):
            raise ValueError(f"flow {self.name}: an input appears twice in its table")

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic the flow reads (event topics, then its command topic)."""
        events = [s.input for s in self.steps if "." in s.input]
        return (*events, self.command_topic) if self.command_topic else tuple(events)

    def step(self, topic: str, message: Mapping[str, Any]) -> Step:
        """The step for ``message`` read from ``topic`` (Invalid for an unknown verb)."""
        name = given = topic
        if topic == self.command_topic:
            given = message.get("command")
            # a verb names a command step only, never an event's (verbs have no dots)
            name = given if isinstance(given, str) and "." not in given else ""
        for step in self.steps:
            if step.input == name:
                return step
        known = ", ".join(s.input for s in self.steps if "." not in s.input)
        raise Invalid(f"{self.name}: unknown command {given!r}; known: {known}")


# --------------------------------------------------------------------------
# Ids and commands.

#: Namespace of every id the kernel derives (uuid5): the same cause always
#: yields the same event id, command id or aggregate id.
ID_NAMESPACE = uuid.UUID("6f1c1a52-4d0e-4f4b-9a55-0d7e8f0c2b11")


def derived_id(*parts: object) -> str:
    """A stable id for something caused by ``parts`` (same parts, same id).

    Each part is escaped before the parts are joined, so parts a client chose
    (a user id, an Idempotency-Key) can never be re-cut into another tuple
    with the same id (``("a/b", "c")`` and ``("a", "b/c")`` differ).
    """
    # uuid.uuid5, written out: the same bytes and text without building a UUID
    # object (ids are derived for every event the kernel publishes)
    name = "/".join(_escaped(p) for p in parts).encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_NAMESPACE_BYTES = ID_NAMESPACE.bytes


def _escaped(part: object) -> str:
    return str(part).replace("\\", "\\\\").replace("/", "\\/")


def remembered(ids: list[str], input_id: str, limit: int) -> list[str]:
    """The applied-input ids of a row after applying ``input_id``: the newest ``limit`` kept.

    ``ids`` itself when ``input_id`` is already its last, else a new list:
    ``ids`` is never changed.
    """
    return ids if ids[-1:] == [input_id] else [*ids, input_id][-limit:]


def command(
    verb: str,
    key_field: str,
    key: str,
    *,
    cause: Mapping[str, Any] | None,
    now_ms: int,
    command_id: str | None = None,
    origin: str | None = None,
    **args: Any,
) -> dict[str, Any]:
    """A command record for the aggregate ``key`` (JSON on a command topic).

    A command caused by an event gets an id derived from the event, the verb
    and the target, so re-deciding the event re-sends the same command, which
    the target row recognises as applied.  ``origin="api"`` marks a command a
    requester waits for: its refusal is answered, never dead-lettered.
    """
    if command_id is None:
        command_id = derived_id(cause["event_id"], verb, key) if cause else str(uuid.uuid4())
    record = {
        "command": verb,
        "command_id": command_id,
        key_field: key,
        "correlation_id": (cause or {}).get("correlation_id") or command_id,
        "causation_id": (cause or {}).get("event_id"),
        "issued_at": now_ms,
        "args": args,
    }
    if origin is not None:
        record["origin"] = origin
    return record


def command_message(record: Mapping[str, Any], key_field: str) -> dict[str, Any]:
    """The message a step decides on: the verb, its id, the key and the arguments.

    Raises Invalid for a record that is not a command of this shape.
    """
    args = record.get("args") or {}
    if not isinstance(args, Mapping):
        raise Invalid("command args must be an object")
    key = record.get(key_field)
    if not isinstance(key, str) or not key:
        raise Invalid(f"command without a {key_field}")
    reserved = {"command_id", "command", "issued_at", key_field} & set(args)
    if reserved:
        raise Invalid(f"command args may not set {', '.join(sorted(reserved))}")
    message = {"command_id": record.get("command_id"), "command": record.get("command"),
               key_field: key, **args}
    if isinstance(record.get("issued_at"), int):
        message["issued_at"] = record["issued_at"]
    return message


def fingerprint(verb: str, parameters: Mapping[str, Any]) -> str:
    """A digest of a request's verb and parameters, for Idempotency-Key reuse checks."""
    canonical = json.dumps([verb, parameters], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
