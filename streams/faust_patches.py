"""Corrections to faust-streaming's consumer, applied once per process.

All touch private parts of faust-streaming 0.15.3 (pinned <0.16 in
setup.cfg) and are tested in ``tests/unit/test_faust_patches.py``; all were
found by measuring and crashing paystream, not by reading.

1. **A short fetch wait.**  Faust hard-codes ``fetch_max_wait_ms=1500`` for
   aiokafka (``AIOKafkaConsumerThread._create_worker_consumer``), and aiokafka
   keeps one fetch in flight per broker for the partitions without buffered
   records: records arriving meanwhile for a partition left out of that fetch
   waited up to 1.5 s (``paystream bench orders`` showed a p99 of 1.5 s per
   hop).  :data:`FETCH_MAX_WAIT_MS` is set on each new consumer before it
   starts (aiokafka reads ``_fetch_max_wait_ms`` in ``start()``).

2. **No acknowledgement of a record from an older consumer generation.**  After
   a rebalance Faust's streams skip records fetched under the previous
   generation, and *acknowledge* them (``Stream._py_aiter``: skipped values are
   acked), so the commit could move past records no agent processed: the kill
   -9 test saw fan-out commands committed and never applied.  Faust re-reads
   every assigned partition from its committed offset after a rebalance
   (``Consumer.perform_seek``), so a stale record is marked done for the
   consumer's bookkeeping (nothing waits for it) but its offset is not
   recorded as processed; it is read again and processed in the new
   generation.  The same holds for a record an agent finished after the
   rebalance that took its partition: it is processed again (the kernel's
   decisions are idempotent), never skipped.

   A released record is also *held*: the partition's commit stops before it
   until a re-read copy is acknowledged, and once the flow runs the fetch
   loop seeks the partition back to it, between two fetches, if it was
   fetched past it (:func:`release`, :func:`seek_back`).  Between two
   fetches, because a seek while the loop still hands
   over records fetched before it lets those move Faust's read offset past
   the held one again: the re-read copy was then dropped as already read,
   and the commit stayed before it for good (the order kill -9 test: an
   index partition committed 31 of 35, four fan-out commands never applied).

3. **Cheap delivery into the kernel's channels.**  Faust's fetch loop
   (``Consumer._drain_messages``) hands each record to the conductor under a
   ``wait_first`` (four tasks and an ``asyncio.wait`` per record) and the
   conductor's handler decodes it and puts it into each subscribed channel's
   queue; together some tens of microseconds per record, as much as
   deciding it.  For a partition whose only subscriber is a kernel agent's
   channel (marked by :class:`streams.batch_source.BatchSource`, raw key and
   value), :func:`deliver_now` does the same delivery synchronously: count
   the reference, wrap the record as the Event the raw decoder makes, put it
   into the queue.  Whenever that would have to wait (flow suspended by a
   rebalance, a full queue, a full producer buffer) or the partition has any
   other subscriber, the record goes Faust's own way, so back pressure and
   rebalances behave as before.  The rest of the loop (``commit_every``,
   the read offsets of topics without acknowledgements) is Faust's, copied;
   the test pins the original's source.

4. **Every record between the committed offset and the commit is handed
   over.**  Faust decides what the fetch loop hands over with a per-partition
   *read offset*, and takes any distance between it and the next record as
   records missing from the log (a *gap*, counted as acknowledged by
   ``_new_offset``).  Logging the loop in the payment kill -9 test (every
   fetch, every seek, every gap: 10 and 15 gaps in two of three runs)
   showed how that goes wrong at start-up, with one consumer generation
   throughout (static membership: a restarted worker takes its place):

   - Faust's recovery resumes the flow to read the changelogs while the
     agents' partitions are paused in its own bookkeeping only; aiokafka
     prefetches every assigned partition, and a fetch returned
     ``order.created[1] 0..2`` (and ten more) for paused partitions.
     ``Consumer.getmany`` skips such records, but aiokafka's position is
     past them.  Faust's seek to committed offsets (``perform_seek``) leaves
     a partition with nothing committed alone, so they were never read: the
     next record, 3, was handed over, and as Faust checks no head when
     nothing is committed (``if committed_offset:``), its acknowledgement
     lets the next commit pass them.
   - ``perform_seek`` runs while the loop hands over records (the flow is
     active); the loop handed over 4..5 of a partition between aiokafka's
     seek to the committed 4 and Faust setting the read offset back to 4;
     the next record, 6, was taken as a gap 5..6 (Faust's gap even includes
     the record itself).  Here 4 and 5 had been delivered, so no harm
     done; but nothing tells such a gap from records skipped without being
     handed over, which it would commit past, and Faust's head check
     (``min(acked) - committed > 1``) lets exactly one missing head record
     through even without a gap.
   - Records the loop hands over between the agents' partitions being
     resumed and the end of ``Recovery.on_recovery_completed`` go into the
     channel queues, and its ``app.flow_control.resume()`` (after
     ``perform_seek``) clears every channel queue (mode's
     ``FlowControlEvent.resume``): dropped unprocessed, the read offset and
     the fetch position past them.  Read from Faust's and mode's code after
     the runs above still stalled now and then (a partition whose commit
     never reached its end): with Faust's head check, one such record at
     the committed offset is committed past, more stall the partition.
     With the fix below, the subscription kill -9 test logged it ("flow
     control cleared 1 records") in a run that passed.

   The fix, for acknowledged topics only (changelogs keep Faust's read
   offsets): one *expected offset* per partition, the next record the loop
   may hand over.  Until ``perform_seek`` sets it nothing is handed over;
   it sets it to the committed offset, or to the log start (looked up)
   when nothing is committed, and has the partition sought back to it if
   it was fetched past it meanwhile; a seek sets it to its target; the
   loop advances it before any ``await``, so a seek made meanwhile wins.  A
   record before it is dropped (already read); a record after it is not
   handed over: the expected offset is held (the commit stops before it,
   :func:`release`'s hold) and the partition is sought back to it between
   two fetches (:func:`seek_back`, in the consumer's thread: aiokafka is
   not thread-safe).  Records a flow-control resume (or a rebalance)
   clears from the channel queues are released: held and read again
   (:func:`_release_what_flow_control_clears`).  Records fetched for
   a paused partition are taken out of the fetch before Faust's
   ``getmany`` sees them, held and read again once it is resumed.  No gap is
   recorded, unless :data:`HOLE_CONFIRMATIONS` rewinds to one offset each
   come back with a later record (offsets really missing from the log: a
   compacted or transactional topic; paystream's acknowledged topics are
   neither).  And ``_new_offset`` returns nothing while the record at the
   committed offset, or at the log start when nothing is committed, is not
   done.  So an offset is committed only once every record from the
   committed offset (or the log start) up to it was acknowledged or found
   missing from the log; the price is a record handed over twice when a
   seek raced the loop (the kernel's decisions are idempotent).

5. **A full kernel channel does not stop the fetch loop.**  Faust's loop
   waits until the record's channel has room; one agent that cannot go on
   (the payment agent retrying its batch while Stripe is unreachable) then
   stopped every partition of the worker: ``paystream bench orders --parts
   deadlines`` with every domain on and no Stripe stopped creating orders
   after about 9,300 of 10,000 commands.  A record whose only subscriber is
   a kernel channel that stays full for :data:`HAND_BACK_AFTER` is handed
   back instead (:func:`hand_back`): the expected offset stays on it, the
   commit is held before it and the partition is sought back to it (4.'s
   machinery); Faust's buffer-full state keeps the partition out of the
   fetches until the channel drains to its low mark.  The other partitions
   go on.  A busy agent makes room within the wait, so a backlog is not
   fetched twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

#: How long the broker may hold a fetch that found nothing (ms).  A short wait
#: costs an idle worker a few empty fetches a second.
FETCH_MAX_WAIT_MS = 100

_APPLIED = "_paystream_patched"


def apply() -> None:
    """Apply the corrections (idempotent)."""
    _shorten_fetch_wait()
    _no_stale_acks()
    _hold_commits()
    _read_every_record()
    _release_what_flow_control_clears()
    _deliver_to_batch_channels()


def _shorten_fetch_wait() -> None:
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    if getattr(thread, _APPLIED, False):
        return
    create = thread._create_worker_consumer

    def create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    thread._create_worker_consumer = create_worker_consumer
    setattr(thread, _APPLIED, True)


def stale(consumer: Any, message: Any) -> bool:
    """Whether ``message`` was fetched under an older generation than the consumer's now."""
    fetched = getattr(message, "generation_id", None)
    current = getattr(consumer.app, "consumer_generation_id", None)
    return fetched is not None and current is not None and fetched != current


