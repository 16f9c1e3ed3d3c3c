"""Reads and writes of a Faust table by explicit partition, for the kernel's batches.

Faust's ``table[key] = value`` picks the partition from the *current event*
and sends the changelog record through its producer buffer, one task hop and a
handful of futures per write: on the kernel's hot path that cost more than the
decisions themselves.  :class:`TableIO` does what Faust does, in one step:

- the value is JSON-encoded once; the same bytes go to the partition's RocksDB
  database and, as the changelog record, to the producer, a batch per
  partition (:mod:`streams.bulk_send`; not awaited: Faust's commit flushes
  the producer before it commits offsets, so an input offset is committed
  only once its changelog records are in Kafka);
- when a changelog record is acknowledged its offset is noted, and written as
  the partition's persisted offset (Faust's own ``set_persisted_offset``) at a
  later batch, at most every :data:`PERSIST_EVERY` seconds, so a warm restart
  replays only the changelog's tail (its last second at most beyond what
  Faust's path would replay).  A persisted offset is where replay starts:
  one that lags is safe (records are applied again, puts of the same
  bytes), one ahead of the store would not be, and it never is: an offset is
  noted only once its record was acknowledged, and the record was in the
  store before it was handed over.

Private parts of faust-streaming's RocksDB store are used
(``_db_for_partition``, ``_key_index``; checked against 0.15.3, pinned <0.16
in setup.cfg, and exercised by the integration tests).  A store without them
(``memory://`` in unit tests) falls back to Faust's own path, bound to the
caller's event.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import rocksdict
from faust.streams import _current_event
from faust.types import TP, EventT

from streams.bulk_send import Sent, send_all

#: Seconds between two writes of a table's persisted offsets (a RocksDB put
#: per partition each: writing them at every batch cost ~1.5% of the worker's
#: CPU in ``paystream bench orders``).
PERSIST_EVERY = 1.0

#: The standard library's compact encoder, for what orjson refuses (see :func:`json_bytes`).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON bytes (every table row and internal record).

    orjson, several times faster than the standard library on rows (the
    encoding was the largest single cost of the kernel's writes).  Its text
    differs from ``json.dumps(value, separators=(",", ":"))`` only in
    writing non-ASCII characters as UTF-8 rather than ``\\u`` escapes (and
    NaN and infinities as null); every JSON reader reads both.  A value
    orjson refuses (an integer beyond 64 bits, a non-string key) is encoded
    by the standard library, as before.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        return _encode(value).encode()


def json_value(raw: bytes) -> Any:
    """The value of UTF-8 JSON bytes (:func:`json_bytes`' or the standard library's)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)  # what orjson refuses and json reads (NaN, integers beyond 64 bits)


