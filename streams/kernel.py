"""The aggregate kernel's driver: one Faust agent runs one :class:`tables.aggregate.Flow`.

A domain declares a flow (pure decisions, see :mod:`tables.aggregate`); this
module owns everything else, once for every domain: batching, the per-batch
row cache, external calls, publishing and acknowledgements, state writes,
deadlines, dead letters, idempotent ids and answers to waiting requests.

One batch, in order
-------------------
1. **Take** up to ``batch_max`` records: the first that arrives, then what
   arrived ``batch_within`` later (:class:`streams.batch_source.BatchSource`
   takes them from the agent's channel queue in one go, not through Faust's
   per-event stream; the fetch loop puts them there without a task per
   record, :mod:`streams.faust_patches`).  Records fetched under an older
   consumer generation or taken while a rebalance suspends the flow are not
   processed and not made committable: they are read again.  Nothing is
   acknowledged, so no offset can be committed, until step 6.
2. **Decide** them in offset order (each partition's records in offset
   order; across the topics of a key, by record timestamp:
   :func:`in_time_order`) against a per-batch row cache (a key's
   second record sees the row its first produced).  A step that needs external
   answers (Stripe, a service client) declares its calls; the calls of the
   whole batch run concurrently, each with the idempotency key its cause
   derived, and the waiting records are decided again with the outcomes (later
   records of the same key wait with them, so per-key order holds).  Each
   decision's events, internal records and dead letters are encoded at once; a
   record whose decision or encoding fails is dead-lettered alone and leaves
   the cache as it was.
3. **Publish** every outgoing record of the batch (events, index updates,
   fan-out commands, dead letters) to the producer, one aiokafka batch per
   partition in the order decided (:mod:`streams.bulk_send`), then await all
   acks once.
   A transient failure (broker down, timeout) fails the whole batch *before*
   any state is written; it is decided again from the table and re-published
   (same derived ids), until it goes through.  A non-transient failure (a record
   too large) is isolated: the batch is re-run one record at a time, and the
   record that still cannot be published is dead-lettered.
4. **Write** each touched row once, then its deadline changes, all derived from
   the rows: ``deadline_of(before)`` and any deadline the timer handed over are
   cancelled unless still wanted, ``deadline_of(after)`` is scheduled.  An
   input the row already applied (a duplicate), or that changed nothing,
   re-asserts the row's deadline (an idempotent put); a duplicate also logs
   the row again.  Writes go to the partition of the record that caused them
   (:mod:`streams.table_io`): the rows into one RocksDB write batch per
   partition (deadlines into theirs), written to the databases right after
   the loop, before the first ``await``, and as changelog
   records handed to the same producer (a batch per partition) before step 6.
5. **Answer** the requests waiting for these records (API commands).
6. **Acknowledge** the records (``Event.ack``, Faust's bookkeeping of
   committable offsets); Faust's commit loop flushes the producer (table
   changelogs included, whichever way they were queued) *before* it commits
   offsets (``Consumer._commit_offsets``), so an offset is committed only
   once the batch's state is durable.  A record fetched under an older
   consumer generation is never made committable
   (:mod:`streams.faust_patches`): after a rebalance it is read again.  A
   rebalance waits for the batch in hand (its records are tracked as
   unacknowledged); records still queued are dropped with the queue and read
   again.  A batch held back by a transient failure (Stripe or the broker
   unreachable) is abandoned when the flow stops for a rebalance or a
   shutdown, at its next backoff: nothing of it was written, its records are
   released (not committable, read again by whoever owns the partition
   next), as a SIGKILL there would leave them.  Else a stop or rebalance
   waited for it as long as the outage lasted (``Consumer.wait_empty``).

What a SIGKILL does at each await
---------------------------------
- while taking or deciding (1-2): nothing was published or written; the
  records are read again after the restart.
- while awaiting external calls (2): the calls may have been made; the replay
  repeats them under the same idempotency keys, and the service answers with
  what it did the first time.  Nothing of ours was published.
- while awaiting acks (3): some outgoing records may be in Kafka, no state is
  written and no offset committed; the replay decides the same inputs against
  the same rows and republishes the same records under the same event ids
  (at-least-once: a consumer may see a record twice, always with one id).
- after the acks, before or while the changelog records are flushed (4-6):
  every outgoing record is in Kafka; some of the row and deadline changelog
  records may be, and the offsets are not committed.  The replay finds rows
  that were written as duplicates (they hold the input's id: nothing is
  published twice under new ids; the row is logged to its changelog again and
  its deadline re-asserted, so a row the local store kept but the changelog
  lost, or a row kept without its deadline, is whole again), and re-decides
  rows that were not written, republishing the same ids.  A lost deadline
  cancel leaves an entry whose hand-over the domain's timer step finds moot
  and clears.
- after the commit: nothing is replayed, and nothing needs to be.
A requester that was waiting gets no answer (its connection is gone); it
retries with its Idempotency-Key and is answered from the row.

Idempotency marks (the applied ids a row keeps) are written with the row, so
they are durable only after the records they caused were acknowledged.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from confluent_kafka.schema_registry.error import SchemaRegistryError
from faust.types import EventT

from streams import catalog, logs, metrics
from streams.batch_source import BatchSource
from streams.bulk_send import send_all
from streams.codec import REGISTRY_HTTP_ERRORS, MalformedRecord
from streams.dispatch import Decoder, UnknownEventType, dead_letter_headers, raw_source
from streams.envelope import new_event
from streams.routing import ReplyBook
from streams.table_io import TableIO, bound_to, json_bytes, json_value
from tables import aggregate
from tables.aggregate import Call, DeadlineEffect, Decision, Flow, Outcome, Refusal, Step
from tables.deadlines import Deadlines, now_ms

log = logging.getLogger(__name__)

#: A service the kernel can call for a step: it answers an Outcome, raises
#: :class:`CallRefused` for a definitive "no", and any other exception for a
#: transient failure (the batch is then retried).
Service = Callable[[Call], Awaitable[Any]]


class BatchAbandoned(BaseException):
    """The flow stopped (rebalance, shutdown) while a batch was held back: it is released, not acked.

    A ``BaseException``, as ``CancelledError``: no ``except Exception`` on the
    way (dead-lettering, isolation) may take it for the batch's own failure.
    """


class CallRefused(Exception):
    """A service's definitive refusal of a call (e.g. a declined card).

    ``code`` is the service's machine-readable reason ("card_declined",
    "insufficient_funds"), handed to the decision as :attr:`Outcome.code`.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


