"""Persisted deadlines, one table key per deadline, handed over by a timer.

Why not Faust's windowed tables and ``on_window_close``: windows restored from
the changelog are never registered for expiry (faust-streaming #385, #193),
and one ``last_closed_window`` covers all partitions, so a deadline would be
lost across a restart or a rebalance.  Here a deadline is a plain entry of a
changelog-backed table.

Layout.  Key = the deadline as 8 bytes big-endian epoch ms, then the
aggregate id in UTF-8; value = the partition number in ASCII digits (1-2
bytes, raw: no JSON encoding on the write path).
The entry is written while the owning agent processes an event of the
aggregate (Faust's *current event*), so it lives in the aggregate's partition,
moves with it on a rebalance and is restored from the changelog with it.
Scheduling or cancelling writes one changelog record of about fifty bytes
(key and value together at most :data:`MAX_AGGREGATE_ID_BYTES` + 8 + a few
digits), however many deadlines are pending: no record grows with the index.

Hand-over.  RocksDB keeps each partition's keys sorted, and big-endian
milliseconds sort by time, so the due deadlines of a partition are a prefix of
its keys.  ``app.timer`` runs :meth:`Deadlines.close_due` on every worker;
it reads each partition this worker owns from a cursor up to "now" (an
iterator upper bound, so RocksDB stops there), merges the partitions in
deadline order and gives the due ``(aggregate_id, deadline_ms)`` pairs to
``on_due`` in batches of at most ``batch_size``.  ``on_due`` sends keyed
commands so the agent that owns each aggregate decides, re-checking its
state, and cancels the entry.  The cursor means nothing is re-read once
handed; a handed entry is remembered, and handed again only if it is still
present ``redeliver_after`` seconds later (a command lost in a rebalance).
A schedule behind a cursor moves the cursor back, so a deadline that is due
when written is handed on the next tick.  After a rebalance, everything about
partitions this worker no longer owns is dropped and every owned partition
is read from its start again (what is still marked as handed is not handed
twice).  Nothing is handed while Faust rebalances or recovers (the restored
state is incomplete then).

Hand-over is at least once: a crash or a failed ``on_due`` hands again.
This module never decides anything itself; an entry leaves the index only
through :meth:`Deadlines.cancel`.

Changelog.  Compacted, with small segments and a low dirty ratio
(:data:`CHANGELOG_TOPIC_CONFIGS`): a segment becomes cleanable once rolled
(after an hour or 64 MiB), the cleaner then removes fired deadlines, and their
tombstones an hour after that, instead of the broker defaults (a week, 1 GiB,
50 % dirty, a day).  The worker creates the changelog topic with these configs
before its consumer joins, as Faust would (``PaystreamApp.faust_topic_settings``);
neither alters an existing topic, so a changelog created by an older version
keeps its configs until an operator alters them (``kafka-configs --alter``).

The old bucketed format.  Earlier versions kept ``"<window start ms,
15 digits>:<partition>" -> {aggregate_id: deadline_ms}`` in the same table
(windows of 5000 ms).  Those ASCII keys start with a digit (0x30-0x39) and
new keys with 0x00 (any deadline below 2**56 ms, some two million years), so
old buckets sort after every new key.  The first time the timer reads, or a
write touches, a partition this worker was assigned, the partition's old
buckets are listed (one seek).  The timer then hands *all* their entries over
once per assignment to this process (due or not), in batches; the owning
agent re-checks each: a due one expires and is cancelled, a not-yet-due one
is scheduled again.
:meth:`Deadlines.schedule` and :meth:`Deadlines.cancel` remove the
aggregate's entry of that deadline from the old bucket of its window (deleting
the bucket when it empties) while the partition still holds old buckets; once
a partition is known to hold none, this costs a dictionary lookup.

The access to the RocksDB store's partition databases is Faust-private; it
is isolated in :func:`rocksdict_partition_dbs`.  Any other store (the
``memory://`` store of unit tests) falls back to sorting each partition's
keys on every read.

One mechanism for every timer of the pipeline: order.expired here, and
invoice.overdue and subscription.expired in the payment domain.
"""

from __future__ import annotations

import bisect
import heapq
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

import faust
from faust.types import EventT

