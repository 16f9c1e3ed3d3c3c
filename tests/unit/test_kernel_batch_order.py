"""streams.kernel.in_time_order: the order a batch is decided in."""

from __future__ import annotations

from dataclasses import dataclass

from streams.kernel import in_time_order


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    timestamp: float


@dataclass
class Event:
    message: Message


def event(topic: str, offset: int, timestamp: float, partition: int = 2) -> Event:
    return Event(Message(topic, partition, offset, timestamp))


def names(events: object) -> list[str]:
    return [f"{e.message.topic}@{e.message.offset}" for e in events]  # type: ignore[attr-defined]


def test_a_record_produced_first_on_another_topic_is_decided_first() -> None:
    # after a crash: the refund (sent once order.completed was seen) arrives ahead of the
    # payment.completed read again from its uncommitted offset
    refund = event("payment.refunded", 0, 20.0)
    completed = event("payment.completed", 7, 10.0)
    assert names(in_time_order([refund, completed])) == ["payment.completed@7", "payment.refunded@0"]


def test_a_partitions_records_keep_their_offset_order_whatever_their_timestamps() -> None:
    skewed = [event("a", 1, 30.0), event("a", 2, 10.0), event("b", 1, 20.0)]
    ordered = names(in_time_order(skewed))
    assert ordered.index("a@1") < ordered.index("a@2")
    assert ordered == ["b@1", "a@1", "a@2"]  # a@2 (10) still waits behind a@1 (30)


def test_equal_timestamps_keep_the_arrival_order() -> None:
    arrived = [event("a", 1, 5.0), event("b", 1, 5.0), event("a", 2, 5.0), event("c", 1, 5.0, partition=3)]
    assert names(in_time_order(arrived)) == ["a@1", "b@1", "a@2", "c@1"]


def test_one_partition_is_left_as_it_is() -> None:
    batch = [event("a", 1, 9.0), event("a", 2, 1.0)]
    assert in_time_order(batch) is batch
