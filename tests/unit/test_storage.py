"""tables.storage: every table's partition databases share one RocksDB memory budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import rocksdict
from faust.exceptions import ImproperlyConfigured

from streams.app import create_app
from streams.settings import Settings
from tables import storage

MiB = 1024 * 1024


def _tables(app: object) -> None:
    for name in ("alpha", "beta"):
        app.Table(name, key_type=bytes, value_type=None, partitions=4, default=None)  # type: ignore[attr-defined]


@pytest.fixture
def app(tmp_path: Path):
    settings = Settings.from_env(env={}, state_dir=tmp_path / "state", rocksdb_memory_mb=32)
    app = create_app(settings, registrars=[_tables])
    yield app
    storage.configure_memory(storage.DEFAULT_MEMORY_MB)  # leave the process default behind


def _fill(db: rocksdict.Rdict, prefix: bytes, count: int) -> None:
    for index in range(count):
        db.put(prefix + str(index).encode(), os.urandom(64) + b"v" * 200)


def test_every_table_of_the_app_uses_the_bounded_store(app) -> None:
    assert app.conf.store.scheme == storage.STORE_URL.partition(":")[0]
    for name in ("alpha", "beta"):
        assert type(app.tables[name].data) is storage.BoundedRocksDBStore
        assert app.tables[name].recovery_buffer_size >= 10_000


def test_the_app_recovers_through_the_bulk_loading_recovery(app) -> None:
    assert isinstance(app.tables, storage.BulkLoadingTableManager)
    assert type(app.tables.recovery) is storage.BulkLoadingRecovery


def test_recovery_starts_where_the_bulk_load_stopped() -> None:
    from faust.types import TP

    class Store:
        offsets = {TP("c", 0): 41, TP("c", 1): None, TP("c", 2): 7}

        def persisted_offset(self, tp: TP) -> int | None:
            return self.offsets[tp]

    destination = {TP("c", 0): 10, TP("c", 1): None, TP("c", 2): 9}
    storage._advance(destination, Store(), list(Store.offsets))
    assert destination == {TP("c", 0): 41, TP("c", 1): None, TP("c", 2): 9}


def test_partition_databases_of_all_tables_share_one_cache_sized_by_settings(app) -> None:
    budget = storage.memory_budget()
    assert budget.capacity == 32 * MiB
    assert budget.write_buffer_manager.get_buffer_size() == 8 * MiB
    stores = [app.tables[name].data for name in ("alpha", "beta")]
    for store in stores:
        assert store.rocksdb_options.budget is budget
        assert store.rocksdb_options.max_open_files == storage.MAX_OPEN_FILES
        assert store.rocksdb_options.write_buffer_size == 4 * MiB
        assert store.rocksdb_options.max_write_buffer_number == 2

    # Memtables of every partition of both tables are charged to the one cache:
    # its usage grows with writes to each database and covers them all.
    before = budget.usage()
    grown = []
    for store in stores:
        for partition in range(4):
            _fill(store._db_for_partition(partition), f"{partition}:".encode(), 2_000)
            grown.append(budget.usage()["memtables"])
    after = budget.usage()
    assert after["memtables"] > before["memtables"]
    # It grows with each database's writes until the write buffer manager (8 MiB)
    # flushes, which may come from the 7th fill on (about 1 MiB each): timing.
    assert grown[:5] == sorted(grown[:5]) and len(set(grown[:5])) == 5
    assert after["cache"] >= after["memtables"]
    assert len({id(s.rocksdb_options.budget.cache) for s in stores}) == 1


def test_the_cache_bounds_what_reading_every_key_keeps(tmp_path: Path) -> None:
    budget = storage.MemoryBudget(8)  # a budget of its own: no other test's memtables in it
    options = storage.BoundedRocksDBOptions(budget)
    dbs = [options.open(tmp_path / f"p{partition}.db") for partition in range(4)]
    for partition, db in enumerate(dbs):
        _fill(db, f"{partition}:".encode(), 20_000)  # ~5 MiB per partition
        assert budget.usage()["memtables"] <= budget.write_buffer_bytes + 1 * MiB
        db.flush()
    assert sum(1 for db in dbs for _ in db.items()) == 80_000
    assert budget.usage()["cache"] <= 8 * MiB + 1 * MiB  # LRU capacity, slack for pinned blocks
    for db in dbs:
        db.close()


def test_configuring_again_resizes_the_same_budget() -> None:
    first = storage.configure_memory(16)
    second = storage.configure_memory(48)
    try:
        assert first is second
        assert second.capacity == 48 * MiB
        assert second.write_buffer_manager.get_buffer_size() == 12 * MiB
        assert second.database_sizes().write_buffer_size == 6 * MiB
    finally:
        storage.configure_memory(storage.DEFAULT_MEMORY_MB)


def test_small_budgets_keep_workable_memtables() -> None:
    budget = storage.MemoryBudget(8)
    assert budget.write_buffer_bytes == 4 * MiB  # at least 4 MiB for all memtables
    assert budget.database_sizes().write_buffer_size == 2 * MiB
    big = storage.MemoryBudget(512)
    assert big.database_sizes().write_buffer_size == 8 * MiB  # capped per database


def test_a_ttl_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImproperlyConfigured, match="ttl"):
        storage.BoundedRocksDBOptions(storage.MemoryBudget(8), ttl=3600)


def test_rows_survive_reopening_the_database(tmp_path: Path) -> None:
    options = storage.BoundedRocksDBOptions(storage.MemoryBudget(8))
    db = options.open(tmp_path / "p0.db")
    db.put(b"k", b"v")
    db.put(b"__faust\0offset__", b"41")
    db.close()
    again = options.open(tmp_path / "p0.db")
    assert again.get(b"k") == b"v"
    assert again.get(b"__faust\0offset__") == b"41"  # the persisted offset a warm restart uses
    again.close()


def test_recovery_progress_lines() -> None:
    progress = storage.RecoveryProgress()
    progress.begin(storage.RecoverySample(at=100.0, remaining=1_000_000))
    line = progress.update(storage.RecoverySample(at=105.0, remaining=750_000))
    assert line == ("recovering tables: 250,000 of 1,000,000 changelog records applied, "
                    "50,000 rows/s, about 15 s left")
    stalled = progress.update(storage.RecoverySample(at=110.0, remaining=750_000))
    assert stalled.endswith("0 rows/s, about unknown left")
    # records written while recovering raise the total
    line = progress.update(storage.RecoverySample(at=115.0, remaining=760_000))
    assert "250,000 of 1,010,000" in line
    assert progress.finish(120.0) == (
        "tables recovered: 1,010,000 changelog records in 20.0 s (50,500 rows/s)")
    assert not progress.active
