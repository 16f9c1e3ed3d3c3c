"""Persisted deadlines, bucketed into time windows, closed by a timer.

Why not Faust's windowed tables and ``on_window_close``: windows restored from
the changelog are never registered for expiry (faust-streaming #385, #193),
so a deadline would be lost across a restart or a rebalance.  Here a deadline
is a plain entry in a changelog-backed table, keyed by its window and the
partition of the aggregate it belongs to (``"<window start ms>:<partition>"``
-> ``{aggregate_id: deadline_ms}``).  A timer on every worker scans the window
keys of the partitions it owns (a RocksDB table iterates only those), and
hands each due aggregate to ``on_due``, which sends a keyed command so the
agent that owns the aggregate decides, re-checking its state.  That agent
then cancels the entry; until it does, the timer hands it over again after
``redeliver_after`` seconds, so a command lost in a rebalance is not the end.

One mechanism for every timer of the pipeline: order.expired here, and
invoice.overdue and subscription.expired in the payment domain.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import faust
from faust.types import EventT

from streams import catalog

OnDue = Callable[[str, int], Awaitable[None]]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Deadlines:
    """A deadline index named ``name`` on ``app``; see the module docstring."""

    def __init__(
        self,
        app: Any,
        name: str,
        on_due: OnDue,
        *,
        window_ms: int = 5_000,
        interval: float = 0.5,
        redeliver_after: float = 15.0,
        partitions: int = catalog.EVENT_PARTITIONS,
    ) -> None:
        self.name = name
        self.window_ms = window_ms
        self.on_due = on_due
        self.redeliver_after = redeliver_after
        # bytes keys: the raw serializer, as on the topics (faust-streaming #514);
        # values are JSON objects {aggregate_id: deadline_ms}.
        self.table = app.Table(
            name, key_type=bytes, value_type=None, partitions=partitions, default=None,
        )
        self._handed: dict[tuple[str, int], float] = {}  # (aggregate, deadline) -> monotonic
        async def tick() -> None:  # Faust passes the app to timers that take an argument
            await self.close_due()

        app.timer(interval, name=f"{name}-timer")(tick)

    def _key(self, deadline_ms: int, partition: int) -> str:
        window = deadline_ms - deadline_ms % self.window_ms
        return f"{window:015d}:{partition}"

    @staticmethod
    def _partition() -> int:
        event: EventT | None = faust.current_event()
        if event is None:
            raise RuntimeError("deadlines change only while an agent processes an event")
        return event.message.partition

    def schedule(self, aggregate_id: str, deadline_ms: int) -> None:
        """Remember a deadline (call while processing an event of ``aggregate_id``)."""
        key = self._key(deadline_ms, self._partition())
        entries = dict(self.table.get(key) or {})
        if entries.get(aggregate_id) == deadline_ms:
            return
        entries[aggregate_id] = deadline_ms
        self.table[key] = entries

    def cancel(self, aggregate_id: str, deadline_ms: int) -> None:
        """Forget a deadline (it fired, or the aggregate no longer needs it)."""
        key = self._key(deadline_ms, self._partition())
        entries = self.table.get(key)
        self._handed.pop((aggregate_id, deadline_ms), None)
        if not entries or aggregate_id not in entries:
            return
        entries = {k: v for k, v in entries.items() if k != aggregate_id}
        if entries:
            self.table[key] = entries
        else:
            del self.table[key]

    def due_windows(self, at_ms: int) -> Iterator[str]:
        """Keys of this worker's windows that start at or before ``at_ms``."""
        for raw in list(self.table.keys()):
            key = raw.decode() if isinstance(raw, bytes) else raw
            if int(key.partition(":")[0]) <= at_ms:
                yield key

    def pending(self) -> Iterator[tuple[str, int]]:
        """Every (aggregate_id, deadline_ms) held for this worker's partitions."""
        for entries in list(self.table.values()):
            yield from (entries or {}).items()

    async def close_due(self, at_ms: int | None = None) -> int:
        """Hand every due deadline of this worker's partitions to ``on_due``."""
        at = now_ms() if at_ms is None else at_ms
        clock = time.monotonic()
        self._forget_stale(clock)
        handed = 0
        for key in self.due_windows(at):
            for aggregate_id, deadline_ms in (self.table.get(key) or {}).items():
                if deadline_ms > at:
                    continue
                last = self._handed.get((aggregate_id, deadline_ms))
                if last is not None and clock - last < self.redeliver_after:
                    continue
                await self.on_due(aggregate_id, deadline_ms)
                self._handed[(aggregate_id, deadline_ms)] = clock
                handed += 1
        return handed

    def _forget_stale(self, clock: float) -> None:
        """Drop hand-over marks of deadlines this worker may no longer own."""
        if len(self._handed) < 1024:
            return
        horizon = clock - 10 * self.redeliver_after
        self._handed = {k: t for k, t in self._handed.items() if t >= horizon}
