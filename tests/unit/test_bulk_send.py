"""streams.bulk_send against a real (not started) aiokafka producer: grouping, partitions, order, size."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from streams import bulk_send

PARTITIONS = 16


class FaustProducer:
    """What ``send_all`` asks of Faust's producer: the aiokafka producer under it."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    def _ensure_producer(self) -> AIOKafkaProducer:
        return self.producer


class App:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = FaustProducer(producer)


@pytest.fixture
async def batches() -> Any:
    """A real aiokafka producer whose metadata and queueing are replaced by a record of the batches."""
    producer = AIOKafkaProducer(bootstrap_servers="localhost:1", max_batch_size=1024,
                                max_request_size=4096)
    handed: list[tuple[str, int, list[tuple[bytes | None, bytes | None]]]] = []

    async def partitions_for(topic: str) -> set[int]:
        return set(range(PARTITIONS))

    async def send_batch(builder: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        built = builder._build()  # the batch's wire bytes, read back below
        records = [(r.key, r.value) for batch in _read_batches(built) for r in batch]
        handed.append((topic, partition, records))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(type("Meta", (), {"offset": 100})())
        return future

    producer.partitions_for = partitions_for  # type: ignore[method-assign]
    producer.send_batch = send_batch  # type: ignore[method-assign]
    yield App(producer), handed
    await producer.stop()


def _read_batches(built: bytes | bytearray) -> list[Any]:
    from aiokafka.record.memory_records import MemoryRecords

    records = MemoryRecords(bytes(built))
    out = []
    while records.has_next():
        out.append(list(records.next_batch()))
    return out


async def test_the_private_parts_used_are_there() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="localhost:1")
    assert callable(producer._serialize) and callable(producer._partitioner)
    assert isinstance(producer._max_request_size, int)
    await producer.stop()


async def test_keyed_records_go_where_aiokafkas_partitioner_puts_them_in_order(batches: Any) -> None:
    app, handed = batches
    keys = [f"user-{n % 7}".encode() for n in range(40)]
    await bulk_send.send_all(app, [("t", key, b"v%d" % n, None, None) for n, key in enumerate(keys)])
    partitioner = DefaultPartitioner()
    expected: dict[int, list[tuple[bytes, bytes]]] = {}
    for n, key in enumerate(keys):
        expected.setdefault(partitioner(key, list(range(PARTITIONS)), list(range(PARTITIONS))), []).append(
            (key, b"v%d" % n))
    got: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
    for topic, partition, records in handed:
        assert topic == "t"
        got.setdefault(partition, []).extend(records)
    assert got == expected  # each partition's records in the order handed over
    assert len(handed) == len(expected)  # one batch per partition


async def test_remembered_hashes_put_keys_where_the_partitioner_does(batches: Any) -> None:
    app, handed = batches
    keys = [f"order-{n}".encode() for n in range(300)]
    partitioner = DefaultPartitioner()
    for _round in range(2):  # the second round's hashes are remembered ones
        handed.clear()
        await bulk_send.send_all(app, [("t", key, b"v", None, None) for key in keys])
        got = {key: partition for _t, partition, records in handed for key, _v in records}
        assert got == {key: partitioner(key, list(range(PARTITIONS)), []) for key in keys}
    assert all(key in bulk_send._hashes for key in keys)


async def test_explicit_partitions_are_kept_and_full_batches_continue_in_a_new_one(batches: Any) -> None:
    app, handed = batches
    records = [("log", b"k%d" % n, bytes(200), 3, None) for n in range(12)]  # > 1024-byte batches
    sent = await bulk_send.send_all(app, records)
    assert {partition for _topic, partition, _records in handed} == {3}
    assert len(handed) > 1
    assert [key for _t, _p, batch in handed for key, _v in batch] == [b"k%d" % n for n in range(12)]
    assert sum(s.count for s in sent) == 12
    assert sent[0].last_offset() == 100 + sent[0].count - 1


async def test_a_record_over_the_request_size_is_refused_before_anything_is_queued(batches: Any) -> None:
    app, handed = batches
    with pytest.raises(MessageSizeTooLargeError):
        await bulk_send.send_all(app, [("t", b"a", b"small", None, None),
                                       ("t", b"b", bytes(5000), None, None)])
    assert handed == []


def _waiting_batch(app: Any, topic: str, partition: int, *records: tuple[bytes, bytes]) -> Any:
    """A batch queued in the producer's accumulator, not yet taken by the sender."""
    from aiokafka.structs import TopicPartition

    accumulator = app.producer.producer._message_accumulator
    builder = accumulator.create_builder()
    for key, value in records:
        builder.append(timestamp=None, key=key, value=value)
    return accumulator._append_batch(builder, TopicPartition(topic, partition))


async def test_records_join_their_partitions_waiting_batch(batches: Any) -> None:
    app, handed = batches
    waiting = _waiting_batch(app, "t", 3, (b"a", b"1"), (b"b", b"2"))
    sent = await bulk_send.send_all(app, [("t", b"c", b"3", 3, None), ("t", b"d", b"4", 3, None),
                                          ("t", b"e", b"5", 4, None)])
    assert [(topic, partition) for topic, partition, _records in handed] == [("t", 4)]  # 3 joined
    built = [(r.key, r.value) for batch in _read_batches(waiting._builder._build()) for r in batch]
    assert built == [(b"a", b"1"), (b"b", b"2"), (b"c", b"3"), (b"d", b"4")]
    joined = next(s for s in sent if s.partition == 3)
    assert (joined.count, joined.last_index) == (2, 3)
    waiting.done(base_offset=500)
    await joined.future
    assert joined.last_offset() == 503  # the call's last record, not the batch's first


async def test_a_full_waiting_batch_takes_what_fits_and_the_rest_follows_in_order(batches: Any) -> None:
    app, handed = batches
    waiting = _waiting_batch(app, "t", 3, (b"a", bytes(600)))
    sent = await bulk_send.send_all(app, [("t", b"k%d" % n, bytes(200), 3, None) for n in range(6)])
    in_waiting = [r.key for batch in _read_batches(waiting._builder._build()) for r in batch]
    after = [key for _t, _p, batch in handed for key, _v in batch]
    assert in_waiting[0] == b"a" and 1 <= len(in_waiting) - 1 < 6
    assert in_waiting[1:] + after == [b"k%d" % n for n in range(6)]
    assert sum(s.count for s in sent) == 6


async def test_a_waiting_batch_built_for_a_retry_or_in_a_transaction_is_left_alone(batches: Any) -> None:
    app, handed = batches
    retried = _waiting_batch(app, "t", 3, (b"a", b"1"))
    retried._builder._build()  # built (closed) when first sent: a retry sends it as it was
    await bulk_send.send_all(app, [("t", b"b", b"2", 3, None)])
    assert [key for _t, _p, batch in handed for key, _v in batch] == [b"b"]

    handed.clear()
    open_batch = _waiting_batch(app, "u", 1, (b"a", b"1"))
    app.producer.producer._txn_manager = type("Txn", (), {"transactional_id": "tx-1"})()
    await bulk_send.send_all(app, [("u", b"b", b"2", 1, None)])
    assert [key for _t, _p, batch in handed for key, _v in batch] == [b"b"]
    assert open_batch.record_count == 1
    app.producer.producer._txn_manager = None
