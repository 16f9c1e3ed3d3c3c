"""Many records to Kafka at once: one batch per partition instead of one send per record.

The kernel hands the producer every outgoing record of a batch (events,
index updates, commands, dead letters) and, through :mod:`streams.table_io`,
every changelog record of its writes.  Sent one at a time through Faust's
``Producer.send`` and aiokafka's ``AIOKafkaProducer.send``, each record costs
two coroutine chains, a metadata lookup, a partitioner call and a future of
its own that the sender resolves on the ack.  :func:`send_all` groups the
records by partition instead and hands each group to the *same* aiokafka
producer as one ``BatchBuilder`` (``create_batch``/``send_batch``, aiokafka's
public batch API): one future per partition and request.

A group whose partition already has a batch waiting in the producer's
accumulator is appended to that batch first, as ``send`` does.  aiokafka's
sender puts one batch per partition into a produce request, and
``send_batch`` waits until the partition's waiting batch is taken; a batch of
each call's own then waited a request behind the last, and the broker
handled many small batches (``paystream bench orders``: the broker's CPU
per input fell by a fifth with this, the worker's by a tenth or more).

What stays as it was:

- the producer: Faust's own aiokafka producer (``acks``, linger, batch size,
  request size from the app's settings), so Faust's commit, which flushes
  that producer (``Producer.flush`` -> the accumulator's ``flush``) before it
  commits offsets, waits for these records too;
- partitions: a record without an explicit partition goes where the
  producer's own partitioner puts it (murmur2 of the key, as every client
  does), so co-partitioning holds; with aiokafka's ``DefaultPartitioner``
  its rule for a keyed record is applied here, the key's hash remembered;
- order: records of one partition keep the order they were handed over in,
  in one batch, or in consecutive batches when they exceed the batch size
  (a waiting batch is the partition's last; one built for a retry is
  closed, and nothing is appended to it);
- refusals: a record larger than the producer's ``max_request_size`` raises
  ``MessageSizeTooLargeError`` before anything of the call is queued, as
  ``AIOKafkaProducer.send`` would for that record; an ack failure fails the
  future of its partition's batch.

A producer that is not Faust's aiokafka driver (another transport, a test
double) is handed the records one at a time through Faust's ``send``.

Private parts used (checked by ``tests/unit/test_bulk_send.py``):
faust-streaming's ``Producer._ensure_producer`` (the aiokafka producer;
faust-streaming pinned <0.16 in setup.cfg) and aiokafka's
``AIOKafkaProducer._serialize`` (size check), ``_max_request_size``,
``_partitioner``, ``_txn_manager`` and ``_message_accumulator`` (its
``_batches``, ``_closed`` and ``_exception``; a ``MessageBatch``'s
``_builder`` and ``future``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.structs import TopicPartition

#: Bytes a record's framing adds at most to its key, value and headers, in
#: aiokafka's size estimate (varints, attributes, headers' counts; generous).
SIZE_MARGIN = 1024

#: Keys whose murmur2 hash :func:`send_all` remembers (aiokafka's is pure
#: Python, a few microseconds a key; an order's events and a user's index
#: updates repeat their key within seconds).  Forgotten all at once when full.
HASHES_KEPT = 50_000
_hashes: dict[bytes, int] = {}

#: (topic, key, value, partition or None, headers or None)
Record = tuple[str, bytes | None, bytes | None, int | None, Sequence[tuple[str, bytes]] | None]


@dataclass(slots=True)
class Sent:
    """A call's records in one producer batch (its own, or one they joined): ack future, where, how many."""

    future: asyncio.Future[Any]  # resolves to the batch's metadata: its first offset
    topic: str
    partition: int
    count: int  # records of the call in the batch
    last_index: int  # the last of them, counted from the batch's first record

    def last_offset(self) -> int:
        """The offset of the call's last record in the batch (once the future is done)."""
        return int(self.future.result().offset) + self.last_index


def kafka_producer(app: Any) -> Any:
    """The aiokafka producer under the app's Faust producer."""
    return app.producer._ensure_producer()


