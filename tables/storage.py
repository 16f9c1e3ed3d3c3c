"""RocksDB table storage with one memory budget for the whole worker process.

Faust's own RocksDB store gives every partition database its own 2 GiB block
cache and three 64 MiB memtables: with 4 tables x 4 partitions a worker
holding a million orders grew to almost 1 GiB.  :class:`BoundedRocksDBStore`
opens every partition database of every table against ONE
:class:`MemoryBudget`: a single LRU block cache that also holds the index and
filter blocks, and a write-buffer manager that charges every memtable to that
same cache.  What RocksDB keeps in memory for all tables together therefore
stays near ``PAYSTREAM_ROCKSDB_MEMORY_MB`` (RocksDB's LRU cache is not a hard
limit: blocks pinned by open iterators may overshoot it briefly).

The store is Faust's ``rocksdb`` store otherwise (same files, same persisted
offsets, same changelog recovery), registered under :data:`STORE_URL`.
``streams.app.create_app`` makes it the default store of every table.

The database files live in the worker's state directory and survive a
restart: Faust keeps the last applied changelog offset inside each partition
database, so a warm restart replays only the changelog written since.

Cold recovery (a new worker, a lost disk, a partition moved here) does not go
through Faust's per-record recovery path, which applies a few thousand
records per second: when a newly assigned partition is more than
:data:`BOOTSTRAP_MIN_RECORDS` behind its changelog, :class:`ChangelogLoader`
reads the changelog partition with a plain confluent-kafka consumer and
writes it in large RocksDB write batches, storing the applied offset the way
Faust does.  Faust's recovery then starts from that offset and replays only
what was written meanwhile.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rocksdict
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from faust import stores
from faust.exceptions import ImproperlyConfigured
from faust.stores import rocksdb as faust_rocksdb
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP

log = logging.getLogger(__name__)

#: The store URL of :class:`BoundedRocksDBStore` (``app.conf.store``).
STORE_URL = "paystream-rocksdb://"
_SCHEME = STORE_URL.partition(":")[0]

MiB = 1024 * 1024
#: Default budget when nothing configured one (``create_app`` always does).
DEFAULT_MEMORY_MB = 64
#: Open SST files per partition database (Faust's default is 90 % of the
#: process's file limit for EACH database).
MAX_OPEN_FILES = 256
#: Bits per key of the bloom filters (about 1 % false positives).
BLOOM_BITS_PER_KEY = 10
#: A partition this many records (or more) behind its changelog is loaded by
#: :class:`ChangelogLoader`; a shorter tail is left to Faust's recovery.
BOOTSTRAP_MIN_RECORDS = 5_000
#: Records per RocksDB write batch while bootstrapping.
BOOTSTRAP_BATCH = 10_000
#: Share of Faust's ``broker_request_timeout`` one bulk load may take.
BULK_LOAD_SHARE = 0.75
#: Seconds between two bootstrap progress lines.
PROGRESS_EVERY_SECONDS = 5.0


@dataclass(frozen=True)
class DatabaseSizes:
    """The per-database sizes derived from a budget (all in bytes)."""

    write_buffer_size: int
    max_write_buffer_number: int
    target_file_size_base: int


class MemoryBudget:
    """One block cache and one write-buffer manager shared by every table.

    A quarter of the budget (at least 4 MiB) may be taken by memtables; the
    write-buffer manager charges them to the cache, so the cache's capacity is
    the total.  ``resize`` changes both in place: databases already open keep
    the same objects and see the new limits.
    """

    def __init__(self, megabytes: int) -> None:
        self.cache = rocksdict.Cache(megabytes * MiB)
        self.megabytes = megabytes
        self.write_buffer_manager = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            self._write_buffer_bytes(megabytes), False, self.cache
        )

    @staticmethod
    def _write_buffer_bytes(megabytes: int) -> int:
        return max(4 * MiB, megabytes * MiB // 4)

    @property
    def capacity(self) -> int:
        return self.megabytes * MiB

    @property
    def write_buffer_bytes(self) -> int:
        return self._write_buffer_bytes(self.megabytes)

    def resize(self, megabytes: int) -> None:
        self.megabytes = megabytes
        self.cache.set_capacity(megabytes * MiB)
        self.write_buffer_manager.set_buffer_size(self._write_buffer_bytes(megabytes))

    def database_sizes(self) -> DatabaseSizes:
        """Memtables small enough that several databases fit the shared budget."""
        write_buffer = max(1 * MiB, min(8 * MiB, self.write_buffer_bytes // 2))
        return DatabaseSizes(
            write_buffer_size=write_buffer,
            max_write_buffer_number=2,
            target_file_size_base=32 * MiB,
        )

    def usage(self) -> dict[str, int]:
        """Bytes in use now: the whole cache (blocks + charged memtables) and the memtables."""
        return {"cache": self.cache.get_usage(), "pinned": self.cache.get_pinned_usage(),
                "memtables": self.write_buffer_manager.get_usage()}


_budget: MemoryBudget | None = None
_budget_lock = threading.Lock()


def configure_memory(megabytes: int) -> MemoryBudget:
    """Set the process's RocksDB budget (``create_app`` calls it with the settings).

    There is one budget per process: a second call with another size resizes
    the same cache, so every table opened before or after shares it.
    """
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = MemoryBudget(megabytes)
        elif _budget.megabytes != megabytes:
            log.info("RocksDB memory budget changed from %d to %d MiB", _budget.megabytes, megabytes)
            _budget.resize(megabytes)
        return _budget


def memory_budget() -> MemoryBudget:
    """The process's budget (created with :data:`DEFAULT_MEMORY_MB` if none was configured)."""
    return _budget if _budget is not None else configure_memory(DEFAULT_MEMORY_MB)


