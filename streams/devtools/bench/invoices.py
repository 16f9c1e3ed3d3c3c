"""``paystream bench invoices``: invoice.overdue lag when many invoices fall due together.

The midnight case: ``count`` open invoices (default 100,000) whose first
overdue notice falls due within ``span`` seconds (default 60), all pending in
the invoice aggregate's deadline index at once.  Target: p99 lag <= 2 s.

Only a broker is needed.  The bench starts our schema registry on a thread
(a private ``_schemas`` topic), then a ``paystream worker`` subprocess running
the ``subscriptions`` domain (the invoice aggregate) with the default cadence
(``INVOICE_OVERDUE_DAYS``), on topics, group and state of its own, all deleted
at the end.

Invoices are created through the pipeline: one ``open`` command per invoice
on ``paystream.invoice-commands`` (the command the subscription aggregate
sends for an invoice it opened at Stripe), each an open invoice whose due date
lies one cadence day (the first) before its measured deadline; the worker
publishes ``invoice.created`` and schedules the deadline.  A calibration
batch (due dates 30 days out) measures the worker's rate first, so that the
measured deadlines fall after the moment all invoices will have been created.
Lag = invoice.overdue seen by the bench - max(deadline, invoice.created seen);
invoices created after their deadline are counted and reported.

Prints numbers, asserts nothing about speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from streams import catalog
from streams.devtools.bench.common import (
    BenchRun,
    Observer,
    WorkerProcess,
    cpu_seconds,
    create_part_topics,
    end_offsets,
    latency_line,
    now_ms,
    percentile,
)
from streams.devtools.bench.preload import preload_through
from streams.settings import Settings
from tables import aggregate
from tables.invoice_state import DAY_MS

FAR_MS = 30 * 24 * 3600 * 1000
AMOUNT = 2900
CURRENCY = "EUR"


@dataclasses.dataclass(frozen=True)
class InvoicesOptions:
    count: int = 100_000
    span: float = 60.0


#: ``--quick``: a smoke run of a minute or two, numbers not meant to be quoted.
QUICK = {"count": 5_000, "span": 10.0}


def open_command(invoice_id: str, user_id: str, due_ms: int) -> bytes:
    """The ``open`` command of one open invoice due at ``due_ms`` (an invoice view as Stripe's answer)."""
    invoice = {
        "invoice_id": invoice_id, "customer_id": f"cus_{user_id}", "subscription_id": None,
        "user_id": user_id, "status": "open", "amount_due": AMOUNT, "amount_paid": 0,
        "amount_remaining": AMOUNT, "currency": CURRENCY, "due_date": due_ms, "created": now_ms(),
        "attempt_count": 0, "next_payment_attempt": None, "payment_intent_id": None,
        "charge_id": None, "billing_reason": "manual", "period_start": None, "period_end": None,
        "metadata": {"user_id": user_id},
    }
    record = aggregate.command("open", "invoice_id", invoice_id, cause=None, now_ms=now_ms(),
                               invoice=invoice)
    return json.dumps(record, separators=(",", ":")).encode()


def _end_offset(settings: Settings, topic: str, timeout: float = 60.0) -> int:
    """The topic's end offset, retried while a new topic's partitions have no leader yet."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return end_offsets(settings, [topic])[topic]
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def preload_invoices(settings: Settings, invoices: Sequence[tuple[str, int]], worker: WorkerProcess, *,
                     label: str, stall_after: float = 180.0, progress_every: float = 15.0) -> float:
    """Open ``invoices`` (id, due ms) through ``worker``; seconds until the last invoice.created."""
    created = settings.topic("invoice.created")
    commands = ((invoice_id, open_command(invoice_id, f"u-{invoice_id}", due_ms))
                for invoice_id, due_ms in invoices)
    return preload_through(
        settings, worker, commands, len(invoices), command_topic=settings.topic(catalog.INVOICE_COMMANDS),
        done_topic=created, start=_end_offset(settings, created), label=label, sent="open commands",
        done="invoices created", stall_after=stall_after, progress_every=progress_every)


def _midnight(run: BenchRun, options: InvoicesOptions) -> dict[str, Any]:
    settings = run.settings("invoices", domains="subscriptions")
    first_day = settings.overdue_days[0]
    create_part_topics(settings)
    worker = WorkerProcess(settings).launch()
    tag = uuid.uuid4().hex[:8]
    try:
        far = now_ms() + FAR_MS
        began = time.monotonic()
        preload_invoices(settings, [(f"in_up{tag}{i:07d}", far) for i in range(100)], worker,
                         label="worker up")
        serving = time.monotonic() - began
        calibration = max(500, min(5_000, options.count // 20))
        seconds = preload_invoices(settings, [(f"in_cal{tag}{i:07d}", far) for i in range(calibration)],
                                   worker, label="calibration")
        rate = calibration / seconds
        print(f"    worker serving after {serving:.1f} s; calibration: {calibration:,} invoices (due in "
              f"30 days) created at {rate:,.0f}/s", flush=True)
        first = now_ms() + int((1.3 * options.count / rate + 10.0) * 1000)
        step = options.span * 1000 / max(options.count, 1)
        deadlines = {f"in_b{tag}{i:07d}": first + int(i * step) for i in range(options.count)}
        marker = f"in_b{tag}"
        created_topic, overdue_topic = settings.topic("invoice.created"), settings.topic("invoice.overdue")
        observer = Observer(settings, [created_topic, overdue_topic],
                            lambda key: key.startswith(marker), stamps=True)
        cpu_before = cpu_seconds(worker.pid)
        try:
            preload = preload_invoices(
                settings, [(i, due - first_day * DAY_MS) for i, due in deadlines.items()], worker,
                label="invoices")
            created_at = now_ms()
            cpu_preloaded = cpu_seconds(worker.pid)
            wait = max(0.0, (max(deadlines.values()) - now_ms()) / 1000) + 120.0
            observer.wait_for(overdue_topic, list(deadlines), wait, "overdue notices",
                              stall_after=max(120.0, (first - now_ms()) / 1000 + 60))
            load_after = os.getloadavg()
            cpu_done = cpu_seconds(worker.pid)
            rss = worker.rss_kib()
            worker.assert_running()
        finally:
            observer.close()
    finally:
        worker.stop()
    created = observer.seen[created_topic]
    overdue = observer.seen[overdue_topic]
    late_created = [i for i in deadlines if created.get(i, 0) > deadlines[i]]
    lags = [float(overdue[i] - max(deadlines[i], created.get(i, 0))) for i in deadlines]
    assert observer.stamps is not None
    produced = observer.stamps[overdue_topic]
    worker_lags = [float(produced[i] - max(deadlines[i], created.get(i, 0))) for i in deadlines]
    tenth = max(1, len(lags) // 10)  # ``deadlines`` (hence ``lags``) is in deadline order
    by_tenth = [percentile(lags[k * tenth:(k + 1) * tenth], 0.99) for k in range(10)]
    start = max(first, min(created.get(i, 0) for i in deadlines))
    return {
        "count": options.count, "span": options.span, "first_day": first_day, "rate": rate,
        "preload": preload, "first_due_after_preload": (first - created_at) / 1000,
        "late_created": len(late_created), "lags": lags, "worker_lags": worker_lags,
        "by_tenth": by_tenth,
        "drained_after": (max(overdue.values()) - start) / 1000,
        "cpu_preload": cpu_preloaded - cpu_before, "cpu_deadlines": cpu_done - cpu_preloaded,
        "load_after": load_after, "rss_kib": rss,
    }


def _report(result: dict[str, Any]) -> None:
    print(f"    {result['count']:,} open invoices created through the pipeline in {result['preload']:.1f} s "
          f"(worker CPU {result['cpu_preload']:.1f} s); their day-{result['first_day']} notices fall due "
          f"within {result['span']:g} s, the first {result['first_due_after_preload']:.1f} s after the "
          "last invoice was created")
    if result["late_created"]:
        print(f"    {result['late_created']:,} invoices were created after their deadline: their lag "
              "counts from their invoice.created")
    print(latency_line(f"overdue lag of {result['count']:,} (seen - due)", result["lags"], 40))
    print(latency_line("of which the worker's (produced - due)", result["worker_lags"], 40))
    print("    p99 lag by tenth of the deadlines, first to last (s): "
          + " ".join(f"{lag / 1000:.2f}" for lag in result["by_tenth"]))
    p99 = percentile(result["lags"], 0.99) / 1000
    print(f"    all {result['count']:,} invoice.overdue seen {result['drained_after']:.1f} s after the first "
          f"was due; p99 {p99:.2f} s (target <= 2 s: {'met' if p99 <= 2 else 'NOT met'})")
    rss, hwm = result["rss_kib"]
    load = result["load_after"]
    print(f"    worker CPU from the last invoice created to the last notice seen: "
          f"{result['cpu_deadlines']:.1f} s; RSS {rss / 1024:.0f} MiB (peak {hwm / 1024:.0f} MiB); "
          f"load average then {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def run_invoices(settings: Settings, options: InvoicesOptions) -> int:
    """Run the midnight case once; print its numbers; 0 unless it failed."""
    started = time.perf_counter()
    run, registry = BenchRun.start(settings)
    tag = run.tag
    print(f"run {tag}: registry {registry.url} in this process; state in {run.state_root}", flush=True)
    print(f"\n== invoices: {options.count:,} pending invoices whose first overdue notice falls due within "
          f"{options.span:g} s (target p99 <= 2 s)", flush=True)
    failed = False
    try:
        _report(_midnight(run, options))
    except Exception as exc:
        failed = True
        print(f"  FAILED: {type(exc).__name__}: {exc}")
    finally:
        run.close(registry)
    print(f"total wall time: {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0