#: Decoded rows a flow that shares rows keeps per aggregate (see
#: ``Aggregate._load``); forgotten all at once when full.  A row is a few KiB.
DECODED_ROWS_KEPT = 4096

#: Seconds between two looks at Faust's flow while a batch waits to be tried again.
BACKOFF_STEP = 0.1

#: Errors after which the same batch may well go through if tried again.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    KafkaTimeoutError, KafkaConnectionError, asyncio.TimeoutError, ConnectionError,
)


def transient(error: BaseException) -> bool:
    """Whether ``error`` says "the system is unwell" rather than "this record is wrong".

    Kafka timeouts and lost connections, a registry that cannot be reached or
    answers 5xx (a writer schema not cached yet), a service that is down.
    """
    if isinstance(error, (*TRANSIENT_ERRORS, *REGISTRY_HTTP_ERRORS)):
        return True
    if isinstance(error, SchemaRegistryError):
        return (error.http_status_code or 0) >= 500 or error.http_status_code in (-1, 408, 429)
    return bool(getattr(error, "retriable", False))


def in_time_order(events: Sequence[EventT]) -> Sequence[EventT]:
    """``events`` with each partition's records in offset order, merged across partitions by timestamp.

    The records of one key come from the partitions of one number on several
    topics (a payment.completed and the payment.refunded sent after it was
    seen); Kafka orders them within a partition only, and a fetch hands them
    over in no defined order across topics.  After a crash both may be read
    again in one batch; the record produced first is decided first.  Records
    of one partition keep their offset order whatever their timestamps say;
    records with equal timestamps keep the order they arrived in.
    """
    partitions: dict[Any, list[tuple[float, int, EventT]]] = {}
    for index, event in enumerate(events):
        message = event.message
        partitions.setdefault((message.topic, message.partition), []).append(
            (message.timestamp or 0.0, index, event))
    if len(partitions) < 2:
        return events
    return [event for _at, _index, event in heapq.merge(*partitions.values(), key=_time_then_arrival)]