class BoundedRocksDBOptions(faust_rocksdb.RocksDBOptions):
    """Faust's RocksDB options, opened against the shared :class:`MemoryBudget`."""

    def __init__(self, budget: MemoryBudget, **kwargs: Any) -> None:
        if kwargs.get("ttl") is not None:
            # rocksdict opens a TTL database, which DELETES values in compaction.
            raise ImproperlyConfigured("table option 'ttl' is refused: it would drop table rows")
        sizes = budget.database_sizes()
        kwargs.setdefault("max_open_files", MAX_OPEN_FILES)
        kwargs.setdefault("write_buffer_size", sizes.write_buffer_size)
        kwargs.setdefault("max_write_buffer_number", sizes.max_write_buffer_number)
        kwargs.setdefault("target_file_size_base", sizes.target_file_size_base)
        kwargs.setdefault("bloom_filter_size", BLOOM_BITS_PER_KEY)
        super().__init__(**kwargs)
        self.budget = budget
        if not self.use_rocksdict:
            raise ImproperlyConfigured("paystream's RocksDB store needs rocksdict")

    def open(self, path: Path, *, read_only: bool = False) -> rocksdict.Rdict:
        db = rocksdict.Rdict(str(path), options=self.as_options(),
                             access_type=rocksdict.AccessType.read_write())
        db.set_read_options(rocksdict.ReadOptions())
        return db

    def as_options(self) -> rocksdict.Options:
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        if self.max_open_files is not None:
            options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_write_buffer_manager(self.budget.write_buffer_manager)
        # RocksDB's own info LOG, one per database: keep it from growing without end.
        options.set_max_log_file_size(1 * MiB)
        options.set_keep_log_file_num(2)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(self.budget.cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        table.set_bloom_filter(self.bloom_filter_size, False)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options


class BoundedRocksDBStore(faust_rocksdb.Store):
    """Faust's RocksDB store with every partition database on the shared budget."""

    # Faust's per-partition lines ("opening partition ...") stay under a faust
    # logger, which the worker's quiet logging config silences.
    logger = logging.getLogger("faust.stores.paystream")

    def __init__(self, url: Any, app: Any, table: Any, **kwargs: Any) -> None:
        super().__init__(url, app, table, **kwargs)
        # Faust built its own RocksDBOptions from the table's options (minus
        # read_only/driver, which it popped); rebuild them on the budget.
        options = {k: v for k, v in self.options.items() if k not in ("read_only", "driver")}
        self.rocksdb_options = BoundedRocksDBOptions(memory_budget(), **options)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    A bulk load allocates and frees a few hundred MiB of small objects (fetched
    records, write batches) in a worker thread; glibc keeps such memory in
    the process unless asked, which would show as RSS for good.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas (``MALLOC_ARENA_MAX``); call before threads start.

    RocksDB, librdkafka and the executor threads each get an arena of their
    own by default (up to 8 per core), and memory freed in one arena is not
    reused by another: on this workload that alone is ~50 MiB of RSS.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


_M_ARENA_MAX = -8  # glibc's malloc.h


def bootstrap_servers(app: Any) -> str:
    """The broker list of a Faust app, as confluent-kafka wants it."""
    settings = getattr(app, "settings", None)
    if settings is not None and hasattr(settings, "kafka_bootstrap_servers"):
        return str(settings.kafka_bootstrap_servers)
    return ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)


