"""The pure half of the event sinks: what one consumed event becomes, as a kernel flow.

A sink (notifications, billing records; see :mod:`connectors.sinks`) turns
each event it reads into exactly one call of one service client, with the
event's ``event_id`` as the call's idempotency key (and as the request's
``source_event_id``), so a redelivered or replayed event makes the service do
the work once.  It keeps no state of its own: the service remembers the key.

Each sink is a :class:`tables.aggregate.Flow` run by the kernel's driver
(:mod:`streams.kernel`), one :class:`SinkRoute` per input topic:

- ``calls`` asks for the route's one :class:`~tables.aggregate.Call`, or none
  when the event is not for this sink (e.g. a refund of a payment no order
  owns has no notification method);
- ``decide`` with the outcome: done (nothing to emit, no row) when the service
  accepted; :class:`SinkRefused` (a :class:`~tables.aggregate.Refusal`) when it
  refused, which the driver dead-letters with the event's bytes and
  ``dlq.reason`` "rejected" (``dlq.error`` names the service's code);
  :class:`GaveUp` when the sink stopped waiting for a service that kept
  failing (``dlq.error`` "GaveUp: ... unavailable ...").

Transient failures never reach ``decide``: the driver retries the batch (see
:mod:`connectors.sinks` for how long).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tables.aggregate import NOOP, Call, Decision, Flow, Outcome, Refusal, Step


class SinkRefused(Refusal):
    """The service refused the call for good (4xx); ``code`` is the service's code."""

    status = 422

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code or "refused"


class GaveUp(SinkRefused):
    """The call kept failing transiently past the sink's patience (code "unavailable").

    Dead-lettered like a refusal, with its bytes, so the sink goes on; the
    service did not say no, so the dead letter (``dlq.reason``
    "unavailable") is worth replaying.
    """

    dead_letter_reason = "unavailable"

#: The code of a call given up after the sink's patience (``connectors.sinks.PatientService``).
UNAVAILABLE = "unavailable"


#: Builds a call's arguments from the event, or None: nothing to send for it.
ArgsOf = Callable[[Mapping[str, Any]], dict[str, Any] | None]


@dataclass(frozen=True)
class SinkRoute:
    """One input topic of a sink: the service method it is sent to and how its arguments are read.

    ``args`` gets the decoded event and answers the method's request fields
    (``source_event_id`` is added here), or None when the event needs no call.
    """

    topic: str
    handler: str
    service: str
    operation: str
    args: ArgsOf

    def call_of(self, message: Mapping[str, Any]) -> Call | None:
        """The one call this event causes (key = its event id), or None."""
        args = self.args(message)
        if args is None:
            return None
        event_id = str(message["event_id"])
        return Call(self.service, self.operation, {**args, "source_event_id": event_id}, event_id)


def _step(route: SinkRoute) -> Step:
    def calls(row: Any, message: Mapping[str, Any]) -> list[Call]:
        call = route.call_of(message)
        return [call] if call is not None else []

    def decide(row: Any, message: Mapping[str, Any], now_ms: int,
               outcomes: Mapping[str, Outcome] | None = None) -> Decision:
        call = route.call_of(message)
        if call is None:
            return NOOP
        outcome = (outcomes or {}).get(call.idempotency_key)
        if outcome is None:  # the driver always hands the outcome of a declared call
            raise RuntimeError(f"{route.handler}: no outcome for {call.idempotency_key}")
        if not outcome.ok:
            kind = GaveUp if outcome.code == UNAVAILABLE else SinkRefused
            raise kind(f"{route.service}.{route.operation} refused event {call.idempotency_key}: "
                              f"{outcome.code}: {outcome.refused}", outcome.code)
        return NOOP

    return Step(route.topic, route.handler, decide, calls=calls)


def sink_flow(name: str, routes: tuple[SinkRoute, ...]) -> Flow:
    """A sink as a kernel flow: one step per route, no row, no command topic, no deadline."""
    return Flow(
        name=name,
        producer=name,
        key_field="event_id",  # no commands: the flow only reads events
        steps=tuple(_step(route) for route in routes),
        load=lambda stored: None,
        dump=lambda row: {},
    )


def iso_date(value: int | None) -> str | None:
    """Epoch milliseconds (our contracts' timestamps) as an ISO-8601 UTC text, as the services take dates."""
    if value is None:
        return None
    return datetime.fromtimestamp(value / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
