"""Part ``memory``: a worker holding many orders: RSS, warm restart, cold recovery.

1. A ``paystream worker`` subprocess creates ``orders`` orders through the
   pipeline (:mod:`.preload`), each with a payment deadline 30 days out, so
   every one is also a pending deadline; then it is stopped (SIGTERM).
2. Every changelog of the run is read: records, largest record, records
   over 1 KiB (the "1,000,000 pending deadlines" check).
3. Warm restart: the app is started in a spawned child on the same state
   directory; seconds until partitions are assigned and table recovery has
   completed; its RSS then, and again after iterating every key and value of
   every table.
4. Cold recovery: the state directory is deleted and the same is measured;
   the rate is changelog records (and keys) recovered per second.

The child does what ``paystream worker`` does before it starts the app
(:func:`_set_up_like_run_worker`), then ``create_app`` + ``app.start()``, so the
numbers are those of the worker's app in a process of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import traceback
import uuid
from typing import Any

from streams.devtools.bench.common import (
    ORDERS_ONLY,
    BenchRun,
    Prober,
    Stalled,
    changelog_record_sizes,
    create_part_topics,
    end_offsets,
    now_ms,
    rss_kib,
    start_worker,
    topics_with_prefix,
    wait_caught_up,
)
from streams.devtools.bench.deadlines import FAR_MS, report_sizes
from streams.devtools.bench.lifecycle import run_child
from streams.devtools.bench.preload import preload_orders
from streams.settings import Settings

MIB = 1024.0


def memory_child(settings: Settings, conn: Any) -> None:
    """Child-process entry: start the app, measure, stop; send the numbers (or the error)."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    try:
        _set_up_like_run_worker()
        conn.send(asyncio.run(_measure(settings)))
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def _set_up_like_run_worker() -> None:
    """The process set-up ``streams.app.run_worker`` does before it builds the app.

    Today: glibc's malloc arenas capped before any thread starts
    (``tables.storage.limit_malloc_arenas``); skipped where it does not exist.
    """
    try:
        from tables.storage import limit_malloc_arenas
    except ImportError:
        return
    limit_malloc_arenas()


async def _measure(settings: Settings, timeout: float = 3600.0) -> dict[str, Any]:
    import gc

    from streams.app import create_app

    app = create_app(settings)
    gc.collect()
    before, _ = rss_kib()
    began, began_monotonic = time.perf_counter(), time.monotonic()
    await app.start()
    try:
        deadline = time.monotonic() + timeout
        assigned: float | None = None
        while not (app.consumer.assignment() and app.tables.recovery.completed.is_set()):
            if assigned is None and app.consumer.assignment():
                assigned = time.perf_counter() - began
            if time.monotonic() > deadline:
                raise Stalled(f"worker not ready after {timeout:.0f} s")
            await asyncio.sleep(0.02)
        ready = time.perf_counter() - began
        if assigned is None:
            assigned = ready
        # Faust's own marks (private, monotonic) time the changelog replay itself.
        recovery = app.tables.recovery
        started = getattr(recovery, "_recovery_started_at", None)
        ended = getattr(recovery, "_recovery_ended_at", None)
        if started is not None and ended is not None and ended >= started >= began_monotonic:
            replay, replay_from = ended - started, started - began_monotonic
        else:
            replay, replay_from = ready - assigned, assigned
        after, peak = rss_kib()
        began = time.perf_counter()
        keys = {}
        for name, table in app.tables.items():
            count = 0
            for _key, _value in table.items():
                count += 1
            keys[name] = count
        scan = time.perf_counter() - began
        after_scan, peak_scan = rss_kib()
    finally:
        await app.stop()
    return {"before": before, "replay_from": replay_from, "replay": replay, "ready": ready,
            "after": after, "peak": peak,
            "keys": keys, "scan": scan, "after_scan": after_scan, "peak_scan": peak_scan}


def run_memory(run: BenchRun, orders: int) -> None:
    settings = run.settings("memory", domains=ORDERS_ONLY)
    create_part_topics(settings)
    prober = Prober(settings)
    worker, ready = start_worker(settings, prober)
    prober.close()
    tag = uuid.uuid4().hex[:8]
    far = now_ms() + FAR_MS
    print(f"  worker serving after {ready:.1f} s; creating {orders:,} orders through the pipeline "
          "(deadlines 30 days out)", flush=True)
    try:
        seconds = preload_orders(settings, [(f"m-{tag}-{i:08d}", f"u-{tag}-{i}", far) for i in range(orders)],
                                 worker, label="memory preload")
        wait_caught_up(settings, worker)
        rss, peak = worker.rss_kib()
    finally:
        worker.stop()
    print(f"    created in {seconds:.1f} s ({orders / seconds:,.0f} orders/s); the creating worker's RSS "
          f"{rss / MIB:.0f} MiB (peak {peak / MIB:.0f} MiB)", flush=True)
    changelogs = [t for t in topics_with_prefix(settings) if t.endswith("-changelog")]
    records = sum(end_offsets(settings, changelogs).values())
    report_sizes(changelog_record_sizes(settings, changelogs), f"{orders:,} orders = pending deadlines")
    warm = run_child(memory_child, (settings,), "bench-memory-warm", 3700)
    _report("warm restart (state directory kept)", warm, records, target_ready=10.0, cold=False)
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    cold = run_child(memory_child, (settings,), "bench-memory-cold", 3700)
    _report("cold recovery (state directory deleted)", cold, records, target_ready=None, cold=True)


def _report(title: str, result: dict[str, Any], records: int, target_ready: float | None,
            cold: bool) -> None:
    keys = sum(result["keys"].values())
    target = f" (target <= {target_ready:g} s)" if target_ready else ""
    print(f"  {title}:")
    replay = max(result["replay"], 1e-3)
    print(f"    start to ready (partitions assigned, table recovery completed): {result['ready']:.1f} s"
          f"{target}")
    rate = (f": {records / replay:,.0f} changelog records/s, {keys / replay:,.0f} keys/s (aim >= 50k "
            f"rows/s; {records:,} records in the changelogs)") if cold else " (only the changelogs' tail)"
    print(f"    changelog replay (Faust's recovery marks): started {result['replay_from']:.1f} s after the "
          f"start, took {result['replay']:.2f} s{rate}")
    print(f"    RSS before start {result['before'] / MIB:.0f} MiB; after recovery "
          f"{result['after'] / MIB:.0f} MiB (peak {result['peak'] / MIB:.0f}); after iterating every key "
          f"{result['after_scan'] / MIB:.0f} MiB (peak {result['peak_scan'] / MIB:.0f}) "
          "(target <= 300 MB = 286 MiB)")
    print("    tables: " + ", ".join(f"{name} {count:,} keys" for name, count in result["keys"].items())
          + f"; iterating took {result['scan']:.1f} s")
