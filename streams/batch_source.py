"""Records for the kernel in lists, taken from an agent's channel without Faust's per-event stream.

Faust delivers every fetched record of an agent's topics into the agent
channel's queue (``Conductor`` -> ``channel.queue``); its ``Stream`` then
takes them out one at a time, each through a task hop, a context variable,
sensors, processors and, with ``noack_take``, a ``wait_first`` per batch that
waits the whole ``within`` even when records are there.  On the kernel's hot
path that cost more per record than deciding it.  :class:`BatchSource` takes
what the queue holds at once instead, as a list, and does per record only
what the stream does that the kernel's guarantees rest on:

- a record fetched under an older consumer generation, or taken while flow
  is suspended by a rebalance, is not processed (Faust's stream skips it
  too), and is released without making its offset committable
  (:func:`streams.faust_patches.release`; Faust's stream would acknowledge
  it): the partition's next owner, or this worker in the new generation,
  reads it again from the committed offset;
- every other record is *tracked* (``Consumer._unacked_messages``, as
  ``Stream`` does), so a rebalance waits (``Consumer.wait_empty``) until the
  batch that holds it is acknowledged;
- the kernel acknowledges each record through :meth:`ack` once the batch is
  done: ``Event.ack`` decrements the message's reference count, and the last
  reference marks the offset committable (``Consumer.ack``).

A record still in the queue when a rebalance starts is dropped with the queue
(``app.flow_control.clear()``, as for every agent) and read again later, since
its offset was never acknowledged.

Not done per record: Faust's stream sensors (``on_stream_event_in/out``,
``on_message_in/out``; counters for the monitor's web page).  The one sensor
value Faust itself reads, the time a partition's stream last took an event
(``Monitor.stream_inbound_time``, behind the aiokafka driver's "stream idle"
warnings), is set once per batch per partition.

Private parts of faust-streaming 0.15.3 used (pinned <0.16 in setup.cfg,
checked by ``tests/unit/test_batch_source.py``): ``ThrowableQueue._errors``,
``Consumer._unacked_messages``, ``Message.tracked``/``generation_id``,
``Monitor.stream_inbound_time``, ``App.topics.acking_topics``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from faust.types import EventT

from streams import faust_patches


class BatchSource:
    """The records of one agent's stream, taken in lists (see the module docstring)."""

    def __init__(self, stream: Any) -> None:
        self.app = stream.app
        # As Stream.noack_take does: iterating the channel registers the
        # agent's iterator channel with the conductor, which fills its queue.
        self.channel = stream.channel.__aiter__()
        self.queue = self.channel.queue
        schema = self.channel.schema
        if (schema.key_serializer, schema.value_serializer, schema.value_type) == ("raw", "raw", None) \
                and schema.key_type in (bytes, None):
            # the conductor may deliver to it without waiting (faust_patches.deliver_now)
            setattr(self.channel, faust_patches.BATCH_CHANNEL, True)

    async def take(self, max_records: int, within: float = 0.0) -> list[EventT]:
        """Wait for a record, then ``within`` seconds more, then take up to ``max_records``.

        Only records of the current generation are returned, so the list may
        be empty (everything taken was stale).
        """
        queue = self.queue
        first = await queue.get()  # raises what was thrown into the channel
        if within > 0 and queue.qsize() < max_records:
            await asyncio.sleep(within)
        taken = [first]
        get = queue.get_nowait
        while len(taken) < max_records and not queue.empty():
            taken.append(get())
        return self._current(taken)

    def _current(self, taken: list[Any]) -> list[EventT]:
        app = self.app
        consumer = app.consumer
        generation = app.consumer_generation_id
        active = app.flow_control.is_active()
        acking = app.topics.acking_topics
        unacked = consumer._unacked_messages
        events: list[EventT] = []
        partitions = set()
        for event in taken:
            message = event.message
            if not active or message.generation_id != generation:
                # Faust's stream skips it too (and would make it committable): done, read again
                faust_patches.release(consumer, message)
                continue
            if message.topic in acking and not message.tracked:
                message.tracked = True
                unacked.add(message)
            partitions.add(message.tp)
            events.append(event)
        monitor = app.monitor
        if partitions and monitor is not None:
            now = time.monotonic()
            inbound = monitor.stream_inbound_time
            for tp in partitions:
                inbound[tp] = now
        return events

    def release(self, events: list[EventT]) -> None:
        """The batch was not processed: done for Faust's bookkeeping, not committable, read again."""
        consumer = self.app.consumer
        for event in events:
            faust_patches.release(consumer, event.message)

    @staticmethod
    def ack(events: list[EventT]) -> None:
        """The batch is done: its offsets may be committed (unless fetched in an older generation)."""
        for event in events:
            event.ack()

