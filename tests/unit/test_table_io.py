"""streams.table_io on real rocksdict databases: batched writes, reads of pending writes, commit order."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import rocksdict

from streams.table_io import TableIO, json_bytes, json_value


class Store:
    """What TableIO asks of Faust's RocksDB store: a database per partition, and the key index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dbs: dict[int, rocksdict.Rdict] = {}
        self._key_index: dict[bytes, int] = {}

    def _db_for_partition(self, partition: int) -> rocksdict.Rdict:
        db = self.dbs.get(partition)
        if db is None:
            db = self.dbs[partition] = rocksdict.Rdict(str(self.root / f"p{partition}"),
                                                       rocksdict.Options(raw_mode=True))
        return db

    def close(self) -> None:
        for db in self.dbs.values():
            db.close()


class Producer:
    """Records what is handed over, and what each database held at that moment."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: list[tuple[str, bytes, bytes | None, int, bytes | None]] = []

    async def send(self, topic: str, key: bytes, value: bytes | None, partition: int,
                   timestamp: Any, headers: Any) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, partition, self.store._db_for_partition(partition).get(key)))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(SimpleNamespace(offset=len(self.sent) - 1))
        return done


def event(partition: int) -> Any:
    return SimpleNamespace(message=SimpleNamespace(partition=partition))


@pytest.fixture
def parts(tmp_path: Path) -> Any:
    store = Store(tmp_path)
    producer = Producer(store)
    changelog = SimpleNamespace(get_topic_name=lambda: "rows-changelog")
    table = SimpleNamespace(data=store, changelog_topic=changelog)
    app = SimpleNamespace(producer=producer)
    yield store, producer, table, app
    store.close()


def test_json_helpers_write_what_json_dumps_writes() -> None:
    value = {"a": [1, {"b": None}], "n": 1.5, "s": "x\\"}
    assert json_bytes(value) == json.dumps(value, separators=(",", ":")).encode()
    assert json_value(json_bytes(value)) == value


@pytest.mark.parametrize("value", [
    {"ü": "ö ✓"},  # UTF-8 where json.dumps escapes: the same value for every reader
    {"big": 2**70},  # beyond orjson's 64-bit integers: the standard library encodes it
    {1: "int key"},  # a key orjson refuses: the standard library makes it "1"
])
def test_json_helpers_read_back_what_json_reads(value: Any) -> None:
    assert json.loads(json_bytes(value)) == json.loads(json.dumps(value))
    assert json_value(json_bytes(value)) == json.loads(json.dumps(value))
    assert json_value(json.dumps(value).encode()) == json.loads(json.dumps(value))


async def test_batched_writes_reach_the_database_on_commit_and_reads_see_them_before(parts: Any) -> None:
    store, _producer, table, app = parts
    io = TableIO(app, table, batched=True)
    io.put(event(3), b"k1", {"v": 1})
    io.put_bytes(event(5), b"k2", b"raw")
    assert store._db_for_partition(3).get(b"k1") is None  # pending, not written yet
    assert io.get(event(3), b"k1") == {"v": 1}
    assert io.contains(event(5), b"k2")
    assert not io.contains(event(3), b"k2")  # another partition's database
    io.commit()
    assert store._db_for_partition(3).get(b"k1") == b'{"v":1}'
    assert store._db_for_partition(5).get(b"k2") == b"raw"
    assert store._key_index == {b"k1": 3, b"k2": 5}
    io.delete(event(3), b"k1")
    assert io.get(event(3), b"k1") is None and not io.contains(event(3), b"k1")
    assert store._db_for_partition(3).get(b"k1") == b'{"v":1}'  # the delete is pending
    await io.flush()
    assert store._db_for_partition(3).get(b"k1") is None


async def test_a_changelog_record_is_handed_over_only_after_its_database_has_the_write(parts: Any) -> None:
    store, producer, table, app = parts
    io = TableIO(app, table, batched=True)
    io.put(event(1), b"a", {"n": 1})
    io.put(event(1), b"a", {"n": 2})  # the last write of a key wins, in the store and the changelog order
    io.delete(event(2), b"b")
    await io.flush()
    assert [(key, value, partition, held) for _t, key, value, partition, held in producer.sent] == [
        (b"a", b'{"n":1}', 1, b'{"n":2}'),
        (b"a", b'{"n":2}', 1, b'{"n":2}'),
        (b"b", None, 2, None),
    ]
    assert store._db_for_partition(1).get(b"a") == b'{"n":2}'


async def test_writes_that_nobody_flushes_are_committed_by_the_queue_task(parts: Any) -> None:
    store, producer, table, app = parts
    io = TableIO(app, table, batched=True)
    io.put(event(0), b"x", [1])
    for _ in range(5):
        await asyncio.sleep(0)
    assert store._db_for_partition(0).get(b"x") == b"[1]"
    assert [key for _t, key, *_rest in producer.sent] == [b"x"]


async def test_unbatched_writes_reach_the_database_at_once(parts: Any) -> None:
    store, _producer, table, app = parts
    io = TableIO(app, table)
    io.put(event(4), b"k", {"v": 2})
    assert store._db_for_partition(4).get(b"k") == b'{"v":2}'
    await io.flush()


async def test_acknowledged_changelog_offsets_are_persisted_at_most_every_persist_every(
    parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _producer, table, app = parts
    persisted: list[tuple[Any, int]] = []
    store.set_persisted_offset = lambda tp, offset: persisted.append((tp.partition, offset))
    clock = [1000.0]
    monkeypatch.setattr("streams.table_io.time.monotonic", lambda: clock[0])
    io = TableIO(app, table, batched=True, persist_every=1.0)
    io.put(event(1), b"a", {"n": 1})
    await io.flush()
    for _ in range(3):
        await asyncio.sleep(0)  # the acks' callbacks note the offsets
    io.persist_offsets()
    assert persisted == [(1, 0)]  # the first call writes
    io.put(event(1), b"a", {"n": 2})
    io.put(event(2), b"b", {"n": 3})
    await io.flush()
    for _ in range(3):
        await asyncio.sleep(0)
    clock[0] += 0.5
    io.persist_offsets()
    assert persisted == [(1, 0)]  # within a second of the last write: nothing yet, nothing lost
    clock[0] += 0.6
    io.persist_offsets()
    assert sorted(persisted[1:]) == [(1, 1), (2, 2)]  # the newest acknowledged offset per partition