def _time_then_arrival(entry: tuple[float, int, EventT]) -> tuple[float, int]:
    return entry[0], entry[1]


@dataclass(slots=True)
class Inbound:
    """One record of a batch, decoded, with the step that decides it."""

    event: EventT
    key: bytes
    topic: str  # catalog name
    message: dict[str, Any]
    step: Step
    input_id: str  # event_id or command_id: the cause of everything it emits
    cause: dict[str, Any]
    answered: bool  # a requester waits for this record's verdict (API command)


def _fields(record: Inbound) -> dict[str, Any]:
    """The log fields of a decoded record (streams.logs): its id, correlation id and position."""
    return logs.record_fields(record.event, event_id=record.input_id,
                              correlation_id=record.cause.get("correlation_id"))


@dataclass(slots=True)
class Outgoing:
    """One record to produce, already encoded."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None = None


@dataclass(slots=True)
class Slot:
    """A key's row through the batch: as loaded, as decided, and what happened to it."""

    event: EventT
    loaded: Any
    row: Any
    changed: bool = False
    repair: bool = False  # re-assert the row's deadline (a duplicate or no-op was seen)
    replayed: bool = False  # an input the row applied before: re-log the row (see _write)
    fired: set[int] = field(default_factory=set)  # deadlines the timer handed over


@dataclass(slots=True)
class Plan:
    """What a batch decided: records to publish, rows to write, verdicts to answer."""

    outgoing: list[Outgoing] = field(default_factory=list)
    slots: dict[bytes, Slot] = field(default_factory=dict)
    verdicts: list[tuple[str, Any]] = field(default_factory=list)  # (input id, view | Refusal)