@contextmanager
def bound_to(event: EventT) -> Iterator[None]:
    """Make ``event`` Faust's current event while the block reads or writes tables.

    Faust picks a table access's partition from the *current event*
    (``faust.streams._current_event``, a private context variable; checked
    against faust-streaming 0.15.3, pinned <0.16 in setup.cfg).  In a batch the
    current event is whatever the stream saw last, so every table access binds
    the event of the key it touches.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class TableIO:
    """Partition-explicit get/put/delete on one Faust table and its changelog.

    Writes change the store at once and queue their changelog records; the
    queue is handed to the producer by :meth:`flush` (the kernel awaits it
    before it acknowledges a batch) or, for writers that do not, by a task
    started on the first queued record, so nothing stays unsent.

    ``batched=True`` collects the writes in one RocksDB write batch per
    partition instead (a put costs a WAL write of its own; a write batch one
    for all), written to the store by :meth:`commit`, which :meth:`flush`
    and the queue's task call before they hand any changelog record over.
    Reads through this object see the pending writes; other readers (Faust's
    ``table.get``, iterators) see them once committed, so the writer commits
    (or flushes) before it awaits anything: the kernel writes a batch's rows
    and calls ``flush`` without an ``await`` in between.
    """

    def __init__(self, app: Any, table: Any, *, batched: bool = False,
                 persist_every: float = PERSIST_EVERY) -> None:
        self.app = app
        self.persist_every = persist_every
        self._persisted_at = float("-inf")
        self.table = table
        self.batched = batched
        self._acked: dict[int, int] = {}  # partition -> newest acknowledged changelog offset
        self._queue: list[tuple[int, bytes, bytes | None]] = []
        self._draining: asyncio.Task[None] | None = None
        # partition -> (its write batch, key -> value or None for a delete), until commit
        self._pending: dict[int, tuple[Any, dict[bytes, bytes | None]]] = {}

    @property
    def _store(self) -> Any:
        store = self.table.data
        return store if hasattr(store, "_db_for_partition") else None

    def get(self, event: EventT, key: bytes) -> Any:
        """The stored value of ``key`` in ``event``'s partition (None: none), JSON-decoded."""
        store = self._store
        if store is None:
            with bound_to(event):
                return self.table.get(key)
        raw = self._read(store, event.message.partition, key)
        return None if raw is None else json_value(raw)

    def get_bytes(self, event: EventT, key: bytes) -> bytes | None:
        """The stored bytes of ``key`` in ``event``'s partition (None: none); only with a RocksDB store."""
        return self._read(self._store, event.message.partition, key)

    @property
    def stores_bytes(self) -> bool:
        """Whether values are stored as JSON bytes (a RocksDB store; not ``memory://``)."""
        return self._store is not None

    def contains(self, event: EventT, key: bytes) -> bool:
        store = self._store
        if store is None:
            with bound_to(event):
                return self.table.get(key) is not None
        return self._read(store, event.message.partition, key) is not None

    def _read(self, store: Any, partition: int, key: bytes) -> bytes | None:
        pending = self._pending.get(partition)
        if pending is not None and key in pending[1]:
            return pending[1][key]
        return store._db_for_partition(partition).get(key)

    def put(self, event: EventT, key: bytes, value: Any) -> None:
        """Store ``value`` (JSON-able) under ``key`` in ``event``'s partition, and log it."""
        if self._store is None:
            with bound_to(event):
                self.table[key] = value
            return
        self.put_bytes(event, key, json_bytes(value))

    def put_bytes(self, event: EventT, key: bytes, raw: bytes) -> None:
        """Store already-encoded ``raw`` (a table whose values are raw bytes, or JSON text)."""
        store = self._store
        if store is None:
            with bound_to(event):
                self.table[key] = raw
            return
        partition = event.message.partition
        if self.batched:
            batch, values = self._batch(partition)
            batch.put(key, raw)
            values[key] = raw
        else:
            store._db_for_partition(partition).put(key, raw)
        store._key_index[key] = partition
        self._log(partition, key, raw)

    def delete(self, event: EventT, key: bytes) -> None:
        """Remove ``key`` from ``event``'s partition, and log a tombstone."""
        store = self._store
        if store is None:
            with bound_to(event):
                if self.table.get(key) is not None:
                    del self.table[key]
            return
        partition = event.message.partition
        if self.batched:
            batch, values = self._batch(partition)
            batch.delete(key)
            values[key] = None
        else:
            store._db_for_partition(partition).delete(key)
        self._log(partition, key, None)

    def _batch(self, partition: int) -> tuple[Any, dict[bytes, bytes | None]]:
        pending = self._pending.get(partition)
        if pending is None:
            pending = self._pending[partition] = (rocksdict.WriteBatch(raw_mode=True), {})
        return pending

    def commit(self) -> None:
        """Write the pending write batches to their partitions' databases (``batched``)."""
        if not self._pending:
            return
        store = self._store
        pending, self._pending = self._pending, {}
        for partition, (batch, _values) in pending.items():
            store._db_for_partition(partition).write(batch)

    def _log(self, partition: int, key: bytes, raw: bytes | None) -> None:
        self._queue.append((partition, key, raw))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    async def flush(self) -> None:
        """Commit, then hand every queued changelog record to the producer (acks are not awaited)."""
        self.commit()
        while self._draining is not None:
            await asyncio.shield(self._draining)

    async def _drain(self) -> None:
        try:
            topic = self.table.changelog_topic.get_topic_name()
            while self._queue:
                self.commit()  # a record reaches the changelog only after the store has it
                queued, self._queue = self._queue, []
                sent = await send_all(self.app, [(topic, key, raw, partition, None)
                                                 for partition, key, raw in queued])
                for batch in sent:
                    batch.future.add_done_callback(lambda _done, batch=batch: self._note(batch))
        finally:
            self._draining = None

    def _note(self, batch: Sent) -> None:
        done = batch.future
        if done.cancelled() or done.exception() is not None:
            return  # the commit's flush fails too, so the input is read again
        offset = batch.last_offset()
        if offset > self._acked.get(batch.partition, -1):
            self._acked[batch.partition] = offset

    def persist_offsets(self) -> None:
        """Record the acknowledged changelog offsets in the store (Faust's checkpoint).

        At most every ``persist_every`` seconds; the offsets acknowledged
        meanwhile wait for the next call.
        """
        store = self._store
        if store is None or not self._acked:
            return
        now = time.monotonic()
        if now - self._persisted_at < self.persist_every:
            return
        self._persisted_at = now
        topic = self.table.changelog_topic.get_topic_name()
        acked, self._acked = self._acked, {}
        for partition, offset in acked.items():
            store.set_persisted_offset(TP(topic, partition), offset)
