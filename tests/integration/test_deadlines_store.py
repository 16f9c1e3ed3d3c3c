"""The deadline index on a real worker: Faust's RocksDB store, its changelog on the real broker.

A plain Faust app (no registry needed) whose agent plays the owning agent:
it schedules and cancels deadlines while processing commands keyed by the
aggregate, and on a hand-over it does what the order kernel does (re-check
the deadline: cancel a due one, schedule a later one again).  The tests
read the changelog topic itself with a plain confluent-kafka consumer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import ConfigResource

from streams.admin import TopicSettings, admin_client, delete_topics, ensure_topics
from tables.deadlines import (
    CHANGELOG_TOPIC_CONFIGS,
    Deadlines,
    deadline_key,
    legacy_key,
    now_ms,
    rocksdict_partition_dbs,
)
from tests.integration.pipeline_support import wait_until

pytestmark = pytest.mark.integration

PARTITIONS = 4


class Worker:
    """A worker with a deadline table and an owning agent fed by a command topic."""

    def __init__(self, bootstrap: str, app_id: str, commands: str, datadir: Path, *,
                 redeliver_after: float = 60.0, ignore: Callable[[str], bool] = lambda _: False) -> None:
        self.app = faust.App(
            app_id, broker=f"kafka://{bootstrap}", store="rocksdb://", datadir=str(datadir),
            topic_partitions=PARTITIONS, topic_replication_factor=1, table_standby_replicas=0,
            consumer_auto_offset_reset="earliest", web_enabled=False, key_serializer="raw",
        )
        self.commands = self.app.topic(commands, key_type=bytes, value_serializer="json",
                                       partitions=PARTITIONS)
        self.handed: list[list[tuple[str, int]]] = []
        self.ignore = ignore  # aggregates whose hand-over "gets lost" (the agent never acts)
        self.deadlines = Deadlines(self.app, "order-deadlines", self.on_due, interval=0.2,
                                   partitions=PARTITIONS, batch_size=50, redeliver_after=redeliver_after)
        self.partition_of: dict[str, int] = {}

        @self.app.agent(self.commands, name="owner")
        async def owner(stream: Any) -> None:
            async for event in stream.events():
                op = event.value
                self.partition_of[op["id"]] = event.message.partition
                if op["op"] == "schedule":
                    self.deadlines.schedule(op["id"], op["deadline"])
                elif op["op"] == "cancel":
                    self.deadlines.cancel(op["id"], op["deadline"])
                elif op["op"] == "due":  # the kernel's re-check of a hand-over
                    if op["deadline"] <= now_ms():
                        self.deadlines.cancel(op["id"], op["deadline"])
                    else:
                        self.deadlines.schedule(op["id"], op["deadline"])

    async def on_due(self, batch: Sequence[tuple[str, int]]) -> None:
        self.handed.append(list(batch))
        for aggregate_id, deadline in batch:
            if not self.ignore(aggregate_id):
                await self.send("due", aggregate_id, deadline)

    async def send(self, op: str, aggregate_id: str, deadline: int, partition: int | None = None) -> None:
        await self.commands.send(key=aggregate_id.encode(), partition=partition,
                                 value={"op": op, "id": aggregate_id, "deadline": deadline})

    def all_handed(self) -> list[tuple[str, int]]:
        return [item for batch in self.handed for item in batch]

    async def start(self) -> None:
        await self.app.start()
        await wait_until(lambda: len(rocksdict_partition_dbs(self.deadlines.table) or {}) == PARTITIONS
                         and not self.app.rebalancing, timeout=60, what="all partitions assigned")

    async def stop(self) -> None:
        await self.app.stop()


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Any]:
    """Every record of ``topic`` (all partitions, up to their current ends)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-reader-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    try:
        ends = {}
        for p in range(PARTITIONS):
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while any(ends[p] > 0 for p in ends) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            records.append(message)
            if message.offset() + 1 >= ends[message.partition()]:
                ends[message.partition()] = 0
        return records
    finally:
        consumer.close()


def topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    admin = admin_client(bootstrap)  # must outlive the future
    described = admin.describe_configs([resource])[resource].result(30)
    return {name: entry.value for name, entry in described.items()}


@pytest.fixture
def names(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Any:
    app_id = unique_name("deadlines")
    commands = f"{app_id}.commands"
    changelog = f"{app_id}-order-deadlines-changelog"
    ensure_topics(kafka_bootstrap, [TopicSettings(commands, PARTITIONS)])
    yield app_id, commands, changelog
    delete_topics(kafka_bootstrap, [commands, changelog])


async def test_rocksdb_worker_hands_due_deadlines_once_in_order_with_small_changelog_records(
    kafka_bootstrap: str, names: Any, tmp_path: Path,
) -> None:
    app_id, commands, changelog = names
    lost = {f"lost-{i}" for i in range(3)}
    worker = Worker(kafka_bootstrap, app_id, commands, tmp_path / "w1", redeliver_after=3.0,
                    ignore=lambda aggregate_id: aggregate_id in lost)
    await worker.start()
    try:
        now = now_ms()
        past = {f"past-{i}": now - 10_000 + i for i in range(120)}
        soon = {f"soon-{i}": now + 4_000 + i for i in range(40)}
        later = {f"later-{i}": now + 3_600_000 for i in range(20)}
        for aggregate_id in sorted(lost):
            past[aggregate_id] = now - 20_000
        for group in (past, soon, later):
            for aggregate_id, deadline in group.items():
                await worker.send("schedule", aggregate_id, deadline)
        for i in range(0, 40, 2):  # half the "soon" ones are cancelled before they are due
            await worker.send("cancel", f"soon-{i}", soon[f"soon-{i}"])
        kept_soon = {k: v for i, (k, v) in enumerate(soon.items()) if i % 2}

        expected = {**past, **kept_soon}
        await wait_until(lambda: set(worker.all_handed()) >= set(expected.items()), timeout=30,
                         what="every due deadline handed over")
        # the lost ones come back once, ~redeliver_after later; nothing else repeats
        await wait_until(lambda: sum(1 for a, _ in worker.all_handed() if a in lost) >= 2 * len(lost),
                         timeout=20, what="the lost hand-overs redelivered")
        handed = worker.all_handed()
        assert set(handed) == set(expected.items())
        repeats = [a for a in {a for a, _ in handed} if sum(1 for b, _ in handed if b == a) > 1]
        assert sorted(repeats) == sorted(lost)
        assert all(len(batch) <= 50 for batch in worker.handed)
        for batch in worker.handed:  # each batch in deadline order
            assert [d for _, d in batch] == sorted(d for _, d in batch)
        await wait_until(lambda: sorted(worker.deadlines.pending()) == sorted(
            [*later.items(), *((a, past[a]) for a in lost)]), timeout=20, what="only later and lost left")
    finally:
        await worker.stop()

    configs = topic_configs(kafka_bootstrap, changelog)
    for name, value in CHANGELOG_TOPIC_CONFIGS.items():
        assert configs[name] == value, name
    records = read_topic(kafka_bootstrap, changelog)
    assert records, "no changelog records"
    assert max(len(r.key()) + len(r.value() or b"") for r in records) < 100
    tombstones = {r.key() for r in records if r.value() is None}
    assert {deadline_key(a, d) for a, d in past.items() if a not in lost} <= tombstones
    assert all(r.partition() == int(r.value()) for r in records if r.value() is not None)

    # A restart on the same disk: what is still pending is handed again (a new process).
    again = Worker(kafka_bootstrap, app_id, commands, tmp_path / "w1")
    await again.start()
    try:
        await wait_until(lambda: {a for a, _ in again.all_handed()} >= lost, timeout=20,
                         what="pending due deadlines handed after a restart")
        # (commands not committed before the stop may be replayed: at least once)
        assert set(again.all_handed()) <= set(expected.items())
    finally:
        await again.stop()


async def test_old_bucketed_changelog_is_converted(
    kafka_bootstrap: str, names: Any, tmp_path: Path,
) -> None:
    app_id, commands, changelog = names
    # The changelog as the previous version left it: compacted, "<window>:<partition>" buckets.
    compacted = {"cleanup.policy": "compact"}
    ensure_topics(kafka_bootstrap, [TopicSettings(changelog, PARTITIONS, config=compacted)])
    now = now_ms()
    old: dict[int, dict[str, int]] = {
        p: {**{f"due-{p}-{i}": now - 60_000 + i for i in range(30)},
            **{f"later-{p}-{i}": now + 5_000 + 1_000 * i for i in range(3)}}
        for p in range(PARTITIONS)
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    buckets: dict[int, set[bytes]] = {p: set() for p in range(PARTITIONS)}
    for p, entries in old.items():
        by_bucket: dict[bytes, dict[str, int]] = {}
        for aggregate_id, deadline in entries.items():
            by_bucket.setdefault(legacy_key(deadline, p), {})[aggregate_id] = deadline
        for key, bucket in by_bucket.items():
            producer.produce(changelog, key=key, value=json.dumps(bucket).encode(), partition=p)
            buckets[p].add(key)
    assert producer.flush(30) == 0

    worker = Worker(kafka_bootstrap, app_id, commands, tmp_path / "w")
    # The hand-over's command must reach the aggregate's partition (where its bucket is).
    partition_of = {a: p for p, entries in old.items() for a in entries}

    async def on_due(batch: Sequence[tuple[str, int]]) -> None:
        worker.handed.append(list(batch))
        for aggregate_id, deadline in batch:
            await worker.send("due", aggregate_id, deadline, partition=partition_of[aggregate_id])

    worker.deadlines.on_due = on_due
    await worker.start()
    try:
        everything = {(a, d) for entries in old.values() for a, d in entries.items()}
        await wait_until(lambda: set(worker.all_handed()) >= everything, timeout=30,
                         what="every old entry handed over")
        assert len(worker.all_handed()) == len(everything)  # once, due or not
        later = {(a, d) for a, d in everything if a.startswith("later-")}
        await wait_until(lambda: set(worker.deadlines.pending()) == later, timeout=30,
                         what="due ones cancelled, later ones re-scheduled in the new format")
        assert all(worker.deadlines.index.legacy_keys(p) == set() for p in range(PARTITIONS))
        dbs = rocksdict_partition_dbs(worker.deadlines.table) or {}
        for p, db in dbs.items():
            assert not any(db.get(key) is not None for key in buckets[p])
            assert {k for k in db.keys() if k[:1] == b"\x00"} == {
                deadline_key(a, d) for a, d in later if partition_of[a] == p}
        # and the later ones fire from the new format when due
        await wait_until(lambda: set(worker.all_handed()) - everything == set() and
                         sum(1 for item in worker.all_handed() if item in later) == 2 * len(later),
                         timeout=30, what="later ones handed again when due")
    finally:
        await worker.stop()

    records = read_topic(kafka_bootstrap, changelog)
    tombstones = {(r.partition(), r.key()) for r in records if r.value() is None}
    assert {(p, k) for p, keys in buckets.items() for k in keys} <= tombstones


async def test_schedule_outside_the_agent_is_refused_on_a_worker(
    kafka_bootstrap: str, names: Any, tmp_path: Path,
) -> None:
    app_id, commands, _ = names
    worker = Worker(kafka_bootstrap, app_id, commands, tmp_path / "w")
    await worker.start()
    try:
        with pytest.raises(RuntimeError, match="current event"):
            worker.deadlines.schedule("o", now_ms())
        await asyncio.sleep(0)
    finally:
        await worker.stop()