#: Attribute of a consumer: TP -> offsets released (to be read again) and not yet acked.
HELD = "_paystream_held"


def held(consumer: Any) -> dict[Any, set[int]]:
    """The offsets of ``consumer`` each partition's commit must not pass (see :func:`release`)."""
    found: dict[Any, set[int]] | None = getattr(consumer, HELD, None)
    if found is None:
        found = {}
        setattr(consumer, HELD, found)
    return found


def release(consumer: Any, message: Any) -> None:
    """Mark ``message`` done without making its offset committable: it is read again.

    Nothing waits for it any more (``Consumer.wait_empty``); its offset is not
    recorded as processed, and it is *held*: the partition's commit cannot
    move past it until a re-read copy of it is acknowledged (Faust's own head
    check is skipped on a partition never committed, so without the hold a
    record released at its head was committed past: the payment kill -9 test
    lost a payment that way), and the fetch loop seeks the partition back to
    it between two fetches once the flow runs (:func:`seek_back`).
    """
    from faust.types.tuples import ack_lock

    with ack_lock:
        message.acked = True
        consumer._unacked_messages.discard(message)
    if _hold(consumer, message.tp, message.offset):
        rewinds_due(consumer).add(message.tp)


def _hold(consumer: Any, tp: Any, offset: int) -> bool:
    """Hold ``tp``'s commit before ``offset``; True if it is now the partition's first held offset."""
    offsets = held(consumer).setdefault(tp, set())
    first = not offsets or offset < min(offsets)
    offsets.add(offset)
    return first


