"""Preloading order state for the deadline and memory parts: through the real pipeline.

The bench never writes table changelogs by hand (their format belongs to the
order agent and the deadline index and changes with them).  It sends one
``create`` command per order, with its payment deadline as ``expires_at``, to
a running worker and waits until that many ``order.created`` were published:
the rows, deadlines and index entries are then whatever the worker writes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from streams import catalog
from streams.devtools.bench.common import (
    Stalled,
    WorkerProcess,
    create_command,
    end_offsets,
    flush,
    produce,
    producer,
)
from streams.settings import Settings

#: (order id, user id, expires_at epoch ms)
OrderSpec = tuple[str, str, int]


def preload_orders(settings: Settings, orders: Sequence[OrderSpec], worker: WorkerProcess, *,
                   label: str = "preload", stall_after: float = 120.0, progress_every: float = 15.0) -> float:
    """Create ``orders`` through ``worker``; seconds from the first command to the last order.created.

    The commands go out as fast as the producer takes them (a backlog for the
    worker); progress (orders/s, ETA) is printed every ``progress_every`` s.
    """
    created = settings.topic("order.created")
    commands = settings.topic(catalog.ORDER_COMMANDS)
    start = end_offsets(settings, [created])[created]
    client = producer(settings, f"bench-{label}",
                      **{"linger.ms": 20, "queue.buffering.max.messages": 500_000})
    began = time.monotonic()
    for index, (order_id, user_id, expires_at) in enumerate(orders):
        command = create_command(order_id, user_id, expires_at_ms=expires_at)
        produce(client, commands, order_id.encode(), command)
        if index % 10_000 == 0:
            client.poll(0)
    flush(client, f"{label}: create commands")
    wanted = len(orders)
    done = 0
    last_change = last_print = time.monotonic()
    while done < wanted:
        time.sleep(0.5)
        worker.assert_running()
        count = end_offsets(settings, [created])[created] - start
        now = time.monotonic()
        if count != done:
            done, last_change = count, now
        elif now - last_change > stall_after:
            raise Stalled(f"{label}: {done:,}/{wanted:,} orders created, none for {stall_after:.0f} s\n"
                          f"{worker.log_tail()}")
        if now - last_print >= progress_every and done < wanted:
            rate = done / (now - began)
            eta = (wanted - done) / rate if rate else float("inf")
            print(f"    {label}: {done:,}/{wanted:,} orders created, {rate:,.0f}/s, ETA {eta:,.0f} s",
                  flush=True)
            last_print = now
    return time.monotonic() - began
