"""The kind of event loop a paystream process runs on (``PAYSTREAM_EVENT_LOOP``).

One place that decides it, for the worker and for the bench's raw loops, so
both sides of a benchmark run on the same kind of loop.
"""

from __future__ import annotations

import asyncio

from streams.settings import Settings


def install_event_loop(settings: Settings) -> None:
    """Make every event loop this process creates from now on ``PAYSTREAM_EVENT_LOOP``'s.

    uvloop by default: the worker spends much of its time in the loop
    itself (tasks, futures, socket reads and writes for the broker, the
    hand-over from Faust's consumer thread), where libuv's loop costs less
    than asyncio's (measured with ``paystream bench orders``: about 12% more
    order lifecycles a second, 6% less CPU per input).  Faust's consumer
    thread makes its loop with ``asyncio.new_event_loop()``, so it gets the
    same kind.  ``asyncio`` keeps the standard library's loop.
    """
    if settings.event_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(None)