#: Attribute of a consumer: the held partitions the fetch loop is to seek back (:func:`seek_back`).
REWINDS_DUE = "_paystream_rewinds_due"


def rewinds_due(consumer: Any) -> set[Any]:
    """The partitions of ``consumer`` whose first held offset the fetch loop is to seek back to."""
    found: set[Any] | None = getattr(consumer, REWINDS_DUE, None)
    if found is None:
        found = set()
        setattr(consumer, REWINDS_DUE, found)
    return found


async def seek_back(consumer: Any) -> None:
    """Seek each partition due a rewind back to its first held offset, unless not yet past it.

    The fetch loop calls this between two fetches, while the flow runs, so
    no record fetched before the seek is handed over after it (one would set
    the expected offset past the held record, and the re-read copy would be
    dropped as already read).  During a rebalance nothing is sought (the
    partitions stay due); after it (``Consumer.perform_seek``) every held
    partition is due again, wherever the new assignment starts it (its
    committed offset, which the hold keeps at or before the held one; a
    partition with nothing committed, which ``seek_to_committed`` leaves
    alone, where aiokafka's reset policy puts it).  So the position is
    asked, and only a partition fetched past the held record is sought back
    to it: never forward, which could skip records (nor with a position
    asked before a rebalance began: the partition stays due).  A partition
    Faust has paused stays due until it is resumed (what it fetched while
    paused is not handed over, module docstring 4.).  Each rewind is
    counted (:func:`jumped` tells a hole in the log by them).
    """
    due = rewinds_due(consumer)
    if not due or not getattr(consumer, "flow_active", True):
        return
    active = getattr(consumer, "_active_partitions", None)
    buffered = getattr(consumer, "_buffered_partitions", ())
    for tp in list(due):
        offsets = held(consumer).get(tp)
        if not offsets:
            due.discard(tp)
            continue
        if active is not None and tp not in active and tp not in buffered:
            continue  # paused (start-up recovery): what it fetches now is not handed over either
        due.discard(tp)
        floor = min(offsets)
        generation = getattr(consumer.app, "consumer_generation_id", None)
        try:
            position = await consumer.position(tp)
            if not getattr(consumer, "flow_active", True) \
                    or getattr(consumer.app, "consumer_generation_id", None) != generation:
                # a rebalance began meanwhile: its seek to committed offsets (at or before
                # the held one) may already be done, and the position asked is stale
                due.add(tp)
                continue
            if position is None or position > floor:
                # in the consumer's thread, as Faust's own seeks to committed offsets: aiokafka is not
                # thread-safe, and Faust's Consumer.seek calls it from this one
                await consumer.seek_wait({tp: floor})
                _expect(consumer, tp, floor, f"a rewind to {floor}")
                rewound = _rewound(consumer)
                last = rewound.get(tp)
                rewound[tp] = (floor, last[1] + 1 if last and last[0] == floor else 1)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not assigned here any more, or stopping: the next owner reads it
            log.info("not rewinding %s to a released record: %r", tp, exc)