from streams import catalog
from streams.table_io import TableIO

logger = logging.getLogger(__name__)

#: ``on_due(batch)``: due ``(aggregate_id, deadline_ms)`` pairs: repeats first, then the
#: newly due in deadline order, then entries of old-format buckets.
OnDue = Callable[[Sequence[tuple[str, int]]], Awaitable[None]]

#: Topic configs of the changelog: compacted, segments rolled hourly or at
#: 64 MiB so the cleaner reaches tombstones, cleaned at 10 % dirty, and a
#: tombstone kept an hour after cleaning.  A reader that misses a tombstone
#: (down longer than that) keeps a stale entry, which the timer hands over
#: and the owning agent cancels after re-checking: it heals itself.
CHANGELOG_TOPIC_CONFIGS: Mapping[str, str] = {
    "cleanup.policy": "compact",
    "segment.ms": str(60 * 60 * 1000),
    "segment.bytes": str(64 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": str(60 * 60 * 1000),
}

#: Deadlines are epoch ms below 2**56 (two million years): the key's first byte is 0.
MAX_DEADLINE_MS = (1 << 56) - 1
#: Longest aggregate id accepted, in UTF-8 bytes (keeps every record far below 1 KiB).
MAX_AGGREGATE_ID_BYTES = 512
_STAMP = 8

#: All keys of the current format lie in [NEW_LOW, NEW_HIGH).
NEW_LOW, NEW_HIGH = b"", b"\x01"
#: All keys of the old bucketed format lie in [LEGACY_LOW, LEGACY_HIGH) (a digit first).
LEGACY_LOW, LEGACY_HIGH = b"0", b":"
#: Window of the old bucketed format.
LEGACY_WINDOW_MS = 5_000
_LEGACY_KEY = re.compile(rb"(\d{15}):(\d+)")


def now_ms() -> int:
    """Wall-clock epoch milliseconds (the clock deadlines are compared with)."""
    return time.time_ns() // 1_000_000


# ----------------------------------------------------------------------
# Key codec


def deadline_key(aggregate_id: str, deadline_ms: int) -> bytes:
    """The table key of one deadline: 8-byte big-endian ``deadline_ms`` + the id in UTF-8."""
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int):
        raise TypeError(f"deadline_ms must be an int of epoch ms, not {deadline_ms!r}")
    if not 0 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms {deadline_ms} is outside 0..{MAX_DEADLINE_MS}")
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise ValueError(f"aggregate_id must be a non-empty str, not {aggregate_id!r}")
    ident = aggregate_id.encode()
    if len(ident) > MAX_AGGREGATE_ID_BYTES:
        raise ValueError(f"aggregate_id is {len(ident)} bytes; at most {MAX_AGGREGATE_ID_BYTES}")
    return deadline_ms.to_bytes(_STAMP, "big") + ident


def is_deadline_key(key: bytes) -> bool:
    """Whether ``key`` is a key of the current format."""
    return len(key) > _STAMP and key[0] == 0


def parse_key(key: bytes) -> tuple[str, int]:
    """``(aggregate_id, deadline_ms)`` of a key made by :func:`deadline_key`."""
    if not is_deadline_key(key):
        raise ValueError(f"{key!r} is not a deadline key")
    return key[_STAMP:].decode(), int.from_bytes(key[:_STAMP], "big")


def due_bound(at_ms: int) -> bytes:
    """The smallest key that is not due at ``at_ms``: every key below it is due."""
    return min(max(at_ms + 1, 0), MAX_DEADLINE_MS + 1).to_bytes(_STAMP, "big")


def key_after(key: bytes) -> bytes:
    """The smallest key greater than ``key``."""
    return key + b"\x00"


def legacy_key(deadline_ms: int, partition: int) -> bytes:
    """The old-format bucket key that held ``deadline_ms`` in ``partition``."""
    window = deadline_ms - deadline_ms % LEGACY_WINDOW_MS
    return f"{window:015d}:{partition}".encode()


def is_legacy_key(key: bytes) -> bool:
    """Whether ``key`` is an old-format bucket key."""
    return _LEGACY_KEY.fullmatch(key) is not None


