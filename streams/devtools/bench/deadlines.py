"""Part ``deadlines``: how late ``order.expired`` comes, for a burst and for many pending.

Two runs, each on a fresh ``paystream worker`` subprocess and topics of its own:

- **burst**: ``burst`` orders whose payment deadlines all fall within
  ``burst_span`` seconds;
- **spread**: ``pending`` orders with deadlines spread evenly over ``span``
  seconds; the lag is measured on those due in the first ``window`` seconds,
  while the rest stay pending in the index.

Orders are created through the pipeline (:mod:`.preload`) with an explicit
``expires_at``.  A calibration batch (deadlines 30 days out, never due here)
measures the worker's create rate first, so the measured deadlines can be
placed after the moment the worker will have created them all.  Lag =
order.expired seen by the bench - max(deadline, order.created seen); an order
whose order.created came after its deadline is counted and reported.

After the spread preload, every changelog of the run is read: record count,
largest record (key + value bytes), records over 1 KiB.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from streams.devtools.bench.common import (
    ORDERS_ONLY,
    BenchRun,
    Observer,
    Prober,
    changelog_record_sizes,
    create_part_topics,
    latency_line,
    now_ms,
    percentile,
    start_worker,
    topics_with_prefix,
)
from streams.devtools.bench.preload import preload_orders

FAR_MS = 30 * 24 * 3600 * 1000


@dataclasses.dataclass(frozen=True)
class DeadlineOptions:
    burst: int
    burst_span: float
    pending: int
    span: float
    window: float


def _expiry_run(run: BenchRun, part: str, count: int, span: float, window: float) -> dict[str, Any]:
    settings = run.settings(part, domains=ORDERS_ONLY)
    create_part_topics(settings)
    prober = Prober(settings)
    worker, ready = start_worker(settings, prober)
    prober.close()
    tag = uuid.uuid4().hex[:8]
    try:
        calibration = max(500, min(5_000, count // 20))
        far = now_ms() + FAR_MS
        seconds = preload_orders(
            settings, [(f"cal-{tag}-{i:07d}", f"u-cal-{tag}-{i}", far) for i in range(calibration)],
            worker, label=f"{part} calibration")
        rate = calibration / seconds
        print(f"    worker serving after {ready:.1f} s; calibration: {calibration:,} orders "
              f"(deadlines 30 days out) created at {rate:,.0f}/s", flush=True)
        first = now_ms() + int((1.3 * count / rate + 10.0) * 1000)
        step = span * 1000 / max(count, 1)
        deadlines = {f"e-{tag}-{i:07d}": first + int(i * step) for i in range(count)}
        horizon = first + int(window * 1000)
        measured = [order_id for order_id, due in deadlines.items() if due <= horizon]
        marker = f"e-{tag}-"
        observer = Observer(settings, [settings.topic("order.created"), settings.topic("order.expired")],
                            lambda key: key.startswith(marker))
        try:
            preload = preload_orders(settings, [(o, f"u-{o}", due) for o, due in deadlines.items()],
                                     worker, label=part)
            created_at = now_ms()
            sizes = None
            if part.endswith("spread"):
                sizes = changelog_record_sizes(
                    settings, [t for t in topics_with_prefix(settings) if t.endswith("-changelog")])
            wait = max(0.0, (horizon - now_ms()) / 1000) + 120.0
            observer.wait_for(settings.topic("order.expired"), measured, wait, f"{part} expiries",
                              stall_after=max(120.0, (horizon - now_ms()) / 1000 + 60))
            worker.assert_running()
        finally:
            observer.close()
    finally:
        worker.stop()
    created = observer.seen[settings.topic("order.created")]
    expired = observer.seen[settings.topic("order.expired")]
    late_created = [o for o in measured if created.get(o, 0) > deadlines[o]]
    lags = [float(expired[o] - max(deadlines[o], created.get(o, 0))) for o in measured]
    start = max(min(deadlines[o] for o in measured), min(created.get(o, 0) for o in measured))
    return {
        "count": count, "span": span, "window": window, "measured": len(measured),
        "calibration": calibration, "create_rate": rate, "ready": ready, "preload": preload,
        "first_due_after_preload": (first - created_at) / 1000, "late_created": len(late_created),
        "lags": lags, "drained_after": (max(expired[o] for o in measured) - start) / 1000,
        "sizes": sizes,
    }


def run_deadlines(run: BenchRun, options: DeadlineOptions) -> None:
    print(f"  burst: {options.burst:,} deadlines due within {options.burst_span:g} s (target p99 <= 2 s)",
          flush=True)
    burst = _expiry_run(run, "deadlines-burst", options.burst, options.burst_span, options.burst_span)
    _report(burst)
    print(f"\n  spread: {options.pending:,} pending deadlines over {options.span:g} s, measured on those due "
          f"in the first {options.window:g} s (target p99 <= 1 s)", flush=True)
    spread = _expiry_run(run, "deadlines-spread", options.pending, options.span, options.window)
    _report(spread)


def _report(result: dict[str, Any]) -> None:
    print(f"    {result['count']:,} orders created through the pipeline in {result['preload']:.1f} s; the "
          f"first deadline fell due {result['first_due_after_preload']:.1f} s after the last was created")
    if result["late_created"]:
        print(f"    {result['late_created']:,} measured orders were created after their deadline: their lag "
              "counts from their order.created")
    print(latency_line(f"expiry lag of {result['measured']:,} (expired seen - due)", result["lags"], 44))
    print(f"    all measured expired {result['drained_after']:.1f} s after the first was due "
          f"(p99 {percentile(result['lags'], 0.99) / 1000:.2f} s)")
    if result["sizes"] is not None:
        report_sizes(result["sizes"], f"{result['count'] + result['calibration']:,} pending deadlines")


def report_sizes(sizes: dict[str, dict[str, int]], what: str) -> None:
    """Print :func:`~streams.devtools.bench.common.changelog_record_sizes` (memory part too)."""
    print(f"    changelog records with {what} (key + value bytes; target: none over 1 KiB):")
    for topic, entry in sorted(sizes.items()):
        short = topic.split(".paystream-", 1)[-1] if ".paystream-" in topic else topic
        print(f"      {short:<36} {entry['records']:>10,} records, largest {entry['largest']:>9,} B, "
              f"{entry['over_1kib']:,} over 1 KiB")
