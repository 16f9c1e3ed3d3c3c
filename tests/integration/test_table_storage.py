"""tables.storage on the real broker: the changelog bulk loader and a worker recovering through it.

The loader must leave a partition database exactly as Faust's per-record
recovery would (last value per key, tombstones deleting, the last applied
offset persisted), and a worker with a large changelog must come up with
every row, having replayed only the tail the old way; a warm restart must
not bulk-load at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer
from faust.types import TP

from streams.admin import TopicSettings, ensure_topics
from streams.app import create_app
from streams.settings import Settings
from tables import storage

pytestmark = pytest.mark.integration

PARTITIONS = 2
OFFSET_KEY = b"__faust\0offset__"


def _produce(servers: str, topic: str, records: list[tuple[int, bytes, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": servers, "linger.ms": 20, "acks": "all"})
    for partition, key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, partition=partition)
                break
            except BufferError:
                producer.poll(0.1)
    assert producer.flush(60) == 0


def test_loader_applies_the_changelog_like_faust_would(
    settings: Settings, unique_name: Callable[[str], str], tmp_path: Path,
) -> None:
    topic = unique_name("changelog")
    servers = settings.kafka_bootstrap_servers
    ensure_topics(servers, [TopicSettings(topic, PARTITIONS, config={"cleanup.policy": "compact"})])
    records: list[tuple[int, bytes, bytes | None]] = []
    for index in range(12_000):
        records.append((0, f"k{index}".encode(), b"v1"))
    for index in range(0, 12_000, 3):
        records.append((0, f"k{index}".encode(), b"v2"))  # a later value wins
    for index in range(1, 12_000, 3):
        records.append((0, f"k{index}".encode(), None))  # tombstones delete
    for index in range(100):
        records.append((1, f"small{index}".encode(), b"x"))  # below the bulk threshold
    _produce(servers, topic, records)

    options = storage.BoundedRocksDBOptions(storage.MemoryBudget(8))
    dbs = {p: options.open(tmp_path / f"p{p}.db") for p in range(PARTITIONS)}
    dbs[0].put(OFFSET_KEY, b"-1")  # as if Faust had persisted "nothing applied yet"

    def persisted(tp: TP) -> int | None:
        raw = dbs[tp.partition].get(OFFSET_KEY)
        return None if raw is None else int(raw)

    loader = storage.ChangelogLoader(
        servers, "t", db_for=dbs.__getitem__, persisted_offset=persisted,
        set_persisted_offset=lambda tp, offset: dbs[tp.partition].put(
            OFFSET_KEY, str(offset).encode()))
    tps = [TP(topic, p) for p in range(PARTITIONS)]
    try:
        assert loader.start(tps)
        deadline = time.monotonic() + 60
        while not loader.step(1.0):
            assert time.monotonic() < deadline, "loader never finished"
    finally:
        loader.close()

    assert loader.applied == 12_000 + 4_000 + 4_000
    rows = {k: v for k, v in dbs[0].items() if k != OFFSET_KEY}
    expected = {f"k{i}".encode(): (b"v2" if i % 3 == 0 else b"v1")
                for i in range(12_000) if i % 3 != 1}
    assert rows == expected
    assert persisted(TP(topic, 0)) == 20_000 - 1  # the last offset applied, as Faust stores it
    assert list(dbs[1].keys()) == []  # 100 records: left to Faust's recovery
    assert persisted(TP(topic, 1)) is None

    # Nothing new: a second loader finds nothing to do.
    again = storage.ChangelogLoader(servers, "t", db_for=dbs.__getitem__,
                                    persisted_offset=persisted,
                                    set_persisted_offset=lambda tp, offset: None)
    try:
        assert not again.start(tps)
    finally:
        again.close()
    for db in dbs.values():
        db.close()


def _big_table(app: object) -> None:
    app.Table("big", key_type=bytes, value_type=None, partitions=4, default=None)  # type: ignore[attr-defined]


async def _run_until_recovered(settings: Settings) -> tuple[dict[bytes, bytes], float]:
    app = create_app(settings, registrars=[_big_table])
    began = time.monotonic()
    await app.start()
    try:
        while not (app.consumer.assignment() and app.tables.recovery.completed.is_set()):
            assert time.monotonic() - began < 90, "worker not recovered in 90 s"
            await asyncio.sleep(0.05)
        took = time.monotonic() - began
        rows = dict(app.tables["big"].data._iteritems())
    finally:
        await app.stop()
    return rows, took


def test_a_worker_bulk_loads_a_large_changelog_then_restarts_warm(
    app_settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tables.storage")
    changelog = f"{app_settings.app_id}-big-changelog"
    servers = app_settings.kafka_bootstrap_servers
    ensure_topics(servers, [TopicSettings(changelog, 4, config={"cleanup.policy": "compact"})])
    records = [(index % 4, f"row-{index}".encode(), f"value-{index}".encode())
               for index in range(40_000)]
    _produce(servers, changelog, records)

    rows, cold = asyncio.run(_run_until_recovered(app_settings))
    assert rows == {key: value for _p, key, value in records}
    loaded = [r.getMessage() for r in caplog.records if "table big loaded" in r.getMessage()]
    assert len(loaded) == 1 and loaded[0].startswith("table big loaded: 40,000 records"), loaded

    caplog.clear()
    rows, warm = asyncio.run(_run_until_recovered(app_settings))
    assert len(rows) == 40_000
    assert not [r for r in caplog.records if "loading table" in r.getMessage()]
    print(f"\n40,000-row table: cold start + recovery {cold:.1f} s, warm restart {warm:.1f} s")