def decode_bucket(raw: bytes | None) -> Mapping[str, Any] | None:
    """An old bucket's value (JSON ``{aggregate_id: deadline_ms}``), or None if absent or not one."""
    if raw is None:
        return None
    try:
        bucket = json.loads(raw)
    except ValueError:
        return None
    return bucket if isinstance(bucket, dict) else None


def encode_bucket(bucket: Mapping[str, int]) -> bytes:
    """An old bucket's value, as the old JSON serializer would have stored it."""
    return json.dumps(dict(bucket), separators=(",", ":")).encode()


def partition_value(partition: int) -> bytes:
    """The value of a current-format entry: its partition in ASCII digits."""
    return str(partition).encode()


def legacy_entries(bucket: Mapping[str, Any] | None) -> list[tuple[int, str]]:
    """The ``(deadline_ms, aggregate_id)`` of an old bucket value, sorted; malformed ones left out."""
    if not isinstance(bucket, Mapping):
        return []
    return sorted(
        (deadline, aggregate_id)
        for aggregate_id, deadline in bucket.items()
        if isinstance(aggregate_id, str) and isinstance(deadline, int) and not isinstance(deadline, bool)
    )


# ----------------------------------------------------------------------
# Reading a table partition by partition, in key order


class KeySource(Protocol):
    """This worker's partitions of a deadline table, read in key order."""

    def partitions(self) -> Collection[int]:
        """The partitions this worker owns and holds data of."""
        ...

    def keys(self, partition: int, start: bytes, stop: bytes) -> Iterator[bytes]:
        """Keys ``start <= key < stop`` of ``partition``, ascending."""
        ...

    def has(self, partition: int, key: bytes) -> bool:
        """Whether ``key`` is present in ``partition``."""
        ...

    def bucket(self, partition: int, key: bytes) -> Any:
        """The decoded value of an old-format bucket key (None if absent)."""
        ...


class RdictSource:
    """Partition databases of Faust's RocksDB store (rocksdict, raw mode), read directly."""

    def __init__(self, dbs: Mapping[int, Any]) -> None:
        self._dbs = dict(dbs)

    def partitions(self) -> Collection[int]:
        return self._dbs.keys()

    def keys(self, partition: int, start: bytes, stop: bytes) -> Iterator[bytes]:
        import rocksdict

        bounds = rocksdict.ReadOptions()
        bounds.set_iterate_upper_bound(stop)  # RocksDB stops at ``stop`` (and skips tombstones past it)
        return iter(self._dbs[partition].keys(from_key=start, read_opt=bounds))

    def has(self, partition: int, key: bytes) -> bool:
        return self._dbs[partition].get(key) is not None

    def bucket(self, partition: int, key: bytes) -> Any:
        return decode_bucket(self._dbs[partition].get(key))


class SortedSource:
    """Any store, read through the table and sorted per partition (the ``memory://`` fallback).

    The partition of a current-format entry is its value; an old bucket names
    its partition in its key.  Other keys are ignored.  Values are the raw
    bytes the table stores.
    """

    def __init__(self, entries: Iterable[tuple[int, bytes, bytes]]) -> None:
        self._values: dict[int, dict[bytes, bytes]] = {}
        for partition, key, value in entries:
            self._values.setdefault(partition, {})[key] = value
        self._sorted = {p: sorted(values) for p, values in self._values.items()}

    @classmethod
    def from_items(cls, items: Iterable[tuple[Any, Any]]) -> SortedSource:
        """From a table's ``items()`` (raw bytes keys and values)."""
        def entries() -> Iterator[tuple[int, bytes, bytes]]:
            for key, value in items:
                if not isinstance(key, bytes) or not isinstance(value, bytes):
                    continue
                if is_deadline_key(key):
                    if value.isdigit():
                        yield int(value), key, value
                    continue
                match = _LEGACY_KEY.fullmatch(key)
                if match is not None:
                    yield int(match.group(2)), key, value
        return cls(entries())

    def partitions(self) -> Collection[int]:
        return self._sorted.keys()

    def keys(self, partition: int, start: bytes, stop: bytes) -> Iterator[bytes]:
        keys = self._sorted.get(partition, [])
        return iter(keys[bisect.bisect_left(keys, start):bisect.bisect_left(keys, stop)])

    def has(self, partition: int, key: bytes) -> bool:
        return key in self._values.get(partition, {})

    def bucket(self, partition: int, key: bytes) -> Any:
        return decode_bucket(self._values.get(partition, {}).get(key))