def _hold_commits() -> None:
    """Faust's ``_new_offset`` never returns an offset past a held one (see :func:`release`)."""
    from faust.transport import consumer as faust_consumer

    cls = faust_consumer.Consumer
    if getattr(cls, "_paystream_holds", False):
        return
    new_offset = cls._new_offset

    def new_offset_held(self: Any, tp: Any) -> int | None:
        offsets = held(self).get(tp)
        if offsets:
            committed = self._committed_offset[tp]
            if committed is not None:  # committed past it elsewhere (another owner): not ours
                offsets.difference_update({o for o in offsets if o < committed})
            acked = self._acked[tp]
            if offsets and acked and min(acked) > min(offsets):
                return None  # the first record to commit is the held one, still unread
        return new_offset(self, tp)

    perform_seek = cls.perform_seek

    async def perform_seek_then_rewind(self: Any) -> None:
        await perform_seek(self)
        rewinds_due(self).update(tp for tp, offsets in held(self).items() if offsets)

    cls._new_offset = new_offset_held
    cls.perform_seek = perform_seek_then_rewind
    cls._paystream_holds = True


# --------------------------------------------------------------------------
# 4. Every record between the committed offset and the commit is handed over

#: Attribute of a consumer: TP -> the offset of the next record the fetch loop hands over.
EXPECTED = "_paystream_expected"
#: Attribute of a consumer: TP -> first offset of a partition with nothing committed (its log start).
STARTS = "_paystream_starts"
#: Attribute of a consumer: TP -> (offset, times) the fetch loop rewound the partition to that offset.
REWOUND = "_paystream_rewound"
#: Attribute of a consumer: TP -> what last set the expected offset (for the log).
RESETS = "_paystream_resets"

#: Rewinds to one offset that each came back with a later first record before the offsets
#: between are taken as missing from the log (a compacted or transactional topic; paystream's
#: acknowledged topics are neither, so this only keeps such a partition from rewinding forever).
HOLE_CONFIRMATIONS = 3


def _consumer_dict(consumer: Any, name: str) -> dict[Any, Any]:
    found: dict[Any, Any] | None = consumer.__dict__.get(name)
    if found is None:
        found = {}
        setattr(consumer, name, found)
    return found


#: What :func:`expected` holds for a partition before ``perform_seek`` set it: nothing is handed over.
_UNSET = object()


def expected(consumer: Any) -> dict[Any, int | None]:
    """TP -> offset of the next record ``consumer``'s fetch loop may hand over (module docstring, 4.)."""
    return _consumer_dict(consumer, EXPECTED)


def starts(consumer: Any) -> dict[Any, int]:
    """TP -> log start of each assigned partition that had nothing committed at the last seek."""
    return _consumer_dict(consumer, STARTS)


def _rewound(consumer: Any) -> dict[Any, tuple[int, int]]:
    return _consumer_dict(consumer, REWOUND)


def _expect(consumer: Any, tp: Any, offset: int | None, why: str) -> None:
    expected(consumer)[tp] = offset
    _consumer_dict(consumer, RESETS)[tp] = why


def skipped(consumer: Any, tp: Any, offset: int) -> None:
    """The records of ``tp`` from ``offset`` on were not handed over: hold the commit, read them again."""
    _hold(consumer, tp, offset)
    rewinds_due(consumer).add(tp)


