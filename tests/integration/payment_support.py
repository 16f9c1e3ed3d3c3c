"""The payment tests' harness: the whole payment path as it is deployed, driven from outside.

A :class:`PaymentStack` runs (``payment_stack``: one for the session's tests
that leave the worker alone; :func:`running_stack`: one of a test module's
own, e.g. to kill its worker):

- private copies of every topic on the shared broker (a prefix of its own),
  created up front, with the session's schema registry;
- the session's localstripe (``tests/integration/stripe_support.py``), with
  a webhook endpoint registered to this stack's ingress and signed with its
  secret, for the ``payment_intent.*`` events localstripe sends;
- ``paystream ingress`` as a subprocess (:class:`IngressProcess`), the real
  ingress process localstripe's webhooks and the tests' signed posts reach;
- ``paystream worker`` as a subprocess (:class:`WorkerProcess`) running the
  domains "orders,payments" against localstripe (``STRIPE_API_BASE``);
- the outside clients: the worker's HTTP API, a Stripe client acting as the
  payer (it confirms intents with test cards), a reader of every ``order.*``
  and ``payment.*`` topic (confluent-kafka's AvroDeserializer), a dead-letter
  reader and a writer for inbound events and raw records.

Outcomes are asserted from the topics, localstripe and the API, never from
the worker's memory.  Webhooks the tests post are Stripe events in Stripe's
own payload shape (``tests/fixtures/stripe/docs_*.json``, with ids, amounts
and metadata replaced), signed the way Stripe signs them.

localstripe sends every event to every endpoint registered with it, and the
session shares one localstripe: events of other stacks' and tests' intents
reach this ingress too.  They name no order of this stack (or none at all),
so the worker keeps them (as intents of unknown orders, or unlinked) and
publishes nothing for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from confluent_kafka.admin import AdminClient

from connectors.stripe_gateway import StripeGateway
from streams import access, catalog
from streams.admin import delete_topics, ensure_topics
from streams.devtools.localstripe import LocalStripe
from streams.devtools.worker_process import ROOT, settings_env
from streams.kernel import CallRefused
from streams.settings import Settings
from tables import order_index, order_state, payment_index, payment_state, stripe_intents
from tables.aggregate import Call
from tests.integration.pipeline_support import (
    ORDER_EVENTS,
    DeadLetterReader,
    EventReader,
    RecordingWriter,
    drain,
    free_port,
    group_lag,
    wait_until,
)
from tests.integration.stripe_ingress_support import Record, read_all, signature
from tests.integration.stripe_support import TEST_API_KEY, gateway_settings, localstripe
from tests.integration.worker_process import WorkerProcess

#: The webhook signing secret of every payment test stack (a test value, not a secret).
WEBHOOK_SECRET = "whsec_paystream_payment_tests"
#: localstripe webhook endpoint ids of the stacks: this, then the stack's name.
ENDPOINT_PREFIX = "paystream-payment-tests-"
#: What localstripe sends of the payment flow (it sends nothing else the ingress keeps).
LOCALSTRIPE_EVENTS = ("payment_intent.succeeded", "payment_intent.payment_failed")
PAYMENT_EVENTS = ("payment.intent.created", "payment.completed", "payment.failed",
                  "payment.refunded")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stripe"
CURRENCY = "EUR"
#: How long a worker (re)start may take to serve the API.
SERVE_TIMEOUT = 90.0

__all__ = ["PaymentStack", "localstripe", "payment_stack", "running_stack"]


def source_topics(settings: Settings) -> list[str]:
    """Every Kafka topic the worker's agents read (for :func:`group_lag`)."""
    flows = (order_state.order_flow(int(settings.order_payment_window_seconds * 1000)),
             order_index.USER_ORDERS, order_index.SUBSCRIPTION_ORDERS, payment_state.payment_flow(),
             stripe_intents.STRIPE_INTENTS, payment_index.USER_PAYMENTS)
    return sorted({settings.topic(t) for flow in flows for t in flow.topics})