def rocksdict_partition_dbs(table: Any) -> dict[int, Any] | None:
    """This worker's active partition DBs of ``table``'s RocksDB store, or None for any other store.

    Faust-private; checked against faust-streaming 0.15.3
    (``faust/stores/rocksdb.py``): ``Store._dbs`` maps a partition number to
    its own ``rocksdict.Rdict``, opened in raw mode, whose keys are the
    serialized table keys (here the raw bytes) plus ``Store.offset_key``
    (``b"__faust\\0offset__"``, outside both key ranges of this module); the
    store's own iteration (``_dbs_for_actives``) keeps the partitions whose
    changelog partition is among ``app.assignor.assigned_actives()``, and so
    does this.  With the python-rocksdb driver (``use_rocksdict`` false) it
    returns None and the sorting fallback is used.
    """
    from faust.stores import rocksdb as rocksdb_store
    from faust.types import TP

    store = table.data
    if not isinstance(store, rocksdb_store.Store) or not store.use_rocksdict:
        return None
    actives = table.app.assignor.assigned_actives()
    topic = table.changelog_topic_name
    return {p: db for p, db in list(store._dbs.items()) if TP(topic, p) in actives}


# ----------------------------------------------------------------------
# Cursors and hand-over bookkeeping (pure: no Faust)


@dataclass(frozen=True)
class _LegacyProgress:
    """Where the once-per-process hand-over of a partition's old buckets stands."""

    buckets: tuple[bytes, ...]
    index: int = 0
    after: tuple[int, str] | None = None  # last entry handed of ``buckets[index]``


@dataclass
class Batch:
    """One hand-over: ``due`` for ``on_due``, and what to undo if it fails."""

    due: list[tuple[str, int]] = field(default_factory=list)
    #: (partition, key, stamp before): stamp None for a first hand-over.
    taken: list[tuple[int, bytes, float | None]] = field(default_factory=list)
    cursors_before: dict[int, bytes | None] = field(default_factory=dict)
    legacy_before: dict[int, _LegacyProgress] = field(default_factory=dict)