def jumped(consumer: Any, tp: Any, want: int, offset: int) -> bool:
    """Record ``offset`` came where ``want`` was due: False, it is read again; True, a real hole.

    Only after :data:`HOLE_CONFIRMATIONS` rewinds to ``want`` that each came
    back with a later record are the offsets between taken as missing from
    the log: they are added to Faust's gaps (counted as done) and the hold
    on ``want`` is lifted.
    """
    if tp in rewinds_due(consumer) and want in held(consumer).get(tp, ()):
        return False  # the rest of a fetch already found past it: the rewind is due
    rewound = _rewound(consumer)
    last = rewound.get(tp)
    if last is not None and last[0] == want and last[1] >= HOLE_CONFIRMATIONS:
        del rewound[tp]
        log.warning("%s: offsets %d..%d missing from the log (read again %d times from %d, the first "
                    "record was %d each time): committed past as a gap", tp, want, offset - 1, last[1],
                    want, offset)
        gap = consumer._gap[tp]
        gap.addi(want, offset)
        gap.merge_overlaps()
        offsets = held(consumer).get(tp)
        if offsets:
            offsets.discard(want)
        return True
    log.info("%s: record %d fetched where %d was due (expected offset last set by %s): "
             "not handed over, read again from %d", tp, offset, want,
             _consumer_dict(consumer, RESETS).get(tp, "the fetch loop"), want)
    skipped(consumer, tp, want)
    return False


def _read_every_record() -> None:
    """Faust's read offsets and gaps, replaced for acknowledged topics by one expected offset.

    Found by logging the fetch loop in the payment kill -9 test (see the
    module docstring, 4.); applied to the consumer's ``perform_seek``,
    ``seek``, ``_wait_next_records`` and ``_new_offset``, and used by the
    fetch loop (:func:`_drain_messages`).
    """
    from faust.transport import consumer as faust_consumer

    cls = faust_consumer.Consumer
    if getattr(cls, "_paystream_every_record", False):
        return
    perform_seek = cls.perform_seek
    seek = cls.seek
    wait_next_records = cls._wait_next_records
    new_offset = cls._new_offset

    async def perform_seek_expecting(self: Any) -> None:
        await perform_seek(self)
        acking = self.app.topics.acks_enabled_for
        read = self._read_offset
        known = starts(self)
        unknown = []
        for tp in self.assignment():
            if not acking(tp.topic):
                continue
            committed = read.get(tp)
            if committed is None:
                unknown.append(tp)
                continue
            known.pop(tp, None)
            _expect(self, tp, committed, f"perform_seek (committed {committed})")
            skipped(self, tp, committed)  # fetched past it meanwhile? seek_back asks the position
        if not unknown:
            return
        try:
            found = await self.earliest_offsets(*unknown)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # then the loop takes what comes and the commit checks no head, as Faust
            log.warning("log start of %d partitions with nothing committed not found: %r", len(unknown), exc)
            found = {}
        for tp in unknown:
            start = found.get(tp)
            if start is None:
                known.pop(tp, None)
                _expect(self, tp, None, "perform_seek (nothing committed, log start unknown)")
                continue
            known[tp] = start
            _expect(self, tp, start, f"perform_seek (nothing committed, log start {start})")
            skipped(self, tp, start)

    async def seek_expecting(self: Any, partition: Any, offset: int) -> None:
        await seek(self, partition, offset)
        _expect(self, partition, offset, f"a seek to {offset}")

    async def wait_next_records_handed_over(self: Any, timeout: float) -> Any:
        records, active = await wait_next_records(self, timeout)
        if records and active is not None:
            buffered = self._buffered_partitions
            acking = self.app.topics.acks_enabled_for
            passed = [tp for tp in records if tp not in active and tp not in buffered and acking(tp.topic)]
            for tp in passed:
                # Faust's getmany would skip them (a paused partition) with the fetch position past them
                fetched = records.pop(tp)
                if fetched:
                    skipped(self, tp, fetched[0].offset)
            if passed:
                log.info("records of %d paused partitions fetched: held, read again once resumed",
                         len(passed))
        return records, active

    def new_offset_from_head(self: Any, tp: Any) -> int | None:
        acked = self._acked[tp]
        if acked:
            committed = self._committed_offset[tp]
            floor = committed if committed is not None else starts(self).get(tp)
            if floor is not None:
                head = min(acked)
                gap = self._gap.get(tp)
                if gap:
                    head = min([head, *(interval.begin for interval in gap.overlap(0, max(acked)))])
                if head > floor:
                    return None  # the record at the committed offset (or log start) is not done
        return new_offset(self, tp)

    cls.perform_seek = perform_seek_expecting
    cls.seek = seek_expecting
    cls._wait_next_records = wait_next_records_handed_over
    cls._new_offset = new_offset_from_head
    cls._paystream_every_record = True


