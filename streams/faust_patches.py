"""Two corrections to faust-streaming's consumer, applied once per process.

Both touch private parts of faust-streaming 0.15.3 (pinned <0.16 in
setup.cfg) and are tested in ``tests/unit/test_faust_patches.py``; both were
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
"""

from __future__ import annotations

from typing import Any

#: How long the broker may hold a fetch that found nothing (ms).  A short wait
#: costs an idle worker a few empty fetches a second.
FETCH_MAX_WAIT_MS = 100

_APPLIED = "_paystream_patched"


def apply() -> None:
    """Apply both corrections (idempotent)."""
    _shorten_fetch_wait()
    _no_stale_acks()


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


def _no_stale_acks() -> None:
    from faust.transport import consumer as faust_consumer

    cls = faust_consumer.Consumer
    if getattr(cls, _APPLIED, False):
        return
    ack = cls.ack

    def ack_current(self: Any, message: Any) -> bool:
        if stale(self, message):
            with faust_consumer.ack_lock:
                message.acked = True  # nothing waits for it (wait_empty) ...
                self._unacked_messages.discard(message)
            return False  # ... and its offset is not committable: it is read again
        return ack(self, message)

    cls.ack = ack_current
    setattr(cls, _APPLIED, True)