class ChangelogLoader:
    """Loads changelog partitions of one table into its RocksDB databases in bulk.

    For each partition: from the offset after the one Faust persisted (or the
    log start) up to the end of the partition as it was when we looked,
    records are applied in order, up to ``BOOTSTRAP_BATCH`` at a time in one
    write batch per partition, and the offset of the last record applied is
    persisted after each batch, exactly as Faust's ``apply_changelog_batch``
    does.  Stopping at any point (a new rebalance, a worker stop, a crash)
    therefore loses nothing: whoever recovers next starts from the persisted
    offset.  A tombstone (null value) deletes the key.

    Used as ``start`` once, ``step`` until it returns True, ``close``; the
    blocking calls run in a worker thread (see :class:`BulkLoadingRecovery`).
    """

    def __init__(self, servers: str, table: str, *, db_for: Callable[[int], Any],
                 persisted_offset: Callable[[TP], int | None],
                 set_persisted_offset: Callable[[TP, int], None],
                 keep_going: Callable[[], bool] = lambda: True,
                 min_records: int = BOOTSTRAP_MIN_RECORDS, batch: int = BOOTSTRAP_BATCH) -> None:
        self.servers = servers
        self.table = table
        self.db_for = db_for
        self.persisted_offset = persisted_offset
        self.set_persisted_offset = set_persisted_offset
        self.keep_going = keep_going
        self.min_records = min_records
        self.batch = batch
        self.applied = 0
        self.total = 0
        self._consumer: Consumer | None = None
        self._pending: dict[tuple[str, int], TP] = {}
        self._ends: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        self._began = 0.0
        self._said = 0.0
        self._progress = RecoveryProgress(f"table {table}")

    def _new_consumer(self) -> Consumer:
        return Consumer({
            "bootstrap.servers": self.servers,
            "group.id": f"paystream-changelog-loader-{self.table}",  # never joins: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 16 * MiB,
            "max.partition.fetch.bytes": 4 * MiB,
            "queued.max.messages.kbytes": 16 * 1024,
            "log_level": 3,
        })

    def plan(self, consumer: Consumer, tps: Iterable[TP]) -> dict[TP, tuple[int, int]]:
        """Partition -> (first offset to load, end offset) for those far enough behind."""
        plan = {}
        for tp in tps:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                       timeout=30.0)
            persisted = self.persisted_offset(tp)
            first = low if persisted is None else max(low, persisted + 1)
            if high - first >= self.min_records:
                plan[tp] = (first, high)
        return plan

    def start(self, tps: Iterable[TP]) -> bool:
        """Look at the partitions; True if some are far enough behind to load."""
        with self._lock:
            self._consumer = consumer = self._new_consumer()
            plan = self.plan(consumer, tps)
            if not plan:
                return False
            self.total = sum(high - first for first, high in plan.values())
            self._pending = {(tp.topic, tp.partition): tp for tp in plan}
            self._ends = {(tp.topic, tp.partition): high for tp, (_first, high) in plan.items()}
            log.info("loading table %s from its changelog: about %s records in %d partitions",
                     self.table, f"{self.total:,}", len(plan))
            self._began = self._said = time.monotonic()
            self._progress.begin(RecoverySample(self._began, self.total))
            consumer.assign([TopicPartition(tp.topic, tp.partition, first)
                             for tp, (first, _high) in plan.items()])
            return True

    def step(self, seconds: float) -> bool:
        """Apply records for about ``seconds``; True when done (or told to stop)."""
        with self._lock:
            assert self._consumer is not None
            until = time.monotonic() + seconds
            while self._pending and self.keep_going():
                self._apply(self._consumer.consume(self.batch, timeout=0.5))
                at = time.monotonic()
                if at - self._said >= PROGRESS_EVERY_SECONDS:
                    self._said = at
                    remaining = max(0, self.total - self.applied)
                    log.info("%s", self._progress.update(RecoverySample(at, remaining)))
                if at >= until:
                    break
            return not self._pending or not self.keep_going()

    def _apply(self, messages: list[Any]) -> None:
        batches: dict[int, rocksdict.WriteBatch] = defaultdict(
            lambda: rocksdict.WriteBatch(raw_mode=True))
        last: dict[TP, int] = {}
        for message in messages:
            error = message.error()
            key = (message.topic(), message.partition())
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._pending.pop(key, None)
                    continue
                raise KafkaException(error)
            tp = self._pending.get(key)
            if tp is None:  # that partition is done; later records are Faust's to replay
                continue
            offset = message.offset()
            value = message.value()
            if value is None:
                batches[tp.partition].delete(message.key())
            else:
                batches[tp.partition].put(message.key(), value)
            last[tp] = offset
            if offset >= self._ends[key] - 1:
                self._pending.pop(key, None)
        for partition, batch in batches.items():
            self.applied += len(batch)
            self.db_for(partition).write(batch)
        for tp, offset in last.items():
            self.set_persisted_offset(tp, offset)

    def close(self) -> None:
        """Close the consumer (waits for a running ``step``) and say what was loaded."""
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
            if self.total:
                seconds = max(time.monotonic() - self._began, 1e-9)
                log.info("table %s loaded: %s records in %.1f s (%s rows/s)%s", self.table,
                         f"{self.applied:,}", seconds, f"{self.applied / seconds:,.0f}",
                         "" if not self._pending else
                         "; stopped early, Faust's recovery goes on from there")
                self.total = 0
        release_free_memory()