def _no_stale_acks() -> None:
    from faust.transport import consumer as faust_consumer

    cls = faust_consumer.Consumer
    if getattr(cls, _APPLIED, False):
        return
    ack = cls.ack

    def ack_current(self: Any, message: Any) -> bool:
        if stale(self, message):
            release(self, message)
            return False
        acked = ack(self, message)
        offsets = held(self).get(message.tp)
        if offsets:
            offsets.discard(message.offset)  # read again and done: the hold is lifted
        return acked

    cls.ack = ack_current
    setattr(cls, _APPLIED, True)


def _release_what_flow_control_clears() -> None:
    """Records a flow-control resume drops from the channel queues are released: read again.

    ``FlowControlEvent.resume`` clears every channel queue; Faust's recovery
    resumes it after its seek to committed offsets, while the fetch loop has
    been handing records over since the partitions were resumed: those were
    dropped unprocessed with the fetch position past them (module
    docstring, 4.).  Each such record of an acknowledged topic is released
    (:func:`release`: held, and read again).
    """
    from mode.utils.queues import FlowControlEvent

    if getattr(FlowControlEvent, _APPLIED, False):
        return
    clear = FlowControlEvent.clear

    def clear_releasing(self: Any) -> None:
        released = []
        for queue in list(self._queues or ()):
            for item in list(getattr(queue, "_queue", ())):
                message = getattr(item, "message", None)
                app = getattr(item, "app", None)
                if message is None or app is None or getattr(message, "acked", True):
                    continue
                if app.topics.acks_enabled_for(message.topic):
                    release(app.consumer, message)
                    released.append(message.tp)
        if released:
            log.info("flow control cleared %d records of %d partitions from the channel queues: "
                     "held, read again", len(released), len(set(released)))
        clear(self)

    FlowControlEvent.clear = clear_releasing
    setattr(FlowControlEvent, _APPLIED, True)


#: Attribute a channel carries when a kernel agent takes its records in batches.
BATCH_CHANNEL = "_paystream_batch_channel"


class _Delivery:
    """One partition's synchronous delivery into a kernel channel (see :func:`deliver_now`)."""

    __slots__ = ("app", "buffer", "buffer_threaded", "channels", "event_cls", "on_pressure_drop",
                 "on_pressure_high", "tp")

    def __init__(self, conductor: Any, tp: Any, channels: Any) -> None:
        app = conductor.app
        self.app = app
        self.tp = tp
        self.channels = channels  # the conductor's live set for this partition
        self.event_cls = app.conf.Event  # what app.create_event makes, looked up once
        self.buffer = app.producer.buffer
        # what ProducerBuffer.size reads from the settings on every call, read once
        self.buffer_threaded = bool(app.conf.producer_threaded)
        consumer = app.consumer
        on_topic_buffer_full = app.sensors.on_topic_buffer_full

        def on_pressure_high() -> None:  # as Faust's handler: stop fetching the partition
            on_topic_buffer_full(tp)
            consumer.on_buffer_full(tp)

        def on_pressure_drop() -> None:
            consumer.on_buffer_drop(tp)

        self.on_pressure_high = on_pressure_high
        self.on_pressure_drop = on_pressure_drop


def _buffered(buffer: Any, threaded: bool) -> int:
    """``ProducerBuffer.size`` without its settings lookup (hot: once per fetched record)."""
    if threaded:
        return len(buffer.queue._queue) if buffer.queue else 0
    return len(buffer.pending._queue)