async def send_all(app: Any, records: Sequence[Record]) -> list[Sent]:
    """Queue ``records`` on the app's producer, a batch per partition; their futures.

    Nothing is awaited but queueing (and topic metadata the first time a
    topic is seen); the caller awaits the futures it needs.
    """
    if not hasattr(app.producer, "_ensure_producer"):  # not Faust's aiokafka driver (a test double)
        return [Sent(await app.producer.send(topic, key, value, partition, None, headers),
                     topic, -1 if partition is None else partition, 1, 0)
                for topic, key, value, partition, headers in records]
    producer = kafka_producer(app)
    cluster = producer.client.cluster
    partitioner = producer._partitioner
    serialize = producer._serialize
    # aiokafka's exact size check (``_serialize``) only where a cheap bound says it could matter
    near_limit = producer._max_request_size - SIZE_MARGIN
    groups: dict[tuple[str, int], list[tuple[bytes | None, bytes | None, list[Any]]]] = {}
    partitions_of: dict[str, tuple[list[int], list[int]]] = {}
    for topic, key, value, partition, headers in records:
        headers = list(headers or [])
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        if size > near_limit:
            key, value = serialize(key, value, headers)  # raises MessageSizeTooLargeError
        if partition is None:
            known = partitions_of.get(topic)
            if known is None:
                everything = await producer.partitions_for(topic)  # waits for metadata if needed
                available = cluster.available_partitions_for_topic(topic) or everything
                known = partitions_of[topic] = (sorted(everything), sorted(available))
            if key is not None and type(partitioner) is DefaultPartitioner:
                # DefaultPartitioner's own rule for a key, its hash remembered
                hashed = _hashes.get(key)
                if hashed is None:
                    if len(_hashes) >= HASHES_KEPT:
                        _hashes.clear()
                    hashed = _hashes[key] = murmur2(key) & 0x7FFFFFFF
                partition = known[0][hashed % len(known[0])]
            else:
                partition = partitioner(key, *known)
        groups.setdefault((topic, partition), []).append((key, value, headers))
    sent: list[Sent] = []
    queued = _queued_batches(producer)
    for (topic, partition), group in groups.items():
        start = 0
        if queued is not None:
            start = _append_to_queued(queued, topic, partition, group, sent)
        builder, count = producer.create_batch(), 0
        for key, value, headers in group[start:]:
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                sent.append(Sent(await producer.send_batch(builder, topic, partition=partition),
                                 topic, partition, count, count - 1))
                builder, count = producer.create_batch(), 0
                builder.append(timestamp=None, key=key, value=value, headers=headers)
            count += 1
        if count:
            sent.append(Sent(await producer.send_batch(builder, topic, partition=partition),
                             topic, partition, count, count - 1))
    return sent


def _queued_batches(producer: Any) -> Any:
    """The accumulator's not yet sent batches by partition, or None where they may not be added to.

    A transactional producer's batches belong to their transaction, and a
    closed or failed accumulator refuses records (``send_batch`` raises why).
    """
    accumulator = producer._message_accumulator
    txn = producer._txn_manager
    if accumulator._closed or accumulator._exception is not None or (
            txn is not None and txn.transactional_id is not None):
        return None
    return accumulator._batches


def _append_to_queued(queued: Any, topic: str, partition: int,
                      group: list[tuple[bytes | None, bytes | None, list[Any]]], sent: list[Sent]) -> int:
    """Add the head of ``group`` to the partition's last batch still waiting to be sent; how many.

    aiokafka's sender takes ONE batch per partition into each produce
    request, and ``send_batch`` waits until the partition's queued batch is
    taken: a batch of its own per call would wait a request (a round trip)
    behind the last.  Appended to the queued batch (as ``send`` does), the
    records go with it.  Order holds: that batch is the partition's last, and
    a batch already built for sending (a retry) is closed, so nothing is
    appended to it.
    """
    batches = queued.get(TopicPartition(topic, partition))
    if not batches:
        return 0
    batch = batches[-1]
    builder = batch._builder
    appended, last = 0, None
    for key, value, headers in group:
        metadata = builder.append(timestamp=None, key=key, value=value, headers=headers)
        if metadata is None:  # full (or closed): the rest goes in a new batch
            break
        appended, last = appended + 1, metadata
    if last is not None:
        sent.append(Sent(asyncio.shield(batch.future), topic, partition, appended, last.offset))
    return appended
