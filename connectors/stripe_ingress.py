"""The Stripe webhook ingress (``paystream ingress``): one signed Stripe call -> one durable Kafka record.

``POST /webhooks/stripe`` does, in this order:

1. reads the body, at most ``INGRESS_MAX_BODY_BYTES`` (413 ``too_large``,
   on a larger ``Content-Length`` before reading, and while reading a body
   that declares none, e.g. chunked);
2. verifies ``Stripe-Signature`` with the stripe library
   (``stripe.WebhookSignature.verify_header``: HMAC-SHA256 over
   ``"{t}.{body}"``, any of several ``v1`` signatures, timestamps older than
   300 s refused) against every secret of ``STRIPE_WEBHOOK_SECRET``, so one
   can be rotated out (400 ``bad_signature``: missing, wrong, stale, or
   signed with a secret no longer configured);
3. reads the event with :func:`tables.stripe_events.parse_event` (400
   ``not_a_stripe_event``: not UTF-8 JSON, an array, a string, an object
   that is not an event); an event type paystream does not consume
   (:data:`tables.stripe_events.CONSUMED_TYPES`: payments, refunds,
   subscriptions, invoices) is answered 200 ``{"ignored": true}``, counted
   and not stored;
4. produces the body **verbatim** (the bytes that were signed) to the
   ``stripe.events`` topic, keyed by :func:`tables.stripe_events.event_key`
   (the PaymentIntent, the subscription or the invoice), with headers ``stripe.event_id``, ``stripe.type``,
   ``stripe.api_version``, ``stripe.account`` (absent ones omitted), and
   answers 200 ``{"received": true}`` only after Kafka acknowledged it
   (idempotent producer, ``acks=all``).  No acknowledgement within
   :data:`ACK_TIMEOUT_SECONDS` (broker down, slow, topic missing) -> 503
   ``unavailable`` with ``Retry-After``: an answer in a few seconds rather
   than a hung request, and Stripe delivers the event again later.

At least once, not exactly once: a record whose acknowledgement was lost
(the broker wrote it but the 503 went out) is stored again when Stripe
retries, and Stripe itself may send an event twice.  Both are answered 200
and stored twice; the agent reading ``stripe.events`` dedupes on the Stripe
event id.

A SIGKILL at the one await between reading a webhook and answering it
(the acknowledgement, step 4): Stripe gets no 2xx and delivers the event
again; the record is in Kafka or not, so the retry stores it once or a
second time, which the payment agent's dedupe makes harmless.  Nothing
is kept in memory that a restart would need.

``GET /healthz``: 200 while the process serves.  ``GET /readyz``: 200 when
Kafka answers a metadata request for the topic within
:data:`READY_TIMEOUT_SECONDS` and the topic exists, else 503.
``GET /metrics``: Prometheus' text format (:class:`streams.metrics.IngressMetrics`):
``paystream_ingress_webhooks_total{outcome}``, one outcome per webhook:
``accepted``, ``duplicate`` (stored again like any other, but an event id
this process stored recently: :data:`RECENT_EVENT_IDS` are remembered,
in memory only), ``unknown_type`` (the ignored types), ``bad_signature``,
``stale`` (signed with a configured secret, but older than the tolerance),
``too_large``, ``not_a_stripe_event``, ``unavailable`` (503); and the Kafka
acknowledgement time.

The log has one INFO line per request (method, path, status, time, and for
webhooks the event id and type and the outcome); never a body, a header
value or a secret.  The process starts while Kafka is down: the producer
connects in the background and webhooks are answered 503 until it can.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import stripe
from aiohttp import web
from confluent_kafka.admin import AdminClient

from streams import access, catalog, logs
from streams.metrics import IngressMetrics, metrics_response
from streams.producer import EventProducer, ProduceError
from streams.settings import Settings
from tables.stripe_events import CONSUMED_TYPES, NotAStripeEvent, event_key, parse_event

log = logging.getLogger("paystream.ingress")

WEBHOOK_PATH = "/webhooks/stripe"
#: Stripe's own default tolerance for the signature timestamp.
SIGNATURE_TOLERANCE_SECONDS = 300
#: How long a webhook waits for Kafka's acknowledgement before 503.  Stripe
#: asks endpoints to answer quickly and does not publish its exact timeout;
#: five seconds is short for it and long for a healthy broker (milliseconds).
#: The producer's delivery timeout is the same, so a record answered 503 is
#: not still waiting in the producer's queue.
ACK_TIMEOUT_SECONDS = 5.0
#: ``Retry-After`` of a 503 (Stripe schedules its own retries; other callers
#: may use it).
RETRY_AFTER_SECONDS = 5
#: How long ``/readyz`` waits for Kafka's metadata answer.
READY_TIMEOUT_SECONDS = 2.0

#: Event ids of stored webhooks this process remembers, to count a Stripe
#: retry of one as ``duplicate`` (it is stored all the same: the agent dedupes).
RECENT_EVENT_IDS = 10_000


class RecentIds:
    """The last ``capacity`` ids seen, oldest forgotten first."""

    def __init__(self, capacity: int = RECENT_EVENT_IDS) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def signature_valid(text: str, header: str | None, secrets: Sequence[str],
                    tolerance: int | None = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """True when ``header`` signs ``text`` with one of ``secrets``, within ``tolerance`` seconds."""
    if not header or not header.isascii():
        return False  # the library would raise TypeError comparing a non-ASCII signature
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
        except stripe.SignatureVerificationError:
            continue
        return True
    return False


def signature_problem(text: str, header: str | None, secrets: Sequence[str],
                      tolerance: int = SIGNATURE_TOLERANCE_SECONDS) -> str | None:
    """None: valid; ``stale``: valid but older than ``tolerance``; else ``bad_signature``."""
    if signature_valid(text, header, secrets, tolerance):
        return None
    return "stale" if signature_valid(text, header, secrets, None) else "bad_signature"


class _Kafka:
    """The process' one producer, and an admin client for ``/readyz``.

    A producer that reports a fatal error (its idempotent state cannot be
    recovered) is replaced by a new one, so the ingress keeps serving once
    Kafka is healthy; ordinary failures (broker down, timeouts) are left to
    the producer, which reconnects by itself.
    """

    def __init__(self, settings: Settings, producer: EventProducer | None, ack_timeout: float) -> None:
        self.settings = settings
        self.ack_timeout = ack_timeout
        self._own = producer is None
        self.producer = producer or self._new_producer()
        self.admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers,
                                  "client.id": "paystream-ingress-admin"})
        self._retired: set[asyncio.Task[None]] = set()

    def _new_producer(self) -> EventProducer:
        return EventProducer(
            self.settings.kafka_bootstrap_servers, client_id="paystream-ingress",
            delivery_timeout_ms=int(self.ack_timeout * 1000),
            # Reconnect within a second once the broker is back, not after
            # librdkafka's default backoff of up to 10 s.
            **{"reconnect.backoff.max.ms": 1000},
        )

    async def send(self, topic: str, value: bytes, key: str, headers: list[tuple[str, bytes]]) -> None:
        producer = self.producer
        try:
            # The producer's own delivery timeout (ack_timeout) fails the record
            # first; this bound only guards against a callback that never comes.
            async with asyncio.timeout(self.ack_timeout + 1.0):
                await producer.send(topic, value, key, headers=headers)
        except ProduceError as exc:
            if self._own and exc.kafka_error is not None and exc.kafka_error.fatal() \
                    and producer is self.producer:
                log.error("producer failed for good (%s); starting a new one", exc.kafka_error.str())
                self.producer = self._new_producer()
                task = asyncio.create_task(producer.close(timeout=1.0))
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
            raise

    async def ready(self, topic: str) -> str | None:
        """None when Kafka answers metadata for ``topic`` in time, else why not."""
        loop = asyncio.get_running_loop()
        try:
            metadata = await loop.run_in_executor(
                None, lambda: self.admin.list_topics(topic=topic, timeout=READY_TIMEOUT_SECONDS))
        except Exception as exc:  # KafkaException: transport, timeout
            return f"kafka metadata: {exc}"
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            return f"topic {topic} missing" + (f" ({found.error.str()})" if found and found.error else "")
        return None

    async def close(self) -> None:
        if self._own:
            await self.producer.close(timeout=self.ack_timeout)
        for task in list(self._retired):
            await task


KAFKA = web.AppKey("kafka", _Kafka)
METRICS = web.AppKey("metrics", IngressMetrics)
RECENT = web.AppKey("recent", RecentIds)
SETTINGS = web.AppKey("settings", Settings)
TOPIC = web.AppKey("topic", str)
#: What the request's log line says besides method, path, status and time.
LOG = web.RequestKey("log", str)


def _json(status: int, body: dict[str, Any], **headers: str) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json",
                        headers=headers or None)


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` bytes (the rest is not read)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


async def stripe_webhook(request: web.Request) -> web.Response:
    settings, metrics = request.app[SETTINGS], request.app[METRICS]

    def reject(status: int, reason: str, detail: str = "") -> web.Response:
        metrics.webhook(reason)
        request[LOG] = f"rejected {reason}" + (f": {detail}" if detail else "")
        return _json(status, {"error": reason})

    body = await _read_capped(request, settings.ingress_max_body_bytes)
    if body is None:
        return reject(413, "too_large", f"over {settings.ingress_max_body_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        # Stripe signs text; a body that is not UTF-8 is no Stripe event whoever signed it.
        return reject(400, "not_a_stripe_event", "body is not UTF-8")
    problem = signature_problem(text, request.headers.get("Stripe-Signature"),
                                settings.stripe_webhook_secrets)
    if problem is not None:
        # One answer for both (Stripe's own word for a stale one is a bad signature); counted apart.
        metrics.webhook(problem)
        request[LOG] = f"rejected {problem}"
        return _json(400, {"error": "bad_signature"})
    try:
        event = parse_event(body)
    except NotAStripeEvent as exc:
        return reject(400, "not_a_stripe_event", str(exc))
    if event.type not in CONSUMED_TYPES:
        metrics.webhook("unknown_type")
        request[LOG] = f"{event.id} {event.type} ignored"
        return _json(200, {"received": True, "ignored": True})
    headers = [("stripe.event_id", event.id.encode()), ("stripe.type", event.type.encode())]
    if event.api_version:
        headers.append(("stripe.api_version", event.api_version.encode()))
    if event.account:
        headers.append(("stripe.account", event.account.encode()))
    began = time.perf_counter()
    try:
        await request.app[KAFKA].send(request.app[TOPIC], body, event_key(event), headers)
    except (ProduceError, TimeoutError) as exc:
        metrics.ack_seconds.observe(time.perf_counter() - began)
        metrics.webhook("unavailable")
        reason = str(exc) or f"no acknowledgement within {request.app[KAFKA].ack_timeout:g} s"
        request[LOG] = f"{event.id} {event.type} unavailable: {reason}"
        return _json(503, {"error": "unavailable"}, **{"Retry-After": str(RETRY_AFTER_SECONDS)})
    metrics.ack_seconds.observe(time.perf_counter() - began)
    recent = request.app[RECENT]
    outcome = "duplicate" if event.id in recent else "accepted"
    recent.add(event.id)
    metrics.webhook(outcome)
    request[LOG] = f"{event.id} {event.type} {outcome}"
    return _json(200, {"received": True})


async def healthz(request: web.Request) -> web.Response:
    return _json(200, {"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    problem = await request.app[KAFKA].ready(request.app[TOPIC])
    if problem is not None:
        request[LOG] = problem
        return _json(503, {"error": "unavailable", "reason": problem},
                     **{"Retry-After": str(RETRY_AFTER_SECONDS)})
    return _json(200, {"status": "ready"})


async def metrics_page(request: web.Request) -> web.Response:
    return metrics_response(request.app[METRICS].render())


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def _log_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """JSON for every error answer, and one log line per request (no bodies, no header values)."""
    began = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = _json(exc.status, {"error": _HTTP_ERRORS.get(exc.status, exc.reason.lower())})
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = _json(500, {"error": "internal"})
    detail = request.get(LOG)
    log.info("%s %s %d %.1f ms%s", request.method, request.path, response.status,
             (time.perf_counter() - began) * 1000, f" {detail}" if detail else "")
    return response


def create_app(settings: Settings, *, producer: EventProducer | None = None,
               ack_timeout: float = ACK_TIMEOUT_SECONDS) -> web.Application:
    """The ingress as an aiohttp application.

    The producer is created when the application starts and closed when it
    stops; pass ``producer`` to share one the caller owns (it is then not
    closed here).
    """
    tokens = access.token_middleware(settings.service_token_list, public=access.ingress_is_public)
    app = web.Application(middlewares=[_log_and_errors, tokens],
                          client_max_size=settings.ingress_max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = IngressMetrics()
    app[RECENT] = RecentIds()
    app[TOPIC] = settings.topic(catalog.STRIPE_EVENTS)

    async def kafka_context(app: web.Application) -> AsyncIterator[None]:
        app[KAFKA] = _Kafka(settings, producer, ack_timeout)
        try:
            yield
        finally:
            await app[KAFKA].close()

    app.cleanup_ctx.append(kafka_context)
    app.router.add_post(WEBHOOK_PATH, stripe_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


def run(settings: Settings) -> None:
    """Serve the ingress on ``INGRESS_HOST:INGRESS_PORT`` until SIGINT/SIGTERM."""
    logs.configure(settings)
    if not settings.stripe_webhook_secrets:
        raise SystemExit("paystream ingress: STRIPE_WEBHOOK_SECRET is empty; no webhook could be verified")
    log.info("stripe webhook ingress on http://%s:%d%s -> topic %r at %s (%d signing secret(s))",
             settings.ingress_host, settings.ingress_port, WEBHOOK_PATH,
             settings.topic(catalog.STRIPE_EVENTS), settings.kafka_bootstrap_servers,
             len(settings.stripe_webhook_secrets))
    web.run_app(create_app(settings), host=settings.ingress_host, port=settings.ingress_port,
                print=None, access_log=None)