class BulkLoadingRecovery(Recovery):
    """Faust's table recovery, with a bulk load before its per-record replay.

    Faust builds the offsets it will recover from (``_build_offsets``) after
    the rebalance callback has returned, so the heartbeat goes on meanwhile.
    Just before that, every active partition of a
    :class:`BoundedRocksDBStore` table that is far behind its changelog is
    loaded by a :class:`ChangelogLoader` (in a thread, a few seconds per
    step), and its new persisted offset becomes Faust's starting point.  A
    new rebalance, a stop, an error, or the time budget ends the bulk load
    early; Faust's own recovery then replays the rest, as it would have
    anyway.  The budget is :data:`BULK_LOAD_SHARE` of
    ``broker_request_timeout``: Faust waits that long for ``_build_offsets``
    and, past it, ends its recovery service for good.  Relies on a private
    Faust method, hence ``faust-streaming<0.16`` in setup.cfg.
    """

    bulk_loading = False
    # Faust's recovery lines (offset tables, "Resuming flow...") stay under a
    # faust logger, which the worker's quiet logging config silences.
    logger = logging.getLogger("faust.tables.recovery.paystream")

    async def _build_offsets(self, consumer: Any, tps: set[TP], destination: Any,
                             title: str) -> None:
        if title == "active" and tps:
            await self._bulk_load(tps, destination)
        await super()._build_offsets(consumer, tps, destination, title)

    async def _bulk_load(self, tps: set[TP], destination: Any) -> None:
        by_table: dict[Any, list[TP]] = defaultdict(list)
        for tp in sorted(tps):
            table = self.tp_to_table.get(tp)
            if table is not None and isinstance(table.data, BoundedRocksDBStore):
                by_table[table].append(tp)
        generation = self.app.consumer_generation_id
        stop = threading.Event()
        until = time.monotonic() + BULK_LOAD_SHARE * float(self.app.conf.broker_request_timeout)

        def keep_going() -> bool:
            return (not stop.is_set() and not self.should_stop and time.monotonic() < until
                    and self.app.consumer_generation_id == generation
                    and not self.signal_recovery_start.is_set())

        loop = asyncio.get_running_loop()
        self.bulk_loading = True
        try:
            for table, table_tps in by_table.items():
                store = table.data
                loader = ChangelogLoader(
                    bootstrap_servers(self.app), table.name, db_for=store._db_for_partition,
                    persisted_offset=store.persisted_offset,
                    set_persisted_offset=store.set_persisted_offset, keep_going=keep_going)
                try:
                    if await loop.run_in_executor(None, loader.start, table_tps):
                        while not await loop.run_in_executor(None, loader.step, 2.0):
                            _advance(destination, store, table_tps)
                        _advance(destination, store, table_tps)
                except asyncio.CancelledError:
                    stop.set()
                    loop.run_in_executor(None, loader.close)
                    raise
                except Exception as exc:  # Faust's per-record recovery still does it all
                    log.warning("bulk load of table %s stopped after %s records (%r); Faust's "
                                "recovery goes on from the last persisted offset",
                                table.name, f"{loader.applied:,}", exc)
                    _advance(destination, store, table_tps)
                await loop.run_in_executor(None, loader.close)
                if not keep_going():
                    return
        finally:
            self.bulk_loading = False