class Aggregate:
    """Runs ``flow`` on ``app``: its table, its agent, its deadlines, its replies.

    ``services`` are the external calls its steps may ask for, by service name.
    """

    def __init__(
        self,
        app: Any,
        flow: Flow,
        *,
        agent_name: str,
        deadlines: str | None = None,
        services: Mapping[str, Service] | None = None,
        batch_max: int | None = None,
        batch_within: float | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self.app = app
        self.flow = flow
        self.services = dict(services or {})
        settings = app.settings
        self.batch_max = batch_max if batch_max is not None else settings.batch_max
        self.batch_within = (batch_within if batch_within is not None
                             else settings.batch_within_ms / 1000)
        self.max_backoff = max_backoff
        self.replies = ReplyBook()
        # key_type=bytes gives the table the raw key serializer of the topics,
        # so the web router finds a key's owner where the agent stored it
        # (faust-streaming #514: a str key_type would hash JSON-quoted keys).
        self.table = app.Table(flow.name, key_type=bytes, value_type=None,
                               partitions=catalog.EVENT_PARTITIONS, default=None)
        self.rows = TableIO(app, self.table, batched=True)  # a RocksDB write batch per partition
        #: key -> (stored bytes, the row decoded from them), for flows that share rows (_load)
        self._decoded: dict[bytes, tuple[bytes, Any]] = {}
        self.names = {app.settings.topic(name): name for name in flow.topics}
        self.decoder = Decoder(app, self.names)
        #: The field that identifies an input record: an event's ``event_id``,
        #: or what a foreign raw topic declares (a Stripe event's ``id``).
        self.id_fields = {name: catalog.id_field(name) for name in flow.topics}
        self.dead_letter_topic = app.settings.topic(catalog.DEAD_LETTERS)
        self.deadlines: Deadlines | None = None
        if deadlines is not None:
            self.fire_step = next(s for s in flow.steps if s.deadline is DeadlineEffect.FIRE)
            self.deadlines = Deadlines(app, deadlines, self.hand_over)
        # Per-batch hooks (streams.metrics); None with PAYSTREAM_METRICS=off.
        self.metrics = metrics.for_agent(app, agent_name, dead_letter_topic=self.dead_letter_topic,
                                         deadlines=self.deadlines)
        app.agent(raw_source(app, list(self.names)), name=agent_name)(self._consume)

    # ------------------------------------------------------------------
    # The agent

    async def _consume(self, stream: Any) -> None:
        await self._drive(BatchSource(stream))

    async def _drive(self, source: BatchSource) -> None:
        """Take a batch, process it, acknowledge it; again, until the agent is stopped.

        Faust stops an agent by throwing ``StopAsyncIteration`` into its
        channel (``Actor.cancel``), which ends a stream's ``async for``; here
        it ends the loop the same way (raised further, it would count as a
        crash, and the supervisor would start the actor again).
        """
        while True:
            try:
                events = await source.take(self.batch_max, self.batch_within)
            except StopAsyncIteration:
                return
            if events:
                try:
                    await self.process(events)
                except BatchAbandoned:
                    log.warning("%s: the flow stopped while a batch of %d records was held back: "
                                "released, read again by the partitions' next owner", self.flow.name,
                                len(events))
                    source.release(events)
                    continue
                source.ack(events)

    async def process(self, events: Sequence[EventT]) -> None:
        """Decide, publish, write and answer one batch (see the module docstring)."""
        now = now_ms()  # one time for the batch and its retries: a retry republishes the same records
        if self.metrics is not None:
            self.metrics.taken(events)
        events = in_time_order(events)
        inbound: list[Inbound] = []
        extra: list[Outgoing] = []
        verdicts: list[tuple[str, Any]] = []
        for event in events:
            try:
                try:
                    read = self._read(event)
                except Exception as exc:
                    if not transient(exc):
                        raise
                    read = await self._retrying(lambda event=event: self._read(event))
            except Exception as exc:  # not transient, not a refusal: keep it for a human
                log.exception("%s: reading %s failed", self.flow.name, event.message.topic,
                              extra=logs.record_fields(event))
                read = self._dead_letter(event, "failed", exc)
            if isinstance(read, Inbound):
                inbound.append(read)
            elif isinstance(read, Outgoing):
                extra.append(read)
            else:
                verdicts.append(read)
        await self._run(inbound, extra, now, verdicts)

    async def _retrying(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()`` until it does not fail transiently (the registry or broker is back)."""
        tries = 0
        while True:
            try:
                return attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not transient(exc):
                    raise
                tries += 1
                await self._backoff(tries, exc)

    async def _backoff(self, tries: int, error: BaseException) -> None:
        """Wait before the batch is tried again; :class:`BatchAbandoned` once the flow stops."""
        delay = min(self.max_backoff, 0.1 * 2 ** min(tries, 6))
        log.warning("%s: batch held back by a transient failure (%r); retrying in %.1fs",
                    self.flow.name, error, delay)
        until = time.monotonic() + delay
        while True:
            if not self._flowing():
                raise BatchAbandoned()
            left = until - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, BACKOFF_STEP))

    def _flowing(self) -> bool:
        """Whether Faust's flow runs (it stops for a rebalance and at shutdown)."""
        flow = getattr(self.app, "flow_control", None)
        return flow is None or flow.is_active()

    async def _run(self, inbound: list[Inbound], extra: list[Outgoing], now: int,
                   verdicts: list[tuple[str, Any]] | None = None) -> None:
        tries = 0
        while True:
            try:
                began = time.perf_counter()
                plan = await self._decide(inbound, now)
                plan.outgoing[:0] = extra
                decided = time.perf_counter()
                await self._publish(plan.outgoing)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not transient(exc):
                    await self._isolate(inbound, extra, now, exc)
                    return
                tries += 1
                await self._backoff(tries, exc)
        acked = time.perf_counter()
        plan.verdicts[:0] = verdicts or []
        await self._write(plan)
        written = time.perf_counter()
        self._answer(plan)
        if self.metrics is not None:
            self.metrics.done(plan.outgoing, plan.slots.values(), decided - began, acked - decided,
                              written - acked)

    async def _isolate(self, inbound: list[Inbound], extra: list[Outgoing], now: int,
                       error: BaseException) -> None:
        """A record that fails for good outside its decision: find it, dead-letter it, keep the rest."""
        if len(inbound) + len(extra) <= 1:
            log.error("%s: record not publishable (%r)", self.flow.name, error,
                      extra=_fields(inbound[0]) if inbound else None)
            if inbound:
                record = inbound[0]
                if record.input_id in self.replies:
                    self.replies.fail(record.input_id, error)
                reason = "unpublishable" if isinstance(error, KafkaError) else "failed"
                await self._run([], [self._dead_letter(record.event, reason, error)], now)
            return
        log.warning("%s: batch refused (%r); retrying one record at a time", self.flow.name, error)
        for letter in extra:
            await self._run([], [letter], now)
        for record in inbound:
            await self._run([record], [], now)

    # ------------------------------------------------------------------
    # Reading and deciding

    def _read(self, event: EventT) -> Inbound | Outgoing | tuple[str, Refusal]:
        """The record as an :class:`Inbound`; else its dead letter, or the refusal its requester gets."""
        message = event.message
        try:
            record = self.decoder.decode(message.topic, event.value)
        except (MalformedRecord, UnknownEventType) as exc:
            return self._dead_letter(event, "undecodable", exc)
        topic = self.names[message.topic]
        answered = topic == self.flow.command_topic and record.get("origin") == "api"
        try:
            if topic == self.flow.command_topic:
                body = aggregate.command_message(record, self.flow.key_field)
                input_id = body.get("command_id")
                if not isinstance(input_id, str) or not input_id:
                    raise aggregate.Invalid("command without a command_id")
                cause = {"event_id": input_id, "correlation_id": record.get("correlation_id")}
            else:  # an event (its id is its cause id), or an internal record such as an index update
                input_id = str(record.get(self.id_fields[topic])
                               or f"{message.topic}/{message.partition}/{message.offset}")
                body, cause = record, {**record, "event_id": input_id}
            step = self.flow.step(topic, body)
        except Refusal as refusal:
            command_id = record.get("command_id")
            if answered and isinstance(command_id, str):
                return command_id, refusal  # the requester is told; nothing to keep
            return self._dead_letter(event, refusal.dead_letter_reason, refusal)
        key = message.key if isinstance(message.key, bytes) else str(message.key or "").encode()
        return Inbound(event, key, topic, body, step, input_id, cause, answered)

    def _slot(self, plan: Plan, record: Inbound) -> Slot:
        slot = plan.slots.get(record.key)
        if slot is None:
            row = self._load(record.event, record.key)
            slot = plan.slots[record.key] = Slot(record.event, row, row)
        return slot

    def _load(self, event: EventT, key: bytes) -> Any:
        """The stored row of ``key`` in ``event``'s partition, decoded (None: none).

        A flow whose decisions never change a row in place (``shares_rows``)
        gets the row object decoded from the same stored bytes before (or the
        one written as them), if it is still remembered: the bytes are read
        from the store every time and compared, so a row changed by anything
        else (a rebalance, a changelog replay) is decoded anew.  At most
        :data:`DECODED_ROWS_KEPT` rows are remembered per flow.
        """
        if not (self.flow.shares_rows and self.rows.stores_bytes):
            stored = self.rows.get(event, key)
            return self.flow.load(stored) if stored is not None else None
        raw = self.rows.get_bytes(event, key)
        if raw is None:
            return None
        known = self._decoded.get(key)
        if known is not None and known[0] == raw:
            return known[1]
        row = self.flow.load(json_value(raw))
        self._remember(key, raw, row)
        return row

    def _remember(self, key: bytes, raw: bytes, row: Any) -> None:
        if len(self._decoded) >= DECODED_ROWS_KEPT:
            self._decoded.clear()
        self._decoded[key] = (raw, row)

    async def _decide(self, inbound: list[Inbound], now: int) -> Plan:
        plan = Plan()
        outcomes: dict[str, Outcome] = {}
        pending = inbound
        for _ in range(8):
            waiting: list[Inbound] = []
            blocked: set[bytes] = set()
            calls: dict[str, Call] = {}
            for record in pending:
                if record.key in blocked:
                    waiting.append(record)
                    continue
                needed = self._decide_one(plan, record, now, outcomes)
                if needed:
                    calls.update((c.idempotency_key, c) for c in needed)
                    blocked.add(record.key)
                    waiting.append(record)
            if not waiting:
                break
            outcomes.update(await self._call_all(list(calls.values())))
            pending = waiting
        else:
            for record in pending:
                error = RuntimeError(f"{record.step.handler} kept asking for calls")
                plan.outgoing.append(self._dead_letter(record.event, "failed", error))
        self._follow(plan)
        return plan

    def _decide_one(self, plan: Plan, record: Inbound, now: int,
                    outcomes: Mapping[str, Outcome]) -> list[Call]:
        """Decide ``record`` into ``plan``; return the calls it still needs, if any."""
        step = record.step
        try:
            slot = self._slot(plan, record)
            fired = int(record.message["deadline_ms"]) if step.deadline is DeadlineEffect.FIRE else None
            if step.calls is not None:
                needed = [c for c in step.calls(slot.row, record.message)
                          if c.idempotency_key not in outcomes]
                if needed:
                    return needed
                decision = step.decide(slot.row, record.message, now, outcomes)  # type: ignore[call-arg]
            else:
                decision = step.decide(slot.row, record.message, now)  # type: ignore[call-arg]
            records = self._encode(step, decision, record, now)
        except Refusal as refusal:
            if record.answered:  # the requester is (or was) told; its retry is decided again
                log.info("%s: %s refused: %s", self.flow.name, record.input_id, refusal,
                         extra=_fields(record))
                plan.verdicts.append((record.input_id, refusal))
            else:
                plan.outgoing.append(self._dead_letter(record.event, refusal.dead_letter_reason, refusal))
            return []
        except Exception as exc:  # a bug in a decision, a row or a contract: keep the record
            log.exception("%s: %s failed on %s", self.flow.name, step.handler, record.input_id,
                          extra=_fields(record))
            plan.outgoing.append(self._dead_letter(record.event, "failed", exc))
            if record.input_id in self.replies:
                plan.verdicts.append((record.input_id, exc))
            return []
        plan.outgoing.extend(records)
        if decision.row is not None and not decision.duplicate:
            slot.row, slot.changed = decision.row, True
        else:
            slot.repair = True
            slot.replayed = slot.replayed or decision.duplicate
        if fired is not None:
            slot.fired.add(fired)
        if record.input_id in self.replies:
            reply = decision.reply if decision.reply is not None else (
                self.flow.view(slot.row) if slot.row is not None else None)
            plan.verdicts.append((record.input_id, reply))
        return []

    def _encode(self, step: Step, decision: Decision, record: Inbound, now: int) -> list[Outgoing]:
        out = []
        for emission in decision.emit:
            if emission.topic not in step.emits:
                raise RuntimeError(f"{step.handler} emitted {emission.topic}, its step declares "
                                   f"{step.emits}")
            event = new_event(  # not checked here: the encoder below refuses what the contract does
                emission.topic, emission.payload, producer=self.flow.producer, cause=record.cause,
                check=False,
                now_ms=emission.occurred_at if emission.occurred_at is not None else now,
                event_id=emission.event_id or aggregate.derived_id(
                    record.input_id, emission.topic, emission.discriminator),
            )
            out.append(self._event_record(event))
        for send in decision.send:
            if send.topic not in step.sends:
                raise RuntimeError(f"{step.handler} sent to {send.topic}, its step declares {step.sends}")
            out.append(self._send_record(send))
        return out

    def _event_record(self, event: dict[str, Any]) -> Outgoing:
        name = event["event_type"]
        topic = self.app.event_topic(name)
        return Outgoing(topic.get_topic_name(), catalog.record_key(name, event).encode(),
                        topic.value_serializer.dumps(event))

    def _send_record(self, send: aggregate.Send) -> Outgoing:
        value = json_bytes(send.value)
        return Outgoing(self.app.settings.topic(send.topic), send.key.encode(), value)

    def _dead_letter(self, event: EventT, reason: str, error: BaseException) -> Outgoing:
        message = event.message
        key = message.key if isinstance(message.key, bytes | None) else str(message.key).encode()
        with logs.about_record(event):  # the dead-letter line says which record
            headers = dead_letter_headers(event, reason, error)
        return Outgoing(self.dead_letter_topic, key, message.value, headers)

    def _follow(self, plan: Plan) -> None:
        """Records a row change causes (index updates), once per key per batch."""
        if self.flow.follow is None:
            return
        for slot in plan.slots.values():
            if slot.changed:
                plan.outgoing.extend(self._send_record(s) for s in self.flow.follow(slot.loaded, slot.row))

    async def _call_all(self, calls: list[Call]) -> dict[str, Outcome]:
        """Run a batch's external calls concurrently; a transient failure fails the batch."""

        async def one(call: Call) -> tuple[str, Outcome]:
            service = self.services.get(call.service)
            if service is None:
                raise LookupError(f"{self.flow.name}: no service {call.service!r} configured")
            try:
                return call.idempotency_key, Outcome(value=await service(call))
            except CallRefused as refused:
                return call.idempotency_key, Outcome(refused=str(refused), code=refused.code)

        return dict(await asyncio.gather(*(one(c) for c in calls)))

    # ------------------------------------------------------------------
    # Publishing, writing, answering

    async def _publish(self, records: list[Outgoing]) -> None:
        """Hand every record to the producer, a batch per partition (``bulk_send``); await the acks."""
        if not records:
            return
        sent = await send_all(self.app, [(r.topic, r.key, r.value, None, r.headers) for r in records])
        await asyncio.gather(*(batch.future for batch in sent))

    async def _write(self, plan: Plan) -> None:
        self.rows.persist_offsets()
        deadline_of = self.flow.deadline_of
        for key, slot in plan.slots.items():
            before = deadline_of(slot.loaded) if deadline_of and slot.loaded is not None else None
            after = deadline_of(slot.row) if deadline_of and slot.row is not None else None
            stale = ({before} | slot.fired) - {after, None}
            schedule = after is not None and (after != before or slot.repair)
            # A replayed input means a crash cut an earlier batch short: its row
            # may be in the local store but not in the changelog (the record was
            # queued, not sent), so it is logged again: a worker rebuilding this
            # partition from the changelog must find the row the replay found.
            relog = slot.replayed and slot.row is not None
            if not (slot.changed or relog or stale or schedule):
                continue
            if slot.changed or relog:
                if self.flow.shares_rows and self.rows.stores_bytes:
                    raw = json_bytes(self.flow.dump(slot.row))
                    self.rows.put_bytes(slot.event, key, raw)
                    self._remember(key, raw, slot.row)
                else:
                    self.rows.put(slot.event, key, self.flow.dump(slot.row))
            if self.deadlines is not None:
                with bound_to(slot.event):
                    aggregate_id = key.decode()
                    for deadline in stale:
                        self.deadlines.cancel(aggregate_id, deadline)
                    if schedule:
                        self.deadlines.schedule(aggregate_id, after)
        # the write batches of rows and deadlines, before anything else (the timer) can run
        self.rows.commit()
        if self.deadlines is not None:
            self.deadlines.commit()
        await self.rows.flush()
        if self.deadlines is not None:
            await self.deadlines.flush()

    def _answer(self, plan: Plan) -> None:
        for input_id, verdict in plan.verdicts:
            if isinstance(verdict, BaseException):
                self.replies.fail(input_id, verdict)
            else:
                self.replies.resolve(input_id, verdict)

    # ------------------------------------------------------------------
    # Commands from outside the agent (API, timer)

    async def send_command(self, record: Mapping[str, Any]) -> None:
        """Publish a command record to this flow's command topic and await its ack."""
        key = record[self.flow.key_field]
        topic = self.app.settings.topic(self.flow.command_topic)
        value = json_bytes(record)
        await (await self.app.producer.send(topic, key.encode(), value, None, None, None))

    async def hand_over(self, due: Sequence[tuple[str, int]]) -> None:
        """The timer's due deadlines become the flow's FIRE command, one per aggregate."""
        producer = self.app.producer
        topic = self.app.settings.topic(self.flow.command_topic)
        now = now_ms()
        acks = []
        for aggregate_id, deadline_ms in due:
            record = aggregate.command(
                self.fire_step.input, self.flow.key_field, aggregate_id, cause=None, now_ms=now,
                command_id=aggregate.derived_id(self.fire_step.input, aggregate_id, deadline_ms),
                deadline_ms=deadline_ms,
            )
            value = json_bytes(record)
            acks.append(await producer.send(topic, aggregate_id.encode(), value, None, None, None))
        await asyncio.gather(*acks)
        if self.metrics is not None:
            self.metrics.handed_over(due, now)

    def row(self, key: str) -> Any:
        """The stored row of ``key`` on this worker (None: none), for queries."""
        stored = self.table.get(key.encode())
        return self.flow.load(stored) if stored is not None else None
