"""Preloading order state for the deadline and memory parts: through the real pipeline.

The bench never writes table changelogs by hand (their format belongs to the
order agent and the deadline index and changes with them).  It sends one
``create`` command per order, with its payment deadline as ``expires_at``, to
a running worker and waits until that many ``order.created`` were published:
the rows, deadlines and index entries are then whatever the worker writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

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
    commands = ((order_id, create_command(order_id, user_id, expires_at_ms=expires_at))
                for order_id, user_id, expires_at in orders)
    return preload_through(
        settings, worker, commands, len(orders), command_topic=settings.topic(catalog.ORDER_COMMANDS),
        done_topic=created, start=end_offsets(settings, [created])[created], label=label,
        sent="create commands", done="orders created", stall_after=stall_after,
        progress_every=progress_every)


def preload_through(settings: Settings, worker: WorkerProcess, commands: Iterable[tuple[str, bytes]],
                    wanted: int, *, command_topic: str, done_topic: str, start: int, label: str,
                    sent: str, done: str, stall_after: float, progress_every: float) -> float:
    """Send ``commands`` (key, value) to ``command_topic`` and wait for ``wanted`` records on ``done_topic``.

    Counted from offset ``start`` of ``done_topic`` (its end before the
    commands went out); seconds from the first command to the last record.
    :class:`Stalled` (with the worker's log tail) when none arrives for
    ``stall_after`` s; ``sent`` and ``done`` name the commands and the
    records in the messages and the progress printed every ``progress_every`` s.
    """
    client = producer(settings, f"bench-{label}",
                      **{"linger.ms": 20, "queue.buffering.max.messages": 500_000})
    began = time.monotonic()
    for index, (key, value) in enumerate(commands):
        produce(client, command_topic, key.encode(), value)
        if index % 10_000 == 0:
            client.poll(0)
    flush(client, f"{label}: {sent}")
    count_done = 0
    last_change = last_print = time.monotonic()
    while count_done < wanted:
        time.sleep(0.5)
        worker.assert_running()
        count = end_offsets(settings, [done_topic])[done_topic] - start
        now = time.monotonic()
        if count != count_done:
            count_done, last_change = count, now
        elif now - last_change > stall_after:
            raise Stalled(f"{label}: {count_done:,}/{wanted:,} {done}, none for {stall_after:.0f} s\n"
                          f"{worker.log_tail()}")
        if now - last_print >= progress_every and count_done < wanted:
            rate = count_done / (now - began)
            eta = (wanted - count_done) / rate if rate else float("inf")
            print(f"    {label}: {count_done:,}/{wanted:,} {done}, {rate:,.0f}/s, ETA {eta:,.0f} s",
                  flush=True)
            last_print = now
    return time.monotonic() - began
