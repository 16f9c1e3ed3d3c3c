"""The raw baselines: a consume -> process -> produce loop on a bare Kafka client.

Each runs in a process of its own (:func:`raw_main`) and turns the driver's
three inputs into the same three outputs as our worker:

- ``create`` command (JSON) -> order.created
- payment.intent.created (Confluent Avro) -> order.payment_pending
- payment.completed (Confluent Avro) -> order.completed

**raw-with-state** does per input what the order path has to do at the
least: decode (JSON or Avro), read the order row from RocksDB (rocksdict, one
DB per input partition, like a Faust table), JSON-decode it, check the
input's id against the ids the row applied, update it, JSON-encode it, write
it back, Avro-encode the output event, and produce the output.  Besides the
output it produces, per input, as many records of each role as our worker
did in the same run:

- an **index update** (the order's summary as JSON, keyed by user id) to an
  index topic the loop itself consumes (:class:`IndexHop`), as ours feeds its
  user -> orders index agent.  For each index record it reads, the loop does
  what ours' second agent does: a rocksdict get of the user's index row (one
  DB per index-topic partition), JSON decode, merge of the summary (kept
  unless a newer version of that order is there), JSON encode, put, and
  produces the row as the **index-row changelog** record;
- the records nobody consumes during the run (``mirror``: topic -> records
  per input, each the order row's JSON), standing for ours' order-row and
  deadline changelog records.

**raw-without-state** skips the rows, the index hop and the extra records:
one output per input, the client's limit.

Both wait for the acks of everything a batch caused before committing that
batch's offsets, index-topic offsets included (the commit itself is not
awaited before the next batch), i.e. at least once.  The producer uses the
settings of the worker's producer (acks, linger, compression, batch size),
read from the app's Faust config.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import shutil
import struct
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from streams import catalog
from streams.event_loop import install_event_loop
from streams.settings import Settings

_HEADER = struct.Struct(">bI")
OUTPUTS = {
    catalog.ORDER_COMMANDS: "order.created",
    "payment.intent.created": "order.payment_pending",
    "payment.completed": "order.completed",
}
#: How many applied ids a row remembers (ours caps its lists too).
MAX_APPLIED = 64


@dataclasses.dataclass(frozen=True)
class IndexHop:
    """The user -> orders index hop: updates the loop produces and consumes itself."""

    topic: str  # where index updates go, and what the loop reads them back from
    per_input: float  # index updates produced per input (ours' count / its inputs)
    changelog: str  # where each merged index row goes, standing for ours' index-table changelog
    per_update: float  # index-row changelog records per index update merged


@dataclasses.dataclass(frozen=True)
class RawSpec:
    settings: Settings  # topic prefix and group (app_id) of this loop
    state: bool
    client: str  # "aiokafka" or "confluent"
    state_dir: str
    producer: dict[str, Any]  # acks, linger_ms, compression, max_batch_size
    max_records: int
    mirror: tuple[tuple[str, float], ...] = ()  # (topic, records per input)
    index: IndexHop | None = None  # only with state

    def topic(self, name: str) -> str:
        return self.settings.topic(name)


def raw_main(spec: RawSpec, conn: Any, stop: Any) -> None:
    """Child-process entry: run the loop until ``stop`` is set; report counts or the error."""
    install_event_loop(spec.settings)  # the worker's kind of loop (PAYSTREAM_EVENT_LOOP)
    try:
        result = asyncio.run(_aiokafka_loop(spec, conn, stop)) if spec.client == "aiokafka" else \
            _confluent_loop(spec, conn, stop)
        conn.send(result)
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


class Work:
    """The per-input work of a raw loop (no Kafka in here)."""

    def __init__(self, spec: RawSpec) -> None:
        from fastavro import parse_schema

        from schemas import contracts
        from streams.codec import SchemaCache, decoding_schema

        self.spec = spec
        self.commands = spec.topic(catalog.ORDER_COMMANDS)
        inputs = {spec.topic(name): name for name in OUTPUTS if name != catalog.ORDER_COMMANDS}
        outputs = {spec.topic(name): name for name in OUTPUTS.values()}
        ids = SchemaCache(spec.settings.schema_registry_url).resolve({**inputs, **outputs})
        # input topic -> (schema id the driver writes with, reader); output -> (header, writer)
        self.readers = {topic: (ids[topic], decoding_schema(name)) for topic, name in inputs.items()}
        self.writers = {spec.topic(OUTPUTS[name]): (_HEADER.pack(0, ids[spec.topic(OUTPUTS[name])]),
                                                    parse_schema(contracts.schema_dict(OUTPUTS[name])))
                        for name in OUTPUTS}
        self.output_of = {spec.topic(name): spec.topic(out) for name, out in OUTPUTS.items()}
        self.intents = spec.topic("payment.intent.created")
        self.dbs: dict[tuple[str, int], Any] = {}
        self.mirror = list(spec.mirror)
        self.owed = [0.0] * len(self.mirror)
        self.index = spec.index if spec.state else None
        self.index_owed = 0.0
        self.index_rows_owed = 0.0
        self.handled = 0  # inputs (the driver's records)
        self.index_handled = 0  # index updates read back

    def db(self, partition: int, table: str = "orders") -> Any:
        """The rocksdict DB of ``table``'s ``partition`` (opened on first use)."""
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
        shutil.rmtree(self.spec.state_dir, ignore_errors=True)

    def decode(self, topic: str, value: bytes) -> dict[str, Any]:
        from fastavro import schemaless_reader

        schema_id, reader = self.readers[topic]
        magic, written_with = _HEADER.unpack_from(value)
        if magic != 0 or written_with != schema_id:
            raise ValueError(f"{topic}: unexpected framing {magic}/{written_with}")
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

    def handle(self, topic: str, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes, bytes]]:
        """The records to produce for one input (none for a duplicate or an unknown order)."""
        if self.index is not None and topic == self.index.topic:
            return self.merge_index(partition, key, value)
        self.handled += 1
        now = time.time_ns() // 1_000_000
        if topic == self.commands:
            cause = json.loads(value)
            cause_id = cause["command_id"]
        else:
            cause = self.decode(topic, value)
            cause_id = cause["event_id"]
        order_id = cause["order_id"]
        row: dict[str, Any] | None = None
        if self.spec.state:
            db = self.db(partition)
            stored = db.get(key)
            row = json.loads(stored) if stored is not None else None
            if row is not None and cause_id in row["applied"]:
                return []  # applied before: nothing twice
            if row is None and topic != self.commands:
                return []  # an event for an order we do not know (ours dead-letters it)
        out = self.output_of[topic]
        envelope = {
            "event_id": str(uuid.uuid4()), "event_type": out[len(self.spec.settings.topic_prefix):],
            "occurred_at": now, "producer": catalog.ORDER_SERVICE,
            "correlation_id": cause["correlation_id"], "causation_id": cause_id, "schema_version": 1,
        }
        if topic == self.commands:
            args = cause["args"]
            event = {**envelope, "order_id": order_id, "user_id": args["user_id"],
                     "order_type": args["order_type"], "total_amount": args["total_amount"],
                     "currency": args["currency"], "items": args["items"], "subscription_id": None,
                     "expires_at": args.get("expires_at")}
            if self.spec.state:
                row = {"order_id": order_id, "user_id": args["user_id"], "order_type": args["order_type"],
                       "status": "PENDING", "total_amount": args["total_amount"],
                       "currency": args["currency"], "items": args["items"], "created_at_ms": now,
                       "updated_at_ms": now, "payment_deadline_ms": now + 1_800_000, "applied": []}
        elif topic == self.intents:
            event = {**envelope, "order_id": order_id, "user_id": cause["user_id"],
                     "payment_intent_id": cause["payment_intent_id"], "amount": cause["amount"],
                     "currency": cause["currency"]}
            if row is not None:
                row["status"], row["payment_intent_id"] = "PAYMENT_PENDING", cause["payment_intent_id"]
        else:
            event = {**envelope, "order_id": order_id, "user_id": cause["user_id"],
                     "order_type": row["order_type"] if row else "ONE_TIME",
                     "total_amount": row["total_amount"] if row else cause["amount"],
                     "currency": cause["currency"], "payment_id": cause["payment_intent_id"]}
            if row is not None:
                row["status"], row["payment_id"] = "COMPLETED", cause["payment_intent_id"]
        records = [(out, key, self.encode(out, event))]
        if row is not None and topic != self.intents:
            # ours keeps a deadline key per pending order (8-byte big-endian ms + id):
            # put when the order is created, deleted when it is paid
            deadline_key = struct.pack(">Q", row["payment_deadline_ms"]) + key
            if topic == self.commands:
                self.db(partition, "deadlines")[deadline_key] = b"%d" % partition
            else:
                del self.db(partition, "deadlines")[deadline_key]
        if row is not None:
            row["updated_at_ms"] = now
            row["applied"] = [*row["applied"], cause_id][-MAX_APPLIED:]
            encoded = json.dumps(row).encode()
            self.db(partition)[key] = encoded
            for index, (mirror_topic, rate) in enumerate(self.mirror):
                self.owed[index] += rate
                while self.owed[index] >= 1.0:
                    self.owed[index] -= 1.0
                    records.append((mirror_topic, key, encoded))
            if self.index is not None:
                self.index_owed += self.index.per_input
                while self.index_owed >= 1.0:
                    self.index_owed -= 1.0
                    records.append(self.index_update(row))
        return records

    def index_update(self, row: dict[str, Any]) -> tuple[str, bytes, bytes]:
        """The order's summary for the user's index row, keyed by user id (as ours sends it)."""
        assert self.index is not None
        summary = {"order_id": row["order_id"], "status": row["status"], "order_type": row["order_type"],
                   "subscription_id": None, "total_amount": row["total_amount"],
                   "currency": row["currency"], "created_at_ms": row["created_at_ms"]}
        update = {"order": summary, "version": row["updated_at_ms"], "user_id": row["user_id"]}
        return self.index.topic, row["user_id"].encode(), json.dumps(update, separators=(",", ":")).encode()

    def merge_index(self, partition: int, key: bytes, value: bytes) -> list[tuple[str, bytes, bytes]]:
        """One index update read back: merge it into the user's index row; the row's changelog record."""
        assert self.index is not None
        self.index_handled += 1
        update = json.loads(value)
        summary, version = update["order"], update["version"]
        db = self.db(partition, "user-orders")
        stored = db.get(key)
        row = json.loads(stored) if stored is not None else {"orders": {}, "applied": []}
        known = row["orders"].get(summary["order_id"])
        if known is not None and known.get("version", 0) > version:
            return []  # an older summary arriving late: the row stays, nothing to log
        row["orders"][summary["order_id"]] = {**summary, "version": version}
        encoded = json.dumps(row, separators=(",", ":")).encode()
        db[key] = encoded
        records = []
        self.index_rows_owed += self.index.per_update
        while self.index_rows_owed >= 1.0:
            self.index_rows_owed -= 1.0
            records.append((self.index.changelog, key, encoded))
        return records

    def input_topics(self) -> list[str]:
        """What the loop consumes: the driver's three inputs, and its own index topic if it has one."""
        return [self.commands, *self.readers, *([self.index.topic] if self.index is not None else [])]

    def summary(self) -> dict[str, Any]:
        return {"handled": self.handled, "index_handled": self.index_handled}