def _kernel_queue(delivery: _Delivery) -> Any:
    """The queue of the partition's only subscriber if it is a kernel channel, else None."""
    if len(delivery.channels) != 1:
        return None
    channel = next(iter(delivery.channels))
    return channel.queue if getattr(channel, BATCH_CHANNEL, False) else None


def deliver_now(delivery: _Delivery | None, message: Any) -> bool:
    """Deliver ``message`` to its kernel channel without waiting; False: go Faust's way."""
    if delivery is None:
        return False
    queue = _kernel_queue(delivery)
    if queue is None:
        return False
    app = delivery.app
    buffer = delivery.buffer
    if queue.full() or not app.flow_control.is_active() or \
            _buffered(buffer, delivery.buffer_threaded) > buffer.max_messages:
        return False
    message.incref(1)
    queue.put_nowait_enhanced(
        delivery.event_cls(app, message.key, message.value, message.headers, message),
        on_pressure_high=delivery.on_pressure_high,
        on_pressure_drop=delivery.on_pressure_drop,
    )
    return True


#: Seconds the fetch loop waits for room in a full kernel channel before it hands
#: the record back (:func:`hand_back`): a busy agent makes room sooner (a batch
#: takes up to ``PAYSTREAM_BATCH_MAX`` records at once), a stuck one does not.
HAND_BACK_AFTER = 1.0


def full(delivery: _Delivery | None) -> bool:
    """Whether the partition's only subscriber is a kernel channel whose queue is full, flow running."""
    if delivery is None:
        return False
    queue = _kernel_queue(delivery)
    return queue is not None and queue.full() and delivery.app.flow_control.is_active()


#: Attribute of a kernel channel's queue: monotonic time of its last hand-back.
HANDED_BACK_AT = "_paystream_handed_back_at"
#: After a hand-back the channel's agent is likely stuck: for :data:`HAND_BACK_AGAIN_FOR`
#: seconds the next records for it, from its other partitions, wait only
#: :data:`HAND_BACK_AGAIN_AFTER` seconds.
HAND_BACK_AGAIN_AFTER = 0.05
HAND_BACK_AGAIN_FOR = 5.0


async def room_within(delivery: _Delivery | None, seconds: float) -> bool:
    """Wait up to ``seconds`` for room in a full kernel channel; whether there is room now.

    Shorter (:data:`HAND_BACK_AGAIN_AFTER`) right after a record for the same
    channel was handed back, so a stuck agent with many partitions costs the
    other partitions one wait, not one per partition.
    """
    if delivery is None or not full(delivery):
        return False  # not a full kernel channel: Faust's way
    queue = _kernel_queue(delivery)
    if time.monotonic() - getattr(queue, HANDED_BACK_AT, float("-inf")) < HAND_BACK_AGAIN_FOR:
        seconds = min(seconds, HAND_BACK_AGAIN_AFTER)
    waited = 0.0
    while full(delivery) and waited < seconds:
        await asyncio.sleep(0.005)
        waited += 0.005
    return not full(delivery)


def hand_back(consumer: Any, delivery: _Delivery, tp: Any) -> bool:
    """Whether a record for ``tp``'s full kernel channel is to be read again rather than waited on.

    True once Faust has stopped fetching the partition: its buffer-full
    state, entered here as Faust's put would (the queue calls it back once
    it drains to its low mark, and the partition is fetched again).  False
    during recovery, when Faust does not stop fetching a full partition and
    reading it again at once would only spin: the record goes Faust's way,
    which waits.
    """
    queue = _kernel_queue(delivery)
    if queue.in_pressure_high_state(delivery.on_pressure_drop):
        delivery.on_pressure_high()
    if tp not in getattr(consumer, "_buffered_partitions", ()):
        return False
    setattr(queue, HANDED_BACK_AT, time.monotonic())
    return True


