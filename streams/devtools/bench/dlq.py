"""``paystream bench dlq``: the replay rate of ``paystream dlq replay`` against a raw loop, same run.

Fills a private dead-letter topic with N dead letters (default 10,000) of a
``payment.completed`` source topic, 4 partitions each, as the kernel writes
them: the original key and Avro bytes, the ``dlq.*`` headers and one header
of the record's own.  Then, alternating, ``rounds`` times each:

- **ours**: :func:`streams.ops.dlq.replay` with a filter that picks every
  one: read the whole dead-letter topic, check every record (source topic
  exists, replay count under the limit), produce each back to its source
  partition with its headers and the raised count through the one producer
  helper (:class:`streams.producer.EventProducer`), awaiting every ack;
- **raw**: a confluent-kafka loop that reads the same topic (assigned, no
  group) and produces each record as it comes to its source partition with
  the same producer settings (idempotent, acks=all, lz4), then one flush.

Prints records/s of each round, the best of each, and ours/raw.  Nothing is
asserted about speed.  Topics are tagged ``bench-<hex>`` and deleted at the
end.  Needs only a broker: the records are made offline (the schema id in
the frames is a placeholder, nothing decodes them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import KafkaError, TopicPartition

from schemas import contracts
from schemas.samples import sample_record
from streams import catalog
from streams.codec import encode
from streams.devtools.bench.common import (
    PARTITIONS,
    flush,
    machine_line,
    partition_of,
    producer,
    watermarks,
)
from streams.ops import dlq
from streams.ops.records import open_consumer
from streams.settings import Settings

SOURCE = "payment.completed"

#: A smoke run's options (``--quick``).
QUICK = {"count": 1_000, "rounds": 1}


@dataclass(frozen=True)
class DlqOptions:
    count: int = 10_000
    rounds: int = 2


def _fill(settings: Settings, count: int) -> None:
    source = settings.topic(SOURCE)
    client = producer(settings, "bench-dlq-fill")
    schema = contracts.parsed_schema(SOURCE)
    sample = sample_record(SOURCE)
    for i in range(count):
        record = {**sample, "order_id": f"o-{i:08d}"}
        key = record["order_id"].encode()
        partition = partition_of(key)
        headers = [("dlq.reason", b"rejected"), ("dlq.error", b"IllegalTransition: bench"),
                   ("dlq.source.topic", source.encode()), ("dlq.source.partition", str(partition).encode()),
                   ("dlq.source.offset", str(i).encode()), ("dlq.source.timestamp", b"0"),
                   ("trace-id", f"t-{i}".encode())]
        value = encode(schema, 1, record)
        while True:
            try:
                client.produce(settings.topic(catalog.DEAD_LETTERS), key=key, value=value,
                               headers=headers, partition=partition)
                break
            except BufferError:
                client.poll(0.05)
    flush(client, "filling the dead-letter topic")


def _raw(settings: Settings) -> tuple[int, float]:
    """Read the dead-letter topic and produce each record back, as a plain loop would."""
    name = settings.topic(catalog.DEAD_LETTERS)
    started = time.perf_counter()
    consumer = open_consumer(settings.kafka_bootstrap_servers)
    client = producer(settings, "bench-dlq-raw")
    ends = {p: watermarks(consumer, name, p)[1] for p in range(PARTITIONS)}
    consumer.assign([TopicPartition(name, p, 0) for p in range(PARTITIONS)])
    todo = {p for p, end in ends.items() if end > 0}
    sent = 0
    while todo:
        for message in consumer.consume(500, timeout=1.0):
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    todo.discard(message.partition())
                    continue
                raise RuntimeError(str(message.error()))
            headers = [(k, v) for k, v in message.headers() or [] if not k.startswith("dlq.")]
            headers.append(("dlq.replay.count", b"1"))
            source_partition = int(dict(message.headers())["dlq.source.partition"])
            while True:
                try:
                    client.produce(settings.topic(SOURCE), key=message.key(), value=message.value(),
                                   headers=headers, partition=source_partition)
                    break
                except BufferError:
                    client.poll(0.05)
            sent += 1
            if message.offset() + 1 >= ends[message.partition()]:
                todo.discard(message.partition())
    flush(client, "raw replay")
    consumer.close()
    return sent, time.perf_counter() - started


def _ours(settings: Settings) -> tuple[int, float, float]:
    started = time.perf_counter()
    result = asyncio.run(dlq.replay(settings, where=dlq.DeadLetterFilter()))
    if result.skipped:
        raise RuntimeError(f"ours skipped {len(result.skipped)} records")
    return len(result.replayed), time.perf_counter() - started, result.seconds


def run_dlq(settings: Settings, options: DlqOptions) -> int:
    """Fill, replay with ours and raw alternating, print the rates; delete the topics."""
    from streams.admin import ensure_topics
    from streams.devtools.bench.common import BenchRun

    tag = f"bench-{uuid.uuid4().hex[:8]}"
    run = BenchRun(settings, tag, settings.state_dir / tag)
    part = dataclasses.replace(settings, topic_prefix=f"{tag}-dlq.")
    print(machine_line(settings))
    ensure_topics(settings.kafka_bootstrap_servers, [
        catalog.CATALOG[SOURCE].settings(name_prefix=part.topic_prefix),
        catalog.INTERNAL_TOPICS[catalog.DEAD_LETTERS].settings(name_prefix=part.topic_prefix)])
    try:
        began = time.perf_counter()
        _fill(part, options.count)
        print(f"dlq: {options.count:,} dead letters of {SOURCE} over {PARTITIONS} partitions "
              f"({len(encode(contracts.parsed_schema(SOURCE), 1, sample_record(SOURCE)))} bytes each, "
              f"7 headers), filled in {time.perf_counter() - began:.1f} s")
        ours_rates: list[float] = []
        raw_rates: list[float] = []
        for round_ in range(1, options.rounds + 1):
            sent, seconds, inside = _ours(part)
            ours_rates.append(sent / seconds)
            print(f"  round {round_} ours: {sent:,} replayed in {seconds:.2f} s "
                  f"({sent / seconds:,.0f} records/s; the call itself {inside:.2f} s)")
            sent, seconds = _raw(part)
            raw_rates.append(sent / seconds)
            print(f"  round {round_} raw : {sent:,} re-produced in {seconds:.2f} s "
                  f"({sent / seconds:,.0f} records/s)")
        best_ours, best_raw = max(ours_rates), max(raw_rates)
        print(f"  best ours: {best_ours:,.0f} records/s, best raw: {best_raw:,.0f} records/s, "
              f"ours/raw {best_ours / best_raw:.2f}")
        print("  what differs: ours reads the whole topic first (all checks before the first "
              "send), looks the source topics up, and awaits each record's ack as an asyncio "
              "future; raw produces while it reads and flushes once")
    finally:
        topics, _ = run.cleanup()
        print(f"  cleanup: deleted {len(topics)} topics")
    return 0