class DueIndex:
    """Per-partition cursors, hand-over marks and old-format progress.

    ``cursor[p]``: every key of partition ``p`` below it was examined; each
    one still present is marked as handed (``marks[p]``: key -> monotonic time
    of its last hand-over, oldest first).  :meth:`written` keeps this true for
    keys written behind the cursor; a rebalance resets the cursors.
    """

    def __init__(self, *, redeliver_after: float, batch_size: int, name: str = "deadlines") -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.name = name
        self.redeliver_after = redeliver_after
        self.batch_size = batch_size
        self._owned: frozenset[int] = frozenset()
        self._epoch: object = None
        self._cursors: dict[int, bytes] = {}
        self._marks: dict[int, OrderedDict[bytes, float]] = {}
        self._legacy_keys: dict[int, set[bytes]] = {}
        self._legacy_todo: dict[int, _LegacyProgress] = {}
        self._legacy_started: set[int] = set()

    # -- assignment -----------------------------------------------------

    @property
    def owned(self) -> frozenset[int]:
        return self._owned

    def sync(self, owned: Iterable[int], epoch: object) -> None:
        """Follow the partitions this worker owns; ``epoch`` changes with every rebalance.

        Partitions no longer owned are forgotten (a later re-assignment
        starts from scratch).  After a rebalance every owned partition is
        read from its start again (it may have been lost and regained, and
        changed meanwhile); its marks are kept so in-flight hand-overs are not
        repeated before ``redeliver_after``.
        """
        now_owned = frozenset(owned)
        if now_owned == self._owned and epoch == self._epoch:
            return
        for partition in self._owned - now_owned:
            self._cursors.pop(partition, None)
            self._marks.pop(partition, None)
            self._legacy_keys.pop(partition, None)
            self._legacy_todo.pop(partition, None)
            self._legacy_started.discard(partition)
        if epoch != self._epoch:
            for partition in now_owned:
                self._cursors.pop(partition, None)
                self._legacy_keys.pop(partition, None)
        self._owned, self._epoch = now_owned, epoch

    def cursor(self, partition: int) -> bytes | None:
        return self._cursors.get(partition)

    def marked(self, partition: int) -> Collection[bytes]:
        return self._marks.get(partition, {}).keys()

    # -- writes by the owning agent ---------------------------------------

    def written(self, partition: int, key: bytes) -> None:
        """A key was written to ``partition``: move its cursor back if it is behind."""
        cursor = self._cursors.get(partition)
        if cursor is not None and key < cursor:
            self._cursors[partition] = key

    def removed(self, partition: int, key: bytes) -> None:
        """A key was cancelled: forget its hand-over."""
        marks = self._marks.get(partition)
        if marks is not None:
            marks.pop(key, None)

    def legacy_keys(self, partition: int) -> set[bytes] | None:
        """Old buckets known in ``partition`` (None: not listed yet, any may exist)."""
        return self._legacy_keys.get(partition)

    def legacy_removed(self, partition: int, key: bytes) -> None:
        keys = self._legacy_keys.get(partition)
        if keys is not None:
            keys.discard(key)

    # -- selection --------------------------------------------------------

    def take(self, source: KeySource, at_ms: int, clock: float) -> Batch:
        """Select and mark the next batch: redeliveries, then due keys in order, then old entries.

        The cursors and marks move as if the batch was handed; :meth:`undo`
        takes that back if handing it fails.
        """
        batch = Batch()
        bound = due_bound(at_ms)
        partitions = sorted(self._owned & set(source.partitions()))
        self._take_redeliveries(batch, source, partitions, bound, clock)
        self._take_due(batch, source, partitions, bound, clock)
        self._take_legacy(batch, source, partitions)
        return batch

    def _room(self, batch: Batch) -> int:
        return self.batch_size - len(batch.due)

    def _take_redeliveries(
        self, batch: Batch, source: KeySource, partitions: list[int], bound: bytes, clock: float
    ) -> None:
        horizon = clock - self.redeliver_after
        for partition in partitions:
            marks = self._marks.get(partition)
            while marks and self._room(batch) > 0:
                key, stamp = next(iter(marks.items()))
                if stamp > horizon:
                    break
                if not source.has(partition, key):
                    del marks[key]  # gone without a cancel through this index: forget it
                    continue
                marks.move_to_end(key)
                marks[key] = clock
                if key >= bound:  # the clock went back: not due after all
                    continue
                batch.due.append(parse_key(key))
                batch.taken.append((partition, key, stamp))

    def _take_due(
        self, batch: Batch, source: KeySource, partitions: list[int], bound: bytes, clock: float
    ) -> None:
        room = self._room(batch)
        if room <= 0:
            return
        exhausted: set[int] = set()

        def due_in(partition: int) -> Iterator[tuple[bytes, int]]:
            marks = self._marks.get(partition, {})
            start = self._cursors.get(partition, NEW_LOW)
            for key in source.keys(partition, start, bound):
                if key not in marks and is_deadline_key(key):
                    yield key, partition
            exhausted.add(partition)

        for key, partition in islice(heapq.merge(*(due_in(p) for p in partitions)), room):
            if partition not in batch.cursors_before:
                batch.cursors_before[partition] = self._cursors.get(partition)
            self._cursors[partition] = key_after(key)
            self._marks.setdefault(partition, OrderedDict())[key] = clock
            batch.due.append(parse_key(key))
            batch.taken.append((partition, key, None))
        # A partition read to the bound had everything below it examined.
        for partition in exhausted:
            if partition not in batch.cursors_before:
                batch.cursors_before[partition] = self._cursors.get(partition)
            self._cursors[partition] = max(self._cursors.get(partition, NEW_LOW), bound)

    def list_legacy(self, source: KeySource, partition: int) -> set[bytes]:
        """List the old buckets of ``partition`` (once per assignment); plan their hand-over once."""
        known = self._legacy_keys.get(partition)
        if known is not None:
            return known
        found = [k for k in source.keys(partition, LEGACY_LOW, LEGACY_HIGH) if is_legacy_key(k)]
        known = self._legacy_keys[partition] = set(found)
        if found and partition not in self._legacy_started:
            self._legacy_started.add(partition)
            self._legacy_todo[partition] = _LegacyProgress(tuple(found))
            logger.info(
                "%s: partition %d holds %d buckets of the old format: "
                "handing their entries over once to convert them", self.name, partition, len(found),
            )
        return known

    def _take_legacy(self, batch: Batch, source: KeySource, partitions: list[int]) -> None:
        for partition in partitions:
            self.list_legacy(source, partition)
            progress = self._legacy_todo.get(partition)
            while progress is not None and self._room(batch) > 0:
                if partition not in batch.legacy_before:
                    batch.legacy_before[partition] = progress
                if progress.index >= len(progress.buckets):
                    del self._legacy_todo[partition]
                    break
                entries = legacy_entries(source.bucket(partition, progress.buckets[progress.index]))
                if progress.after is not None:
                    entries = entries[bisect.bisect_right(entries, progress.after):]
                taken = entries[: self._room(batch)]
                batch.due.extend((aggregate_id, deadline) for deadline, aggregate_id in taken)
                if len(taken) < len(entries):
                    progress = _LegacyProgress(progress.buckets, progress.index, taken[-1])
                else:
                    progress = _LegacyProgress(progress.buckets, progress.index + 1)
                self._legacy_todo[partition] = progress

    def undo(self, batch: Batch) -> None:
        """Take back what :meth:`take` recorded for a batch that was not handed over."""
        for partition, key, stamp in reversed(batch.taken):
            marks = self._marks.get(partition)
            if marks is None:
                continue  # no longer owned
            if stamp is None:
                marks.pop(key, None)
            elif key in marks:
                marks[key] = stamp
                marks.move_to_end(key, last=False)
        for partition, before in batch.cursors_before.items():
            if partition not in self._owned:
                continue
            # Back to where it was (every key taken lies at or after it), or further
            # back if a write moved it back meanwhile.
            current = self._cursors.get(partition)
            if before is None or current is None:
                self._cursors.pop(partition, None)  # read it from its start again
            else:
                self._cursors[partition] = min(before, current)
        for partition, progress in batch.legacy_before.items():
            if partition in self._owned:
                self._legacy_todo[partition] = progress


