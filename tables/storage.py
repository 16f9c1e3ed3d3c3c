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
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rocksdict
from faust import stores
from faust.exceptions import ImproperlyConfigured
from faust.stores import rocksdb as faust_rocksdb

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

    def __init__(self) -> None:
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
        return (f"recovering tables: {done:,} of {self.total:,} changelog records applied, "
                f"{rate:,.0f} rows/s, about {eta} left")

    def finish(self, at: float) -> str:
        """The closing line; resets the tracker for the next recovery."""
        assert self.started is not None
        seconds = max(at - self.started.at, 1e-9)
        line = (f"tables recovered: {self.total:,} changelog records in {seconds:,.1f} s "
                f"({self.total / seconds:,.0f} rows/s)")
        self.started = self.last = None
        self.total = 0
        return line