def _advance(destination: Any, store: Any, tps: Iterable[TP]) -> None:
    """Move Faust's recovery start offsets up to what the bulk load persisted."""
    for tp in tps:
        persisted = store.persisted_offset(tp)
        if persisted is not None and (destination.get(tp) is None or persisted > destination[tp]):
            destination[tp] = persisted


class BulkLoadingTableManager(TableManager):
    """Faust's table manager with :class:`BulkLoadingRecovery` (``app.conf.TableManager``)."""

    logger = logging.getLogger("faust.tables.manager.paystream")

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = BulkLoadingRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def register() -> str:
    """Make :data:`STORE_URL` resolve to :class:`BoundedRocksDBStore`; return the URL."""
    stores.STORES.aliases[_SCHEME] = f"{__name__}:BoundedRocksDBStore"
    return STORE_URL


# ----------------------------------------------------------------------
# Recovery progress


@dataclass
class RecoverySample:
    """Faust's view of active recovery at one moment."""

    at: float  # monotonic seconds
    remaining: int  # changelog records still to apply, all active partitions


class RecoveryProgress:
    """Turns samples of Faust's remaining-records counter into one log line each.

    Faust logs a multi-line table every 5 s while it recovers; this says the
    same in one line: records applied, rows/s over the last interval, and
    the time left at that rate.
    """

    def __init__(self, what: str = "tables") -> None:
        self.what = what
        self.started: RecoverySample | None = None
        self.last: RecoverySample | None = None
        self.total = 0

    @property
    def active(self) -> bool:
        return self.started is not None

    def begin(self, sample: RecoverySample) -> None:
        self.started = self.last = sample
        self.total = sample.remaining

    def update(self, sample: RecoverySample) -> str:
        """The progress line for ``sample`` (call :meth:`begin` first)."""
        assert self.started is not None and self.last is not None
        if sample.remaining > self.last.remaining:  # more was written while we recovered
            self.total += sample.remaining - self.last.remaining
        elapsed = sample.at - self.last.at
        applied = max(0, self.last.remaining - sample.remaining)
        rate = applied / elapsed if elapsed > 0 else 0.0
        self.last = sample
        done = self.total - sample.remaining
        eta = f"{sample.remaining / rate:,.0f} s" if rate > 0 else "unknown"
        return (f"recovering {self.what}: {done:,} of {self.total:,} changelog records applied, "
                f"{rate:,.0f} rows/s, about {eta} left")

    def finish(self, at: float) -> str:
        """The closing line; resets the tracker for the next recovery."""
        assert self.started is not None
        seconds = max(at - self.started.at, 1e-9)
        line = (f"{self.what} recovered: {self.total:,} changelog records in {seconds:,.1f} s "
                f"({self.total / seconds:,.0f} rows/s)")
        self.started = self.last = None
        self.total = 0
        return line