# ----------------------------------------------------------------------
# The Faust-side index


class Deadlines:
    """A deadline index named ``name`` on ``app``; see the module docstring.

    ``on_due(batch)`` receives due ``(aggregate_id, deadline_ms)`` pairs, at
    most ``batch_size`` at a time.  ``interval`` is the timer period in
    seconds; ``partitions`` must match the partition count of the topics the
    owning agents read (the changelog is co-partitioned with them).
    """

    def __init__(
        self,
        app: Any,
        name: str,
        on_due: OnDue,
        *,
        interval: float = 0.5,
        redeliver_after: float = 60.0,
        partitions: int = catalog.EVENT_PARTITIONS,
        batch_size: int = 5_000,
    ) -> None:
        self.app = app
        self.name = name
        self.on_due = on_due
        self.batch_size = batch_size
        self.redeliver_after = redeliver_after
        # bytes keys: the raw serializer, as on the topics (faust-streaming #514).
        # bytes values: the partition in digits (what JSON made of an int before),
        # an old bucket its JSON bytes; raw spares two JSON encodings per schedule.
        self.table = app.Table(
            name, key_type=bytes, value_type=bytes, partitions=partitions, default=None,
            extra_topic_configs=dict(CHANGELOG_TOPIC_CONFIGS),
        )
        # writes by explicit partition, in a RocksDB write batch per partition; the kernel commits
        # and flushes it (commit before it awaits anything, so the timer never sees half a batch)
        self.io = TableIO(app, self.table, batched=True)
        self.index = DueIndex(redeliver_after=redeliver_after, batch_size=batch_size, name=name)

        async def tick() -> None:  # Faust passes the app to timers that take an argument
            try:
                await self.close_due()
            except Exception:
                # The batch was taken back (DueIndex.undo): the next tick hands it again.
                logger.exception("%s: handing due deadlines over failed; retrying", name)

        app.timer(interval, name=f"{name}-timer")(tick)

    # -- writes (inside the owning agent) -----------------------------------

    def _event(self) -> EventT:
        event = faust.current_event()
        if event is None:
            raise RuntimeError(
                f"{self.name}: deadlines change only while an agent processes an event of the "
                "aggregate's partition (Faust's current event is not set)"
            )
        return event

    def schedule(self, aggregate_id: str, deadline_ms: int) -> None:
        """Remember a deadline (while processing an event of ``aggregate_id``'s partition).

        Always writes (one small changelog record), so a replay re-asserts a
        deadline whose first record a crash may have lost.
        """
        key = deadline_key(aggregate_id, deadline_ms)
        event = self._event()
        partition = int(event.message.partition)
        self.io.put_bytes(event, key, partition_value(partition))
        self.index.written(partition, key)
        self._drop_legacy(partition, aggregate_id, deadline_ms)

    def cancel(self, aggregate_id: str, deadline_ms: int) -> None:
        """Forget a deadline (it fired, or the aggregate no longer needs it)."""
        key = deadline_key(aggregate_id, deadline_ms)
        event = self._event()
        partition = int(event.message.partition)
        if self.io.contains(event, key):
            self.io.delete(event, key)
        self.index.removed(partition, key)
        self._drop_legacy(partition, aggregate_id, deadline_ms)

    def commit(self) -> None:
        """Write this batch's pending schedules and cancels to the partition databases."""
        self.io.commit()

    async def flush(self) -> None:
        """Commit, then hand the changelog records of this batch's writes to the producer."""
        self.io.persist_offsets()
        await self.io.flush()

    def _drop_legacy(self, partition: int, aggregate_id: str, deadline_ms: int) -> None:
        """Remove the aggregate's entry for ``deadline_ms`` from its old-format bucket, if any."""
        known = self.index.legacy_keys(partition)
        if known is None:  # first write in this partition since it was assigned: list it once
            source = self._source()
            if partition in source.partitions():
                known = self.index.list_legacy(source, partition)
        if known is not None and not known:
            return  # this partition holds no old bucket: the common path
        key = legacy_key(deadline_ms, partition)
        if known is not None and key not in known:
            return
        raw = self.table.get(key)
        if raw is None:
            self.index.legacy_removed(partition, key)
            return
        bucket = decode_bucket(raw)
        if bucket is None or bucket.get(aggregate_id) != deadline_ms:
            return
        rest = {k: v for k, v in bucket.items() if k != aggregate_id}
        if rest:
            self.table[key] = encode_bucket(rest)
        else:
            del self.table[key]
            self.index.legacy_removed(partition, key)

    # -- reads (any time) -------------------------------------------------

    def _source(self) -> KeySource:
        dbs = rocksdict_partition_dbs(self.table)
        if dbs is not None:
            return RdictSource(dbs)
        return SortedSource.from_items(self.table.items())

    def pending(self) -> Iterator[tuple[str, int]]:
        """Every (aggregate_id, deadline_ms) held for this worker's partitions.

        Partition by partition, in deadline order; then the entries of any
        old-format bucket not converted yet.
        """
        source = self._source()
        for partition in sorted(source.partitions()):
            for key in source.keys(partition, NEW_LOW, NEW_HIGH):
                if is_deadline_key(key):
                    yield parse_key(key)
            for key in source.keys(partition, LEGACY_LOW, LEGACY_HIGH):
                if is_legacy_key(key):
                    for deadline, aggregate_id in legacy_entries(source.bucket(partition, key)):
                        yield aggregate_id, deadline

    async def close_due(self, at_ms: int | None = None) -> int:
        """Hand this worker's due deadlines to ``on_due`` in batches; return how many were handed.

        Hands nothing while the app rebalances or recovers.  If ``on_due``
        raises, that batch is taken back (handed again next time) and the
        error propagates.
        """
        handed = 0
        while not getattr(self.app, "rebalancing", False):
            at = now_ms() if at_ms is None else at_ms
            source = self._source()
            self.index.sync(source.partitions(), getattr(self.app, "rebalancing_count", 0))
            batch = self.index.take(source, at, time.monotonic())
            if not batch.due:
                break
            try:
                await self.on_due(batch.due)
            except BaseException:
                self.index.undo(batch)
                raise
            handed += len(batch.due)
            if len(batch.due) < self.batch_size:
                break
        return handed