def stack_settings(kafka_bootstrap: str, registry_url: str, api_base: str, state_dir: Path,
                   name: str, **overrides: Any) -> Settings:
    """Settings of one stack: private topics, group and ports; localstripe as Stripe."""
    prefix = f"t-pay-{name}-{uuid.uuid4().hex[:8]}."
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": kafka_bootstrap, "schema_registry_url": registry_url,
        "topic_prefix": prefix, "app_id": f"{prefix}paystream", "domains": "orders,payments",
        "state_dir": state_dir, "worker_web_port": free_port(), "ingress_port": free_port(),
        "stripe_api_key": TEST_API_KEY, "stripe_api_base": api_base,
        "stripe_webhook_secret": WEBHOOK_SECRET, "stripe_max_network_retries": 2,
        "stripe_timeout_seconds": 10.0,
    }
    values.update(overrides)
    return Settings.from_env(**values)


def create_topics(settings: Settings) -> None:
    """Every catalog and internal topic of ``settings``' deployment, as the worker creates them."""
    prefix = settings.topic_prefix
    ensure_topics(settings.kafka_bootstrap_servers,
                  catalog.topic_settings(name_prefix=prefix) + catalog.internal_topic_settings(prefix))


def drop_topics(settings: Settings) -> None:
    """Delete every topic of ``settings``' deployment: its own copies and the worker's changelogs.

    A stack creates some 170 partitions; a broker holds an open file per
    partition, so stacks that leave theirs behind exhaust its file limit.
    """
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(settings.topic_prefix)]
    delete_topics(settings.kafka_bootstrap_servers, names)


# ----------------------------------------------------------------------
# Stripe events in Stripe's payload shape


def stripe_event(fixture: str, obj: Mapping[str, Any] | None = None, *, event_id: str | None = None,
                 created: int | None = None) -> dict[str, Any]:
    """The event of ``tests/fixtures/stripe/docs_<fixture>.json`` with a fresh id and time.

    ``obj`` replaces fields of ``data.object`` (top level; a nested dict
    replaces the whole field).
    """
    event = json.loads((FIXTURES / f"docs_{fixture}.json").read_text())
    event["id"] = event_id or f"evt_test{uuid.uuid4().hex}"
    event["created"] = int(time.time()) if created is None else created
    event["data"]["object"].update(copy.deepcopy(dict(obj or {})))
    return event


def intent_event(kind: str, intent_id: str, *, amount: int, order_id: str | None, user_id: str | None,
                 created: int | None = None, event_id: str | None = None,
                 **fields: Any) -> dict[str, Any]:
    """A ``payment_intent.<kind>`` event (succeeded, payment_failed, canceled, created)."""
    metadata = {k: v for k, v in (("order_id", order_id), ("user_id", user_id)) if v}
    obj = {"id": intent_id, "amount": amount, "currency": CURRENCY.lower(), "metadata": metadata,
           **fields}
    if kind == "succeeded":
        obj["amount_received"] = amount
    return stripe_event(f"payment_intent_{kind}", obj, event_id=event_id, created=created)


def insufficient_funds_event(intent_id: str, *, amount: int, order_id: str, user_id: str,
                             payment_method: str = "pm_card_visa") -> dict[str, Any]:
    """``payment_intent.payment_failed`` declined for insufficient funds, as Stripe sends it."""
    event = intent_event("payment_failed", intent_id, amount=amount, order_id=order_id, user_id=user_id)
    error = event["data"]["object"]["last_payment_error"]
    error.update({"code": "card_declined", "decline_code": "insufficient_funds",
                  "message": "Your card has insufficient funds."})
    error["payment_method"] = {**error["payment_method"], "id": payment_method}
    event["data"]["object"]["payment_method"] = None  # Stripe clears it after a decline
    return event


def refund_object(refund_id: str, intent_id: str, charge_id: str, amount: int,
                  metadata: Mapping[str, Any]) -> dict[str, Any]:
    """A Refund in Stripe's shape (as inside ``refund.*`` and ``charge.refunded`` events)."""
    refund = stripe_event("refund_updated")["data"]["object"]
    refund.update({"id": refund_id, "payment_intent": intent_id, "charge": charge_id, "amount": amount,
                   "currency": CURRENCY.lower(), "status": "succeeded", "metadata": dict(metadata),
                   "reason": "requested_by_customer"})
    return refund


def encode(event: Mapping[str, Any]) -> bytes:
    """A webhook body as Stripe sends one (pretty-printed JSON)."""
    return json.dumps(event, indent=2).encode()


# ----------------------------------------------------------------------
# The ingress process


