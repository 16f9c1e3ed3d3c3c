"""Event-driven sinks: notifications and billing records, off the order and payment path.

The seed's decision matrix makes notifications and billing records
asynchronous: nobody waits for them.  Each sink is a kernel flow
(:mod:`tables.notification_sink`, :mod:`tables.billing_sink`, the pure
mapping of events to client calls) run by the kernel's driver
(:class:`streams.kernel.Aggregate`) with the process's service clients
(``app.clients``) as its service:

- **once per event id**: each event becomes one call whose idempotency key
  (and ``source_event_id``) is the event's id; a redelivered or replayed
  event, or a batch retried after another call of it failed, repeats the call
  under the same key and the service answers with what it did the first time;
- **refusals are dead-lettered**: a 4xx from the service (``Rejected``/
  ``NotFound``, the kernel's ``CallRefused``) puts the event's bytes on the
  dead-letter topic (``dlq.reason`` "rejected", ``dlq.error`` naming the
  service's code) and the rest of the batch goes on;
- **retried while the service is down**: a transient failure (5xx, timeout,
  refused connection, open breaker) fails the batch, which the driver retries
  with backoff (0.2 s doubling to 5 s between batch attempts; each call itself
  makes up to 3 jittered attempts, and the service's breaker stops calls for
  its cool-down after 5 consecutive failures); no offset is committed
  meanwhile, so nothing is lost, and the service gets each event's call again
  once it is back;
- **but not forever** (:class:`PatientService`): an event whose call has
  failed transiently for ``patience_seconds`` (default
  :data:`PATIENCE_SECONDS`, 10 minutes) is dead-lettered as
  :class:`tables.sinks.GaveUp` (``dlq.reason`` "unavailable", so it is worth
  replaying) with its bytes, so one event the service keeps failing (a payload it answers with
  500, a call that always times out) cannot hold back the other events and
  partitions of the sink.  This is Kafka Connect's ``errors.retry.timeout``
  plus dead-letter queue.  A service that stays down longer than the patience
  costs one batch (at most ``PAYSTREAM_BATCH_MAX`` events) dead-lettered per
  patience period, not the whole backlog: the next batch starts its own
  clock.  ``patience_seconds=None`` retries for ever instead (the topics'
  7-day retention is then the bound).

Isolation from the order and payment path
-----------------------------------------
The sinks are domains of their own (``notifications``, ``billing`` in
:data:`agents.DOMAINS`), **not** in the default ``PAYSTREAM_DOMAINS``; they
run in a worker group of their own::

    paystream sinks        # = PAYSTREAM_DOMAINS=notifications,billing
                           #   PAYSTREAM_APP_ID=<app id>-sinks
                           #   WORKER_WEB_PORT=<worker port + 1>  paystream worker

Why that isolates them: in one Faust app every agent reading a topic is fed
by one conductor and one consumer; an agent whose stream stalls (its service
down, its batch retrying) fills its buffer and back-pressures the conductor,
and the consumer's committed offset of a shared topic partition cannot move
past the stalled agent's unacknowledged records.  A separate app id is a
separate Kafka consumer group with its own consumer, its own offsets and its
own process: a sink stalled for hours holds back only the sink group's
offsets, while the order and payment workers consume, commit and publish as
before (``tests/integration/test_sinks.py`` checks this with the
notification service down).  The sink's table is empty (a sink keeps no
state: the services remember the keys), so the group starts without
recovery.

The same argument holds between the two sinks: in one sink worker they share
the conductor, so with the notification service down the billing sink goes
on only until the stalled notification stream's buffer is full (Faust's
``stream_buffer_maxsize``), and its commits on the shared topics wait for the
notifications' (a restart then repeats billing calls under their keys:
harmless).  Where billing must not wait for notifications, run each in a
group of its own: ``PAYSTREAM_APP_ID=paystream-billing paystream sinks
--domains billing`` and ``PAYSTREAM_APP_ID=paystream-notifications
WORKER_WEB_PORT=6068 paystream sinks --domains notifications``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streams.kernel import Aggregate, CallRefused, Service, transient
from streams.settings import Settings
from tables import billing_sink, notification_sink
from tables.aggregate import Call, Flow
from tables.sinks import UNAVAILABLE

log = logging.getLogger(__name__)

#: How long one event's call may keep failing transiently before it is dead-lettered.
PATIENCE_SECONDS = 600.0

#: The sink domains of :data:`agents.DOMAINS`.
SINK_DOMAINS = ("notifications", "billing")


def sink_settings(settings: Settings, domains: str = ",".join(SINK_DOMAINS)) -> Settings:
    """The settings of a sink worker (``paystream sinks``) next to the order/payment worker of ``settings``.

    Its own consumer group (``<PAYSTREAM_APP_ID>-sinks``), the sink
    ``domains`` only, and the web port after the worker's, so both run on one
    host with the defaults (and their static membership ids differ).
    ValueError for a domain that is no sink.
    """
    chosen = tuple(d.strip() for d in domains.split(",") if d.strip())
    strangers = [d for d in chosen if d not in SINK_DOMAINS]
    if not chosen or strangers:
        raise ValueError(f"--domains: sink domains only ({', '.join(SINK_DOMAINS)}), got {domains!r}")
    return dataclasses.replace(settings, app_id=f"{settings.app_id}-sinks", domains=",".join(chosen),
                               worker_web_port=settings.worker_web_port + 1)


class PatientService:
    """A kernel service (``client.call``) with a retry budget per idempotency key.

    Transient failures propagate (the driver retries the batch) until the
    key's first transient failure is ``patience_seconds`` old; then the call
    is refused with code :data:`UNAVAILABLE`, which the sink dead-letters.
    A success or a refusal forgets the key.  ``clock`` is injectable for tests.
    """

    def __init__(self, service: Service, patience_seconds: float | None = PATIENCE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if patience_seconds is not None and patience_seconds < 0:
            raise ValueError("patience_seconds must not be negative")
        self.service = service
        self.patience_seconds = patience_seconds
        self.clock = clock
        #: idempotency key -> when its call first failed transiently (since its last success).
        self.failing: dict[str, float] = {}

    async def __call__(self, call: Call) -> Any:
        key = call.idempotency_key
        try:
            answer = await self.service(call)
        except (CallRefused, asyncio.CancelledError):
            self.failing.pop(key, None)
            raise
        except Exception as error:
            if not transient(error) or self.patience_seconds is None:
                raise
            now = self.clock()
            since = self.failing.setdefault(key, now)
            if now - since < self.patience_seconds:
                raise
            del self.failing[key]
            log.error("%s.%s: giving up on %s after %.0f s of transient failures (%r)",
                      call.service, call.operation, key, now - since, error,
                      extra={"event_id": key})  # the sinks key each call by its event's id
            raise CallRefused(f"{call.service} {UNAVAILABLE} for {now - since:.0f} s "
                              f"(patience {self.patience_seconds:g} s): {error}", code=UNAVAILABLE) from error
        self.failing.pop(key, None)
        return answer


@dataclass(frozen=True)
class Sink:
    """One running sink: its driver and the patient service it calls."""

    aggregate: Aggregate
    service: PatientService


def register_sink(app: Any, flow: Flow, service_name: str, *, agent_name: str,
                  patience_seconds: float | None = PATIENCE_SECONDS) -> Sink:
    """Run ``flow`` on ``app`` calling ``app.clients``' ``service_name`` client, patiently."""
    patient = PatientService(app.clients.client(service_name).call, patience_seconds)
    driver = Aggregate(app, flow, agent_name=agent_name, services={service_name: patient})
    sinks = getattr(app, "sinks", None)
    if not isinstance(sinks, dict):
        sinks = app.sinks = {}
    sinks[flow.name] = Sink(driver, patient)
    return sinks[flow.name]


def register_notifications(app: Any, *, patience_seconds: float | None = PATIENCE_SECONDS) -> Sink:
    """The notification sink (domain ``notifications``): our events -> NotificationClient."""
    return register_sink(app, notification_sink.NOTIFICATIONS, notification_sink.SERVICE,
                         agent_name="notification_sink", patience_seconds=patience_seconds)


def register_billing(app: Any, *, patience_seconds: float | None = PATIENCE_SECONDS) -> Sink:
    """The billing sink (domain ``billing``): our events -> BillingClient."""
    return register_sink(app, billing_sink.BILLING, billing_sink.SERVICE,
                         agent_name="billing_sink", patience_seconds=patience_seconds)
