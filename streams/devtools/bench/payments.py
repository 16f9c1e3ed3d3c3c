"""``paystream bench payments``: payment lifecycles through the kernel vs a raw loop, one run.

A payment lifecycle, as the payment service lives it:

1. the driver produces ``order.created`` (Confluent Avro, as the order
   service writes it) -> ``handle_order_created`` opens a PaymentIntent
   (an HTTP call to Stripe) and publishes ``payment.intent.created``;
2. on seeing it, the driver produces Stripe's ``payment_intent.succeeded``
   event (Stripe's JSON shape, ~2.2 KB, metadata order_id/user_id) to
   ``stripe.events`` keyed by the intent id, as the ingress stores it ->
   ``handle_stripe_webhook`` (the intent index) sends a ``stripe`` command
   to the payment -> ``apply_stripe_fact`` publishes ``payment.completed``:
   the lifecycle is done.

Two inputs per lifecycle.  Stripe is **a local stand-in**
(:mod:`streams.devtools.bench.stripe_standin`, a process of its own that
answers PaymentIntent creates in Stripe's shape): localstripe serves about
80 calls/s here and would be all the bench measures.  Both sides make the
same call per ``order.created``, through the same adapter
(:class:`connectors.stripe_gateway.StripeGateway`: stripe-python's
StripeClient on aiohttp, an idempotency key derived from the order), the
calls of a batch concurrently.

Sides, one after the other, each driven by the same closed-loop driver
(:func:`driver_main`, a process of its own):

- **ours**: a ``paystream worker`` subprocess with ``PAYSTREAM_DOMAINS=payments``;
- **raw-with-state**: an aiokafka consume -> process -> produce loop
  (:func:`raw_main`, its own process) doing the same per-record work as
  ours' three agents, on the same topology: the payment row (order id), the
  intent row (intent id) and the user's payment index row (user id), each a
  rocksdict DB per partition, get + JSON decode + update + JSON encode + put
  per record, the row's JSON produced to a changelog mirror topic; the intent
  link, the user-index updates and the ``stripe`` command go through topics
  the loop consumes itself.  It produces the same records per lifecycle as
  ours by design (two events, a link, a command, two index updates and up to
  six changelog records: the intent row is not written again when the link
  is read after the Stripe event that already made it, on either side); the
  bench prints both sides' counts per topic.

Only a broker is needed (the bench starts the schema registry and the
stand-in itself); every topic and group of the run is deleted at the end.
Prints numbers, asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import multiprocessing
import struct
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from streams import catalog
from streams.devtools.bench.common import (
    AMOUNT,
    CURRENCY,
    ITEMS,
    PARTITIONS,
    BenchRun,
    Observer,
    Stalled,
    assigned_consumer,
    cpu_seconds,
    create_part_topics,
    end_offsets,
    free_port,
    latency_line,
    partition_of,
    percentile,
    produce,
    producer,
    topics_with_prefix,
    wait_caught_up,
    wait_quiet,
)
from streams.devtools.bench.ingress import FIXTURE
from streams.devtools.bench.lifecycle import run_child, worker_producer_config
from streams.devtools.bench.stripe_standin import StandinProcess
from streams.event_loop import install_event_loop
from streams.settings import Settings

INPUTS_PER_LIFECYCLE = 2
INTENT_CREATED = "payment.intent.created"
COMPLETED = "payment.completed"
#: Faust's changelog topic of each payment-domain table (``{app id}-{table}-changelog``,
#: app id ``paystream`` under the part's prefix); raw-with-state logs its rows to
#: ``mirror.<these>``.
CHANGELOGS = {table: f"paystream-{table}-changelog" for table in ("payments", "stripe-intents",
                                                                  "user-payments")}
STANDIN_KEY = "sk_test_bench_standin"
_HEADER = struct.Struct(">bI")


@dataclasses.dataclass(frozen=True)
class PaymentsOptions:
    duration: float = 30.0
    warmup: float = 10.0
    concurrency: int = 200


QUICK = {"duration": 5.0, "warmup": 2.0}


# ----------------------------------------------------------------------
# The driver (a process of its own)


@dataclasses.dataclass(frozen=True)
class DriverSpec:
    settings: Settings  # topic prefix and registry of the side under test
    concurrency: int
    warmup: float
    duration: float
    start_timeout: float = 180.0
    stall_after: float = 60.0
    drain_timeout: float = 60.0


def driver_main(spec: DriverSpec, conn: Any) -> None:
    """Child-process entry: run the driver, send its result (or its error) back."""
    try:
        conn.send(drive(spec))
    except BaseException as exc:  # report, never leave the parent waiting
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


class OutsideWorld:
    """What the driver writes: order.created as the order service, Stripe events as the ingress."""

    def __init__(self, settings: Settings) -> None:
        from schemas import contracts
        from streams.codec import SchemaCache, decoding_schema

        self.orders = settings.topic("order.created")
        self.stripe_events = settings.topic(catalog.STRIPE_EVENTS)
        self.intents = settings.topic(INTENT_CREATED)
        ids = SchemaCache(settings.schema_registry_url).resolve(
            {self.orders: "order.created", self.intents: INTENT_CREATED})
        self._order_schema = (contracts.parsed_schema("order.created"), ids[self.orders])
        self._intent_reader = decoding_schema(INTENT_CREATED)
        self._intent_id = ids[self.intents]
        template = json.loads(FIXTURE.read_text())
        self._event = template
        self._intent = template["data"]["object"]

    def order_created(self, order_id: str, user_id: str) -> bytes:
        from streams.codec import encode
        from streams.envelope import new_event

        event = new_event("order.created", {
            "order_id": order_id, "user_id": user_id, "order_type": "ONE_TIME", "total_amount": AMOUNT,
            "currency": CURRENCY, "items": ITEMS}, producer=catalog.ORDER_SERVICE, check=False)
        schema, schema_id = self._order_schema
        return encode(schema, schema_id, event)

    def intent_id(self, value: bytes) -> str:
        """The PaymentIntent id a ``payment.intent.created`` record carries."""
        from fastavro import schemaless_reader

        magic, schema_id = _HEADER.unpack_from(value)
        if magic != 0 or schema_id != self._intent_id:
            raise ValueError(f"payment.intent.created framed {magic}/{schema_id}")
        body = io.BytesIO(value)
        body.seek(_HEADER.size)
        record: Any = schemaless_reader(body, self._intent_reader, None)
        return str(record["payment_intent_id"])

    def succeeded(self, intent_id: str, order_id: str, user_id: str) -> bytes:
        """``payment_intent.succeeded`` for the intent, pretty-printed as Stripe sends it."""
        now = int(time.time())
        intent = {**self._intent, "id": intent_id, "amount": AMOUNT, "amount_received": AMOUNT,
                  "currency": CURRENCY.lower(), "created": now, "status": "succeeded",
                  "client_secret": f"{intent_id}_secret_bench",
                  "metadata": {"order_id": order_id, "user_id": user_id}}
        event = {**self._event, "id": f"evt_{uuid.uuid4().hex}", "created": now,
                 "data": {**self._event["data"], "object": intent}}
        return json.dumps(event, indent=2).encode()


def drive(spec: DriverSpec) -> dict[str, Any]:
    """The closed loop: ``concurrency`` lifecycles in flight, warm-up, measured window, drain."""
    world = OutsideWorld(spec.settings)
    completed_topic = spec.settings.topic(COMPLETED)
    consumer = assigned_consumer(spec.settings, [world.intents, completed_topic])
    client = producer(spec.settings, "bench-payments-driver")
    run = uuid.uuid4().hex[:8]
    sent = {world.orders: 0, world.stripe_events: 0}
    # order id -> [stage, order.created sent, intent seen, user id]
    flight: dict[str, list[Any]] = {}
    index = 0
    began = time.perf_counter()
    first_done: float | None = None
    window_start = window_end = float("inf")
    outputs_in_window = lifecycles_in_window = duplicates = 0
    end_to_end: list[float] = []
    hops: dict[str, list[float]] = {"intent": [], "payment": []}
    last_output = time.perf_counter()
    cpu = time.process_time()
    now = began
    try:
        while True:
            now = time.perf_counter()
            issuing = now < window_end
            while issuing and len(flight) < spec.concurrency:
                order_id = f"o-{run}-{index:08d}"
                user_id = f"u-{run}-{index % 5000}"
                produce(client, world.orders, order_id.encode(), world.order_created(order_id, user_id))
                flight[order_id] = [0, time.perf_counter(), 0.0, user_id]
                sent[world.orders] += 1
                index += 1
            client.poll(0)
            if not issuing and not flight:
                break
            messages = consumer.consume(1000, 0.005)
            now = time.perf_counter()
            counting = window_start <= now < window_end
            for message in messages:
                if message.error() is not None or message.key() is None:
                    continue
                order_id = message.key().decode()
                state = flight.get(order_id)
                if state is None:
                    duplicates += 1
                    continue
                topic = message.topic()
                if topic == world.intents and state[0] == 0:
                    state[0], state[2] = 1, now
                    intent_id = world.intent_id(message.value())
                    produce(client, world.stripe_events, intent_id.encode(),
                            world.succeeded(intent_id, order_id, state[3]))
                    sent[world.stripe_events] += 1
                    if counting:
                        hops["intent"].append(now - state[1])
                elif topic == completed_topic and state[0] == 1:
                    del flight[order_id]
                    if counting:
                        hops["payment"].append(now - state[2])
                        end_to_end.append(now - state[1])
                        lifecycles_in_window += 1
                    if first_done is None:
                        first_done = now
                        window_start = now + spec.warmup
                        window_end = window_start + spec.duration
                else:
                    duplicates += 1
                    continue
                last_output = now
                if counting:
                    outputs_in_window += 1
            if first_done is None and now - began > spec.start_timeout:
                raise Stalled(f"no lifecycle completed within {spec.start_timeout:.0f} s ({_stages(flight)})")
            if now - last_output > spec.stall_after and first_done is not None:
                raise Stalled(f"no output for {spec.stall_after:.0f} s ({_stages(flight)})")
            if now > window_end + spec.drain_timeout:
                raise Stalled(f"{len(flight)} lifecycles still in flight {spec.drain_timeout:.0f} s "
                              f"after the window ({_stages(flight)})")
        client.flush(30)
    finally:
        consumer.close()
    return {
        "inputs_per_s": outputs_in_window / spec.duration,
        "lifecycles_per_s": lifecycles_in_window / spec.duration,
        "outputs_in_window": outputs_in_window,
        "lifecycles_in_window": lifecycles_in_window,
        "waited_for_first": (first_done or now) - began,
        "end_to_end_ms": [1000.0 * s for s in end_to_end],
        "hops_ms": {name: [1000.0 * s for s in values] for name, values in hops.items()},
        "sent": sent,
        "inputs_total": sum(sent.values()),
        "lifecycles_total": index,
        "duplicates": duplicates,
        "cpu_s": time.process_time() - cpu,
    }


def _stages(flight: dict[str, list[Any]]) -> str:
    waiting = sum(1 for state in flight.values() if state[0] == 0)
    return f"{waiting} await payment.intent.created, {len(flight) - waiting} await payment.completed"


# ----------------------------------------------------------------------
# raw-with-state (a process of its own)


@dataclasses.dataclass(frozen=True)
class RawSpec:
    settings: Settings  # topic prefix, group (app_id), registry, Stripe stand-in of this loop
    state_dir: str
    producer: dict[str, Any]  # the worker's: acks, linger_ms, compression, max_batch_size
    max_records: int | None


def raw_main(spec: RawSpec, conn: Any, stop: Any) -> None:
    """Child-process entry: run the loop until ``stop`` is set; report counts or the error."""
    install_event_loop(spec.settings)  # the worker's kind of loop (PAYSTREAM_EVENT_LOOP)
    try:
        conn.send(asyncio.run(_raw_loop(spec, conn, stop)))
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


class PaymentWork:
    """The per-record work of raw-with-state: ours' three agents' jobs, without the kernel."""

    def __init__(self, spec: RawSpec) -> None:
        from fastavro import parse_schema

        from schemas import contracts
        from streams.codec import SchemaCache, decoding_schema

        self.spec = spec
        topic = spec.settings.topic
        self.orders = topic("order.created")
        self.stripe_events = topic(catalog.STRIPE_EVENTS)
        self.links = topic(catalog.PAYMENT_INTENT_LINKS)
        self.index = topic(catalog.USER_PAYMENT_INDEX)
        self.commands = topic(catalog.PAYMENT_COMMANDS)
        self.intents = topic(INTENT_CREATED)
        self.completed = topic(COMPLETED)
        self.mirror = {table: topic(f"mirror.{name}") for table, name in CHANGELOGS.items()}
        ids = SchemaCache(spec.settings.schema_registry_url).resolve(
            {self.orders: "order.created", self.intents: INTENT_CREATED, self.completed: COMPLETED})
        self.order_reader = (ids[self.orders], decoding_schema("order.created"))
        self.writers = {t: (_HEADER.pack(0, ids[t]), parse_schema(contracts.schema_dict(name)))
                        for t, name in ((self.intents, INTENT_CREATED), (self.completed, COMPLETED))}
        self.dbs: dict[tuple[str, int], Any] = {}
        self.counts = {"orders": 0, "stripe_events": 0, "links": 0, "index": 0, "commands": 0, "calls": 0}

    def input_topics(self) -> list[str]:
        return [self.orders, self.stripe_events, self.links, self.index, self.commands]

    def db(self, table: str, partition: int) -> Any:
        db = self.dbs.get((table, partition))
        if db is None:
            from rocksdict import Options, Rdict

            path = Path(self.spec.state_dir) / f"{table}-partition-{partition}"
            path.parent.mkdir(parents=True, exist_ok=True)
            db = self.dbs[table, partition] = Rdict(str(path), Options(raw_mode=True))
        return db

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()
        self.dbs.clear()

    def decode_order(self, value: bytes) -> dict[str, Any]:
        from fastavro import schemaless_reader

        schema_id, reader = self.order_reader
        magic, written_with = _HEADER.unpack_from(value)
        if magic != 0 or written_with != schema_id:
            raise ValueError(f"order.created: unexpected framing {magic}/{written_with}")
        body = io.BytesIO(value)
        body.seek(_HEADER.size)
        return schemaless_reader(body, reader, None)  # type: ignore[return-value]

    def encode(self, topic: str, event: dict[str, Any]) -> bytes:
        from fastavro import schemaless_writer

        header, writer = self.writers[topic]
        out = io.BytesIO()
        out.write(header)
        schemaless_writer(out, writer, event)
        return out.getvalue()

    def get(self, table: str, partition: int, key: bytes) -> dict[str, Any] | None:
        stored = self.db(table, partition).get(key)
        return json.loads(stored) if stored is not None else None

    def put(self, table: str, partition: int, key: bytes, row: dict[str, Any]) -> tuple[str, bytes, bytes]:
        """Write the row; its changelog mirror record."""
        encoded = json.dumps(row, separators=(",", ":")).encode()
        self.db(table, partition)[key] = encoded
        return self.mirror[table], key, encoded

    def wants_intent(self, partition: int, key: bytes, order: dict[str, Any]) -> bool:
        """The plan: a PaymentIntent is needed when the order has no payment row yet."""
        return self.db("payments", partition).get(key) is None

    def _event(self, topic: str, cause: dict[str, Any], now: int, **payload: Any) -> dict[str, Any]:
        return {"event_id": str(uuid.uuid4()), "event_type": topic[len(self.spec.settings.topic_prefix):],
                "occurred_at": now, "producer": catalog.PAYMENT_SERVICE,
                "correlation_id": cause.get("correlation_id") or str(uuid.uuid4()),
                "causation_id": cause["event_id"], "schema_version": 1, **payload}

    def _index_update(self, row: dict[str, Any]) -> tuple[str, bytes, bytes]:
        summary = {"order_id": row["order_id"], "payment_intent_id": row["payment_intent_id"],
                   "status": row["status"], "failure_code": None, "retryable": False}
        update = {"order": summary, "version": row["updated_at_ms"], "user_id": row["user_id"]}
        return self.index, row["user_id"].encode(), json.dumps(update, separators=(",", ":")).encode()

    def order_created(self, partition: int, key: bytes, order: dict[str, Any],
                      intent: dict[str, Any] | None) -> list[tuple[str, bytes, bytes]]:
        self.counts["orders"] += 1
        if intent is None or self.get("payments", partition, key) is not None:
            return []
        now = time.time_ns() // 1_000_000
        row = {"order_id": order["order_id"], "user_id": order["user_id"], "amount": order["total_amount"],
               "currency": order["currency"], "status": "REQUIRES_PAYMENT", "created_at_ms": now,
               "updated_at_ms": now, "payment_intent_id": intent["id"],
               "client_secret": intent.get("client_secret"), "attempts": 1, "refunded_amount": 0,
               "refunds": {}, "applied_ids": [order["event_id"]], "idempotency_keys": {}}
        event = self._event(self.intents, order, now, payment_intent_id=intent["id"],
                            order_id=row["order_id"], user_id=row["user_id"], amount=row["amount"],
                            currency=row["currency"])
        link = {"event_id": str(uuid.uuid4()), "payment_intent_id": intent["id"],
                "order_id": row["order_id"], "user_id": row["user_id"]}
        return [(self.intents, key, self.encode(self.intents, event)),
                (self.links, intent["id"].encode(), json.dumps(link, separators=(",", ":")).encode()),
                self._index_update(row), self.put("payments", partition, key, row)]

    def link(self, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes, bytes]]:
        self.counts["links"] += 1
        link = json.loads(value)
        row = self.get("stripe-intents", partition, key) or {}
        if row.get("order_id") == link["order_id"]:
            return []
        row = {**row, "payment_intent_id": link["payment_intent_id"], "order_id": link["order_id"],
               "user_id": link["user_id"]}
        return [self.put("stripe-intents", partition, key, row)]

    def stripe_event(self, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes, bytes]]:
        self.counts["stripe_events"] += 1
        event = json.loads(value)
        intent = event["data"]["object"]
        row = self.get("stripe-intents", partition, key) or {}
        applied = row.get("applied") or []
        if event["id"] in applied:
            return []
        metadata = intent.get("metadata") or {}
        order_id = metadata.get("order_id") or row.get("order_id")
        row = {**row, "applied": [*applied, event["id"]][-64:], "payment_intent_id": intent["id"],
               "order_id": order_id, "user_id": metadata.get("user_id") or row.get("user_id")}
        now = time.time_ns() // 1_000_000
        command = {"command": "stripe", "command_id": str(uuid.uuid4()), "order_id": order_id,
                   "correlation_id": None, "causation_id": event["id"], "issued_at": now,
                   "args": {"kind": "succeeded", "stripe_event_id": event["id"],
                            "occurred_at_ms": event["created"] * 1000, "payment_intent_id": intent["id"],
                            "user_id": row["user_id"], "amount": intent["amount"],
                            "currency": intent["currency"].upper(), "status": intent["status"],
                            "error_code": None, "error_message": None, "payment_method": None,
                            "refunds": []}}
        return [(self.commands, order_id.encode(), json.dumps(command, separators=(",", ":")).encode()),
                self.put("stripe-intents", partition, key, row)]

    def command(self, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes, bytes]]:
        self.counts["commands"] += 1
        command = json.loads(value)
        fact = command["args"]
        row = self.get("payments", partition, key)
        if row is None or command["command_id"] in row["applied_ids"] or row["status"] != "REQUIRES_PAYMENT":
            return []
        now = time.time_ns() // 1_000_000
        row.update(status="SUCCEEDED", updated_at_ms=now,
                   applied_ids=[*row["applied_ids"], command["command_id"]][-128:])
        cause = {"event_id": command["command_id"], "correlation_id": command["correlation_id"]}
        event = self._event(self.completed, cause, fact["occurred_at_ms"],
                            payment_intent_id=fact["payment_intent_id"], order_id=row["order_id"],
                            user_id=row["user_id"], amount=row["amount"], currency=row["currency"])
        return [(self.completed, key, self.encode(self.completed, event)), self._index_update(row),
                self.put("payments", partition, key, row)]

    def index_update(self, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes, bytes]]:
        self.counts["index"] += 1
        update = json.loads(value)
        summary, version = update["order"], update["version"]
        row = self.get("user-payments", partition, key) or {"orders": {}, "applied": []}
        known = row["orders"].get(summary["order_id"])
        if known is not None and known.get("version", 0) > version:
            return []
        row["orders"][summary["order_id"]] = {**summary, "version": version}
        return [self.put("user-payments", partition, key, row)]


async def _raw_loop(spec: RawSpec, conn: Any, stop: Any) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from connectors.stripe_gateway import StripeGateway
    from tables.aggregate import Call, derived_id

    work = PaymentWork(spec)
    gateway = StripeGateway.from_settings(spec.settings)
    bootstrap = spec.settings.kafka_bootstrap_servers
    consumer = AIOKafkaConsumer(*work.input_topics(), bootstrap_servers=bootstrap,
                                group_id=spec.settings.app_id, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    options = spec.producer
    client = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all" if options["acks"] in (-1, "all") else options["acks"],
        linger_ms=options["linger_ms"], compression_type=options["compression"],
        max_batch_size=options["max_batch_size"])
    handlers = {work.stripe_events: work.stripe_event, work.links: work.link,
                work.index: work.index_update, work.commands: work.command}
    await consumer.start()
    await client.start()
    ready = False
    batches = 0
    commit: asyncio.Task[None] | None = None
    to_commit: dict[Any, int] = {}
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(timeout_ms=100, max_records=spec.max_records)
            if not ready and consumer.assignment():
                conn.send("ready")
                ready = True
            if not fetched:
                continue
            # the orders of the batch that need a PaymentIntent: one call each, all at once
            orders: dict[tuple[int, int], dict[str, Any]] = {}
            calls = []
            for tp, records in fetched.items():
                if tp.topic == work.orders:
                    for record in records:
                        order = orders[tp.partition, record.offset] = work.decode_order(record.value)
                        if work.wants_intent(tp.partition, record.key, order):
                            calls.append(Call("stripe", "create_payment_intent", {
                                "amount": order["total_amount"], "currency": order["currency"].lower(),
                                "metadata": {"order_id": order["order_id"], "user_id": order["user_id"]}},
                                derived_id("create_payment_intent", order["order_id"])))
            intents = dict(zip((c.args["metadata"]["order_id"] for c in calls),
                               await asyncio.gather(*(gateway.call(c) for c in calls)), strict=True))
            work.counts["calls"] += len(calls)
            pending = []
            for tp, records in fetched.items():
                for record in records:
                    if tp.topic == work.orders:
                        order = orders[tp.partition, record.offset]
                        intent = intents.get(order["order_id"])
                        out = work.order_created(tp.partition, record.key, order, intent)
                    else:
                        out = handlers[tp.topic](tp.partition, record.key, record.value)
                    for topic, key, value in out:
                        pending.append(await client.send(topic, value=value, key=key))
                to_commit[tp] = records[-1].offset + 1
            await asyncio.gather(*pending)  # every ack of the batch, then its offsets
            batches += 1
            if commit is None or commit.done():
                if commit is not None:
                    commit.result()
                commit = asyncio.create_task(consumer.commit(dict(to_commit)))
                to_commit.clear()
        if commit is not None:
            await commit
        if to_commit:
            await consumer.commit(dict(to_commit))
    finally:
        await consumer.stop()
        await client.stop()
        await gateway.close()
        work.close()
    return {**work.counts, "batches": batches}


# ----------------------------------------------------------------------
# The sides


@dataclasses.dataclass
class Side:
    name: str
    label: str
    driver: dict[str, Any]
    produced: dict[str, int]  # topic (without prefix) -> records the side produced
    extra: dict[str, Any]

    @property
    def records_per_input(self) -> float:
        return sum(self.produced.values()) / max(self.driver["inputs_total"], 1)


def _drive(settings: Settings, options: PaymentsOptions) -> dict[str, Any]:
    spec = DriverSpec(settings, options.concurrency, options.warmup, options.duration)
    budget = spec.start_timeout + options.warmup + options.duration + spec.drain_timeout + 120
    return run_child(driver_main, (spec,), "bench-payments-driver", budget)


def _produced(settings: Settings, before: dict[str, int], after: dict[str, int],
              driver: dict[str, Any]) -> dict[str, int]:
    prefix = settings.topic_prefix
    produced = {}
    for topic, end in after.items():
        count = end - before.get(topic, 0) - driver["sent"].get(topic, 0)
        if count:
            produced[topic[len(prefix):]] = count
    return produced


def _wait_serving(settings: Settings, worker: Any, timeout: float = 180.0) -> float:
    """Probe every partition with an order.created until each is answered with an intent."""
    began = time.monotonic()
    world = OutsideWorld(settings)
    marker = f"probe-{uuid.uuid4().hex[:8]}-"
    observer = Observer(settings, [world.intents], lambda key: key.startswith(marker))
    client = producer(settings, "bench-payments-prober")
    try:
        probes, counter = [], 0
        for partition in range(PARTITIONS):
            while True:
                counter += 1
                order_id = f"{marker}{counter:05d}"
                if partition_of(order_id.encode()) == partition:
                    break
            produce(client, world.orders, order_id.encode(), world.order_created(order_id, f"u-{order_id}"))
            probes.append(order_id)
        client.flush(30)
        deadline = began + timeout
        while True:
            worker.assert_running()
            try:
                observer.wait_for(world.intents, probes, 2.0, "probe orders")
                return time.monotonic() - began
            except Stalled:
                if time.monotonic() > deadline:
                    raise Stalled(f"worker not serving all {PARTITIONS} partitions after {timeout:.0f} s\n"
                                  f"{worker.log_tail()}") from None
    finally:
        observer.close()


def run_ours(run: BenchRun, options: PaymentsOptions, standin: StandinProcess) -> Side:
    from streams.devtools.bench.common import WorkerProcess

    settings = run.settings("pay-ours", domains="payments", stripe_api_base=standin.url,
                            stripe_api_key=STANDIN_KEY)
    create_part_topics(settings)
    worker = WorkerProcess(settings).launch()
    try:
        ready = _wait_serving(settings, worker)
        print(f"  ours: worker pid {worker.pid} (PAYSTREAM_DOMAINS=payments) serving after {ready:.1f} s; "
              "driving", flush=True)
        topics = topics_with_prefix(settings)
        before = wait_quiet(settings, topics, quiet_for=2.0)
        cpu, standin_cpu, calls = cpu_seconds(worker.pid), cpu_seconds(standin.pid), standin.stats()["calls"]
        driver = _drive(settings, options)
        after = wait_caught_up(settings, worker, timeout=300)
        cpu = cpu_seconds(worker.pid) - cpu
        standin_cpu = cpu_seconds(standin.pid) - standin_cpu
        calls = standin.stats()["calls"] - calls
        rss, peak = worker.rss_kib()
        worker.assert_running()
    finally:
        worker.stop()
    return Side("ours", "ours (paystream worker)", driver, _produced(settings, before, after, driver),
                {"rss_kib": rss, "peak_kib": peak, "cpu_s": cpu, "standin_cpu_s": standin_cpu,
                 "stripe_calls": calls})


def run_raw(run: BenchRun, options: PaymentsOptions, standin: StandinProcess,
            producer_conf: dict[str, Any], max_records: int | None) -> Side:
    from streams.admin import TopicSettings, ensure_topics

    settings = run.settings("pay-raw-state", stripe_api_base=standin.url, stripe_api_key=STANDIN_KEY)
    create_part_topics(settings)
    mirrors = [TopicSettings(settings.topic(f"mirror.{name}"), PARTITIONS) for name in CHANGELOGS.values()]
    ensure_topics(settings.kafka_bootstrap_servers, mirrors)
    spec = RawSpec(settings, str(settings.state_dir / "rocksdb"), producer_conf, max_records)
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    stop = context.Event()
    child = context.Process(target=raw_main, args=(spec, send, stop), name="bench-pay-raw-state")
    child.start()
    send.close()
    try:
        if not receive.poll(120):
            raise Stalled("raw-with-state loop not assigned within 120 s")
        hello = receive.recv()
        if hello != "ready":
            raise Stalled(f"raw-with-state: {hello.get('error')}\n{hello.get('traceback', '')}")
        print(f"  raw-with-state: loop pid {child.pid} (aiokafka) assigned; driving", flush=True)
        topics = topics_with_prefix(settings)
        before = end_offsets(settings, topics)
        cpu, standin_cpu, calls = cpu_seconds(child.pid), cpu_seconds(standin.pid), standin.stats()["calls"]
        driver = _drive(settings, options)
        after = wait_quiet(settings, topics)
        cpu = cpu_seconds(child.pid) - cpu
        standin_cpu = cpu_seconds(standin.pid) - standin_cpu
        calls = standin.stats()["calls"] - calls
        stop.set()
        if not receive.poll(60):
            raise Stalled("raw-with-state loop did not stop within 60 s")
        summary = receive.recv()
        if "error" in summary:
            raise Stalled(f"raw-with-state: {summary['error']}\n{summary.get('traceback', '')}")
    finally:
        stop.set()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    return Side("raw-state", "raw-with-state (aiokafka)", driver, _produced(settings, before, after, driver),
                {**summary, "cpu_s": cpu, "standin_cpu_s": standin_cpu, "stripe_calls": calls})


def run_payments(settings: Settings, options: PaymentsOptions) -> int:
    """Ours, then raw-with-state, against one Stripe stand-in; print; 0 unless a side failed."""
    started = time.perf_counter()
    run, registry = BenchRun.start(settings)
    tag = run.tag
    standin = StandinProcess(free_port(), run.state_root / "stripe-standin.log")
    sides: list[Side] = []
    failures = 0
    try:
        standin.start()
        print(f"run {tag}: registry {registry.url} (topic {tag}-_schemas) in this process; Stripe stand-in "
              f"{standin.url} (pid {standin.pid}, streams/devtools/bench/stripe_standin.py); state in "
              f"{run.state_root}", flush=True)
        producer_conf, max_records, commit_interval = worker_producer_config(
            run.settings("pay-ours", domains="payments"))
        print(f"  worker producer (Faust conf, used by the raw loop too): {producer_conf}; "
              f"max poll records {max_records}; commit interval {commit_interval:g} s", flush=True)
        for name, body in (("ours", lambda: run_ours(run, options, standin)),
                           ("raw-with-state", lambda: run_raw(run, options, standin, producer_conf,
                                                              max_records))):
            try:
                sides.append(body())
            except Exception as exc:
                failures += 1
                print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
        report(sides, options, commit_interval)
    finally:
        standin.stop()
        run.close(registry)
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


def report(sides: list[Side], options: PaymentsOptions, commit_interval: float) -> None:
    by_name = {side.name: side for side in sides}
    print(f"\n  closed loop, {options.concurrency} payment lifecycles in flight, warm-up "
          f"{options.warmup:g} s, measured {options.duration:g} s; {INPUTS_PER_LIFECYCLE} inputs per "
          "lifecycle (order.created Avro, Stripe payment_intent.succeeded JSON on stripe.events); "
          "one PaymentIntent create per lifecycle against the LOCAL Stripe stand-in, on both sides")
    print(f"  {'side':<30} {'input events/s':>14} {'lifecycles/s':>13} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'records/input':>14}")
    for side in sides:
        d = side.driver
        print(f"  {side.label:<30} {d['inputs_per_s']:>14,.0f} {d['lifecycles_per_s']:>13,.0f} "
              f"{percentile(d['end_to_end_ms'], 0.5):>9.1f} {percentile(d['end_to_end_ms'], 0.99):>9.1f} "
              f"{side.records_per_input:>14.2f}")
    ours, raw = by_name.get("ours"), by_name.get("raw-state")
    if ours and raw:
        ratio = ours.driver["inputs_per_s"] / max(raw.driver["inputs_per_s"], 1e-9)
        print(f"  ours / raw-with-state (target >= 0.8): {ratio:.3f}")
    for side in sides:
        d = side.driver
        inputs = max(d["inputs_total"], 1)
        print(f"\n  {side.label}: {d['lifecycles_in_window']:,} lifecycles in the window "
              f"({d['outputs_in_window']:,} outputs), first after {d['waited_for_first']:.1f} s, "
              f"{d['lifecycles_total']:,} started in all, {d['duplicates']} duplicate outputs seen")
        print(latency_line("lifecycle (order.created -> payment.completed)", d["end_to_end_ms"], 48))
        print(latency_line("  hop order.created -> payment.intent.created", d["hops_ms"]["intent"], 48))
        print(latency_line("  hop stripe event -> payment.completed", d["hops_ms"]["payment"], 48))
        per_input = ", ".join(f"{topic} {count / inputs:.2f}"
                              for topic, count in sorted(side.produced.items()))
        print(f"    records produced per input: {side.records_per_input:.2f} = {per_input or '-'}")
        print(f"    Stripe stand-in: {side.extra['stripe_calls']:,} calls for {d['lifecycles_total']:,} "
              f"lifecycles, {side.extra['standin_cpu_s']:.1f} s CPU in its process")
        print(f"    CPU while driven: {side.extra['cpu_s']:.1f} s in the side's process "
              f"({1e6 * side.extra['cpu_s'] / inputs:,.0f} us per input), {d['cpu_s']:.1f} s in the driver "
              f"for {inputs:,} inputs")
        if "rss_kib" in side.extra:
            print(f"    worker RSS at the end {side.extra['rss_kib'] / 1024:.0f} MiB "
                  f"(peak {side.extra['peak_kib'] / 1024:.0f} MiB)")
        if "batches" in side.extra:
            print(f"    loop handled: {side.extra['orders']:,} order.created, "
                  f"{side.extra['stripe_events']:,} Stripe events, {side.extra['links']:,} links, "
                  f"{side.extra['commands']:,} commands, "
                  f"{side.extra['index']:,} index updates in {side.extra['batches']:,} batches")
    print("\n  what still differs between ours and raw-with-state:")
    for line in differences(ours, raw, commit_interval):
        print(f"    - {line}")


def differences(ours: Side | None, raw: Side | None, commit_interval: float) -> list[str]:
    lines = [
        "Stripe is the local stand-in on both sides, called through the same adapter (StripeGateway, "
        "stripe-python on aiohttp) with the same idempotency key, one call per order.created, a "
        "batch's calls concurrently; ours runs them from the kernel's decide loop, raw before handling "
        "the batch",
        "ours decides through the payment state machine, the Stripe event parser (tables.stripe_events: "
        "the whole event validated into a PaymentFact) and derived uuid5 event ids; raw does fixed "
        "dict updates on the parsed JSON and uuid4 ids",
        "ours runs Faust: three agents with their own streams, table wrappers, its RocksDB options, "
        "Faust's changelog producer; raw is one aiokafka consumer and loop over the five topics, one "
        "rocksdict DB per partition of each of its three tables with rocksdict's defaults",
        "ours writes a row (and its changelog record) once per key per batch; raw once per record",
        f"ours commits offsets on Faust's timer (every {commit_interval:g} s) after the acks; raw "
        "commits each batch's offsets right after that batch's acks, without waiting for the commit",
    ]
    if ours and raw:
        for topic in sorted(set(ours.produced) | set(raw.produced)):
            if topic.startswith("mirror."):
                continue
            mine = ours.produced.get(topic, 0) / max(ours.driver["inputs_total"], 1)
            counterpart = f"mirror.{topic}" if topic in CHANGELOGS.values() else topic
            theirs = raw.produced.get(counterpart, 0) / max(raw.driver["inputs_total"], 1)
            if abs(mine - theirs) > 0.02:
                lines.append(f"{topic}: ours {mine:.2f}, raw {theirs:.2f} records per input")
    return lines
