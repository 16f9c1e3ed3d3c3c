"""The deadline index (tables.deadlines): key codec, cursors, hand-over, rebalance, conversion.

Three levels: the pure index over an in-memory sorted source; a real
Faust app with the ``memory://`` store, driven through an agent's test
context (Faust's current event, as in production); and a real rocksdict
database in a temporary directory, opened as Faust's RocksDB store opens its
partition databases.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.stores.rocksdb import RocksDBOptions, Store

from tables.deadlines import (
    CHANGELOG_TOPIC_CONFIGS,
    LEGACY_HIGH,
    LEGACY_LOW,
    MAX_AGGREGATE_ID_BYTES,
    MAX_DEADLINE_MS,
    NEW_HIGH,
    Deadlines,
    DueIndex,
    KeySource,
    RdictSource,
    SortedSource,
    deadline_key,
    decode_bucket,
    due_bound,
    encode_bucket,
    is_deadline_key,
    is_legacy_key,
    legacy_key,
    parse_key,
    partition_value,
)

# ----------------------------------------------------------------------
# Key codec


def test_key_is_big_endian_deadline_then_id_and_round_trips() -> None:
    key = deadline_key("order-1", 1_700_000_000_123)
    assert key == (1_700_000_000_123).to_bytes(8, "big") + b"order-1"
    assert parse_key(key) == ("order-1", 1_700_000_000_123)
    assert parse_key(deadline_key("ü-€", 0)) == ("ü-€", 0)


def test_key_order_is_deadline_order_then_id() -> None:
    rng = random.Random(7)
    pairs = [(rng.randrange(0, 10**13), f"o-{rng.randrange(1000)}") for _ in range(2000)]
    pairs += [(10**12, "b"), (10**12, "a"), (10**12 + 1, "a"), (255, "z"), (256, "a")]
    by_key = sorted(pairs, key=lambda p: deadline_key(p[1], p[0]))
    # equal deadlines: ordered by id bytes; otherwise strictly by deadline
    assert [d for d, _ in by_key] == sorted(d for d, _ in pairs)
    assert [k for k in (deadline_key("a", 10**12), deadline_key("b", 10**12))] == sorted(
        [deadline_key("b", 10**12), deadline_key("a", 10**12)])


def test_new_keys_sort_before_old_buckets_and_fausts_offset_key() -> None:
    # Every deadline below 2**56 ms (two million years) starts with 0x00.
    assert deadline_key("x", MAX_DEADLINE_MS)[0] == 0
    newest = deadline_key("\U0010ffff" * 100, MAX_DEADLINE_MS)
    oldest_bucket = legacy_key(0, 0)
    assert newest < NEW_HIGH <= LEGACY_LOW <= oldest_bucket < legacy_key(MAX_DEADLINE_MS, 99) < LEGACY_HIGH
    assert LEGACY_HIGH <= Store.offset_key  # Faust keeps its offset in the same partition DB
    assert is_deadline_key(newest) and not is_legacy_key(newest)
    assert is_legacy_key(oldest_bucket) and not is_deadline_key(oldest_bucket)
    assert not is_deadline_key(Store.offset_key) and not is_legacy_key(Store.offset_key)


@pytest.mark.parametrize("deadline", [-1, MAX_DEADLINE_MS + 1])
def test_deadline_outside_the_key_range_is_refused(deadline: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        deadline_key("o", deadline)


@pytest.mark.parametrize("deadline", [1.5, True, "5"])
def test_deadline_must_be_an_int(deadline: Any) -> None:
    with pytest.raises(TypeError):
        deadline_key("o", deadline)


def test_aggregate_id_must_be_short_and_non_empty() -> None:
    deadline_key("x" * MAX_AGGREGATE_ID_BYTES, 1)
    with pytest.raises(ValueError, match="bytes"):
        deadline_key("x" * (MAX_AGGREGATE_ID_BYTES + 1), 1)
    with pytest.raises(ValueError, match="non-empty"):
        deadline_key("", 1)


def test_due_bound_splits_due_from_not_due() -> None:
    bound = due_bound(1000)
    assert deadline_key("zzz" * 100, 1000) < bound
    assert deadline_key("a", 1001) >= bound
    assert legacy_key(0, 0) >= due_bound(MAX_DEADLINE_MS)


def test_legacy_key_is_the_old_format() -> None:
    # The old module: window = deadline - deadline % 5000; f"{window:015d}:{partition}"
    assert legacy_key(1_700_000_004_999, 3) == b"001700000000000:3"
    assert legacy_key(1_700_000_005_000, 12) == b"001700000005000:12"
    assert not is_legacy_key(b"001700000005000:")
    assert not is_legacy_key(b"1700000005000:3")


def test_values_read_like_what_the_old_json_serializer_wrote() -> None:
    app = faust.App("t-deadlines-codec", broker="kafka://localhost:9092", store="memory://")
    old_json = app.serializers.dumps_value(None, {"o-1": 1_000, "o-2": 1_001}, serializer="json")
    assert decode_bucket(old_json) == {"o-1": 1_000, "o-2": 1_001}
    assert decode_bucket(encode_bucket({"o-1": 1_000})) == {"o-1": 1_000}
    assert decode_bucket(b"3") is None and decode_bucket(b"not json") is None and decode_bucket(None) is None
    assert partition_value(13) == app.serializers.dumps_value(None, 13, serializer="json") == b"13"


# ----------------------------------------------------------------------
# The pure index over a sorted in-memory source


class Partitions:
    """A table split by partition: key -> value (what a store holds)."""

    def __init__(self) -> None:
        self.data: dict[int, dict[bytes, Any]] = {}

    def add(self, partition: int, aggregate_id: str, deadline_ms: int) -> bytes:
        key = deadline_key(aggregate_id, deadline_ms)
        self.data.setdefault(partition, {})[key] = str(partition).encode()
        return key

    def remove(self, partition: int, aggregate_id: str, deadline_ms: int) -> bytes:
        key = deadline_key(aggregate_id, deadline_ms)
        self.data[partition].pop(key)
        return key

    def bucket(self, partition: int, key: bytes, entries: Mapping[str, int]) -> None:
        self.data.setdefault(partition, {})[key] = encode_bucket(entries)

    def source(self) -> SortedSource:
        return SortedSource((p, k, v) for p, kv in self.data.items() for k, v in kv.items())


class Counting:
    """Wraps a source and counts the keys it reads (to see that cursors avoid re-reading)."""

    def __init__(self, inner: KeySource) -> None:
        self.inner = inner
        self.read = 0

    def partitions(self) -> Any:
        return self.inner.partitions()

    def keys(self, partition: int, start: bytes, stop: bytes) -> Iterator[bytes]:
        for key in self.inner.keys(partition, start, stop):
            self.read += 1
            yield key

    def has(self, partition: int, key: bytes) -> bool:
        return self.inner.has(partition, key)

    def bucket(self, partition: int, key: bytes) -> Any:
        return self.inner.bucket(partition, key)


def index(batch_size: int = 100, redeliver_after: float = 60.0) -> DueIndex:
    return DueIndex(redeliver_after=redeliver_after, batch_size=batch_size)


def take(ix: DueIndex, parts: Partitions | KeySource, at: int, clock: float = 0.0,
         epoch: int = 0) -> list[tuple[str, int]]:
    source = parts.source() if isinstance(parts, Partitions) else parts
    ix.sync(source.partitions(), epoch)
    return ix.take(source, at, clock).due


def test_due_keys_come_in_deadline_order_across_partitions_and_not_due_stay() -> None:
    parts = Partitions()
    parts.add(0, "c", 30)
    parts.add(1, "a", 10)
    parts.add(2, "b", 20)
    parts.add(1, "d", 40)
    parts.add(0, "later", 1000)
    assert take(index(), parts, at=40) == [("a", 10), ("b", 20), ("c", 30), ("d", 40)]


def test_batches_are_bounded_and_nothing_is_handed_twice() -> None:
    parts = Partitions()
    expected = []
    for i in range(12):
        parts.add(i % 3, f"o{i:02d}", 100 + i)
        expected.append((f"o{i:02d}", 100 + i))
    ix = index(batch_size=5)
    batches = [take(ix, parts, at=1000) for _ in range(4)]
    assert [len(b) for b in batches] == [5, 5, 2, 0]
    assert [item for b in batches for item in b] == expected


def test_cursor_does_not_reread_what_was_handed() -> None:
    parts = Partitions()
    for i in range(1000):
        parts.add(i % 4, f"o{i}", i)
    ix = index(batch_size=10_000)
    counting = Counting(parts.source())
    assert len(take(ix, counting, at=499)) == 500
    assert counting.read == 500  # stopped at the bound: the later keys were not read
    counting.read = 0
    assert take(ix, counting, at=499) == []
    assert counting.read == 0
    assert len(take(ix, counting, at=599)) == 100
    assert counting.read == 100  # only the new range


def test_after_a_rebalance_handed_keys_are_read_once_not_every_tick() -> None:
    parts = Partitions()
    for i in range(300):
        parts.add(i % 3, f"o{i}", i)
    ix = index(batch_size=10_000)
    counting = Counting(parts.source())
    assert len(take(ix, counting, at=1000, epoch=1)) == 300  # handed, not cancelled yet
    counting.read = 0
    assert take(ix, counting, at=1000, epoch=2) == []  # marked: not handed twice
    assert counting.read == 300  # the rebalance re-reads each partition from its start...
    counting.read = 0
    assert take(ix, counting, at=1000, epoch=2) == []
    assert counting.read == 0  # ...once


def test_a_deadline_written_behind_the_cursor_is_handed_next_time() -> None:
    parts = Partitions()
    parts.add(0, "a", 100)
    ix = index()
    assert take(ix, parts, at=200) == [("a", 100)]
    key = parts.add(0, "late", 50)  # e.g. an order created with an already passed deadline
    ix.written(0, key)
    assert take(ix, parts, at=200) == [("late", 50)]


def test_handed_entries_are_handed_again_only_after_redeliver_after() -> None:
    parts = Partitions()
    parts.add(0, "a", 1)
    parts.add(1, "b", 2)
    parts.add(1, "c", 3)
    ix = index(redeliver_after=60.0)
    assert take(ix, parts, at=10, clock=0.0) == [("a", 1), ("b", 2), ("c", 3)]
    ix.removed(1, parts.remove(1, "b", 2))  # the agent cancelled b
    assert take(ix, parts, at=10, clock=30.0) == []
    assert take(ix, parts, at=10, clock=59.9) == []
    assert sorted(take(ix, parts, at=10, clock=60.0)) == [("a", 1), ("c", 3)]
    assert take(ix, parts, at=10, clock=61.0) == []  # stamped again
    parts.remove(0, "a", 1)  # gone without a cancel on this worker: the mark is dropped
    assert take(ix, parts, at=10, clock=121.0) == [("c", 3)]
    assert list(ix.marked(0)) == []


def test_undo_gives_the_batch_back() -> None:
    parts = Partitions()
    for i in range(5):
        parts.add(i % 2, f"o{i}", i)
    ix = index(batch_size=3)
    source = parts.source()
    ix.sync(source.partitions(), 0)
    first = ix.take(source, 100, 0.0)
    assert first.due == [("o0", 0), ("o1", 1), ("o2", 2)]
    ix.undo(first)
    assert take(ix, parts, at=100) == [("o0", 0), ("o1", 1), ("o2", 2)]
    assert take(ix, parts, at=100) == [("o3", 3), ("o4", 4)]
    # a redelivery that fails stays due for redelivery
    again = ix.take(parts.source(), 100, 100.0)
    assert len(again.due) == 3
    ix.undo(again)
    assert len(take(ix, parts, at=100, clock=100.5)) == 3


def test_rebalance_drops_lost_partitions_and_reads_new_ones_from_their_start() -> None:
    parts = Partitions()
    parts.add(0, "p0", 1)
    parts.add(1, "p1", 2)
    parts.add(2, "p2", 3)
    ix = index()

    def owned(*partitions: int) -> SortedSource:
        return SortedSource(
            (p, k, v) for p, kv in parts.data.items() if p in partitions for k, v in kv.items())

    assert take(ix, owned(0, 1), at=10, epoch=1) == [("p0", 1), ("p1", 2)]
    # partition 0 moves away, partition 2 arrives
    assert take(ix, owned(1, 2), at=10, clock=1.0, epoch=2) == [("p2", 3)]
    assert ix.cursor(0) is None and list(ix.marked(0)) == []
    assert list(ix.marked(1)) == [deadline_key("p1", 2)]  # kept: not handed twice
    # partition 0 comes back: its entry is handed again at once, not after redeliver_after
    assert take(ix, owned(0, 1, 2), at=10, clock=2.0, epoch=3) == [("p0", 1)]


def test_rebalance_reads_kept_partitions_from_their_start_again() -> None:
    parts = Partitions()
    parts.add(0, "a", 5)
    ix = index()
    assert take(ix, parts, at=10, epoch=1) == [("a", 5)]
    ix.removed(0, parts.remove(0, "a", 5))
    # lost and regained between two ticks: the new owner wrote a passed deadline meanwhile
    parts.add(0, "written-elsewhere", 3)
    assert take(ix, parts, at=10, epoch=1) == []  # same epoch: the cursor is past it
    assert take(ix, parts, at=10, epoch=2) == [("written-elsewhere", 3)]


def test_old_buckets_are_handed_over_whole_once_due_or_not() -> None:
    parts = Partitions()
    parts.add(0, "new", 50)
    parts.bucket(0, legacy_key(1000, 0), {"old-due": 1000, "old-due-2": 1001})
    parts.bucket(0, legacy_key(9_000_000, 0), {"old-later": 9_000_000})
    parts.bucket(1, legacy_key(5000, 1), {"other": 5000})
    ix = index()
    batch = take(ix, parts, at=2000)
    assert batch == [("new", 50), ("old-due", 1000), ("old-due-2", 1001),
                     ("old-later", 9_000_000), ("other", 5000)]
    assert ix.legacy_keys(0) == {legacy_key(1000, 0), legacy_key(9_000_000, 0)}
    assert take(ix, parts, at=2000) == []  # once per process
    assert take(ix, parts, at=2000, epoch=1) == []  # a rebalance keeping the partition: still once


def test_old_buckets_are_split_into_bounded_batches() -> None:
    parts = Partitions()
    parts.bucket(0, legacy_key(0, 0), {f"a{i}": i for i in range(5)})
    parts.bucket(0, legacy_key(5000, 0), {"b0": 5000, "b1": 5001})
    ix = index(batch_size=3)
    handed = [take(ix, parts, at=0) for _ in range(4)]
    assert [len(b) for b in handed] == [3, 3, 1, 0]
    assert [a for b in handed for a, _ in b] == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]


def test_old_bucket_progress_survives_cancels_and_undo() -> None:
    parts = Partitions()
    parts.bucket(0, legacy_key(0, 0), {f"a{i}": i for i in range(4)})
    parts.bucket(0, legacy_key(5000, 0), {"b0": 5000})
    ix = index(batch_size=2)
    assert take(ix, parts, at=0) == [("a0", 0), ("a1", 1)]
    # the agent converted a0 and a2 meanwhile (the bucket shrank)
    parts.bucket(0, legacy_key(0, 0), {"a1": 1, "a3": 3})
    source = parts.source()
    failed = ix.take(source, 0, 0.0)
    assert failed.due == [("a3", 3), ("b0", 5000)]
    ix.undo(failed)
    assert take(ix, parts, at=0) == [("a3", 3), ("b0", 5000)]
    assert take(ix, parts, at=0) == []


def test_a_partition_regained_hands_its_old_buckets_again() -> None:
    parts = Partitions()
    parts.bucket(0, legacy_key(0, 0), {"a": 1})
    ix = index()
    assert take(ix, parts, at=0, epoch=1) == [("a", 1)]
    assert take(ix, SortedSource([]), at=0, epoch=2) == []  # partition 0 lost
    assert take(ix, parts, at=0, epoch=3) == [("a", 1)]


# ----------------------------------------------------------------------
# Through a real Faust app (memory store), writes inside an agent


class Harness:
    """A Faust app with the deadline table and an agent that applies ops as the owning agent would."""

    def __init__(self, tmp_path: Path, *, fail: int = 0, **options: Any) -> None:
        self.app = faust.App(
            f"t-deadlines-{uuid.uuid4().hex[:8]}", broker="kafka://localhost:9092",
            store="memory://", datadir=str(tmp_path), key_serializer="raw",
        )
        self.handed: list[list[tuple[str, int]]] = []
        self.fail = fail
        self.deadlines = Deadlines(self.app, "order-deadlines", self.on_due, partitions=4, **options)

        @self.app.agent()
        async def owner(stream: Any) -> None:
            async for event in stream.events():
                op = event.value
                if op["op"] == "schedule":
                    self.deadlines.schedule(op["id"], op["deadline"])
                elif op["op"] == "cancel":
                    self.deadlines.cancel(op["id"], op["deadline"])
                elif op["op"] == "put":  # a raw table write (an old-format bucket)
                    self.deadlines.table[op["key"].encode()] = encode_bucket(op["value"])
                elif op["op"] == "delete":
                    del self.deadlines.table[op["key"].encode()]

        self.owner = owner

    async def on_due(self, batch: Sequence[tuple[str, int]]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("the command topic is unreachable")
        self.handed.append(list(batch))

    @property
    def store(self) -> dict[Any, Any]:
        return self.deadlines.table.data.data


async def test_schedule_and_cancel_write_one_small_key_each(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "schedule", "id": "o-1", "deadline": 1_000}, partition=2)
        await agent.put({"op": "schedule", "id": "o-2", "deadline": 2_000}, partition=3)
        assert h.store == {deadline_key("o-1", 1_000): b"2", deadline_key("o-2", 2_000): b"3"}
        await agent.put({"op": "cancel", "id": "o-1", "deadline": 1_000}, partition=2)
        await agent.put({"op": "cancel", "id": "never", "deadline": 5}, partition=2)  # absent: fine
    assert h.store == {deadline_key("o-2", 2_000): b"3"}
    assert sorted(h.deadlines.pending()) == [("o-2", 2_000)]


async def test_writes_outside_an_agent_are_refused_clearly(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(RuntimeError, match="current event"):
        h.deadlines.schedule("o-1", 1)
    with pytest.raises(RuntimeError, match="current event"):
        h.deadlines.cancel("o-1", 1)


def test_changelog_is_compacted_with_the_cleaning_configs(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    topic = h.deadlines.table.changelog_topic
    assert topic.get_topic_name().endswith("-order-deadlines-changelog")
    assert dict(topic.config or {}) == dict(CHANGELOG_TOPIC_CONFIGS)
    assert topic.compacting and not topic.deleting
    assert h.deadlines.table.key_serializer == "raw"


async def test_close_due_hands_batches_in_order_and_not_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, batch_size=3)
    async with h.owner.test_context() as agent:
        for i, partition in enumerate([0, 1, 2, 3, 0, 1, 2]):
            await agent.put({"op": "schedule", "id": f"o{i}", "deadline": 100 + i}, partition=partition)
        await agent.put({"op": "schedule", "id": "later", "deadline": 10_000}, partition=1)
        assert await h.deadlines.close_due(at_ms=1_000) == 7
        assert h.handed == [[("o0", 100), ("o1", 101), ("o2", 102)],
                            [("o3", 103), ("o4", 104), ("o5", 105)], [("o6", 106)]]
        assert await h.deadlines.close_due(at_ms=1_000) == 0  # handed, not cancelled yet: no repeat
        for i, partition in enumerate([0, 1, 2, 3, 0, 1, 2]):
            await agent.put({"op": "cancel", "id": f"o{i}", "deadline": 100 + i}, partition=partition)
        await agent.put({"op": "schedule", "id": "past", "deadline": 50}, partition=3)
        assert await h.deadlines.close_due(at_ms=1_000) == 1
        assert h.handed[-1] == [("past", 50)]
    assert sorted(h.deadlines.pending()) == [("later", 10_000), ("past", 50)]


async def test_a_failed_hand_over_is_handed_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, fail=1)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "schedule", "id": "o", "deadline": 1}, partition=0)
    with pytest.raises(ConnectionError):
        await h.deadlines.close_due(at_ms=10)
    assert await h.deadlines.close_due(at_ms=10) == 1
    assert h.handed == [[("o", 1)]]


async def test_nothing_is_handed_while_the_app_rebalances(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "schedule", "id": "o", "deadline": 1}, partition=0)
    h.app.rebalancing = True
    assert await h.deadlines.close_due(at_ms=10) == 0
    h.app.rebalancing = False
    assert await h.deadlines.close_due(at_ms=10) == 1


async def test_a_rebalance_through_the_app_forgets_lost_partitions(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "schedule", "id": "kept", "deadline": 1}, partition=0)
        await agent.put({"op": "schedule", "id": "moved", "deadline": 2}, partition=1)
    assert await h.deadlines.close_due(at_ms=10) == 2
    # Faust's memory store drops a revoked partition's keys on recovery...
    moved_key = deadline_key("moved", 2)
    h.store.pop(moved_key)
    h.app.rebalancing_count += 1
    assert await h.deadlines.close_due(at_ms=10) == 0
    assert 1 not in h.deadlines.index.owned
    # ...and restores them from the changelog when the partition comes back
    h.store[moved_key] = b"1"
    h.app.rebalancing_count += 1
    assert await h.deadlines.close_due(at_ms=10) == 1
    assert h.handed[-1] == [("moved", 2)]  # at once; "kept" is not handed twice


async def test_old_buckets_are_converted(tmp_path: Path) -> None:
    """An old-format table: its entries are handed over once, then schedule/cancel empty the buckets."""
    h = Harness(tmp_path)
    due_bucket, later_bucket = legacy_key(1_000, 2), legacy_key(90_000, 2)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "put", "key": due_bucket.decode(), "value": {"a": 1_000, "b": 1_001}},
                        partition=2)
        await agent.put({"op": "put", "key": later_bucket.decode(), "value": {"c": 90_000}}, partition=2)
        await agent.put({"op": "schedule", "id": "n", "deadline": 500}, partition=2)
        assert sorted(h.deadlines.pending()) == [("a", 1_000), ("b", 1_001), ("c", 90_000), ("n", 500)]

        assert await h.deadlines.close_due(at_ms=2_000) == 4
        assert h.handed == [[("n", 500), ("a", 1_000), ("b", 1_001), ("c", 90_000)]]
        assert await h.deadlines.close_due(at_ms=2_000) == 0  # once

        # what the owning agents do: expire (cancel) the due ones, re-assert the later one
        for aggregate_id, deadline in [("n", 500), ("a", 1_000), ("b", 1_001)]:
            await agent.put({"op": "cancel", "id": aggregate_id, "deadline": deadline}, partition=2)
        assert decode_bucket(h.store[later_bucket]) == {"c": 90_000}
        assert due_bucket not in h.store  # emptied: deleted
        await agent.put({"op": "schedule", "id": "c", "deadline": 90_000}, partition=2)
        assert later_bucket not in h.store
        assert h.store == {deadline_key("c", 90_000): b"2"}
        assert h.deadlines.index.legacy_keys(2) == set()

    assert await h.deadlines.close_due(at_ms=89_999) == 0
    assert await h.deadlines.close_due(at_ms=90_000) == 1
    assert h.handed[-1] == [("c", 90_000)]


async def test_cancel_converts_an_old_bucket_before_the_timer_listed_it(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    bucket = legacy_key(7_000, 1)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "put", "key": bucket.decode(), "value": {"x": 7_000, "y": 7_001}},
                        partition=1)
        assert h.deadlines.index.legacy_keys(1) is None
        await agent.put({"op": "cancel", "id": "x", "deadline": 7_000}, partition=1)
        await agent.put({"op": "cancel", "id": "y", "deadline": 9_999}, partition=1)  # other deadline: kept
        assert decode_bucket(h.store[bucket]) == {"y": 7_001}
        await agent.put({"op": "cancel", "id": "y", "deadline": 7_001}, partition=1)
        assert h.store == {}


async def test_once_no_old_bucket_is_left_cancel_does_not_look_for_one(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    async with h.owner.test_context() as agent:
        await agent.put({"op": "schedule", "id": "x", "deadline": 7_000}, partition=1)
        await h.deadlines.close_due(at_ms=0)  # lists partition 1: no old bucket
        assert h.deadlines.index.legacy_keys(1) == set()
        # An old bucket appearing now (impossible in practice) is not looked for any more,
        # which is what makes the common path free.
        bucket = legacy_key(7_000, 1)
        await agent.put({"op": "put", "key": bucket.decode(), "value": {"x": 7_000}}, partition=1)
        await agent.put({"op": "cancel", "id": "x", "deadline": 7_000}, partition=1)
        assert h.store == {bucket: encode_bucket({"x": 7_000})}


# ----------------------------------------------------------------------
# A real rocksdict database, opened as Faust's RocksDB store opens a partition


def open_partition_db(path: Path) -> Any:
    return RocksDBOptions(block_cache_size=8 * 1024**2, write_buffer_size=4 * 1024**2).open(path)


def test_rocksdict_partition_reads_in_key_order_from_the_cursor(tmp_path: Path) -> None:
    rng = random.Random(3)
    dbs = {p: open_partition_db(tmp_path / f"p{p}.db") for p in range(3)}
    try:
        expected: list[tuple[str, int]] = []
        for i in range(3000):
            deadline = rng.randrange(0, 100_000)
            partition = rng.randrange(3)
            dbs[partition].put(deadline_key(f"o{i}", deadline), str(partition).encode())
            expected.append((f"o{i}", deadline))
        for p, db in dbs.items():  # what else lives in a partition DB: Faust's offset, old buckets
            db.put(Store.offset_key, b"42")
            db.put(legacy_key(5_000, p), b'{"old-%d": 5000}' % p)
        expected.sort(key=lambda item: (item[1], item[0].encode()))

        source = Counting(RdictSource(dbs))
        ix = index(batch_size=700)
        ix.sync(source.partitions(), 0)
        handed: list[tuple[str, int]] = []
        for _ in range(3):
            handed += ix.take(source, 49_999, 0.0).due
        due = [item for item in expected if item[1] <= 49_999]
        assert handed[: len(due)] == due  # merged across partitions, in deadline order
        assert [a for a, _ in handed[len(due):]] == ["old-0", "old-1", "old-2"]  # then old buckets

        source.read = 0
        assert ix.take(source, 49_999, 0.0).due == []
        assert source.read == 0  # the cursors: nothing re-read
        rest = []
        while batch := ix.take(source, 100_000, 0.0).due:
            rest += batch
        assert rest == [item for item in expected if item[1] > 49_999]
        # each later key read once, but for the merge's look-ahead (one key per partition)
        # when a batch filled up; the old buckets and Faust's offset key never
        full_batches = len(rest) // 700
        assert len(rest) <= source.read <= len(rest) + 3 * full_batches

        # a key deleted without a cancel here is forgotten; the others are handed again, once
        gone = deadline_key(*rest[0])
        dbs[next(p for p in dbs if dbs[p].get(gone) is not None)].delete(gone)
        again = []
        while batch := ix.take(source, 100_000, 61.0).due:
            again += batch
        assert sorted(again) == sorted(item for item in expected if item != rest[0])
    finally:
        for db in dbs.values():
            db.close()


def test_rocksdict_source_reads_old_buckets_as_json(tmp_path: Path) -> None:
    db = open_partition_db(tmp_path / "p0.db")
    try:
        db.put(legacy_key(5_000, 0), b'{"a": 5000, "b": 5001}')
        db.put(deadline_key("n", 1), b"0")
        source = RdictSource({0: db})
        assert list(source.keys(0, LEGACY_LOW, LEGACY_HIGH)) == [legacy_key(5_000, 0)]
        assert list(source.keys(0, b"", NEW_HIGH)) == [deadline_key("n", 1)]
        assert source.bucket(0, legacy_key(5_000, 0)) == {"a": 5000, "b": 5001}
        assert source.has(0, deadline_key("n", 1)) and not source.has(0, deadline_key("n", 2))
    finally:
        db.close()