async def deliver_or_hand_back(consumer: Any, delivery: _Delivery | None, tp: Any, message: Any) -> bool:
    """For a record :func:`deliver_now` could not deliver: True once it is delivered or handed back.

    Only for a full kernel channel (module docstring, 5.): wait for room
    (:func:`room_within`), deliver; still full, hand the record back: the
    expected offset stays on it, the commit is held before it, the partition
    is sought back to it.  A record whose partition was sought meanwhile is
    left to the seek.  False: the record goes Faust's way.
    """
    if await room_within(delivery, HAND_BACK_AFTER) and deliver_now(delivery, message):
        return True
    if delivery is None or not full(delivery):
        return False
    offset = message.offset
    if expected(consumer).get(tp, _UNSET) != offset + 1:
        return True  # sought meanwhile: the seek says what is read next
    if not hand_back(consumer, delivery, tp):
        return False
    log.info("%s: its agent's channel stayed full: record %d handed back, read again once the "
             "channel drained", tp, offset)
    _expect(consumer, tp, offset, "a hand-back")
    skipped(consumer, tp, offset)
    return True


def _deliver_to_batch_channels() -> None:
    from faust.transport import conductor as faust_conductor
    from faust.transport import consumer as faust_consumer

    conductor_cls = faust_conductor.Conductor
    if not getattr(conductor_cls, _APPLIED, False):
        build = conductor_cls._build_handler

        def build_handler(self: Any, tp: Any, channels: Any) -> Any:
            deliveries = self.__dict__.setdefault("_paystream_deliveries", {})
            deliveries[tp] = _Delivery(self, tp, channels)
            return build(self, tp, channels)

        conductor_cls._build_handler = build_handler
        setattr(conductor_cls, _APPLIED, True)

    consumer_cls = faust_consumer.Consumer
    if getattr(consumer_cls, "_paystream_drain", False):
        return
    global FAUST_DRAIN_MESSAGES
    FAUST_DRAIN_MESSAGES = consumer_cls._drain_messages
    consumer_cls._drain_messages = _drain_messages
    consumer_cls._paystream_drain = True


#: Faust's own ``Consumer._drain_messages``, kept when it is replaced (the
#: test compares its source with the one :func:`_drain_messages` copies).
FAUST_DRAIN_MESSAGES: Any = None


async def _drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - the fetch loop
    """Faust 0.15.3's ``Consumer._drain_messages``, with :func:`deliver_now` tried first.

    And, before each fetch, the seeks back to held records (:func:`seek_back`).
    """
    import asyncio
    from typing import cast

    from faust.transport.consumer import CONSUMER_FETCHING

    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    deliveries = self.app.topics.__dict__.setdefault("_paystream_deliveries", {})
    get_delivery = deliveries.get
    due = rewinds_due(self)
    expecting = expected(self)
    get_expected = expecting.get
    set_expected = expecting.__setitem__
    rewound = _rewound(self)

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            if due:  # not Faust's: seek held partitions back, no earlier fetch still being handed over
                await seek_back(self)
            set_flag(flag_consumer_fetching)
            ait = cast(Any, getmany(timeout=1.0))

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0

                    offset = message.offset
                    acked_topic = acks_enabled_for(message.topic)
                    if acked_topic:  # not Faust's: one expected offset, no gap (module docstring, 4.)
                        want = get_expected(tp, _UNSET)
                        if want is _UNSET:  # before perform_seek said where it starts: not yet
                            accept = False
                        else:
                            accept = want is None or offset == want or (
                                offset > want and jumped(self, tp, want, offset))
                        if accept:
                            if rewound:
                                rewound.pop(tp, None)  # a rewind came back where it was due
                            set_expected(tp, offset + 1)  # before any await: a seek meanwhile wins
                    else:
                        r_offset = get_read_offset(tp)
                        accept = r_offset is None or offset >= r_offset
                    if accept:
                        if commit_every is not None:
                            if self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                        delivery = get_delivery(tp)
                        if not deliver_now(delivery, message) and not (  # not Faust's: 5.
                                acked_topic and await deliver_or_hand_back(self, delivery, tp, message)):
                            await self.wait_first(
                                callback(message), self.suspend_flow.wait()
                            )
                        if not acked_topic:
                            set_read_offset(tp, offset)
                    elif acked_topic and (want is _UNSET or offset > want):
                        pass  # not handed over: read again from the expected offset
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)