async def _aiokafka_loop(spec: RawSpec, conn: Any, stop: Any) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    work = Work(spec)
    bootstrap = spec.settings.kafka_bootstrap_servers
    consumer = AIOKafkaConsumer(
        *work.input_topics(), bootstrap_servers=bootstrap, group_id=spec.settings.app_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
    )
    options = spec.producer
    client = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all" if options["acks"] in (-1, "all") else options["acks"],
        linger_ms=options["linger_ms"], compression_type=options["compression"],
        max_batch_size=options["max_batch_size"],
    )
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
            pending = []
            for tp, records in fetched.items():
                for record in records:
                    for topic, key, value in work.handle(tp.topic, tp.partition, record.key, record.value):
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
        work.close()
    return {**work.summary(), "batches": batches}


def _confluent_loop(spec: RawSpec, conn: Any, stop: Any) -> dict[str, Any]:
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

    work = Work(spec)
    bootstrap = spec.settings.kafka_bootstrap_servers
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": spec.settings.app_id,
        "enable.auto.commit": False, "auto.offset.reset": "earliest",
    })
    consumer.subscribe(work.input_topics())
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    options = spec.producer
    client = Producer({
        "bootstrap.servers": bootstrap, "acks": "all" if options["acks"] in (-1, "all") else options["acks"],
        "linger.ms": options["linger_ms"], "compression.type": options["compression"] or "none",
        "batch.size": options["max_batch_size"], "on_delivery": delivered,
    })
    ready = False
    batches = 0
    try:
        while not stop.is_set():
            first = consumer.poll(0.1)  # block for one record, then take what is there
            if not ready and consumer.assignment():
                conn.send("ready")
                ready = True
            if first is None:
                continue
            messages = [first, *consumer.consume(spec.max_records - 1, 0)]
            for message in messages:
                if message.error() is not None:
                    continue
                for topic, key, value in work.handle(message.topic(), message.partition(),
                                                     message.key(), message.value()):
                    while True:
                        try:
                            client.produce(topic, key=key, value=value)
                            break
                        except BufferError:
                            client.poll(0.01)
            if client.flush(30) != 0 or failures:  # every ack of the batch, then its offsets
                raise RuntimeError(f"raw loop: records not acknowledged: {failures[:3]}")
            consumer.commit(asynchronous=True)
            batches += 1
        if batches:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:  # all committed already
                    raise
    finally:
        consumer.close()
        work.close()
    return {**work.summary(), "batches": batches}