class IngressProcess:
    """``paystream ingress`` as a subprocess on ``settings.ingress_port``, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.ingress_port}"
        self.webhook_url = f"{self.url}/webhooks/stripe"
        self.log_path = log_path
        self.env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> IngressProcess:
        """Start it and wait until ``/readyz`` answers 200 (Kafka reachable, topic there)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "ingress"], cwd=ROOT, env=self.env,
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"ingress exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ingress not ready after {timeout}s\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        return process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = []
        return f"--- ingress log ({self.log_path}) ---\n" + "\n".join(text)


# ----------------------------------------------------------------------
# The stack


class PaymentStack:
    """One module's payment deployment (see the module docstring); build it with :meth:`start`."""

    def __init__(self, settings: Settings, localstripe: LocalStripe, state_dir: Path) -> None:
        self.settings = settings
        self.localstripe = localstripe
        self.state_dir = state_dir
        self.endpoint_id = ENDPOINT_PREFIX + settings.topic_prefix.rstrip(".")
        self.worker = WorkerProcess(settings_env(settings), settings.worker_web_port,
                                    state_dir / "worker-state", name="worker")
        self.ingress = IngressProcess(settings, state_dir / "ingress.log")
        self.api = httpx.AsyncClient(base_url=self.worker.url, timeout=30.0,
                                     headers=access.authorization(settings.service_token))
        self.webhooks = httpx.AsyncClient(timeout=30.0)
        self.stripe_http = httpx.AsyncClient(base_url=localstripe.url, timeout=30.0,
                                             headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        self.payer = StripeGateway.from_settings(gateway_settings(localstripe.url))
        self.reader: EventReader | None = None
        self.writer = RecordingWriter(settings)
        self.dead_letters: DeadLetterReader | None = None
        self.topics = source_topics(settings)

    @classmethod
    async def start(cls, kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                    state_dir: Path, name: str, **overrides: Any) -> PaymentStack:
        settings = stack_settings(kafka_bootstrap, registry_url, localstripe.url, state_dir, name,
                                  **overrides)
        stack = cls(settings, localstripe, state_dir)
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        try:
            await loop.run_in_executor(None, create_topics, settings)
            stack.worker.launch()
            await loop.run_in_executor(None, stack.ingress.start)
            localstripe.register_webhook(stack.endpoint_id, stack.ingress.webhook_url, WEBHOOK_SECRET,
                                         events=LOCALSTRIPE_EVENTS)
            stack.reader = EventReader(settings, (*ORDER_EVENTS, *PAYMENT_EVENTS))
            stack.dead_letters = DeadLetterReader(settings)
            await loop.run_in_executor(None, stack.worker.wait_serving, SERVE_TIMEOUT)
        except BaseException:
            await stack.stop()
            raise
        print(f"\npayment stack {name}: worker serving and ingress ready after "
              f"{time.monotonic() - began:.1f}s", flush=True)
        return stack

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # localstripe cannot forget an endpoint: it is narrowed to an event type that
            # does not exist, so nothing goes to this stack's port once it is gone.
            self.localstripe.register_webhook(self.endpoint_id, self.ingress.webhook_url, WEBHOOK_SECRET,
                                              events=["paystream.none"])
        finally:
            for reader in (self.reader, self.dead_letters):
                if reader is not None:
                    reader.close()
            await self.api.aclose()
            await self.webhooks.aclose()
            await self.stripe_http.aclose()
            await self.payer.close()
            # The stack's state is thrown away with it: the worker is SIGKILLed rather
            # than given the seconds a graceful stop takes.
            await asyncio.gather(loop.run_in_executor(None, self.ingress.stop),
                                 loop.run_in_executor(None, self.worker.kill))
            try:
                if not os.environ.get("PAYSTREAM_KEEP_TEST_TOPICS"):  # kept to look into a failure
                    await loop.run_in_executor(None, drop_topics, self.settings)
            except Exception as exc:  # a broker that is down (a test stopped it) keeps them
                print(f"topics {self.settings.topic_prefix}* not dropped: {exc!r}", flush=True)

    # -- the order side ------------------------------------------------

    async def create_order(self, user_id: str, amount: int, **body: Any) -> dict[str, Any]:
        """POST /orders: one item of ``amount`` cents; the order as answered (201)."""
        payload = {"user_id": user_id, "order_type": "ONE_TIME", "currency": CURRENCY,
                   "items": [{"product_id": "sku-pay", "quantity": 1, "unit_amount": amount}], **body}
        answer = await self.api.post("/orders", json=payload,
                                     headers={"Idempotency-Key": uuid.uuid4().hex})
        assert answer.status_code == 201, answer.text
        return answer.json()

    async def open_payment(self, user_id: str, amount: int) -> tuple[dict[str, Any], str]:
        """An order whose PaymentIntent is open: (the order, the intent id) once PAYMENT_PENDING."""
        order = await self.create_order(user_id, amount)
        [created] = await self.events_of("payment.intent.created", order_id=order["order_id"])
        await self.events_of("order.payment_pending", order_id=order["order_id"])
        return order, created["payment_intent_id"]

    async def paid_order(self, user_id: str, amount: int) -> tuple[dict[str, Any], str]:
        """An order paid with ``pm_card_visa``: (the order, the intent id) once COMPLETED."""
        order, intent_id = await self.open_payment(user_id, amount)
        confirmed = await self.confirm(intent_id, "pm_card_visa")
        assert not isinstance(confirmed, CallRefused), confirmed
        await self.events_of("order.completed", order_id=order["order_id"])
        return order, intent_id

    async def read(self, path: str, timeout: float = 60.0) -> dict[str, Any]:
        """GET ``path`` as a careful client does: a 503 (no worker owns the key
        yet, as while partitions move after a broker outage) is retried after its
        ``Retry-After``; any other answer but 200 fails the test."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await self.api.get(path)
            if answer.status_code != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(min(float(answer.headers.get("Retry-After") or 1), 2.0))
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def order(self, order_id: str) -> dict[str, Any]:
        return await self.read(f"/orders/{order_id}")

    async def payment(self, intent_id: str) -> dict[str, Any]:
        return await self.read(f"/payments/{intent_id}")

    async def order_payment(self, order_id: str) -> dict[str, Any]:
        return await self.read(f"/orders/{order_id}/payment")

    async def refund(self, intent_id: str, key: str | None, **body: Any) -> httpx.Response:
        headers = {"Idempotency-Key": key} if key is not None else {}
        return await self.api.post(f"/payments/{intent_id}/refunds", json=body, headers=headers)

    async def wait_status(self, order_id: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
        """The order's row once GET /orders/{id} shows ``status``."""
        async def reached() -> dict[str, Any] | None:
            row = await self.order(order_id)
            return row if row["status"] == status else None

        return await wait_until(reached, timeout=timeout, what=f"order {order_id} {status}")

    # -- the Stripe side -----------------------------------------------

    async def confirm(self, intent_id: str, payment_method: str) -> dict[str, Any] | CallRefused:
        """The payer confirms the intent on localstripe with a test card; a decline is returned."""
        call = Call("stripe", "confirm_payment_intent",
                    {"payment_intent_id": intent_id, "payment_method": payment_method},
                    f"test-payer-{uuid.uuid4().hex}")
        try:
            return await self.payer.call(call)
        except CallRefused as refused:
            return refused

    async def stripe_get(self, path: str, **params: Any) -> Any:
        answer = await self.stripe_http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def stripe_intent(self, intent_id: str) -> dict[str, Any]:
        return await self.stripe_get(f"/v1/payment_intents/{intent_id}")

    async def stripe_refunds(self, intent_id: str) -> list[dict[str, Any]]:
        """Every refund localstripe holds for the intent.

        Listed whole and filtered here: localstripe's ``?payment_intent=``
        filter answers 500 for an intent that has no charge yet.
        """
        listed = (await self.stripe_get("/v1/refunds", limit=100000))["data"]
        return [r for r in listed if r.get("payment_intent") == intent_id]

    async def stripe_intents_by_order(self, order_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """order id -> the PaymentIntents localstripe holds with that ``metadata.order_id``.

        localstripe's list takes no metadata filter (Stripe's search API is
        not there either): every intent is listed and filtered here.
        """
        wanted = set(order_ids)
        listed = (await self.stripe_get("/v1/payment_intents", limit=100000))["data"]
        found: dict[str, list[dict[str, Any]]] = {o: [] for o in wanted}
        for intent in listed:
            order_id = (intent.get("metadata") or {}).get("order_id")
            if order_id in wanted:
                found[order_id].append(intent)
        return found

    # -- webhooks ------------------------------------------------------

    async def post_webhook(self, body: bytes | Mapping[str, Any], secret: str = WEBHOOK_SECRET
                           ) -> httpx.Response:
        """POST ``body`` to the ingress, signed now with ``secret`` as Stripe signs."""
        raw = body if isinstance(body, bytes) else encode(body)
        return await self.webhooks.post(self.ingress.webhook_url, content=raw, headers={
            "Stripe-Signature": signature(raw, secret), "Content-Type": "application/json"})

    async def deliver(self, body: bytes | Mapping[str, Any]) -> None:
        """Post a webhook and require the ingress' 200 (stored on stripe.events)."""
        answer = await self.post_webhook(body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"received": True}, answer.text

    async def stripe_records(self) -> list[Record]:
        """Every record on this stack's stripe.events topic."""
        topic = self.settings.topic(catalog.STRIPE_EVENTS)
        return await asyncio.get_running_loop().run_in_executor(
            None, read_all, self.settings.kafka_bootstrap_servers, topic)

    async def intent_row(self, intent_id: str) -> dict[str, Any] | None:
        """The intent index's row for ``intent_id``, as its changelog holds it last."""
        topic = f"{self.settings.app_id}-{stripe_intents.STRIPE_INTENTS.name}-changelog"
        records = await asyncio.get_running_loop().run_in_executor(
            None, read_all, self.settings.kafka_bootstrap_servers, topic)
        rows = [r.value for r in records if r.key == intent_id.encode()]
        return json.loads(rows[-1]) if rows else None

    # -- the topics ----------------------------------------------------

    async def events_of(self, topic: str, count: int = 1, timeout: float = 45.0,
                        **match: Any) -> list[dict[str, Any]]:
        assert self.reader is not None
        return await self.reader.wait_for(topic, count, timeout, **match)

    def events(self, topic: str, **match: Any) -> list[dict[str, Any]]:
        assert self.reader is not None
        return self.reader.events(topic, **match)

    def history(self, order_id: str) -> list[str]:
        """Event types of ``order_id`` read so far (order across topics is not defined)."""
        assert self.reader is not None
        return [e["event_type"] for e in self.reader.seen if e.get("order_id") == order_id]

    def lag(self) -> list[str]:
        return group_lag(self.settings.kafka_bootstrap_servers, self.settings.app_id, self.topics)

    async def settle(self, timeout: float = 45.0, rounds: int = 2) -> None:
        """The worker consumed every record of its source topics (``rounds`` times in a row), and
        the readers read every event and dead letter written so far."""
        loop = asyncio.get_running_loop()
        for _ in range(rounds):
            deadline = time.monotonic() + timeout
            while lagging := await loop.run_in_executor(None, self.lag):
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker did not consume within {timeout}s: {lagging}\n"
                                         f"{self.worker.log_tail()}")
                await asyncio.sleep(0.3)
        assert self.reader is not None and self.dead_letters is not None
        await drain(self.reader)
        await self.dead_letters.drain()

    def dead_letters_of(self, key: bytes) -> list[Any]:
        assert self.dead_letters is not None
        return [d for d in self.dead_letters.seen if d.key == key]


@contextlib.asynccontextmanager
async def running_stack(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                        state_dir: Path, name: str, **overrides: Any) -> AsyncIterator[PaymentStack]:
    """A started :class:`PaymentStack`, stopped on leaving the block."""
    stack = await PaymentStack.start(kafka_bootstrap, registry_url, localstripe, state_dir, name,
                                     **overrides)
    try:
        yield stack
    finally:
        await stack.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def payment_stack(kafka_bootstrap: str, registry_url: str, localstripe: LocalStripe,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PaymentStack]:
    """One :class:`PaymentStack` for the session's payment tests that leave the worker running.

    A start costs 15-25 s on a busy machine, so the flow, refund and bad
    input modules share one; their tests keep apart by their own users,
    orders and intents, and run in the session's event loop
    (``pytest.mark.asyncio(loop_scope="session")``).  A test that kills the
    worker starts a stack of its own with :func:`running_stack`.
    """
    async with running_stack(kafka_bootstrap, registry_url, localstripe,
                             tmp_path_factory.mktemp("payments"), "shared") as stack:
        yield stack
