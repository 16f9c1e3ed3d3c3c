"""The aggregate kernel's driver (streams.kernel.Aggregate), without a broker.

The driver runs on a small stand-in for the Faust app: tables are dicts that
record every read and write together with the partition of Faust's *current
event* at that moment (so :func:`streams.kernel.bound_to` is checked, not
assumed); the producer records what it was handed, acknowledges it or fails
it like aiokafka does (``KafkaTimeoutError`` on the ack, ``MessageSizeTooLargeError``
raised by ``send``); events are encoded and decoded with the real Avro codec
(schema ids preloaded, no registry) and commands are JSON built by
:func:`tables.aggregate.command`, as the API and the index flows build them.

Batches are handed to :meth:`Aggregate.process` directly.  Most tests use a
small counter flow declared here (it covers every kind of step: events,
commands, refusals, bugs, external calls, sends, deadlines, the timer's hand
over); the last ones run the real order flow and the user -> orders index.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import struct
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry.error import SchemaRegistryError

from schemas.contracts import schema_dict
from streams import catalog
from streams.catalog import DEAD_LETTERS, ORDER_COMMANDS, SUBSCRIPTION_ORDER_INDEX, USER_ORDER_INDEX
from streams.codec import ConfluentAvroCodec, SchemaCache
from streams.envelope import new_event
from streams.kernel import Aggregate, CallRefused, bound_to, transient
from tables import aggregate, order_index, order_state
from tables.aggregate import (
    DUPLICATE,
    NOOP,
    Call,
    Conflict,
    DeadlineEffect,
    Decision,
    Emission,
    Flow,
    Invalid,
    Outcome,
    Send,
    Step,
)
from tables.deadlines import deadline_key, parse_key

PREFIX = "t-"
BALANCE = "wallet.balance_changed"
CREDITS = "wallet.credits_added"
DLQ = PREFIX + DEAD_LETTERS
COMMANDS = PREFIX + ORDER_COMMANDS
T_SECONDS = 1_767_225_600.0  # record timestamps (Kafka's, in seconds as Faust gives them)


# --------------------------------------------------------------------------
# The stand-in app


def _bound_partition() -> int | None:
    event = faust.current_event()
    return None if event is None else event.message.partition


class FakeTable:
    """A table that remembers each access and the partition it was bound to.

    Values are deep-copied in and out, as a store that serializes them would,
    so a decision that mutates a loaded row cannot change what is stored.
    """

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.options = options
        self.data: dict[Any, Any] = {}
        self.reads: list[tuple[Any, int | None]] = []
        self.writes: list[tuple[Any, Any, int | None]] = []
        self.deletes: list[tuple[Any, int | None]] = []
        self.on_write: Callable[[Any], None] | None = None

    def get(self, key: Any, default: Any = None) -> Any:
        self.reads.append((key, _bound_partition()))
        return copy.deepcopy(self.data.get(key, default))

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.on_write is not None:
            self.on_write(key)
        self.writes.append((key, copy.deepcopy(value), _bound_partition()))
        self.data[key] = copy.deepcopy(value)

    def __delitem__(self, key: Any) -> None:
        self.deletes.append((key, _bound_partition()))
        del self.data[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.data

    def items(self) -> list[tuple[Any, Any]]:
        return list(self.data.items())


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None

    def header(self, name: str) -> str | None:
        return next((v.decode() for k, v in self.headers or () if k == name), None)


class FakeProducer:
    """Records what it is handed; acknowledges it, or fails it as aiokafka would.

    - ``transient_failures``: so many of the next records get a future that
      fails with ``KafkaTimeoutError`` (the ack never came);
    - ``max_value_bytes``: a larger value makes ``send`` itself raise
      ``MessageSizeTooLargeError`` (aiokafka checks the size before queueing);
    - ``observe``: called at every failure; what it returns is kept in
      ``observations`` (a test's view of the state at that moment).
    """

    def __init__(self) -> None:
        self.handed: list[Sent] = []
        self.acked: list[Sent] = []
        self.transient_failures = 0
        self.max_value_bytes: int | None = None
        self.observe: Callable[[], Any] | None = None
        self.observations: list[Any] = []

    def _failed(self) -> None:
        if self.observe is not None:
            self.observations.append(self.observe())

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                   timestamp: float | None, headers: list[tuple[str, bytes]] | None) -> asyncio.Future[Any]:
        assert partition is None and timestamp is None  # the key picks the partition
        record = Sent(topic, key, value, headers)
        self.handed.append(record)
        if self.max_value_bytes is not None and value is not None and len(value) > self.max_value_bytes:
            self._failed()
            raise MessageSizeTooLargeError(f"{len(value)} bytes is over {self.max_value_bytes}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.transient_failures > 0:
            self.transient_failures -= 1
            self._failed()
            future.set_exception(KafkaTimeoutError())
        else:
            self.acked.append(record)
            future.set_result((topic, len(self.acked)))
        return future


class EventTopic:
    """What the kernel asks of ``app.event_topic(name)``: the Kafka name and the codec."""

    def __init__(self, kafka_topic: str, codec: ConfluentAvroCodec) -> None:
        self.kafka_topic = kafka_topic
        self.value_serializer = codec

    def get_topic_name(self) -> str:
        return self.kafka_topic


class Settings:
    batch_max = 1000
    batch_within_ms = 10.0

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"


class FakeApp:
    """The parts of the paystream Faust app the kernel uses, and nothing else."""

    def __init__(self, prefix: str = PREFIX, registry: Any = "http://registry.invalid") -> None:
        self.settings = Settings(prefix)
        self.producer = FakeProducer()
        self.tables: dict[str, FakeTable] = {}
        self.agents: dict[str, tuple[Any, Callable[..., Any]]] = {}
        self.timers: list[tuple[str, float, Callable[..., Any]]] = []
        self.topics: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        cache = SchemaCache(registry)  # asked only for ids not preloaded here
        self.event_topics: dict[str, EventTopic] = {}
        for schema_id, name in enumerate(sorted(catalog.CATALOG), start=1):
            kafka_topic = self.settings.topic(name)
            cache.preload(kafka_topic, name, schema_id)
            self.event_topics[name] = EventTopic(kafka_topic, ConfluentAvroCodec(kafka_topic, name, cache))

    def Table(self, name: str, **options: Any) -> FakeTable:
        table = self.tables[name] = FakeTable(name, **options)
        return table

    def topic(self, *topics: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
        source = (topics, options)
        self.topics.append(source)
        return source

    def agent(self, source: Any, *, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.agents[name] = (source, fn)
            return fn
        return register

    def timer(self, interval: float, *, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.timers.append((name, interval, fn))
            return fn
        return register

    def event_topic(self, name: str) -> EventTopic:
        return self.event_topics[name]

    # -- reading what was published --------------------------------------

    def acked(self, name: str) -> list[Sent]:
        """Acknowledged records on catalog/internal topic ``name``, in order."""
        return [r for r in self.producer.acked if r.topic == self.settings.topic(name)]

    def events(self, name: str, records: Sequence[Sent] | None = None) -> list[dict[str, Any]]:
        """The decoded events of catalog topic ``name`` among ``records`` (default: acked)."""
        topic = self.event_topics[name]
        chosen = self.producer.acked if records is None else records
        return [topic.value_serializer.loads(r.value) for r in chosen if r.topic == topic.kafka_topic]

    def json(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.acked(name)]

    def dead_letters(self) -> list[Sent]:
        return [r for r in self.producer.acked if r.topic == DLQ]


# --------------------------------------------------------------------------
# Records as the stream hands them over


@dataclass(eq=False)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float = T_SECONDS
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class Event:
    """A Faust event: its message, key and (raw, as the agent reads them) value."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.key = message.key
        self.value = message.value


class Offsets:
    """Hands out increasing offsets per partition, like a topic would."""

    def __init__(self) -> None:
        self.next: dict[tuple[str, int], int] = {}

    def __call__(self, topic: str, partition: int) -> int:
        offset = self.next.get((topic, partition), 0)
        self.next[(topic, partition)] = offset + 1
        return offset


OFFSETS = Offsets()


def record(topic: str, key: str | bytes | None, value: bytes | None, *, partition: int = 0,
           headers: list[tuple[str, bytes]] | None = None) -> Event:
    raw_key = key.encode() if isinstance(key, str) else key
    return Event(Message(topic, partition, OFFSETS(topic, partition), raw_key, value,
                         headers=list(headers or [])))


def command(verb: str, user_id: str, *, partition: int = 0, command_id: str | None = None,
            origin: str | None = None, **args: Any) -> Event:
    """A counter command on the command topic, as another aggregate or the API sends it."""
    body = aggregate.command(verb, "user_id", user_id, cause=None, now_ms=1_767_225_600_000,
                             command_id=command_id or str(uuid.uuid4()), origin=origin, **args)
    return record(COMMANDS, user_id, json.dumps(body).encode(), partition=partition)


def command_id_of(event: Event) -> str:
    return json.loads(event.value)["command_id"]


def credits_added(app: FakeApp, user_id: str, amount: int, *, currency: str = "EUR",
                  partition: int = 0, **overrides: Any) -> Event:
    """A wallet.credits_added event, Avro-encoded like the wallet service writes it."""
    payload = {"user_id": user_id, "wallet_id": f"w-{user_id}", "amount": amount,
               "currency": currency, "balance_amount": amount}
    event = new_event(CREDITS, payload, producer="wallet_service", **overrides)
    topic = app.event_topic(CREDITS)
    return record(topic.kafka_topic, user_id, topic.value_serializer.dumps(event), partition=partition,
                  headers=[("traceparent", b"00-abc-01")])


# --------------------------------------------------------------------------
# A counter flow: every kind of step the kernel runs, in a few lines each.


def _counter(row: dict[str, Any] | None) -> dict[str, Any]:
    return row if row is not None else {"count": 0, "deadline": None, "applied": [], "charges": []}


def _applied(row: dict[str, Any] | None, message_id: str) -> bool:
    return row is not None and message_id in row["applied"]


def _balance(user_id: str, count: int, delta: int, *, pad: int = 0, discriminator: str = "") -> Emission:
    payload = {"user_id": user_id, "wallet_id": f"w-{user_id}", "balance_amount": count,
               "delta_amount": delta, "currency": "EUR", "transaction_id": "x" * pad or None}
    return Emission(BALANCE, payload, discriminator=discriminator)


def _advance(row: dict[str, Any] | None, message_id: str, amount: int, **changes: Any) -> dict[str, Any]:
    current = _counter(row)
    return {**current, "count": current["count"] + amount,
            "applied": [*current["applied"], message_id], **changes}


def add(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """Add ``amount``; optional ``deadline`` (set/clear), ``pad`` (a large event), ``notify`` (a send)."""
    if _applied(row, message["command_id"]):
        return DUPLICATE
    amount = message.get("amount")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise Invalid(f"amount must be an integer, not {amount!r}")
    changes = {"deadline": message["deadline"]} if "deadline" in message else {}
    after = _advance(row, message["command_id"], amount, **changes)
    sends = ()
    if message.get("notify"):
        sends = (Send(SUBSCRIPTION_ORDER_INDEX, message["user_id"], {"count": after["count"]}),)
    emit = (_balance(message["user_id"], after["count"], amount, pad=message.get("pad", 0)),)
    return Decision(row=after, emit=emit, send=sends, reply=message.get("reply"))


def credit(row: dict[str, Any] | None, event: Mapping[str, Any], now_ms: int) -> Decision:
    """wallet.credits_added: add the credit; only euros are accepted."""
    if _applied(row, event["event_id"]):
        return DUPLICATE
    if event["currency"] != "EUR":
        raise Conflict(f"counter {event['user_id']} counts EUR, not {event['currency']}")
    after = _advance(row, event["event_id"], event["amount"])
    return Decision(row=after, emit=(_balance(event["user_id"], after["count"], event["amount"]),))


def refuse(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    raise Conflict(f"counter {message['user_id']} refuses")


def boom(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    raise RuntimeError("a bug in a decision")


def stray(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """Emits a topic its step does not declare."""
    return Decision(row=_advance(row, message["command_id"], 1),
                    emit=(_balance(message["user_id"], 1, 1),))


def stray_send(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """Sends to a topic its step does not declare."""
    return Decision(row=_advance(row, message["command_id"], 1),
                    send=(Send(USER_ORDER_INDEX, message["user_id"], {}),))


def twice(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """Two events of one topic from one input, told apart by their discriminators."""
    after = _advance(row, message["command_id"], 2)
    return Decision(row=after, emit=(_balance(message["user_id"], after["count"] - 1, 1, discriminator="a"),
                                     _balance(message["user_id"], after["count"], 1, discriminator="b")))


def charge_calls(row: dict[str, Any] | None, message: Mapping[str, Any]) -> list[Call]:
    """A charge asks the bank, under a key derived from the command."""
    return [Call("bank", "charge", {"user_id": message["user_id"], "amount": message["amount"]},
                 aggregate.derived_id(message["command_id"], "charge"))]


def charge(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int,
           outcomes: Mapping[str, Outcome]) -> Decision:
    """Counts the charge if the bank took it; records the bank's answer either way."""
    if _applied(row, message["command_id"]):
        return DUPLICATE
    outcome = outcomes[aggregate.derived_id(message["command_id"], "charge")]
    amount = message["amount"] if outcome.ok else 0
    current = _counter(row)
    answer = outcome.value if outcome.ok else f"refused ({outcome.code}): {outcome.refused}"
    after = _advance(row, message["command_id"], amount, charges=[*current["charges"], answer])
    return Decision(row=after, emit=(_balance(message["user_id"], after["count"], amount),))


def greedy_calls(row: dict[str, Any] | None, message: Mapping[str, Any]) -> list[Call]:
    """Never satisfied: a fresh idempotency key every time it is asked."""
    return [Call("bank", "charge", {"user_id": message["user_id"], "amount": message["amount"]},
                 str(uuid.uuid4()))]


def tick(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
    """The timer's hand-over: clear a due deadline; anything else changes nothing."""
    if _applied(row, message["command_id"]):
        return DUPLICATE
    if row is None or row["deadline"] is None or now_ms < row["deadline"]:
        return NOOP
    return Decision(row=_advance(row, message["command_id"], 0, deadline=None))


def counter_flow(*, follow: Callable[[Any, Any], Sequence[Send]] | None = None) -> Flow:
    E = DeadlineEffect
    return Flow(
        name="counters",
        producer=catalog.ORDER_SERVICE,
        key_field="user_id",
        command_topic=ORDER_COMMANDS,
        steps=(
            Step(CREDITS, "handle_wallet_credits_added", credit, (BALANCE,)),
            Step("add", "add", add, (BALANCE,), sends=(SUBSCRIPTION_ORDER_INDEX,), deadline=E.SET),
            Step("refuse", "refuse", refuse),
            Step("boom", "boom", boom),
            Step("stray", "stray", stray),
            Step("stray_send", "stray_send", stray_send, (BALANCE,)),
            Step("twice", "twice", twice, (BALANCE,)),
            Step("charge", "charge", charge, (BALANCE,), calls=charge_calls),
            Step("greedy", "greedy", charge, (BALANCE,), calls=greedy_calls),
            Step("tick", "tick", tick, deadline=E.FIRE),
        ),
        load=copy.deepcopy,
        dump=copy.deepcopy,
        deadline_of=lambda row: row["deadline"],
        follow=follow,
        view=lambda row: {"count": row["count"]},
    )


class DeadlineRecorder:
    """Stands in for tables.deadlines.Deadlines: what was scheduled and cancelled, bound where."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int | None]] = []
        self.flushes = 0
        self.steps: list[str] = []  # commit / flush, in the order the kernel asked

    def schedule(self, aggregate_id: str, deadline_ms: int) -> None:
        self.calls.append(("schedule", aggregate_id, deadline_ms, _bound_partition()))

    def cancel(self, aggregate_id: str, deadline_ms: int) -> None:
        self.calls.append(("cancel", aggregate_id, deadline_ms, _bound_partition()))

    def commit(self) -> None:
        self.steps.append("commit")

    async def flush(self) -> None:
        self.flushes += 1
        self.steps.append("flush")


@dataclass
class Rig:
    app: FakeApp
    kernel: Aggregate
    deadlines: DeadlineRecorder

    @property
    def table(self) -> FakeTable:
        return self.app.tables["counters"]

    def row(self, user_id: str) -> dict[str, Any] | None:
        return self.table.data.get(user_id.encode())

    def row_writes(self, user_id: str) -> list[tuple[Any, Any, int | None]]:
        return [w for w in self.table.writes if w[0] == user_id.encode()]


def make_rig(*, services: Mapping[str, Any] | None = None,
             follow: Callable[[Any, Any], Sequence[Send]] | None = None) -> Rig:
    app = FakeApp()
    kernel = Aggregate(app, counter_flow(follow=follow), agent_name="counter_events",
                       deadlines="counter-deadlines", services=services, max_backoff=0.0)
    recorder = DeadlineRecorder()
    kernel.deadlines = recorder  # type: ignore[assignment]
    return Rig(app, kernel, recorder)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


# --------------------------------------------------------------------------
# Wiring


def test_the_agent_reads_every_input_topic_raw_and_the_table_is_keyed_by_bytes(rig: Rig) -> None:
    source, consume = rig.app.agents["counter_events"]
    topics, options = source
    assert set(topics) == {PREFIX + CREDITS, COMMANDS}
    assert options == {"key_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    assert consume == rig.kernel._consume
    assert rig.table.options["key_type"] is bytes
    assert rig.table.options["partitions"] == catalog.EVENT_PARTITIONS
    assert [name for name, _, _ in rig.app.timers] == ["counter-deadlines-timer"]


def test_bound_to_sets_and_restores_fausts_current_event() -> None:
    outer, inner = record("x", "k", b"", partition=1), record("x", "k", b"", partition=2)
    with bound_to(outer):
        assert faust.current_event() is outer
        with bound_to(inner):
            assert faust.current_event() is inner
        assert faust.current_event() is outer
    assert faust.current_event() is None


def test_transient_tells_a_broker_outage_from_a_bad_record() -> None:
    assert transient(KafkaTimeoutError())
    assert transient(ConnectionResetError())
    assert transient(TimeoutError())
    assert not transient(MessageSizeTooLargeError())
    assert not transient(ValueError("bad"))


def test_a_registry_that_cannot_be_reached_is_transient() -> None:
    """With the HTTP library the registry client really uses (httpx2 when installed)."""
    from confluent_kafka.schema_registry.common._httpx_compat import httpx as registry_http

    assert transient(registry_http.ConnectError("registry down"))
    assert transient(SchemaRegistryError(503, 50301, "unavailable"))
    assert not transient(SchemaRegistryError(422, 42201, "invalid schema"))


# --------------------------------------------------------------------------
# Deciding a batch


async def test_records_are_decided_in_offset_order_per_key(rig: Rig) -> None:
    batch = [command("add", "u1", amount=1), command("add", "u2", amount=10),
             command("add", "u1", amount=2), command("add", "u1", amount=4),
             command("add", "u2", amount=20)]
    await rig.kernel.process(batch)
    u1 = [(e["delta_amount"], e["balance_amount"]) for e in rig.app.events(BALANCE) if e["user_id"] == "u1"]
    u2 = [(e["delta_amount"], e["balance_amount"]) for e in rig.app.events(BALANCE) if e["user_id"] == "u2"]
    assert u1 == [(1, 1), (2, 3), (4, 7)]
    assert u2 == [(10, 10), (20, 30)]
    assert rig.row("u1")["applied"] == [command_id_of(e) for e in (batch[0], batch[2], batch[3])]
    # published in the order decided, keyed by the aggregate
    assert [r.key for r in rig.app.acked(BALANCE)] == [b"u1", b"u2", b"u1", b"u1", b"u2"]


async def test_a_keys_second_record_sees_the_first_and_the_row_is_read_and_written_once(rig: Rig) -> None:
    await rig.kernel.process([command("add", "u1", amount=1)])
    rig.table.reads.clear()
    rig.table.writes.clear()
    await rig.kernel.process([command("add", "u1", amount=2), command("add", "u1", amount=3),
                              command("add", "u2", amount=5)])
    assert [e["balance_amount"] for e in rig.app.events(BALANCE)] == [1, 3, 6, 5]
    assert [key for key, _ in rig.table.reads] == [b"u1", b"u2"]
    assert [(key, value["count"]) for key, value, _ in rig.table.writes] == [(b"u1", 6), (b"u2", 5)]


async def test_table_reads_writes_and_deadlines_are_bound_to_the_keys_partition(rig: Rig) -> None:
    await rig.kernel.process([
        command("add", "u1", partition=2, amount=1, deadline=5_000_000_000_000),
        command("add", "u3", partition=3, amount=1, deadline=6_000_000_000_000),
        command("add", "u1", partition=2, amount=1),
    ])
    assert {(key, p) for key, p in rig.table.reads} == {(b"u1", 2), (b"u3", 3)}
    assert [(key, p) for key, _, p in rig.table.writes] == [(b"u1", 2), (b"u3", 3)]
    assert rig.deadlines.calls == [("schedule", "u1", 5_000_000_000_000, 2),
                                   ("schedule", "u3", 6_000_000_000_000, 3)]
    assert faust.current_event() is None  # nothing stays bound after the batch
    assert rig.deadlines.steps == ["commit", "flush"]  # the write batches before the first await


async def test_a_row_change_causes_its_follow_records_once_per_key_per_batch() -> None:
    seen: list[tuple[Any, Any]] = []

    def follow(before: Any, after: Any) -> list[Send]:
        seen.append((before and before["count"], after["count"]))
        change = {"before": before and before["count"], "after": after["count"]}
        return [Send(USER_ORDER_INDEX, "idx", change)]

    rig = make_rig(follow=follow)
    await rig.kernel.process([command("add", "u1", amount=1)])
    await rig.kernel.process([command("add", "u1", amount=2), command("add", "u1", amount=3),
                              command("refuse", "u2")])
    assert seen == [(None, 1), (1, 6)]  # from the row before the batch to the row after it
    assert rig.app.json(USER_ORDER_INDEX) == [{"before": None, "after": 1}, {"before": 1, "after": 6}]


async def test_an_input_emitting_one_topic_twice_gets_two_stable_ids(rig: Rig) -> None:
    event = command("twice", "u1")
    await rig.kernel.process([event])
    ids = [e["event_id"] for e in rig.app.events(BALANCE)]
    cause = command_id_of(event)
    assert ids == [aggregate.derived_id(cause, BALANCE, "a"), aggregate.derived_id(cause, BALANCE, "b")]


async def test_an_emission_with_an_identity_of_its_own_keeps_its_event_id(rig: Rig) -> None:
    """Two inputs reporting one fact (a call's answer, a webhook) publish it under one id."""
    fact_id = aggregate.derived_id("stripe-fact", "pi_1")

    def report(row: dict[str, Any] | None, message: Mapping[str, Any], now_ms: int) -> Decision:
        emission = _balance(message["user_id"], 1, 1)
        return Decision(emit=(Emission(emission.topic, emission.payload, event_id=fact_id),))

    rig.kernel.flow = dataclasses.replace(rig.kernel.flow, steps=(
        *rig.kernel.flow.steps, Step("report", "report", report, (BALANCE,))))
    await rig.kernel.process([command("report", "u1"), command("report", "u1")])
    assert [e["event_id"] for e in rig.app.events(BALANCE)] == [fact_id, fact_id]


async def test_events_carry_the_envelope_of_their_cause(rig: Rig) -> None:
    credit_event = credits_added(rig.app, "u1", 7, correlation_id="corr-1")
    cause_id = rig.app.event_topic(CREDITS).value_serializer.loads(credit_event.value)["event_id"]
    await rig.kernel.process([credit_event])
    [event] = rig.app.events(BALANCE)
    assert event["event_id"] == aggregate.derived_id(cause_id, BALANCE, "")
    assert event["causation_id"] == cause_id
    assert event["correlation_id"] == "corr-1"
    assert event["producer"] == catalog.ORDER_SERVICE
    assert rig.row("u1")["applied"] == [cause_id]


async def test_sends_are_published_as_json_keyed_by_their_target(rig: Rig) -> None:
    await rig.kernel.process([command("add", "u1", amount=4, notify=True)])
    [sent] = rig.app.acked(SUBSCRIPTION_ORDER_INDEX)
    assert sent.key == b"u1"
    assert json.loads(sent.value) == {"count": 4}


# --------------------------------------------------------------------------
# Publishing: acks, retries, poison records


def unique(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(user, balance) of each distinct event id, in order; a repeat must be the same event."""
    first: dict[str, dict[str, Any]] = {}
    for event in events:
        seen = first.setdefault(event["event_id"], event)
        assert {**seen, "occurred_at": 0} == {**event, "occurred_at": 0}
    return [(e["user_id"], e["balance_amount"]) for e in first.values()]


async def test_a_transient_ack_failure_writes_nothing_then_republishes_the_same_records(rig: Rig) -> None:
    rig.app.producer.transient_failures = 3  # both of the first attempt, one of the second
    rig.app.producer.observe = lambda: (len(rig.table.writes), len(rig.deadlines.calls))
    batch = [command("add", "u1", amount=1, deadline=5_000_000_000_000), command("add", "u2", amount=2)]
    waiter = rig.kernel.replies.expect(command_id_of(batch[0]))
    await rig.kernel.process(batch)

    assert rig.app.producer.observations == [(0, 0)] * 3  # no state while acks fail
    handed = rig.app.events(BALANCE, rig.app.producer.handed)
    assert len(handed) == 6  # three attempts of two events
    assert [e["event_id"] for e in handed[:2]] == [e["event_id"] for e in handed[2:4]] \
        == [e["event_id"] for e in handed[4:]]
    assert [e["event_id"] for e in handed[:2]] == [
        aggregate.derived_id(command_id_of(batch[0]), BALANCE, ""),
        aggregate.derived_id(command_id_of(batch[1]), BALANCE, ""),
    ]
    # once through: each row written once, the deadline once, the waiter answered
    assert [(k, v["count"]) for k, v, _ in rig.table.writes] == [(b"u1", 1), (b"u2", 2)]
    assert rig.deadlines.calls == [("schedule", "u1", 5_000_000_000_000, 0)]
    assert waiter.result() == {"count": 1}


async def test_while_acks_keep_failing_nothing_is_written_or_answered(rig: Rig) -> None:
    rig.app.producer.transient_failures = 10**9
    batch = [command("add", "u1", amount=1, deadline=5_000_000_000_000, origin="api")]
    waiter = rig.kernel.replies.expect(command_id_of(batch[0]))
    task = asyncio.create_task(rig.kernel.process(batch))
    for _ in range(200):
        await asyncio.sleep(0)
        if len(rig.app.producer.handed) >= 5:
            break
    assert len(rig.app.producer.handed) >= 5  # retried, over and over
    assert not task.done()
    assert rig.table.writes == [] and rig.deadlines.calls == []
    assert not waiter.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.table.writes == []


async def test_a_record_the_broker_refuses_for_good_is_dead_lettered_alone(rig: Rig) -> None:
    rig.app.producer.max_value_bytes = 1000
    poison = command("add", "u2", partition=1, amount=2, pad=5000)
    batch = [command("add", "u1", amount=1), poison, command("add", "u3", amount=3),
             command("add", "u2", partition=1, amount=20)]
    await rig.kernel.process(batch)

    assert {k: v["count"] for k, v, _ in rig.table.writes} == {b"u1": 1, b"u2": 20, b"u3": 3}
    assert rig.row("u2")["applied"] == [command_id_of(batch[3])]  # decided without the poison one
    # u1's event went out before the broker refused the poison record: at least once, one id
    assert sorted(unique(rig.app.events(BALANCE))) == [("u1", 1), ("u2", 20), ("u3", 3)]
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "unpublishable"
    assert "MessageSizeTooLargeError" in letter.header("dlq.error")
    assert (letter.key, letter.value) == (b"u2", poison.value)  # the input, as it came
    assert letter.header("dlq.source.topic") == COMMANDS
    assert letter.header("dlq.source.partition") == "1"
    assert letter.header("dlq.source.offset") == str(poison.message.offset)


async def test_isolation_keeps_per_key_order_and_answers_each_waiter(rig: Rig) -> None:
    rig.app.producer.max_value_bytes = 1000
    batch = [command("add", "u1", amount=1, origin="api"), command("add", "u1", amount=1, pad=5000),
             command("add", "u1", amount=5, origin="api")]
    waiters = [rig.kernel.replies.expect(command_id_of(e)) for e in (batch[0], batch[2])]
    await rig.kernel.process(batch)
    assert unique(rig.app.events(BALANCE)) == [("u1", 1), ("u1", 6)]
    assert [w.result() for w in waiters] == [{"count": 1}, {"count": 6}]
    assert [letter.value for letter in rig.app.dead_letters()] == [batch[1].value]


# --------------------------------------------------------------------------
# Refusals, failures, undecodable records


async def test_a_refused_event_is_dead_lettered_as_rejected_and_the_rest_applies(rig: Rig) -> None:
    dollars = credits_added(rig.app, "u1", 5, currency="USD", partition=3)
    await rig.kernel.process([credits_added(rig.app, "u1", 1, partition=3), dollars,
                              credits_added(rig.app, "u1", 2, partition=3)])
    assert rig.row("u1")["count"] == 3
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "rejected"
    assert letter.header("dlq.error") == "Conflict: counter u1 counts EUR, not USD"
    assert (letter.key, letter.value) == (b"u1", dollars.value)
    assert letter.header("dlq.source.topic") == PREFIX + CREDITS
    assert letter.header("dlq.source.timestamp") == str(int(T_SECONDS * 1000))
    assert letter.header("traceparent") == "00-abc-01"  # the record's own headers travel with it


async def test_a_refused_command_from_another_aggregate_is_dead_lettered(rig: Rig) -> None:
    refused = command("refuse", "u1")
    await rig.kernel.process([refused, command("add", "u1", amount=1)])
    [letter] = rig.app.dead_letters()
    assert (letter.header("dlq.reason"), letter.value) == ("rejected", refused.value)
    assert rig.row("u1")["count"] == 1


async def test_a_refused_api_command_is_answered_and_not_dead_lettered(rig: Rig) -> None:
    refused = command("refuse", "u1", origin="api")
    waiter = rig.kernel.replies.expect(command_id_of(refused))
    await rig.kernel.process([refused])
    assert isinstance(waiter.exception(), Conflict)
    assert str(waiter.exception()) == "counter u1 refuses"
    assert rig.app.producer.handed == []  # nothing published: no event, no dead letter
    assert rig.table.writes == []
    assert command_id_of(refused) not in rig.kernel.replies


async def test_a_refused_api_command_nobody_waits_for_is_not_dead_lettered(rig: Rig) -> None:
    # the API's wait ran out; its retry is decided again and answered then
    await rig.kernel.process([command("refuse", "u1", origin="api")])
    assert rig.app.producer.handed == []


async def test_a_successful_command_answers_its_waiters_with_the_view(rig: Rig) -> None:
    first = command("add", "u1", amount=3, origin="api")
    twice_waited = [rig.kernel.replies.expect(command_id_of(first)) for _ in range(2)]
    with_reply = command("add", "u1", amount=1, origin="api", reply={"custom": True})
    custom = rig.kernel.replies.expect(command_id_of(with_reply))
    await rig.kernel.process([first, with_reply])
    assert [w.result() for w in twice_waited] == [{"count": 3}, {"count": 3}]
    assert custom.result() == {"custom": True}


async def test_waiters_are_answered_only_after_rows_and_deadlines_are_written(rig: Rig) -> None:
    answered_at: list[tuple[int, int]] = []
    resolve = rig.kernel.replies.resolve

    def resolve_and_note(command_id: str, result: Any) -> None:
        answered_at.append((len(rig.table.writes), len(rig.deadlines.calls)))
        resolve(command_id, result)

    rig.kernel.replies.resolve = resolve_and_note  # type: ignore[method-assign]
    event = command("add", "u1", amount=3, deadline=5_000_000_000_000, origin="api")
    rig.kernel.replies.expect(command_id_of(event))
    await rig.kernel.process([event])
    assert answered_at == [(1, 1)]


async def test_a_duplicate_api_command_is_answered_with_the_current_row(rig: Rig) -> None:
    event = command("add", "u1", amount=3, origin="api")
    await rig.kernel.process([event])
    waiter = rig.kernel.replies.expect(command_id_of(event))
    again = record(COMMANDS, "u1", event.value)
    await rig.kernel.process([again])
    assert waiter.result() == {"count": 3}
    assert len(rig.app.events(BALANCE)) == 1


@pytest.mark.parametrize("value", [b"{not json", b"[1, 2]", b"", None])
async def test_an_undecodable_command_is_dead_lettered_and_the_batch_goes_on(rig: Rig, value: Any) -> None:
    bad = record(COMMANDS, "u1", value, partition=2)
    await rig.kernel.process([command("add", "u1", partition=2, amount=1), bad,
                              command("add", "u1", partition=2, amount=2)])
    assert rig.row("u1")["count"] == 3
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "undecodable"
    assert letter.header("dlq.error").startswith("MalformedRecord: ")
    assert (letter.key, letter.value) == (b"u1", value)
    assert letter.header("dlq.source.offset") == str(bad.message.offset)


async def test_an_undecodable_event_is_dead_lettered(rig: Rig) -> None:
    not_avro = record(PREFIX + CREDITS, "u1", b"\x01not confluent framing at all")
    await rig.kernel.process([not_avro, credits_added(rig.app, "u1", 4)])
    assert rig.row("u1")["count"] == 4
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "undecodable"
    assert "magic byte 1" in letter.header("dlq.error")


async def test_an_event_whose_envelope_names_another_type_is_undecodable(rig: Rig) -> None:
    codec = rig.app.event_topic(CREDITS).value_serializer
    event = codec.loads(credits_added(rig.app, "u1", 4).value)
    mislabelled = record(PREFIX + CREDITS, "u1", codec.dumps({**event, "event_type": BALANCE}))
    await rig.kernel.process([mislabelled])
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "undecodable"
    assert letter.header("dlq.error").startswith("UnknownEventType: ")
    assert rig.table.writes == []


@pytest.mark.parametrize(("verb", "args", "problem"), [
    ("frobnicate", {}, "unknown command 'frobnicate'"),
    ("add", {"issued_at": 5}, "command args may not set issued_at"),
])
async def test_a_command_the_flow_cannot_read_is_dead_lettered_as_rejected(
        rig: Rig, verb: str, args: dict[str, Any], problem: str) -> None:
    body = aggregate.command(verb, "user_id", "u1", cause=None, now_ms=1, command_id="c-1")
    body["args"].update(args)
    await rig.kernel.process([record(COMMANDS, "u1", json.dumps(body).encode())])
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "rejected"
    assert problem in letter.header("dlq.error")


class FlakyRegistry:
    """A registry client that fails ``failures`` times with a 503, then serves one schema."""

    def __init__(self, schema: dict[str, Any], failures: int) -> None:
        self.schema = schema
        self.failures = failures
        self.asked = 0

    def get_schema(self, schema_id: int) -> Any:
        self.asked += 1
        if self.failures:
            self.failures -= 1
            raise SchemaRegistryError(503, 50003, "registry unavailable")
        return Schema(json.dumps(self.schema), "AVRO")


async def test_a_registry_outage_while_decoding_retries_the_batch() -> None:
    registry = FlakyRegistry(schema_dict(CREDITS), failures=1)
    app = FakeApp(registry=registry)
    kernel = Aggregate(app, counter_flow(), agent_name="counter_events", max_backoff=0.0)
    credit_event = credits_added(app, "u1", 4)
    new_writer_id = b"\x00" + struct.pack(">I", 999) + credit_event.value[5:]  # same body, new schema id
    await kernel.process([record(credit_event.message.topic, b"u1", new_writer_id)])
    assert registry.asked == 2
    assert kernel.row("u1")["count"] == 4
    assert app.dead_letters() == []


async def test_a_command_without_a_command_id_is_dead_lettered(rig: Rig) -> None:
    body = aggregate.command("add", "user_id", "u1", cause=None, now_ms=1, amount=1)
    del body["command_id"]
    await rig.kernel.process([record(COMMANDS, "u1", json.dumps(body).encode())])
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") == "rejected"
    assert "command without a command_id" in letter.header("dlq.error")
    assert rig.table.writes == []


async def test_an_api_command_refused_while_read_is_answered_not_dead_lettered(rig: Rig) -> None:
    body = aggregate.command("frobnicate", "user_id", "u1", cause=None, now_ms=1, command_id="c-api",
                             origin="api")
    waiter = rig.kernel.replies.expect("c-api")
    await rig.kernel.process([record(COMMANDS, "u1", json.dumps(body).encode())])
    assert rig.app.dead_letters() == []
    assert waiter.done() and isinstance(waiter.exception(), Invalid)


async def test_a_failing_decision_is_dead_lettered_and_leaves_the_row_as_it_was(rig: Rig) -> None:
    broken = command("boom", "u1")
    await rig.kernel.process([command("add", "u1", amount=1), broken, command("add", "u1", amount=2)])
    assert rig.row("u1")["count"] == 3
    assert [e["balance_amount"] for e in rig.app.events(BALANCE)] == [1, 3]
    [letter] = rig.app.dead_letters()
    assert (letter.header("dlq.reason"), letter.value) == ("failed", broken.value)
    assert letter.header("dlq.error") == "RuntimeError: a bug in a decision"


@pytest.mark.parametrize(("verb", "says"), [("stray", "stray emitted wallet.balance_changed"),
                                            ("stray_send", "stray_send sent to paystream.user-order-index")])
async def test_a_step_publishing_what_it_does_not_declare_is_dead_lettered(
        rig: Rig, verb: str, says: str) -> None:
    await rig.kernel.process([command(verb, "u1")])
    [letter] = rig.app.producer.acked
    assert letter.topic == DLQ
    assert letter.header("dlq.reason") == "failed"
    assert says in letter.header("dlq.error")
    assert rig.table.writes == []


async def test_an_emission_its_contract_rejects_is_dead_lettered(rig: Rig) -> None:
    await rig.kernel.process([command("add", "u1", amount="3"), command("add", "u1", amount=2**63)])
    reasons = [(letter.header("dlq.reason"), letter.header("dlq.error").split(":")[0])
               for letter in rig.app.dead_letters()]
    # a refusal of the decision, then an event its Avro contract cannot hold (a long overflow),
    # refused by the envelope's check or by the encoder
    assert reasons[0] == ("rejected", "Invalid")
    assert reasons[1] in {("failed", "InvalidEvent"), ("failed", "MalformedRecord")}
    assert len(reasons) == 2
    assert rig.table.writes == []


# --------------------------------------------------------------------------
# Duplicates and deadlines


async def test_a_duplicate_publishes_nothing_and_re_asserts_the_deadline(rig: Rig) -> None:
    original = command("add", "u1", partition=1, amount=1, deadline=5_000_000_000_000)
    await rig.kernel.process([original])
    assert rig.deadlines.calls == [("schedule", "u1", 5_000_000_000_000, 1)]
    published = len(rig.app.producer.acked)
    writes = len(rig.table.writes)

    stored = rig.row("u1")
    redelivered = record(COMMANDS, "u1", original.value, partition=1)
    await rig.kernel.process([redelivered])
    assert len(rig.app.producer.acked) == published
    # the row is logged again, unchanged: a crash may have kept it locally only
    assert len(rig.table.writes) == writes + 1 and rig.row("u1") == stored
    assert rig.deadlines.calls[1:] == [("schedule", "u1", 5_000_000_000_000, 1)]


async def test_a_duplicate_within_one_batch_publishes_once(rig: Rig) -> None:
    original = command("add", "u1", amount=1)
    await rig.kernel.process([original, record(COMMANDS, "u1", original.value)])
    assert len(rig.app.events(BALANCE)) == 1
    assert [v["count"] for _, v, _ in rig.table.writes] == [1]


async def test_deadline_writes_follow_the_row(rig: Rig) -> None:
    await rig.kernel.process([command("add", "u1", amount=1, deadline=5_000)])
    await rig.kernel.process([command("add", "u1", amount=1, deadline=7_000)])  # moved
    await rig.kernel.process([command("add", "u1", amount=1)])  # untouched: no write
    await rig.kernel.process([command("add", "u1", amount=1, deadline=None)])  # cleared
    assert [(op, ms) for op, _, ms, _ in rig.deadlines.calls] == [
        ("schedule", 5_000), ("cancel", 5_000), ("schedule", 7_000), ("cancel", 7_000)]


async def test_one_batch_writes_only_the_net_deadline_change(rig: Rig) -> None:
    await rig.kernel.process([command("add", "u1", amount=1, deadline=5_000)])
    await rig.kernel.process([command("add", "u1", amount=1, deadline=6_000),
                              command("add", "u1", amount=1, deadline=7_000)])
    assert [(op, ms) for op, _, ms, _ in rig.deadlines.calls] == [
        ("schedule", 5_000), ("cancel", 5_000), ("schedule", 7_000)]


async def test_the_timers_hand_over_clears_a_due_deadline(rig: Rig) -> None:
    due = int(time.time() * 1000) - 1_000
    await rig.kernel.process([command("add", "u1", partition=2, amount=1, deadline=due)])
    await rig.kernel.process([command("tick", "u1", partition=2, deadline_ms=due)])
    assert rig.row("u1")["deadline"] is None
    assert rig.deadlines.calls == [("schedule", "u1", due, 2), ("cancel", "u1", due, 2)]


async def test_an_early_or_stale_hand_over_keeps_the_rows_deadline(rig: Rig) -> None:
    later = int(time.time() * 1000) + 3_600_000
    await rig.kernel.process([command("add", "u1", amount=1, deadline=later)])
    rig.deadlines.calls.clear()
    await rig.kernel.process([command("tick", "u1", deadline_ms=later)])  # early: a no-op
    assert rig.deadlines.calls == [("schedule", "u1", later, 0)]  # re-asserted, not cancelled
    rig.deadlines.calls.clear()
    await rig.kernel.process([command("tick", "u1", deadline_ms=1_000)])  # an old entry
    assert rig.deadlines.calls == [("cancel", "u1", 1_000, 0), ("schedule", "u1", later, 0)]
    assert rig.row("u1")["deadline"] == later


async def test_a_fire_command_without_deadline_ms_is_dead_lettered_alone(rig: Rig) -> None:
    await rig.kernel.process([command("tick", "u1"), command("add", "u2", amount=1)])
    [letter] = rig.app.dead_letters()
    assert letter.header("dlq.reason") in {"failed", "rejected"}
    assert rig.row("u2")["count"] == 1


async def test_a_hand_over_for_a_missing_aggregate_cancels_the_entry(rig: Rig) -> None:
    await rig.kernel.process([command("tick", "ghost", partition=3, deadline_ms=1_000)])
    assert rig.deadlines.calls == [("cancel", "ghost", 1_000, 3)]
    assert rig.table.writes == []


async def test_hand_over_sends_one_fire_command_per_aggregate_with_a_derived_id(rig: Rig) -> None:
    await rig.kernel.hand_over([("u1", 5_000), ("u2", 6_000)])
    await rig.kernel.hand_over([("u1", 5_000)])  # handed again (at least once)
    sent = rig.app.producer.acked
    assert [(r.topic, r.key) for r in sent] == [(COMMANDS, b"u1"), (COMMANDS, b"u2"), (COMMANDS, b"u1")]
    bodies = [json.loads(r.value) for r in sent]
    assert [b["command"] for b in bodies] == ["tick"] * 3
    assert [b["args"] for b in bodies] == [{"deadline_ms": 5_000}, {"deadline_ms": 6_000},
                                           {"deadline_ms": 5_000}]
    assert bodies[0]["command_id"] == aggregate.derived_id("tick", "u1", 5_000) == bodies[2]["command_id"]
    # and the driver reads them back as the FIRE step
    await rig.kernel.process([record(r.topic, r.key, r.value) for r in sent])
    assert rig.app.dead_letters() == []


async def test_send_command_publishes_json_on_the_command_topic_and_awaits_the_ack(rig: Rig) -> None:
    body = aggregate.command("add", "user_id", "u7", cause=None, now_ms=1, amount=1)
    await rig.kernel.send_command(body)
    [sent] = rig.app.producer.acked
    assert (sent.topic, sent.key, json.loads(sent.value)) == (COMMANDS, b"u7", body)
    rig.app.producer.transient_failures = 1
    with pytest.raises(KafkaTimeoutError):
        await rig.kernel.send_command(body)


# --------------------------------------------------------------------------
# External calls


class Bank:
    """A service the counter flow calls; answers after ``delay`` unless told otherwise."""

    def __init__(self, *, refuse: set[str] = frozenset(), fail_times: int = 0) -> None:
        self.calls: list[Call] = []
        self.running = 0
        self.most_at_once = 0
        self.refuse = refuse
        self.fail_times = fail_times

    async def __call__(self, call: Call) -> Any:
        self.calls.append(call)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.01)
            if self.fail_times:
                self.fail_times -= 1
                raise ConnectionResetError("bank unreachable")
            if call.args.get("user_id") in self.refuse:
                raise CallRefused("card declined", code="card_declined")
            return f"ch-{call.args['user_id']}-{call.args['amount']}"
        finally:
            self.running -= 1


async def test_calls_of_a_batch_run_concurrently_and_feed_the_decisions() -> None:
    bank = Bank()
    rig = make_rig(services={"bank": bank})
    batch = [command("charge", "u1", amount=5), command("charge", "u2", amount=7),
             command("add", "u3", amount=1)]
    await rig.kernel.process(batch)
    assert bank.most_at_once == 2  # one wave, both keys' calls at once
    assert [c.idempotency_key for c in bank.calls] == [
        aggregate.derived_id(command_id_of(batch[0]), "charge"),
        aggregate.derived_id(command_id_of(batch[1]), "charge")]
    assert rig.row("u1")["charges"] == ["ch-u1-5"] and rig.row("u1")["count"] == 5
    assert rig.row("u2")["charges"] == ["ch-u2-7"]
    assert rig.row("u3")["count"] == 1


async def test_a_later_record_of_the_same_key_waits_for_the_call_and_the_decision() -> None:
    bank = Bank()
    rig = make_rig(services={"bank": bank})
    batch = [command("charge", "u1", amount=5), command("add", "u1", amount=1),
             command("charge", "u1", amount=10), command("add", "u2", amount=2)]
    await rig.kernel.process(batch)
    u1 = [(e["delta_amount"], e["balance_amount"]) for e in rig.app.events(BALANCE) if e["user_id"] == "u1"]
    assert u1 == [(5, 5), (1, 6), (10, 16)]
    assert rig.row("u1")["charges"] == ["ch-u1-5", "ch-u1-10"]
    assert bank.most_at_once == 1  # the second charge of u1 was asked only after the first
    assert [w[1]["count"] for w in rig.row_writes("u1")] == [16]  # still one write per key


async def test_a_refused_call_becomes_an_outcome_the_decision_sees() -> None:
    bank = Bank(refuse={"u2"})
    rig = make_rig(services={"bank": bank})
    await rig.kernel.process([command("charge", "u1", amount=5), command("charge", "u2", amount=7)])
    assert rig.row("u2")["charges"] == ["refused (card_declined): card declined"]
    assert rig.row("u2")["count"] == 0
    assert rig.row("u1")["count"] == 5
    assert rig.app.dead_letters() == []


async def test_a_call_is_repeated_under_the_same_key_when_the_batch_is_retried() -> None:
    bank = Bank()
    rig = make_rig(services={"bank": bank})
    rig.app.producer.transient_failures = 1
    charge_event = command("charge", "u1", amount=5)
    await rig.kernel.process([charge_event])
    expected = aggregate.derived_id(command_id_of(charge_event), "charge")
    assert [c.idempotency_key for c in bank.calls] == [expected, expected]
    assert rig.row("u1")["charges"] == ["ch-u1-5"]


async def test_a_transient_call_failure_retries_the_batch() -> None:
    bank = Bank(fail_times=1)
    rig = make_rig(services={"bank": bank})
    await rig.kernel.process([command("charge", "u1", amount=5)])
    assert rig.row("u1")["charges"] == ["ch-u1-5"]
    assert len(bank.calls) == 2


async def test_a_step_that_keeps_asking_for_calls_is_dead_lettered() -> None:
    bank = Bank()
    rig = make_rig(services={"bank": bank})
    greedy = command("greedy", "u1", amount=1)
    await rig.kernel.process([greedy, command("add", "u2", amount=1)])
    [letter] = rig.app.dead_letters()
    assert (letter.header("dlq.reason"), letter.value) == ("failed", greedy.value)
    assert "greedy kept asking for calls" in letter.header("dlq.error")
    assert len(bank.calls) == 8
    assert rig.row("u2")["count"] == 1 and rig.row("u1") is None


# --------------------------------------------------------------------------
# The agent


class Exhausted(Exception):
    """The fake source has no batch left."""


class Source:
    """What ``Aggregate._drive`` uses of a :class:`streams.batch_source.BatchSource`: take and ack."""

    def __init__(self, batches: list[Any], log: list[str]) -> None:
        self.batches = batches  # lists of events, or an exception take raises
        self.log = log
        self.taken: tuple[int, float] | None = None

    async def take(self, max_records: int, within: float) -> list[Event]:
        self.taken = (max_records, within)
        if not self.batches:
            raise Exhausted
        batch = self.batches.pop(0)
        if isinstance(batch, BaseException):
            raise batch
        return batch

    def ack(self, events: list[Event]) -> None:
        self.log.extend(f"ack {event.message.offset}" for event in events)

    def release(self, events: list[Event]) -> None:
        self.log.extend(f"release {event.message.offset}" for event in events)


async def test_the_agent_acknowledges_a_batch_only_after_it_is_published_and_written() -> None:
    app = FakeApp()
    kernel = Aggregate(app, counter_flow(), agent_name="counter_events", batch_max=50, batch_within=0.02)
    log: list[str] = []
    app.tables["counters"].on_write = lambda key: log.append(f"write {key.decode()}")
    original_send = app.producer.send

    async def logged_send(topic: str, key: Any, *rest: Any) -> Any:
        log.append(f"send {key.decode()}")
        return await original_send(topic, key, *rest)

    app.producer.send = logged_send  # type: ignore[method-assign]
    first, second = command("add", "u1", amount=1), command("add", "u2", amount=1)
    source = Source([[first, second], []], log)
    with pytest.raises(Exhausted):
        await kernel._drive(source)  # type: ignore[arg-type]
    assert source.taken == (50, 0.02)
    assert log == ["send u1", "send u2", "write u1", "write u2",
                   f"ack {first.message.offset}", f"ack {second.message.offset}"]
    assert kernel.row("u1") == {"count": 1, "deadline": None, "applied": [command_id_of(first)],
                                "charges": []}


async def test_the_agent_ends_when_faust_stops_it() -> None:
    app = FakeApp()
    kernel = Aggregate(app, counter_flow(), agent_name="counter_events")
    log: list[str] = []
    only = command("add", "u1", amount=1)
    # Faust's Actor.cancel throws StopAsyncIteration into the channel: the agent returns
    # (raised, it would count as a crash and be restarted)
    await kernel._drive(Source([[only], StopAsyncIteration(), [command("add", "u2", amount=1)]], log))
    assert log == [f"ack {only.message.offset}"]
    assert kernel.row("u2") is None


class FlowControl:
    """Faust's flow control, as far as the kernel looks at it."""

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


async def test_a_batch_held_back_when_the_flow_stops_is_released_not_acked_nor_written() -> None:
    """A rebalance or a shutdown (Faust stops the flow, then waits for unacked records) does not wait
    for an outage to end: the held batch is released, read again by the partition's next owner."""
    app = FakeApp()
    app.flow_control = FlowControl()  # type: ignore[attr-defined]
    app.producer.transient_failures = 10**9  # the broker does not acknowledge
    kernel = Aggregate(app, counter_flow(), agent_name="counter_events")
    log: list[str] = []
    held, later = command("add", "u1", amount=1), command("add", "u2", amount=1)
    source = Source([[held], [later]], log)
    driving = asyncio.ensure_future(kernel._drive(source))  # type: ignore[arg-type]
    for _ in range(500):
        await asyncio.sleep(0.001)
        if len(app.producer.handed) >= 2:
            break
    assert len(app.producer.handed) >= 2 and not driving.done()  # retried while the flow runs
    app.flow_control.active = False  # type: ignore[attr-defined]
    app.producer.transient_failures = 0
    with pytest.raises(Exhausted):
        await asyncio.wait_for(driving, 2)  # within a backoff step, not after the outage
    assert log[0] == f"release {held.message.offset}"
    assert f"ack {held.message.offset}" not in log
    assert kernel.row("u1") is None  # nothing of the abandoned batch was written
    assert log[1:] == [f"ack {later.message.offset}"]  # the agent goes on with what comes next


# --------------------------------------------------------------------------
# The real order flow on the kernel


WINDOW_MS = 30 * 60 * 1000
ITEMS = [{"product_id": "credits-10", "quantity": 2, "unit_amount": 1000}]


@dataclass
class Orders:
    app: FakeApp
    kernel: Aggregate

    @property
    def table(self) -> FakeTable:
        return self.app.tables["orders"]

    @property
    def deadline_table(self) -> FakeTable:
        return self.app.tables["order-deadlines"]

    def row(self, order_id: str) -> order_state.Order | None:
        return self.kernel.row(order_id)


@pytest.fixture
def orders() -> Orders:
    app = FakeApp()
    kernel = Aggregate(app, order_state.order_flow(WINDOW_MS), agent_name="order_events",
                       deadlines="order-deadlines", max_backoff=0.0)
    return Orders(app, kernel)


def order_command(verb: str, order_id: str, *, partition: int = 0, issued_at: int | None = None,
                  origin: str | None = "api", command_id: str | None = None, **args: Any) -> Event:
    body = aggregate.command(verb, "order_id", order_id, cause=None,
                             now_ms=issued_at if issued_at is not None else int(time.time() * 1000),
                             command_id=command_id or str(uuid.uuid4()), origin=origin, **args)
    return record(COMMANDS, order_id, json.dumps(body).encode(), partition=partition)


def create_order(order_id: str, **kwargs: Any) -> Event:
    return order_command("create", order_id, user_id="usr-1", order_type="WALLET_TOPUP",
                         currency="EUR", total_amount=2000, items=ITEMS, **kwargs)


def payment_completed(app: FakeApp, order_id: str, *, partition: int = 0) -> Event:
    event = new_event("payment.completed", {
        "payment_intent_id": "pi-1", "order_id": order_id, "user_id": "usr-1", "amount": 2000,
        "currency": "EUR",
    }, producer=catalog.PAYMENT_SERVICE)
    topic = app.event_topic("payment.completed")
    return record(topic.kafka_topic, order_id, topic.value_serializer.dumps(event), partition=partition)


def deadline_entries(orders: Orders) -> dict[tuple[str, int], int]:
    """Pending deadlines -> the partition each was written in (the entry's value, in digits)."""
    return {parse_key(k): int(v) for k, v in orders.deadline_table.data.items()}


async def test_an_api_create_publishes_order_created_stores_the_row_and_its_deadline(orders: Orders) -> None:
    issued_at = int(time.time() * 1000)
    create = create_order("ord-1", partition=3, issued_at=issued_at)
    waiter = orders.kernel.replies.expect(command_id_of(create))
    await orders.kernel.process([create])

    [created] = orders.app.events("order.created")
    assert created["event_id"] == aggregate.derived_id(command_id_of(create), "order.created", "")
    assert created["occurred_at"] == issued_at and created["expires_at"] == issued_at + WINDOW_MS
    assert [r.key for r in orders.app.acked("order.created")] == [b"ord-1"]
    [index_update] = orders.app.json(USER_ORDER_INDEX)
    assert index_update["order"]["status"] == "PENDING" and index_update["user_id"] == "usr-1"
    assert [(k, p) for k, _, p in orders.table.writes] == [(b"ord-1", 3)]
    assert deadline_entries(orders) == {("ord-1", issued_at + WINDOW_MS): 3}
    assert [p for _, _, p in orders.deadline_table.writes] == [3]
    view = waiter.result()
    assert view["status"] == "PENDING" and view["order_id"] == "ord-1" and "applied_event_ids" not in view


async def test_an_order_created_and_paid_in_one_batch_is_written_once_without_a_deadline(
        orders: Orders) -> None:
    await orders.kernel.process([create_order("ord-2", partition=1),
                                 payment_completed(orders.app, "ord-2", partition=1)])
    published = [r.topic for r in orders.app.producer.acked]
    assert published == [PREFIX + "order.created", PREFIX + "order.completed", PREFIX + USER_ORDER_INDEX]
    assert [json.loads(r.value)["order"]["status"] for r in orders.app.acked(USER_ORDER_INDEX)] == [
        "COMPLETED"]
    assert len(orders.table.writes) == 1
    assert orders.row("ord-2").status is order_state.OrderStatus.COMPLETED
    assert orders.deadline_table.writes == [] and orders.deadline_table.data == {}


async def test_an_unpaid_order_expires_through_the_deadline_index_once(orders: Orders) -> None:
    issued_at = int(time.time() * 1000) - WINDOW_MS - 5_000  # its payment window is over
    await orders.kernel.process([create_order("ord-3", partition=2, issued_at=issued_at)])
    deadline = issued_at + WINDOW_MS
    assert deadline_entries(orders) == {("ord-3", deadline): 2}

    assert await orders.kernel.deadlines.close_due(at_ms=deadline + 1) == 1
    [fire] = orders.app.acked(ORDER_COMMANDS)
    body = json.loads(fire.value)
    assert (fire.key, body["command"], body["args"]) == (b"ord-3", "expire", {"deadline_ms": deadline})

    handed = record(fire.topic, fire.key, fire.value, partition=2)
    await orders.kernel.process([handed])
    [expired] = orders.app.events("order.expired")
    assert expired["expired_at"] == deadline
    assert orders.row("ord-3").status is order_state.OrderStatus.EXPIRED
    assert orders.deadline_table.data == {}
    assert orders.deadline_table.deletes == [(deadline_key("ord-3", deadline), 2)]

    await orders.kernel.process([record(fire.topic, fire.key, fire.value, partition=2)])  # handed again
    assert len(orders.app.events("order.expired")) == 1
    assert orders.deadline_table.data == {}


async def test_commands_for_a_missing_order_are_answered_404_and_not_dead_lettered(orders: Orders) -> None:
    cancel = order_command("cancel", "nope")
    waiter = orders.kernel.replies.expect(command_id_of(cancel))
    await orders.kernel.process([cancel])
    refusal = waiter.exception()
    assert isinstance(refusal, order_state.OrderNotFound) and refusal.status == 404
    assert orders.app.producer.handed == []


async def test_the_same_create_key_with_other_parameters_is_refused_422(orders: Orders) -> None:
    await orders.kernel.process([create_order("ord-4", idempotency_key="k1", fingerprint="f1")])
    reused = create_order("ord-4", idempotency_key="k1", fingerprint="f2")
    waiter = orders.kernel.replies.expect(command_id_of(reused))
    await orders.kernel.process([reused])
    assert isinstance(waiter.exception(), aggregate.IdempotencyKeyReused)
    assert waiter.exception().status == 422
    assert len(orders.app.events("order.created")) == 1


# --------------------------------------------------------------------------
# The user -> orders index on the kernel (finding 2: marks only after acks)


async def test_an_index_marks_an_inbound_event_applied_only_once_its_commands_are_acked() -> None:
    app = FakeApp()
    kernel = Aggregate(app, order_index.USER_ORDERS, agent_name="user_order_events", max_backoff=0.0)
    table = app.tables["user-orders"]
    summary = {"order_id": "ord-9", "status": "COMPLETED", "order_type": "WALLET_TOPUP",
               "subscription_id": None, "total_amount": 2000, "currency": "EUR", "created_at_ms": 1}
    update = {"order": summary, "version": 5, "user_id": "usr-1"}
    await kernel.process([record(PREFIX + USER_ORDER_INDEX, "usr-1", json.dumps(update).encode())])

    credit_event = credits_added(app, "usr-1", 2000)
    event_id = app.event_topic(CREDITS).value_serializer.loads(credit_event.value)["event_id"]
    app.producer.transient_failures = 1
    app.producer.observe = lambda: copy.deepcopy(table.data[b"usr-1"]["applied"])
    await kernel.process([credit_event])
    assert app.producer.observations == [[]]  # not marked while the command was not acked

    [fulfil] = [json.loads(r.value) for r in app.acked(ORDER_COMMANDS)]
    assert fulfil["command"] == "fulfill" and fulfil["order_id"] == "ord-9"
    assert fulfil["command_id"] == aggregate.derived_id(event_id, "fulfill", "ord-9")
    assert fulfil["causation_id"] == event_id
    assert table.data[b"usr-1"]["applied"] == [event_id]

    await kernel.process([record(credit_event.message.topic, b"usr-1", credit_event.value)])  # redelivery
    assert len(app.acked(ORDER_COMMANDS)) == 1


# --------------------------------------------------------------------------
# Rows decoded once per stored value (flows that share rows), on a real RocksDB store


def _rocksdb_rows(kernel: Aggregate, root: Any) -> Any:
    """Point ``kernel``'s rows at rocksdict databases (one per partition), as Faust's RocksDB store has."""
    import rocksdict

    from streams.table_io import TableIO

    class Store:
        def __init__(self) -> None:
            self.dbs: dict[int, Any] = {}
            self._key_index: dict[bytes, int] = {}

        def _db_for_partition(self, partition: int) -> Any:
            if partition not in self.dbs:
                self.dbs[partition] = rocksdict.Rdict(str(root / f"p{partition}"),
                                                      rocksdict.Options(raw_mode=True))
            return self.dbs[partition]

        def set_persisted_offset(self, tp: Any, offset: int) -> None:
            self.persisted = (tp, offset)

    class Producer:
        async def send(self, *_record: Any) -> asyncio.Future[Any]:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result(type("Meta", (), {"offset": 0})())
            return done

    store = Store()
    table = type("Table", (), {"data": store, "changelog_topic": type(
        "Topic", (), {"get_topic_name": staticmethod(lambda: "counters-changelog")})})()
    kernel.rows = TableIO(type("App", (), {"producer": Producer()})(), table, batched=True)
    return store


@pytest.mark.parametrize("shares_rows", [True, False])
async def test_a_shared_row_is_decoded_once_per_stored_value(tmp_path: Any, shares_rows: bool) -> None:
    loads: list[Any] = []

    def load(stored: Any) -> Any:
        loads.append(stored)
        return copy.deepcopy(stored)

    app = FakeApp()
    flow = dataclasses.replace(counter_flow(), load=load, shares_rows=shares_rows)
    kernel = Aggregate(app, flow, agent_name="counter_events", max_backoff=0.0)
    store = _rocksdb_rows(kernel, tmp_path)
    try:
        await kernel.process([command("add", "u1", partition=2, amount=1)])
        await kernel.process([command("add", "u1", partition=2, amount=2)])
        # the row as written by the first batch was handed to the second without decoding it
        assert len(loads) == (0 if shares_rows else 1)
        stored = json.loads(store.dbs[2][b"u1"])
        assert stored["count"] == 3
        # something else changes the stored value (a changelog replay): it is decoded anew
        store.dbs[2][b"u1"] = json.dumps({**stored, "count": 10}).encode()
        await kernel.process([command("add", "u1", partition=2, amount=1)])
        assert loads[-1]["count"] == 10
        assert json.loads(store.dbs[2][b"u1"])["count"] == 11
    finally:
        for db in store.dbs.values():
            db.close()
